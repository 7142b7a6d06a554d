//! The access line, written straight to the server's log writer.
//!
//! One line per call is the log's whole cost at INFO, and as a tracing event it went through the
//! dispatcher, the per-layer filter, the formatting layer's buffers and a dynamic `Visit` call
//! per field: ~4,300 instructions a call, most of a call's observability (BENCHMARKS.md). The
//! line's shape is fixed, so where the server logs JSON lines through its own writer this writes
//! the same bytes (members in the same order, the same escaping, timestamp and numbers) without
//! the machinery. Everything else, and the access line in text format, still goes through
//! tracing.
//!
//! What stays tracing's: whether the line is written at all. `call::observe` asks the
//! subscriber (`tracing::enabled!` on [`TARGET`]) when the server is built, so `log.filter` and
//! `RUST_LOG` switch it off as before.

use std::{cell::RefCell, sync::OnceLock};

use tracing::Level;

use super::{
    batch::BatchWriter,
    json::{write_millis, write_string, write_timestamp},
};

/// The writer access lines go to directly: set once the server's subscriber writes JSON lines
/// through it, never otherwise (text format, client commands, tests with their own subscriber).
static DIRECT: OnceLock<BatchWriter> = OnceLock::new();

/// Sends access lines straight to `writer` from now on.
pub(super) fn write_directly_to(writer: BatchWriter) {
    let _ = DIRECT.set(writer);
}

/// A finished call, as its access line reports it. `None` members are left out of the line, as
/// tracing leaves out an event's `None` fields.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub level: Level,
    pub method: &'a str,
    /// `method` is a path the server serves, from its own tables: written without the escaping
    /// scan. False for a client's unknown path, which may hold anything.
    pub served: bool,
    /// Digits, dots, colons, brackets, `%` and `unix:uid=..,pid=..`: written without the escaping
    /// scan.
    pub peer: Option<&'a str>,
    /// A name from a fixed set ([`Caller::class`](crate::call::auth::Caller::class)): written
    /// without the escaping scan, as are `level` and `code`.
    pub auth: &'static str,
    pub identity: Option<&'a str>,
    /// The status code's name (`OK`, `NOT_FOUND`, ...).
    pub code: &'static str,
    /// The call's duration, written as milliseconds (`duration_ms`, up to three decimals).
    pub duration_us: u64,
    pub request_id: &'a str,
    /// 32 hex digits: written without the escaping scan.
    pub trace_id: Option<&'a str>,
    pub fault: Option<&'a str>,
    pub refused: Option<&'a str>,
}

/// The line's `message`.
const MESSAGE: &str = "call finished";

/// The access line's target: `greeter::access=off` in `log.filter` switches it off.
pub const TARGET: &str = "greeter::access";

impl AccessLine<'_> {
    /// Logs the line: straight to the server's writer where there is one, else as a tracing
    /// event. Either way outside any span: `call::observe` finishes a call's record after leaving
    /// the call's span, so the event's line has no span fields for the direct one to miss.
    pub fn log(&self) {
        if !self.write_directly() {
            self.event();
        }
    }

    /// The line as a tracing event, which the subscriber filters and formats like any other.
    fn event(&self) {
        // Every value is a `str` or a number: `fmt` (Display, Debug) would cost more than the
        // rest of the line.
        macro_rules! access {
            ($level:expr) => {
                tracing::event!(
                    target: TARGET,
                    $level,
                    method = self.method,
                    peer = self.peer,
                    auth = self.auth,
                    identity = self.identity,
                    code = self.code,
                    duration_ms = self.duration_us as f64 / 1000.0,
                    request_id = self.request_id,
                    trace_id = self.trace_id,
                    fault = self.fault,
                    refused = self.refused,
                    // A `str` field, not a format string: formatting `"call finished"` through
                    // `fmt::Arguments` cost ~700 instructions a call. The line is the same.
                    message = MESSAGE,
                )
            };
        }
        if self.level == Level::DEBUG {
            access!(Level::DEBUG);
        } else {
            access!(Level::INFO);
        }
    }

    /// Writes the line to the server's writer, unless the server has none for direct lines:
    /// true when it was written (or dropped because the writer's buffer was full, and counted).
    fn write_directly(&self) -> bool {
        let Some(writer) = DIRECT.get() else {
            return false;
        };
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                self.format(&mut line);
                writer.append(line.as_bytes());
                // A huge unknown path must not pin its size in every thread for good.
                if line.capacity() > 64 * 1024 {
                    *line = String::with_capacity(512);
                }
            }
            Err(_) => {
                let mut line = String::new();
                self.format(&mut line);
                writer.append(line.as_bytes());
            }
        });
        true
    }

    /// The line as `json::JsonLines` formats the event, byte for byte.
    fn format(&self, line: &mut String) {
        line.push_str("{\"timestamp\":\"");
        // Writing to a `String` cannot fail.
        let _ = write_timestamp(line, std::time::SystemTime::now());
        line.push_str("\",\"level\":\"");
        line.push_str(self.level.as_str());
        line.push_str("\",\"method\":");
        string(line, self.method, !self.served);
        member(line, "peer", self.peer, false);
        line.push_str(",\"auth\":");
        plain(line, self.auth);
        member(line, "identity", self.identity, true);
        line.push_str(",\"code\":");
        plain(line, self.code);
        line.push_str(",\"duration_ms\":");
        let _ = write_millis(line, self.duration_us);
        line.push_str(",\"request_id\":");
        let _ = write_string(line, self.request_id);
        member(line, "trace_id", self.trace_id, false);
        member(line, "fault", self.fault, true);
        member(line, "refused", self.refused, true);
        line.push_str(",\"message\":\"");
        line.push_str(MESSAGE);
        line.push_str("\",\"target\":\"");
        line.push_str(TARGET);
        line.push_str("\"}\n");
    }
}

