//! The bearer token a client sends: given on the command line, or read from a file that is
//! re-read when it changes. A projected service-account token is the file case: the kubelet
//! replaces it (a fresh token after 80% of its lifetime) while the pod runs, so a long-running
//! client (`bench`, `chat`, a sidecar's loop) must follow it rather than keep the first one.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use tonic::metadata::{Ascii, MetadataValue};

use super::ClientError;

/// How often the file's modification time is looked at: cheap, and far below any token's life.
const RECHECK: Duration = Duration::from_secs(1);

/// `authorization: Bearer <token>`, fixed or followed from a file.
#[derive(Debug)]
pub enum Bearer {
    Fixed(MetadataValue<Ascii>),
    File(TokenFile),
}

impl Bearer {
    /// The header value to send now.
    pub fn value(&self) -> MetadataValue<Ascii> {
        match self {
            Self::Fixed(value) => value.clone(),
            Self::File(file) => file.value(),
        }
    }
}

/// A token file and what was last read from it.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<Read>,
}

#[derive(Debug)]
struct Read {
    modified: Option<SystemTime>,
    checked: Instant,
    value: MetadataValue<Ascii>,
}

impl TokenFile {
    /// Reads the file once: a token file that cannot be read or holds no valid token is an
    /// error now, not a failed call later.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let value = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: Mutex::new(Read {
                modified,
                checked: Instant::now(),
                value,
            }),
        })
    }

    /// The current token: the file is looked at again at most every [`RECHECK`], and re-read
    /// when its modification time changed. A file that is briefly missing or half-written keeps
    /// the last good token (the kubelet swaps a directory symlink; the next look sees the new one).
    fn value(&self) -> MetadataValue<Ascii> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified.is_some()
                && modified != state.modified
                && let Ok(value) = read(&self.path)
            {
                state.modified = modified;
                state.value = value;
            }
        }
        state.value.clone()
    }
}

/// `Bearer <the file's first line>`.
fn read(path: &Path) -> Result<MetadataValue<Ascii>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(ClientError::Token(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    header(token)
        .map_err(|_| ClientError::Token(format!("{}: not a valid header value", path.display())))
}

/// `Bearer <token>` as a header value.
pub fn header(token: &str) -> Result<MetadataValue<Ascii>, ClientError> {
    format!("Bearer {token}")
        .parse::<MetadataValue<Ascii>>()
        .map_err(|_| ClientError::Token("not a valid header value".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_followed_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(file.value(), "Bearer first");
        std::fs::write(&path, "second\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        // Not before the next look...
        assert_eq!(file.value(), "Bearer first");
        file.state.lock().unwrap().checked = Instant::now() - RECHECK;
        assert_eq!(file.value(), "Bearer second");
        // ...and a file that goes missing keeps the last token.
        std::fs::remove_file(&path).unwrap();
        file.state.lock().unwrap().checked = Instant::now() - RECHECK;
        assert_eq!(file.value(), "Bearer second");
        assert!(TokenFile::open(&dir.path().join("nope")).is_err());
    }
}
