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
//! JSON lines are formatted by `json`, which keeps tracing-subscriber's JSON shape at a fraction
//! of its cost per line; the access line, one per call, is written by `access` without going
//! through tracing's dispatch at all (the same bytes).

pub mod access;
mod batch;
mod json;
mod refused_authority;

use std::{io::IsTerminal as _, sync::OnceLock};

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

/// The server's writer, once its subscriber is installed: for its count of dropped lines.
static WRITER: OnceLock<batch::BatchWriter> = OnceLock::new();

/// Lines dropped because the writer's buffer was full (`greeter_log_lines_dropped_total`).
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, batch::BatchWriter::dropped)
}

/// Keeps the writer thread of [`init`] alive; dropping it writes out every queued line, so hold
/// it until the last line that matters (the drain's) has been logged.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<batch::WriterGuard>,
}

/// Installs the server's global subscriber: lines are formatted on the thread that logs them and
/// appended to a bounded buffer that a writer thread writes to stderr in batches (`batch.rs`).
/// A call never waits for stderr (a full buffer drops the line and counts it), and the access log
/// costs no system call per call.
///
/// `RUST_LOG`, when set, wins over `filter` so an operator can raise verbosity without editing
/// config. `Auto` picks text for a person at a terminal and JSON lines for log collectors. The
/// filter applies to the lines written; h2's refusals of malformed authorities reach
/// `refused_authority` whatever it says.
pub fn init(filter: &str, format: LogFormat) -> LogGuard {
    let Ok((writer, guard)) = batch::spawn(std::io::stderr()) else {
        // No thread to write for us: write directly rather than not at all.
        install(filter, format, std::io::stderr);
        return LogGuard { _writer: None };
    };
    if install(filter, format, writer.clone()) {
        if writes_json(format) {
            access::write_directly_to(writer.clone());
        }
        let _ = WRITER.set(writer);
        LogGuard {
            _writer: Some(guard),
        }
    } else {
        LogGuard { _writer: None }
    }
}

/// Installs a global subscriber writing straight to stderr: for the client commands, whose few
/// lines must be out before the process exits.
pub fn init_direct(filter: &str, format: LogFormat) {
    install(filter, format, std::io::stderr);
}

/// Installs the subscriber; false when one already is (tests in one process keep the first).
fn install<W>(filter: &str, format: LogFormat, writer: W) -> bool
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(layer(format, writer).with_filter(filter))
        .with(refused_authority::layer())
        .try_init()
        .is_ok()
}

/// The formatting layer, writing to `writer`: JSON lines with the event's fields at the top level,
/// or text (coloured when stderr is a terminal). Public so that benchmarks format exactly as the
/// server does.
pub fn layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let layer = fmt::layer().with_writer(writer);
    if writes_json(format) {
        layer
            .fmt_fields(json::JsonSpanFields)
            .event_format(json::JsonLines)
            .boxed()
    } else {
        layer.with_ansi(std::io::stderr().is_terminal()).boxed()
    }
}

/// Whether lines are JSON: `Auto` picks text for a person at a terminal.
fn writes_json(format: LogFormat) -> bool {
    match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    }
}
