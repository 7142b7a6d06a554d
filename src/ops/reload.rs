//! Re-reading files that rotate under a running server: certificates, keys, CA bundles, tokens.
//!
//! Polls the files' contents rather than watching inodes: Kubernetes updates Secret volumes by
//! swapping a `..data` symlink, which inotify on the file path misses, while reading through the
//! path always sees what a new open would. The files are small; a read every few seconds costs
//! nothing. SIGHUP forces a reload at once.

use std::{path::PathBuf, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::ops::metrics::{ReloadOutcome, ReloadOutcomes};

/// Sends a tick on every SIGHUP the process receives.
pub fn hangups() -> watch::Receiver<()> {
    let (tx, rx) = watch::channel(());
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    info!("SIGHUP: reloading certificates and tokens");
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            });
        }
        Err(e) => error!("cannot install a SIGHUP handler; files still reload on change: {e}"),
    }
    rx
}

/// The files a reloader watches, with a digest of each one's content (`None`: unreadable) to
/// notice any change. Taken before the files are first loaded, so a change that lands between
/// that load and the reloader's start is still a change.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    paths: Vec<PathBuf>,
    seen: Vec<Option<ring::digest::Digest>>,
}

impl Watched {
    pub fn now(paths: Vec<PathBuf>) -> Self {
        let seen = Self::digests(&paths);
        Self { paths, seen }
    }

    fn digests(paths: &[PathBuf]) -> Vec<Option<ring::digest::Digest>> {
        paths
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .ok()
                    .map(|bytes| ring::digest::digest(&ring::digest::SHA256, &bytes))
            })
            .collect()
    }

    /// Reads the files again: whether any differs from when they were last read.
    fn changed(&mut self) -> bool {
        let now = Self::digests(&self.paths);
        let same = now.len() == self.seen.len()
            && now.iter().zip(&self.seen).all(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => x.as_ref() == y.as_ref(),
                (None, None) => true,
                _ => false,
            });
        self.seen = now;
        !same
    }
}

/// What starts a reload besides a change (SIGHUP), and what ends the reloaders.
#[derive(Clone)]
pub struct Triggers {
    pub hangups: watch::Receiver<()>,
    pub stop: CancellationToken,
}

/// What a reload installed.
#[derive(Debug)]
pub enum Reloaded {
    /// The new version of the files, described.
    Loaded(String),
    /// Nothing: the file is gone, and what it granted is revoked (fail closed), described.
    Revoked(String),
}

/// Calls `reload` whenever the content of the `files` changes (checked every `interval`) or
/// SIGHUP arrives, until `stop`. `reload` builds and installs the new state, or returns why it cannot:
/// the old state then stays in force and the failure is logged and counted in `outcomes` once
/// per distinct content, so an alert on failures fires on a bad rotation, not on every poll. A
/// revocation is logged as an error and counted too.
pub fn spawn<E, F>(
    what: &'static str,
    mut files: Watched,
    interval: Duration,
    Triggers { hangups, stop }: Triggers,
    outcomes: ReloadOutcomes,
    mut reload: F,
) where
    E: std::fmt::Display,
    F: FnMut() -> Result<Reloaded, E> + Send + 'static,
{
    let mut hangups = Some(hangups);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => false,
                changed = next_hangup(&mut hangups) => {
                    if changed.is_err() {
                        // No more SIGHUPs can come; keep polling.
                        hangups = None;
                        continue;
                    }
                    true
                }
            };
            if !files.changed() && !forced {
                continue;
            }
            match reload() {
                Ok(Reloaded::Loaded(summary)) => {
                    outcomes.record(ReloadOutcome::Success);
                    info!(what, %summary, "reloaded");
                }
                Ok(Reloaded::Revoked(summary)) => {
                    outcomes.record(ReloadOutcome::Revoked);
                    error!(what, "file gone, revoked: {summary}");
                }
                Err(e) => {
                    outcomes.record(ReloadOutcome::Failure);
                    error!(what, "reload refused, previous version stays in force: {e}");
                }
            }
        }
    });
}

async fn next_hangup(
    hangups: &mut Option<watch::Receiver<()>>,
) -> Result<(), watch::error::RecvError> {
    match hangups {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_new_content_or_a_file_appearing_or_going() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let mut watched = Watched::now(vec![path.clone()]);
        assert!(!watched.changed(), "missing, and still missing");
        std::fs::write(&path, "a").unwrap();
        assert!(watched.changed(), "appeared");
        assert!(!watched.changed());
        std::fs::write(&path, "b").unwrap();
        assert!(watched.changed(), "new content");
        std::fs::write(&path, "b").unwrap();
        assert!(!watched.changed(), "rewritten, same content");
        std::fs::remove_file(&path).unwrap();
        assert!(watched.changed(), "gone");
        assert!(!watched.changed());
    }
}
