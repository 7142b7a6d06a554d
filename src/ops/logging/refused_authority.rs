//! A greeter warning for calls h2 refuses before greeter sees them: an `:authority` that is not a
//! valid URI authority (hyperium/h2#487).
//!
//! grpcio sends the socket path for `unix:` targets and the joined list for `ipv4:a,b,c` targets;
//! h2 resets such a stream with PROTOCOL_ERROR while decoding its headers, so neither hyper nor
//! any layer of greeter gets a request, and the client only sees INTERNAL. The one trace is a
//! DEBUG event of `h2::server`; this layer, filtered to that target alone, turns it into a WARN
//! that says what the client must change. At most one a minute: a client retrying in a loop must
//! not flood the log.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    Layer,
    filter::{Filtered, Targets},
    layer::Context,
};

/// h2's message for the case, as in h2 0.4's `server.rs`.
const MALFORMED_AUTHORITY: &str = "malformed headers: malformed authority";
/// Seconds between two warnings.
const QUIET_SECONDS: u64 = 60;

/// The layer, with the filter that lets exactly h2's server events through to it.
pub fn layer<S>() -> Filtered<RefusedAuthority, Targets, S>
where
    S: Subscriber,
{
    RefusedAuthority::default().with_filter(Targets::new().with_target("h2::server", Level::DEBUG))
}

#[derive(Debug, Default)]
pub struct RefusedAuthority {
    /// When the last warning was logged, in seconds since the epoch.
    last: AtomicU64,
}

impl<S: Subscriber> Layer<S> for RefusedAuthority {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut message = Message(None);
        event.record(&mut message);
        let Some(h2) = message
            .0
            .as_deref()
            .filter(|text| text.starts_with(MALFORMED_AUTHORITY))
        else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if (last != 0 && now < last + QUIET_SECONDS)
            || self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        tracing::warn!(
            target: "greeter::server",
            h2,
            "a call was refused before reaching greeter: its :authority is not a valid HTTP/2 \
             authority (hyperium/h2#487), and the client got INTERNAL. grpcio sends the socket \
             path for unix: targets and the address list for ipv4:a,b targets: set the channel \
             option grpc.default_authority (e.g. \"localhost\"). Logged at most once a minute."
        );
    }
}

/// The `message` field of an event, as text.
struct Message(Option<String>);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::{Registry, layer::SubscriberExt as _};

    use super::*;

    /// h2's DEBUG event for a refused stream, as h2 0.4 words it.
    fn h2_refuses(authority: &str) {
        tracing::debug!(
            target: "h2::server",
            "{MALFORMED_AUTHORITY} ({authority:?}): invalid uri character"
        );
    }

    /// When the layer last warned after `events` ran: the warning itself cannot be seen here, as
    /// tracing drops events logged while a scoped subscriber handles one (the server's global
    /// one takes them; tests/it/observability.rs reads them there).
    fn last_warned(layer: impl Layer<Registry> + Send + Sync, events: impl FnOnce()) -> u64 {
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        tracing::dispatcher::with_default(&dispatch, events);
        let layer = dispatch
            .downcast_ref::<RefusedAuthority>()
            .expect("the layer");
        layer.last.load(Ordering::Relaxed)
    }

    #[test]
    fn only_h2_refusing_a_malformed_authority_is_warned_about() {
        let unrelated = || {
            tracing::debug!(target: "h2::server", "malformed headers: missing :path");
            tracing::debug!(target: "h2::client", "{MALFORMED_AUTHORITY} (\"x\")");
        };
        assert_eq!(last_warned(layer(), unrelated), 0);
        assert_ne!(last_warned(layer(), || h2_refuses("/run/greeter.sock")), 0);
    }

    #[test]
    fn the_next_warning_comes_a_minute_after_the_last() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (ago, warned) in [
            (QUIET_SECONDS / 2, false),
            (QUIET_SECONDS, true),
            (3600, true),
        ] {
            let refused = RefusedAuthority {
                last: AtomicU64::new(now - ago),
            };
            let last = last_warned(refused, || h2_refuses("/run/greeter.sock"));
            assert_eq!(last >= now, warned, "{ago} s after the last warning");
        }
    }
}
