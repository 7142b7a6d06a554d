//! The tracing subscriber: one place decides the format and the filter.
//!
//! What operators get, besides the server's own events:
//! - one line per finished call under the target `greeter::access` (written by `call::observe`),
//!   at INFO (health checks at DEBUG): method, peer, auth (`token`, `client_cert`, `none`) and
//!   identity, code, duration_ms, request_id. Switch it off with `greeter::access=off` in
//!   `log.filter` or `RUST_LOG`;
//! - with `greeter::request=debug`, the call's `grpc` span on every line logged while a call runs,
//!   holding its `request_id` (in JSON: `"span": {"request_id": ..., "name": "grpc"}`); off at
//!   `info`, where the only line a call logs is its access line.
//!
//! JSON lines are formatted by [`json`], which keeps tracing-subscriber's JSON shape at a fraction
//! of its cost per line.

mod json;
mod refused_authority;

use std::io::IsTerminal as _;

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer, fmt, fmt::MakeWriter, layer::SubscriberExt as _, registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use crate::config::{LogConfig, LogFormat, Problem, Section};

impl Section for LogConfig {
    /// `log.filter` parses as the subscriber will parse it.
    fn check(&self) -> Result<(), Problem> {
        match EnvFilter::builder().parse(&self.filter) {
            Ok(_) => Ok(()),
            Err(e) => Err(Problem {
                key: "log.filter",
                message: format!("not a valid log filter: {e}"),
            }),
        }
    }
}

/// Installs the global subscriber, writing to stderr (stdout is for command output).
///
/// `RUST_LOG`, when set, wins over `filter` so an operator can raise verbosity without editing
/// config. `Auto` picks text for a person at a terminal and JSON lines for log collectors. The
/// filter applies to the lines written; h2's refusals of malformed authorities reach
/// [`refused_authority`] whatever it says.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests in one process) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::registry()
        .with(layer(format, std::io::stderr).with_filter(filter))
        .with(refused_authority::layer())
        .try_init();
}

/// The formatting layer, writing to `writer`: JSON lines with the event's fields at the top level,
/// or text (coloured when stderr is a terminal). Public so that benchmarks format exactly as the
/// server does.
pub fn layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let layer = fmt::layer().with_writer(writer);
    if json {
        layer
            .fmt_fields(json::JsonSpanFields)
            .event_format(json::JsonLines)
            .boxed()
    } else {
        layer.with_ansi(terminal).boxed()
    }
}