/// `value` as a JSON string, for values of the server's own making that need no escaping
/// (`AccessLine`'s test compares the line with the tracing event's, which escapes everything).
fn plain(line: &mut String, value: &str) {
    line.push('"');
    line.push_str(value);
    line.push('"');
}

/// `value` as a JSON string: escaped, or as it is where it is the server's own (see [`plain`]).
fn string(line: &mut String, value: &str, escape: bool) {
    if escape {
        let _ = write_string(line, value);
    } else {
        plain(line, value);
    }
}

/// `,"name":"value"`, or nothing for `None`.
fn member(line: &mut String, name: &str, value: Option<&str>, escape: bool) {
    if let Some(value) = value {
        line.push_str(",\"");
        line.push_str(name);
        line.push_str("\":");
        string(line, value, escape);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::logging::json::tests::capture_text;

    /// The line as the event logged where nothing is written directly.
    fn as_event(line: &AccessLine<'_>) -> String {
        capture_text(|| line.event())
    }

    /// Everything but the timestamp, which differs between two lines.
    fn without_timestamp(line: &str) -> &str {
        let at = line.find("\",\"level\"").expect("a timestamp first");
        &line[at..]
    }

    #[test]
    fn direct_lines_are_the_events_lines_byte_for_byte() {
        let full = AccessLine {
            level: Level::INFO,
            method: "/helloworld.Greeter/SayHello",
            served: true,
            peer: Some("127.0.0.1:4242"),
            auth: "jwt",
            identity: Some("spiffe://example.org/\"quoted\"\\\n"),
            code: "PERMISSION_DENIED",
            duration_us: 12_345,
            request_id: "0123456789abcdef0123456789abcdef",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            fault: Some("delay"),
            refused: Some("scope"),
        };
        let bare = AccessLine {
            peer: None,
            identity: None,
            trace_id: None,
            fault: None,
            refused: None,
            duration_us: 1,
            auth: "none",
            code: "OK",
            ..full
        };
        let unknown = AccessLine {
            method: "/\"odd\\path\u{1}",
            served: false,
            peer: Some("[::1%3]:4242"),
            ..bare
        };
        for line in [full, bare, unknown] {
            let mut direct = String::new();
            line.format(&mut direct);
            let event = as_event(&line);
            assert_eq!(without_timestamp(&direct), without_timestamp(&event));
            assert!(direct.starts_with("{\"timestamp\":\"20"), "{direct}");
            serde_json::from_str::<serde_json::Value>(direct.trim_end()).unwrap();
        }
    }

    #[test]
    fn the_names_written_plainly_need_no_escaping() {
        use crate::{call::auth::Caller, ops::metrics::grpc::CODE_NAMES};
        let name: std::sync::Arc<str> = "n".into();
        let callers = [
            Caller::Anonymous,
            Caller::Token(name.clone()),
            Caller::Jwt {
                subject: name.clone(),
                issuer: name,
            },
            Caller::ClientCert("c".into()),
        ];
        for written in CODE_NAMES
            .iter()
            .copied()
            .chain(callers.iter().map(Caller::class))
        {
            let (mut plainly, mut escaped) = (String::new(), String::new());
            plain(&mut plainly, written);
            write_string(&mut escaped, written).unwrap();
            assert_eq!(plainly, escaped);
        }
    }

    #[test]
    fn levels_are_written_as_tracing_names_them() {
        let mut line = String::new();
        AccessLine {
            level: Level::DEBUG,
            method: "/grpc.health.v1.Health/Check",
            served: true,
            peer: None,
            auth: "none",
            identity: None,
            code: "OK",
            duration_us: 500,
            request_id: "r",
            trace_id: None,
            fault: None,
            refused: None,
        }
        .format(&mut line);
        let json: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(json["level"], "DEBUG");
        assert_eq!(json["target"], "greeter::access");
        assert_eq!(json["message"], "call finished");
        assert!(line.ends_with("}\n"));
    }
}
