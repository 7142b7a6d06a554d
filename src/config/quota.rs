//! `[quota]`: per-caller rate quotas, the identities with buckets of their own, and the store the
//! buckets live in (this process, or a Redis the fleet shares).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::values;

/// Per-caller rate quotas: token buckets (GCRA) per identity, and per identity and method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub enabled: bool,
    /// Every caller's bucket, unless `identities` names it: calls per second, and how many may
    /// come at once after a quiet spell.
    pub rate: f64,
    pub burst: u32,
    /// Calls without credentials (auth off, or methods the policy marks "open"): counted per
    /// peer address, or not at all.
    pub anonymous: AnonymousQuota,
    /// Callers with credentials tracked at once per bucket table; newcomers beyond it share one
    /// bucket (with each other, never with anonymous peers) until idle callers are forgotten.
    /// Their number is bounded by who holds credentials: size it so an honest fleet fits.
    pub max_callers: usize,
    /// Peers without credentials tracked at once per bucket table: tables of their own, so no
    /// number of source addresses can push a caller with credentials into an overflow bucket.
    pub anonymous_max_callers: usize,
    /// Entry key -> a whole identity (class, issuer for JWTs, name) and its own rate and burst
    /// instead of the default. A later layer removes an entry by setting it to `""`.
    #[serde(deserialize_with = "values::removable::map")]
    pub identities: BTreeMap<String, IdentityQuota>,
    /// Method pattern -> a bucket per caller for the matching methods, drawn from besides the
    /// caller's own. A later layer removes an entry by setting it to `""`.
    #[serde(deserialize_with = "values::removable::map")]
    pub methods: BTreeMap<String, QuotaLimits>,
    /// Where the buckets live: this process, or a Redis the fleet shares.
    pub store: QuotaStore,
    pub redis: RedisQuotaConfig,
}

/// `quota.store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaStore {
    /// Each process its own buckets: `rate` is per pod.
    Local,
    /// Buckets in Redis, shared by every process pointed at it: `rate` is the fleet's.
    Redis,
}

/// `[quota.redis]`: the shared store of `quota.store = "redis"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisQuotaConfig {
    /// `redis://host:port[/db]` or `rediss://` (TLS); no password in it (`password_file`).
    pub url: String,
    /// PEM CA bundle the server's certificate must chain to (`rediss://`); empty: the system's.
    pub ca_file: PathBuf,
    /// A file holding the password (a Secret mount); empty: no AUTH.
    pub password_file: PathBuf,
    /// How long one call's check may wait for Redis before `on_error` decides.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Prepended to every key, so fleets (or environments) can share one Redis.
    pub key_prefix: String,
    pub on_error: RedisFallback,
}

/// What a check does when Redis is slow or down (`quota.redis.on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFallback {
    /// This pod's own buckets at the configured rate (the fleet admits up to replicas x rate).
    Local,
    /// Admit the call uncounted.
    Allow,
    /// Refuse the call with UNAVAILABLE.
    Deny,
}

/// One token bucket: `rate` calls per second on average, `burst` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimits {
    pub rate: f64,
    pub burst: u32,
}

/// `[quota.identities.KEY]`: one identity's own bucket. An identity is whole: its class, and for
/// JWTs its issuer, so a name two issuers (or a token holder and a certificate) share never
/// shares a bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityQuota {
    pub class: IdentityClass,
    /// The JWT issuer (`iss`) whose subject this is; JWT identities only.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The token holder's name, the JWT's `sub` or the certificate's identity; the entry's key
    /// when absent.
    #[serde(default)]
    pub name: Option<String>,
    pub rate: f64,
    pub burst: u32,
}

impl IdentityQuota {
    /// The bucket's size.
    pub fn limits(&self) -> QuotaLimits {
        QuotaLimits {
            rate: self.rate,
            burst: self.burst,
        }
    }
}

/// The kinds of credentials an identity can come from (`quota.identities.*.class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityClass {
    /// A holder of `auth.tokens_file`.
    Token,
    /// A JWT's subject, with its issuer.
    Jwt,
    /// A client certificate's identity (its SPIFFE ID, else its subject).
    Cert,
}

/// How calls without credentials are counted (`quota.anonymous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymousQuota {
    /// A bucket per peer IP address (per /64 for IPv6; per user on the Unix socket).
    Peer,
    /// Not counted.
    Exempt,
}
