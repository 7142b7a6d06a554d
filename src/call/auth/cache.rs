//! Verified JWTs by the SHA-256 of the token, until they expire: a workload sends the same token
//! on every call for its lifetime (the kubelet rotates it after 80% of it), and a reused token then
//! costs a hash and a lookup instead of a signature verification and a JSON parse.
//!
//! Bounded by count, and each entry by [`JWT_CACHE_IDENTITY_BYTES`] (a larger identity is not
//! cached), so `greeter config check` can count it ([`crate::ops::memory`]). When full, expired
//! entries go first, then an arbitrary one. The cache lives
//! inside one generation of the keys ([`super::jwt::Jwt`]): a JWKS reload starts an empty one, so
//! a token whose key was removed is never answered from here.
//!
//! Refused tokens are remembered too ([`FailureCache`]), or the same forged token would cost a
//! signature check on every call. Only refusals that stay true while the keys do: a token not
//! valid yet may be valid in a minute, and a refusal for a spent budget is no verdict on the
//! token. Emptied at every reload like the other: a token refused for an unknown `kid` verifies
//! once the reload brings the key.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use super::jwt::JwtError;
use crate::ops::memory::JWT_CACHE_IDENTITY_BYTES;

/// A verified token's identity and scopes, and until when (unix seconds, leeway included) it is
/// valid.
#[derive(Debug)]
pub struct Verified {
    pub subject: Arc<str>,
    pub issuer: Arc<str>,
    pub scopes: Vec<String>,
    pub valid_until: u64,
}

impl Verified {
    /// The bytes of the identity's strings.
    fn identity_bytes(&self) -> usize {
        self.subject.len() + self.issuer.len() + self.scopes.iter().map(String::len).sum::<usize>()
    }
}

#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], Arc<Verified>>>,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::with_capacity(capacity.min(1024))),
        }
    }

    /// The token hashed to `hash`, if verified before and still valid at `now`.
    pub fn get(&self, hash: &[u8; 32], now: u64) -> Option<Arc<Verified>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(hash)?;
        if entry.valid_until >= now {
            return Some(Arc::clone(entry));
        }
        entries.remove(hash);
        None
    }

    pub fn insert(&self, hash: [u8; 32], verified: Arc<Verified>, now: u64) {
        if self.capacity == 0 || verified.identity_bytes() > JWT_CACHE_IDENTITY_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&hash) {
            entries.retain(|_, v| v.valid_until >= now);
            if entries.len() >= self.capacity
                && let Some(victim) = entries.keys().next().copied()
            {
                entries.remove(&victim);
            }
        }
        entries.insert(hash, verified);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// Refused tokens by the SHA-256 of the token, with why; bounded by count (when full, an
/// arbitrary entry makes room: a flood of distinct tokens only churns it).
#[derive(Debug)]
pub struct FailureCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], JwtError>>,
}

impl FailureCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::with_capacity(capacity.min(1024))),
        }
    }

    /// Why the token hashed to `hash` was refused, if it was.
    pub fn get(&self, hash: &[u8; 32]) -> Option<JwtError> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(hash).cloned()
    }

    pub fn insert(&self, hash: [u8; 32], error: JwtError) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity
            && !entries.contains_key(&hash)
            && let Some(victim) = entries.keys().next().copied()
        {
            entries.remove(&victim);
        }
        entries.insert(hash, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(valid_until: u64) -> Arc<Verified> {
        Arc::new(Verified {
            subject: "system:serviceaccount:shop:checkout".into(),
            issuer: "https://k8s".into(),
            scopes: vec!["greeter".into()],
            valid_until,
        })
    }

    #[test]
    fn entries_live_until_they_expire() {
        let cache = TokenCache::new(8);
        cache.insert([1; 32], verified(100), 10);
        assert!(cache.get(&[1; 32], 100).is_some());
        assert!(cache.get(&[2; 32], 100).is_none());
        assert!(cache.get(&[1; 32], 101).is_none());
        assert_eq!(cache.len(), 0, "an expired entry is dropped when met");
    }

    #[test]
    fn bounded_expired_first() {
        let cache = TokenCache::new(3);
        cache.insert([1; 32], verified(50), 10);
        cache.insert([2; 32], verified(50), 10);
        cache.insert([3; 32], verified(500), 10);
        // Full at 60, when 1 and 2 have expired: both go, not one arbitrary entry (which would
        // leave 3 entries, and might be the valid one).
        cache.insert([4; 32], verified(500), 60);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[3; 32], 60).is_some());
        assert!(cache.get(&[4; 32], 60).is_some());
        // Full of valid entries: one of them makes room.
        cache.insert([5; 32], verified(500), 60);
        cache.insert([9; 32], verified(500), 60);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&[9; 32], 60).is_some());

        let huge = Arc::new(Verified {
            subject: "x".repeat(JWT_CACHE_IDENTITY_BYTES).into(),
            ..Arc::into_inner(verified(500)).unwrap()
        });
        cache.insert([6; 32], huge, 60);
        assert!(cache.get(&[6; 32], 60).is_none(), "too large to cache");

        // The bound counts the subject, the issuer and the scopes together.
        let sized = |issuer_bytes: usize| {
            Arc::new(Verified {
                subject: "s".into(),
                issuer: "i".repeat(issuer_bytes).into(),
                scopes: vec!["greeter".into()],
                valid_until: 500,
            })
        };
        cache.insert([7; 32], sized(JWT_CACHE_IDENTITY_BYTES - 8), 60);
        assert!(cache.get(&[7; 32], 60).is_some(), "exactly the bound");
        cache.insert([8; 32], sized(JWT_CACHE_IDENTITY_BYTES - 7), 60);
        assert!(cache.get(&[8; 32], 60).is_none(), "a byte over the bound");

        let off = TokenCache::new(0);
        off.insert([1; 32], verified(500), 10);
        assert!(off.get(&[1; 32], 10).is_none());
    }

    #[test]
    fn refusals_are_bounded_by_count() {
        let cache = FailureCache::new(2);
        cache.insert([1; 32], JwtError::Signature);
        cache.insert([2; 32], JwtError::UnknownKid);
        assert_eq!(cache.get(&[2; 32]), Some(JwtError::UnknownKid));
        cache.insert([3; 32], JwtError::Expired);
        assert_eq!(cache.get(&[3; 32]), Some(JwtError::Expired));
        let kept = [[1; 32], [2; 32]].iter().filter(|h| cache.get(h).is_some());
        assert_eq!(kept.count(), 1, "one made room");

        let off = FailureCache::new(0);
        off.insert([1; 32], JwtError::Signature);
        assert_eq!(off.get(&[1; 32]), None);
    }
}
