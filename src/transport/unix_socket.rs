//! The Unix domain socket file: created with its mode already set, a stale one replaced, and
//! removed when the server stops.
//!
//! Who may connect is decided by the file's permission bits, so no one else may reach the socket
//! before they are set: it is bound inside a fresh directory only this process can enter, given
//! its mode there, and only then linked into place. Linking fails if anything appeared at the
//! path meanwhile, so nothing is ever replaced unchecked. A socket already at the path is replaced
//! only when it is stale: connecting to it is refused, i.e. nobody listens.

use std::{
    fs, io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};

use crate::config::{Problem, Section, ServerConfig};

impl Section for ServerConfig {
    /// The socket's mode is a file mode, and its directory exists: its owner and mode are part
    /// of who may reach the socket, so greeter does not make it. Caught by `config check` too,
    /// not only at bind time.
    fn check(&self) -> Result<(), Problem> {
        if self.unix_mode > 0o777 {
            return Err(Problem {
                key: "server.unix_mode",
                message: format!("{:o} is not a file mode (at most \"0777\")", self.unix_mode),
            });
        }
        if let Some(dir) = self.unix.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return Err(Problem {
                key: "server.unix",
                message: format!(
                    "the socket's directory {} does not exist; create it first (greeter does not)",
                    dir.display()
                ),
            });
        }
        Ok(())
    }
}

/// Why the socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: another server is listening on it")]
    InUse { path: PathBuf },
    #[error(
        "{path}: cannot tell whether another server listens on it ({source}); remove it if not"
    )]
    Undecided { path: PathBuf, source: io::Error },
    #[error("server.unix_mode {mode:o}: only permission bits (at most 0777)")]
    Mode { mode: u32 },
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
    /// Binds `path` with permission bits `mode`.
    pub async fn bind(path: &Path, mode: u32) -> Result<(Self, UnixListener), UnixSocketError> {
        if mode & !0o777 != 0 {
            return Err(UnixSocketError::Mode { mode });
        }
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| UnixSocketError::Io { path, source }
        };
        let stale = match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(UnixSocketError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Ok(meta) => Some(meta.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(path)(e)),
        };
        if stale.is_some() {
            // Non-blocking: a live server with a full backlog answers EAGAIN, not a hang.
            match UnixStream::connect(path).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Ok(_) => {
                    return Err(UnixSocketError::InUse {
                        path: path.to_owned(),
                    });
                }
                Err(source) => {
                    return Err(UnixSocketError::Undecided {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }

        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        // Mode 0700: nobody else can reach a socket inside, whatever its own mode.
        let private = tempfile::Builder::new()
            .prefix(".greeter-")
            .tempdir_in(parent)
            .map_err(io_error(parent))?;
        let bound = private.path().join("socket");
        let listener = std::os::unix::net::UnixListener::bind(&bound).map_err(io_error(&bound))?;
        fs::set_permissions(&bound, fs::Permissions::from_mode(mode)).map_err(io_error(&bound))?;
        listener.set_nonblocking(true).map_err(io_error(&bound))?;
        let listener = UnixListener::from_std(listener).map_err(io_error(&bound))?;

        // Remove the stale socket only if it is still the one found above.
        if let Some(inode) = stale
            && fs::symlink_metadata(path).is_ok_and(|meta| meta.ino() == inode)
        {
            fs::remove_file(path).map_err(io_error(path))?;
        }
        fs::hard_link(&bound, path).map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => UnixSocketError::InUse {
                path: path.to_owned(),
            },
            _ => io_error(path)(source),
        })?;
        let inode = fs::symlink_metadata(path).map_err(io_error(path))?.ino();
        // The private directory and the socket's first name go; the socket stays, at `path`.
        drop(private);
        let socket = Self {
            path: path.to_owned(),
            inode,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_gets_its_mode_replaces_a_stale_one_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greeter.sock");

        // A stale socket: bound, then its listener closed without removing the file.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (socket, listener) = UnixSocket::bind(&path, 0o640).await.unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file or directory is left"
        );
        // The socket at the path is the one listening.
        let (connected, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        assert!(connected.is_ok() && accepted.is_ok());

        // A live one is refused, and left alone.
        let err = UnixSocket::bind(&path, 0o600).await.unwrap_err();
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
        let err = UnixSocket::bind(&path, 0o600).await.unwrap_err();
        assert!(matches!(err, UnixSocketError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "data");
    }

    #[tokio::test]
    async fn a_replaced_socket_is_not_removed_by_the_old_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("greeter.sock");
        let (old, old_listener) = UnixSocket::bind(&path, 0o600).await.unwrap();
        drop(old_listener);
        let (_new, _new_listener) = UnixSocket::bind(&path, 0o600).await.unwrap();
        drop(old);
        assert!(path.exists(), "the new server's socket stays");
    }

    #[tokio::test]
    async fn only_permission_bits_are_a_mode() {
        let dir = tempfile::tempdir().unwrap();
        let err = UnixSocket::bind(&dir.path().join("s"), 0o4755)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("server.unix_mode"), "{err}");
    }
}
