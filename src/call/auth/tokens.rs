//! Bearer tokens: the file of their hashes, lookup in constant time, and minting new ones.
//!
//! The server never stores a token, only its SHA-256. Tokens are 256 random bits, so a plain hash
//! is enough (no salt or slow KDF is needed for secrets that cannot be guessed), and operators can
//! compute an entry with `printf %s "$TOKEN" | sha256sum`.

use std::{
    collections::HashSet,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use base64::Engine as _;
use ring::{
    digest::{SHA256, digest},
    rand::{SecureRandom as _, SystemRandom},
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::config;

/// Prefix of every token greeter mints, so secret scanners and people recognize one.
pub const TOKEN_PREFIX: &str = "grt_";

/// What is wrong with a tokens file, naming the file and the entry.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("{path}: cannot read: {source}{}", config::paths::relative_note(.path))]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid tokens file: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: token {name:?}: {reason}")]
    Entry {
        path: String,
        name: String,
        reason: String,
    },
}

/// One `[[tokens]]` entry as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who holds the token; appears in logs and PERMISSION_DENIED messages, never the token.
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    /// What the token may call (see `auth.policy`).
    pub scopes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// A known token holder.
#[derive(Debug, Clone)]
pub struct Holder {
    pub name: Arc<str>,
    pub scopes: Vec<String>,
}

/// Numbers the stores parsed in this process, so that a per-connection memo can tell a holder
/// found in this store from one found in a store since replaced by a reload ([`super::recent`]).
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// The loaded tokens, ready for lookups.
#[derive(Debug, Default)]
pub struct TokenStore {
    hashes: Vec<[u8; 32]>,
    holders: Vec<Holder>,
    /// Unique to each parsed file in the process; 0 for the empty default store.
    generation: u64,
}

impl TokenStore {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, TokensError> {
        let file: TokensFile = toml::from_str(text).map_err(|e| TokensError::Parse {
            path: path.to_owned(),
            reason: config::secret::toml_error(text, &e),
        })?;
        let mut store = Self {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            ..Self::default()
        };
        let mut names = HashSet::new();
        for entry in file.tokens {
            let fail = |reason: &str| TokensError::Entry {
                path: path.to_owned(),
                name: entry.name.clone(),
                reason: reason.to_owned(),
            };
            if entry.name.trim().is_empty() {
                return Err(fail("name must not be empty"));
            }
            if !names.insert(entry.name.clone()) {
                return Err(fail("name appears twice"));
            }
            let hash: [u8; 32] = hex::decode(&entry.sha256)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| fail("sha256 must be 64 hex digits (the SHA-256 of the token)"))?;
            if store.hashes.contains(&hash) {
                return Err(fail("the same token hash appears twice"));
            }
            if entry.scopes.is_empty() || entry.scopes.iter().any(|s| s.trim().is_empty()) {
                return Err(fail("scopes must list at least one non-empty scope"));
            }
            store.hashes.push(hash);
            store.holders.push(Holder {
                name: entry.name.into(),
                scopes: entry.scopes,
            });
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.holders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }

    /// Finds the holder of `token`.
    pub fn authenticate(&self, token: &str) -> Option<&Holder> {
        self.find(token).and_then(|index| self.holder(index))
    }

    /// The index of `token`'s holder. Every stored hash is compared, in constant time, whether
    /// or not an earlier one matched, so timing reveals neither which entry matched nor how much
    /// of a hash did.
    pub fn find(&self, token: &str) -> Option<usize> {
        let presented = sha256(token);
        let mut found = None;
        for (i, hash) in self.hashes.iter().enumerate() {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(i);
            }
        }
        found
    }

    /// The holder [`TokenStore::find`] found at `index`.
    pub fn holder(&self, index: usize) -> Option<&Holder> {
        self.holders.get(index)
    }

    /// Tells this store's indexes from another's: unique to each file parsed in the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// SHA-256 of a token, as stored in the tokens file.
pub fn sha256(token: &str) -> [u8; 32] {
    digest(&SHA256, token.as_bytes())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// A new token: 256 bits from the OS's CSPRNG, base64url, with a recognizable prefix.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random number generator works");
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The tokens-file entry for `token`.
pub fn entry_for(token: &str, name: &str, scopes: &[String]) -> TokenEntry {
    TokenEntry {
        name: name.to_owned(),
        sha256: hex::encode(sha256(token)),
        scopes: scopes.to_vec(),
    }
}

/// The entry as TOML, ready to append to a tokens file.
pub fn entry_toml(entry: &TokenEntry) -> String {
    #[derive(Serialize)]
    struct One<'a> {
        tokens: [&'a TokenEntry; 1],
    }
    toml::to_string(&One { tokens: [entry] }).expect("a token entry serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_authenticate_through_their_entry() {
        let token = generate();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() > 40);
        let entry = entry_for(&token, "ci", &["greeter".into()]);
        let other = entry_for(&generate(), "other", &["greeter".into()]);
        let file = format!("{}{}", entry_toml(&entry), entry_toml(&other));
        let store = TokenStore::parse(&file, "t.toml").unwrap();
        assert_eq!(store.len(), 2);
        assert!(!store.is_empty());
        assert!(TokenStore::default().is_empty());
        let holder = store.authenticate(&token).unwrap();
        assert_eq!(&*holder.name, "ci");
        assert_eq!(holder.scopes, ["greeter"]);
        assert!(store.authenticate("grt_wrong").is_none());
        assert!(store.authenticate("").is_none());
    }

    #[test]
    fn hash_matches_sha256sum() {
        // printf %s test | sha256sum
        assert_eq!(
            hex::encode(sha256("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_their_name() {
        let cases = [
            (
                "[[tokens]]\nname = \"a\"\nsha256 = \"zz\"\nscopes = [\"x\"]\n",
                "64 hex",
            ),
            (
                "[[tokens]]\nname = \"a\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nscopes = []\n",
                "at least one",
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"x\"\n",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let err = TokenStore::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.starts_with("t.toml"), "{err}");
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn an_empty_file_means_no_tokens() {
        assert!(TokenStore::parse("", "t.toml").unwrap().is_empty());
    }
}
