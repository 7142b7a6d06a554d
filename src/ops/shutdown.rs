//! Stopping: the process signals that start it, and the drain that bounds it.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::config::ShutdownConfig;

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

/// The drain, once the shutdown began: `not_serving` takes the server out of rotation (health
/// NOT_SERVING), calls are still answered for `shutdown.delay` while load balancers notice, then
/// `draining` closes the listeners, sends GOAWAY and ends server streams, and open calls get up
/// to `shutdown.grace` to finish in `connections` before this returns regardless.
pub async fn drain(
    config: &ShutdownConfig,
    not_serving: impl FnOnce(),
    draining: &CancellationToken,
    connections: &TaskTracker,
) {
    not_serving();
    info!(
        delay = %humantime::format_duration(config.delay),
        "shutting down: health NOT_SERVING"
    );
    tokio::time::sleep(config.delay).await;
    info!(
        connections = connections.len(),
        "closing listeners; draining open calls"
    );
    draining.cancel();
    connections.close();
    if tokio::time::timeout(config.grace, connections.wait())
        .await
        .is_ok()
    {
        info!("all calls finished; stopped");
    } else {
        warn!(
            grace = %humantime::format_duration(config.grace),
            "shutdown grace expired; abandoning the calls still open"
        );
    }
}
