//! Process signals that stop the server.

use tokio::signal::unix::{SignalKind, signal};

/// Waits for SIGTERM (Kubernetes, `podman stop`) or SIGINT (Ctrl-C) and names the one received.
///
/// A second signal while draining means the operator wants out now: the process exits at once with
/// the conventional 128 + signal number.
pub async fn terminate() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let first = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = term.recv() => 128 + 15,
            _ = int.recv() => 128 + 2,
        };
        tracing::warn!("second signal while draining: exiting now");
        std::process::exit(code);
    });
    first
}
