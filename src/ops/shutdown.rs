//! Process signals that stop the server.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM (Kubernetes, `podman stop`) and SIGINT (Ctrl-C) handlers.
///
/// Installed before the server binds: a signal that arrives between "serving" and the first poll
/// of the shutdown future would otherwise take the default action and kill the process mid-call.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first signal and names it. A second signal while draining means the operator
    /// wants out now: the process exits at once with the conventional 128 + signal number.
    pub async fn first(mut self) -> &'static str {
        let first = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tokio::spawn(async move {
            let code = tokio::select! {
                _ = self.term.recv() => 128 + 15,
                _ = self.int.recv() => 128 + 2,
            };
            tracing::warn!("second signal while draining: exiting now");
            std::process::exit(code);
        });
        first
    }
}
