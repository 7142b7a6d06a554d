//! The Unix domain socket file: created with its mode already set, a stale one replaced, and
//! removed when the server stops.
//!
//! Who may connect is decided by the file's permission bits, so there must be no moment when the
//! socket exists with the process umask's looser mode: the socket is bound under a temporary name,
//! given its mode, then renamed into place (a rename is atomic, and replaces a stale socket left
//! by a crashed server in the same step).

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

/// Why the socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: another server is listening on it")]
    InUse { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound socket file; dropping it removes the file, unless another server has replaced it since.
#[derive(Debug)]
pub struct UnixSocket {
    path: PathBuf,
    inode: u64,
}

impl UnixSocket {
    /// Binds `path` with permission bits `mode`. Must run inside a tokio runtime.
    pub fn bind(path: &Path, mode: u32) -> Result<(Self, UnixListener), UnixSocketError> {
        let io = |source| UnixSocketError::Io {
            path: path.to_owned(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UnixSocketError::NotASocket {
                    path: path.to_owned(),
                });
            }
            // A socket someone answers on belongs to a running server; one nobody answers on is
            // left over from a server that did not stop cleanly.
            Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
                return Err(UnixSocketError::InUse {
                    path: path.to_owned(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let temporary = temporary_name(path);
        let _ = fs::remove_file(&temporary);
        let listener = std::os::unix::net::UnixListener::bind(&temporary).map_err(io)?;
        let placed = fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
            .and_then(|()| fs::rename(&temporary, path))
            .and_then(|()| fs::symlink_metadata(path));
        let meta = match placed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = fs::remove_file(&temporary);
                return Err(io(e));
            }
        };
        listener.set_nonblocking(true).map_err(io)?;
        let listener = UnixListener::from_std(listener).map_err(io)?;
        let socket = Self {
            path: path.to_owned(),
            inode: meta.ino(),
        };
        Ok((socket, listener))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `dir/.name.PID.tmp`: beside the final path (a rename cannot cross file systems), hidden, and
/// distinct per process.
fn temporary_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_gets_its_mode_replaces_a_stale_one_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greeter.sock");

        // A stale socket: bound, then its listener closed without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (socket, listener) = UnixSocket::bind(&path, 0o640).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );

        // A live one is refused, and left alone.
        let err = UnixSocket::bind(&path, 0o600).unwrap_err();
        assert!(matches!(err, UnixSocketError::InUse { .. }), "{err}");
        assert!(path.exists());

        drop(listener);
        drop(socket);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greeter.sock");
        fs::write(&path, "data").unwrap();
        let err = UnixSocket::bind(&path, 0o600).unwrap_err();
        assert!(matches!(err, UnixSocketError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");
    }

    #[tokio::test]
    async fn a_replaced_socket_is_not_removed_by_the_old_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greeter.sock");
        let (old, old_listener) = UnixSocket::bind(&path, 0o600).unwrap();
        drop(old_listener);
        let (_new, _new_listener) = UnixSocket::bind(&path, 0o600).unwrap();
        drop(old);
        assert!(path.exists(), "the new server's socket stays");
    }
}
