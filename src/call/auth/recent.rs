//! The bearer token a connection's calls presented last, and what it proved.
//!
//! A workload sends the same token on every call of a connection (the kubelet rotates a
//! service-account token after 80% of its lifetime; a static token lives until it is revoked).
//! Recognising it again costs a SHA-256 of it: the key of the verified-JWT cache, and what the
//! tokens file stores. For a projected service-account token (~400 bytes to ~1 KiB) that was
//! more than the rest of a call's authentication, ~10,000 instructions a call under callgrind;
//! for a static token ~1,700, a quarter of what TLS + token costs over plaintext (BENCHMARKS.md).
//! Comparing the token with the one this connection presented last, in constant time, costs a
//! fraction.
//!
//! Per connection (each connection's auth service holds one), so it holds one token at most
//! ([`RECENT_TOKEN_BYTES`] at most, which `greeter config check` counts per connection), and a
//! token presented on one connection never answers for another. An entry answers only within
//! the generation that proved it: a JWKS reload starts a new generation of keys (as it empties
//! the caches), a tokens-file reload a new store, so a revoked token is refused on the next call;
//! and a JWT only while it is valid.

use std::sync::{Arc, Mutex, PoisonError};

use subtle::ConstantTimeEq as _;

use super::{
    SignatureBudget,
    cache::Verified,
    jwt::{Jwt, JwtError},
    tokens::{Holder, TokenStore},
};
use crate::{ops::memory::RECENT_TOKEN_BYTES, transport::listener::PeerPrefix};

/// One connection's last recognised bearer token.
#[derive(Debug, Default)]
pub struct RecentToken(Mutex<Option<Recent>>);

#[derive(Debug)]
struct Recent {
    token: Box<str>,
    proof: Proof,
}

/// What the token proved, and in which generation.
#[derive(Debug, Clone)]
enum Proof {
    /// A JWT verified by the keys of [`Jwt::generation`].
    Jwt {
        generation: u64,
        verified: Arc<Verified>,
    },
    /// A static token, the holder at `index` of the store of [`TokenStore::generation`].
    Static { generation: u64, index: usize },
}

impl RecentToken {
    /// `token` verified by `jwt`: from this connection's last token when it is the same (and
    /// still valid), else from `jwt` ([`Jwt::verify`]), which is then remembered.
    pub fn verify(
        &self,
        jwt: &Jwt,
        token: &str,
        peer: PeerPrefix,
        budget: &SignatureBudget,
    ) -> Result<Arc<Verified>, JwtError> {
        let now = super::jwt::now();
        let remembered = self.get(token, |proof| match proof {
            Proof::Jwt {
                generation,
                verified,
            } if *generation == jwt.generation() && verified.valid_until >= now => {
                Some(Arc::clone(verified))
            }
            _ => None,
        });
        if let Some(verified) = remembered {
            return Ok(verified);
        }
        let verified = jwt.verify(token, peer, budget)?;
        self.remember(
            token,
            Proof::Jwt {
                generation: jwt.generation(),
                verified: Arc::clone(&verified),
            },
        );
        Ok(verified)
    }

