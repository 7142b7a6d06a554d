//! The JWT a connection's calls presented last, and what it verified to.
//!
//! A workload sends the same token on every call of a connection (the kubelet rotates it after
//! 80% of its lifetime). The verified-token cache is keyed by the token's SHA-256, which for a
//! projected service-account token (~400 bytes to ~1 KiB) costs more than the rest of a call's
//! authentication: ~10,000 instructions a call under callgrind (BENCHMARKS.md). Comparing the
//! token with the one this connection presented last, in constant time, costs a fraction.
//!
//! Per connection (each connection's auth service holds one), so it holds one token at most
//! ([`RECENT_JWT_BYTES`] at most, which `greeter config check` counts per connection), and a
//! token presented on one connection never answers for another. An entry answers only within
//! the key generation that verified it (a JWKS reload starts a new one, as it empties the
//! caches) and while the token is valid.

use std::sync::{Arc, Mutex, PoisonError};

use subtle::ConstantTimeEq as _;

use super::{
    SignatureBudget,
    cache::Verified,
    jwt::{Jwt, JwtError},
};
use crate::{ops::memory::RECENT_JWT_BYTES, transport::listener::PeerPrefix};

/// One connection's last verified JWT.
#[derive(Debug, Default)]
pub struct RecentJwt(Mutex<Option<Recent>>);

#[derive(Debug)]
struct Recent {
    token: Box<str>,
    generation: u64,
    verified: Arc<Verified>,
}

impl RecentJwt {
    /// `token` verified by `jwt`: from this connection's last token when it is the same (and
    /// still valid), else from `jwt` ([`Jwt::verify`]), which is then remembered.
    pub fn verify(
        &self,
        jwt: &Jwt,
        token: &str,
        peer: PeerPrefix,
        budget: &SignatureBudget,
    ) -> Result<Arc<Verified>, JwtError> {
        if let Some(verified) = self.get(token, jwt.generation(), super::jwt::now()) {
            return Ok(verified);
        }
        let verified = jwt.verify(token, peer, budget)?;
        self.remember(token, jwt.generation(), &verified);
        Ok(verified)
    }

    fn get(&self, token: &str, generation: u64, now: u64) -> Option<Arc<Verified>> {
        let recent = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        recent
            .as_ref()
            // In constant time: a connection from a proxy carries several callers' calls, and
            // one of them must not learn another's token from how long a comparison took.
            .filter(|r| {
                r.generation == generation
                    && r.verified.valid_until >= now
                    && bool::from(r.token.as_bytes().ct_eq(token.as_bytes()))
            })
            .map(|r| Arc::clone(&r.verified))
    }

    fn remember(&self, token: &str, generation: u64, verified: &Arc<Verified>) {
        if token.len() > RECENT_JWT_BYTES {
            return;
        }
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Recent {
            token: token.into(),
            generation,
            verified: Arc::clone(verified),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(valid_until: u64) -> Arc<Verified> {
        Arc::new(Verified {
            subject: "system:serviceaccount:ns:app".into(),
            issuer: "https://issuer.example".into(),
            scopes: vec!["greeter".into()],
            valid_until,
        })
    }

    /// Only the same token, of the same key generation, still valid, is answered from memory.
    #[test]
    fn the_same_token_of_the_same_generation_while_valid() {
        let recent = RecentJwt::default();
        assert!(recent.get("a.b.c", 1, 100).is_none());
        let first = verified(200);
        recent.remember("a.b.c", 1, &first);
        let answered = recent.get("a.b.c", 1, 200).expect("remembered");
        assert!(Arc::ptr_eq(&answered, &first));
        assert!(recent.get("a.b.d", 1, 100).is_none(), "another token");
        assert!(recent.get("a.b.c.", 1, 100).is_none(), "a longer one");
        assert!(recent.get("a.b.c", 2, 100).is_none(), "after a JWKS reload");
        assert!(recent.get("a.b.c", 1, 201).is_none(), "expired");
        recent.remember("x.y.z", 1, &verified(300));
        assert!(
            recent.get("a.b.c", 1, 100).is_none(),
            "one token per connection"
        );
        assert!(recent.get("x.y.z", 1, 100).is_some());
    }

    /// A token larger than the bound `greeter config check` counts is not kept.
    #[test]
    fn an_oversized_token_is_not_kept() {
        let recent = RecentJwt::default();
        let huge = "a".repeat(RECENT_JWT_BYTES + 1);
        recent.remember(&huge, 1, &verified(200));
        assert!(recent.get(&huge, 1, 100).is_none());
        let largest = "a".repeat(RECENT_JWT_BYTES);
        recent.remember(&largest, 1, &verified(200));
        assert!(recent.get(&largest, 1, 100).is_some());
    }
}