    /// The holder of the static `token` in `store`: from this connection's last token when it
    /// is the same and `store` is the one that found it, else from [`TokenStore::find`], which is
    /// then remembered.
    pub fn authenticate<'s>(&self, store: &'s TokenStore, token: &str) -> Option<&'s Holder> {
        let remembered = self.get(token, |proof| match proof {
            Proof::Static { generation, index } if *generation == store.generation() => {
                Some(*index)
            }
            _ => None,
        });
        if let Some(index) = remembered {
            return store.holder(index);
        }
        let index = store.find(token)?;
        self.remember(
            token,
            Proof::Static {
                generation: store.generation(),
                index,
            },
        );
        store.holder(index)
    }

    /// What `answer` makes of the last token's proof, when `token` is the last token.
    fn get<T>(&self, token: &str, answer: impl FnOnce(&Proof) -> Option<T>) -> Option<T> {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent
            .as_ref()
            // In constant time: a connection from a proxy carries several callers' calls, and
            // one of them must not learn another's token from how long a comparison took.
            .filter(|r| bool::from(r.token.as_bytes().ct_eq(token.as_bytes())))
            .and_then(|r| answer(&r.proof))
    }

    fn remember(&self, token: &str, proof: Proof) {
        if token.len() > RECENT_TOKEN_BYTES {
            return;
        }
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Recent {
            token: token.into(),
            proof,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::auth::tokens::{entry_for, entry_toml};

    fn verified(valid_until: u64) -> Arc<Verified> {
        Arc::new(Verified {
            subject: "system:serviceaccount:ns:app".into(),
            issuer: "https://issuer.example".into(),
            scopes: vec!["greeter".into()],
            valid_until,
        })
    }

    fn jwt_proof(generation: u64, valid_until: u64) -> Proof {
        Proof::Jwt {
            generation,
            verified: verified(valid_until),
        }
    }

    /// The JWT answer of [`RecentToken::verify`], for a generation and a time.
    fn jwt_answer(recent: &RecentToken, token: &str, generation: u64, now: u64) -> bool {
        recent
            .get(token, |proof| match proof {
                Proof::Jwt {
                    generation: g,
                    verified,
                } if *g == generation && verified.valid_until >= now => Some(()),
                _ => None,
            })
            .is_some()
    }

    /// Only the same token, of the same key generation, still valid, is answered from memory.
    #[test]
    fn the_same_jwt_of_the_same_generation_while_valid() {
        let recent = RecentToken::default();
        assert!(!jwt_answer(&recent, "a.b.c", 1, 100));
        recent.remember("a.b.c", jwt_proof(1, 200));
        assert!(jwt_answer(&recent, "a.b.c", 1, 200));
        assert!(!jwt_answer(&recent, "a.b.d", 1, 100), "another token");
        assert!(!jwt_answer(&recent, "a.b.c.", 1, 100), "a longer one");
        assert!(!jwt_answer(&recent, "a.b.c", 2, 100), "after a JWKS reload");
        assert!(!jwt_answer(&recent, "a.b.c", 1, 201), "expired");
        recent.remember("x.y.z", jwt_proof(1, 300));
        assert!(
            !jwt_answer(&recent, "a.b.c", 1, 100),
            "one token per connection"
        );
        assert!(jwt_answer(&recent, "x.y.z", 1, 100));
    }

    /// A token larger than the bound `greeter config check` counts is not kept.
    #[test]
    fn an_oversized_token_is_not_kept() {
        let recent = RecentToken::default();
        let huge = "a".repeat(RECENT_TOKEN_BYTES + 1);
        recent.remember(&huge, jwt_proof(1, 200));
        assert!(!jwt_answer(&recent, &huge, 1, 100));
        let largest = "a".repeat(RECENT_TOKEN_BYTES);
        recent.remember(&largest, jwt_proof(1, 200));
        assert!(jwt_answer(&recent, &largest, 1, 100));
    }

    fn store(entries: &[(&str, &str)]) -> TokenStore {
        let text: String = entries
            .iter()
            .map(|(token, name)| entry_toml(&entry_for(token, name, &["greeter".into()])))
            .collect();
        TokenStore::parse(&text, "tokens.toml").unwrap()
    }

    /// A static token is answered from memory only by the store that found it: a reload (a new
    /// store, even with the same entries in another order) finds it again, and a revoked token
    /// is refused at once.
    #[test]
    fn a_static_token_is_remembered_within_its_store_only() {
        let recent = RecentToken::default();
        let first = store(&[("tok-a", "alice"), ("tok-b", "bob")]);
        assert_eq!(&*recent.authenticate(&first, "tok-b").unwrap().name, "bob");
        let remembered = recent.get("tok-b", |proof| match proof {
            Proof::Static { index, .. } => Some(*index),
            Proof::Jwt { .. } => None,
        });
        assert_eq!(remembered, Some(1));
        assert_eq!(&*recent.authenticate(&first, "tok-b").unwrap().name, "bob");
        assert!(recent.authenticate(&first, "tok-c").is_none());

        let reordered = store(&[("tok-b", "bob"), ("tok-a", "alice")]);
        assert_eq!(
            &*recent.authenticate(&reordered, "tok-b").unwrap().name,
            "bob",
            "index 1 of the old store is alice in the new one"
        );
        let revoked = store(&[("tok-a", "alice")]);
        assert!(recent.authenticate(&revoked, "tok-b").is_none());
    }
}
