//! Per-caller quotas: token buckets (governor's GCRA) per identity, and per identity and method,
//! so one caller with valid credentials cannot take every slot. A call over its quota is answered
//! RESOURCE_EXHAUSTED at once, with `google.rpc.RetryInfo` (when a token is back) and
//! `google.rpc.QuotaFailure` (which quota) in the status details, as Google APIs do.
//!
//! The layer runs right after auth, which has put the call's [`Caller`] in the request (none for
//! an anonymous call): refused
//! calls never take a concurrency slot. Each caller's bucket is keyed by its identity class and a
//! hash of its identity (fixed-size keys: no allocation per call, and a caller's name never
//! grows the tables); callers without credentials by their peer address. The tables are bounded
//! (`quota.max_callers`): beyond it, callers not yet tracked share one overflow bucket, and a
//! timer forgets callers whose bucket is full again.
//!
//! Callers with credentials and peers without them never share a table: anyone can present new
//! source addresses (an IPv6 /48 holds 65,536 /64s), so anonymous peers fill tables of their own
//! (`quota.anonymous_max_callers`) and only ever crowd each other into their overflow bucket.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock as _, MonotonicClock},
};
use tokio_util::sync::CancellationToken;
use tonic::{Status, codegen::http};

mod check;
mod layer;
mod redis;
mod store;

pub use layer::{QuotaLayer, QuotaService};
pub use redis::{
    ERROR_KINDS as STORE_ERROR_KINDS, FALLBACKS as STORE_FALLBACKS, RedisStore, RedisStoreError,
};
use store::Bounded;

use crate::{
    call::auth::Caller,
    config::{AnonymousQuota, IdentityClass, QuotaConfig, QuotaLimits, RedisFallback},
    methods::MethodTable,
    ops::metrics::QuotaRefusals,
    transport::listener::{PeerInfo, PeerPrefix},
};

/// The identity classes refusals are counted by (`greeter_quota_refused_total{class}`), indexed
/// by `Class`: a bounded label set, whatever the callers are called.
pub const CLASSES: &[&str] = &["anonymous", "token", "jwt", "cert"];

/// How often callers whose bucket is full again are forgotten.
const FORGET_INTERVAL: Duration = Duration::from_secs(10);

/// What kind of credentials a caller showed, as quotas and their metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    Anonymous,
    Token,
    Jwt,
    Cert,
}

impl Class {
    fn as_str(self) -> &'static str {
        CLASSES[self as usize]
    }
}

/// Whose bucket a call draws from. Fixed-size: the identity is hashed (identities come from
/// credentials the server trusts, so nobody can choose colliding names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Named(Class, u64),
    /// A caller without credentials, by its address ([`PeerPrefix`], flattened: 16 bytes).
    V4(u32),
    V6(u64),
    Uid(u32),
}

impl From<PeerPrefix> for Key {
    fn from(prefix: PeerPrefix) -> Self {
        match prefix {
            PeerPrefix::V4(v4) => Self::V4(v4),
            PeerPrefix::V6(v6) => Self::V6(v6),
            PeerPrefix::Uid(uid) => Self::Uid(uid),
        }
    }
}

/// The caller of one call, as quotas see it.
#[derive(Clone, Copy)]
struct Identity<'a> {
    class: Class,
    /// The name overrides are looked up by; `None` for callers without credentials.
    name: Option<&'a str>,
    /// A JWT's issuer: an override names it too.
    issuer: Option<&'a str>,
    key: Key,
}

/// The one mapping from a [`Caller`] to its quota class and key: a new kind of caller gets its
/// arm here (and its class in [`CLASSES`]).
fn identify<'a>(
    caller: Option<&'a Caller>,
    peer: Option<&PeerInfo>,
    hasher: &RandomState,
) -> Identity<'a> {
    let named = |class, name: &'a str| Identity {
        class,
        name: Some(name),
        issuer: None,
        key: Key::Named(class, hasher.hash_one((class, name))),
    };
    match caller {
        Some(Caller::Token(name)) => named(Class::Token, name),
        // The bucket, and the override, are the issuer's subject (two clusters may both have a
        // `system:serviceaccount:shop:checkout`).
        Some(Caller::Jwt { subject, issuer }) => Identity {
            class: Class::Jwt,
            name: Some(subject),
            issuer: Some(issuer),
            key: Key::Named(Class::Jwt, hasher.hash_one((Class::Jwt, issuer, subject))),
        },
        Some(Caller::ClientCert(subject)) => named(Class::Cert, subject),
        Some(Caller::Anonymous) | None => Identity {
            class: Class::Anonymous,
            name: None,
            issuer: None,
            key: PeerPrefix::of(peer).into(),
        },
    }
}

/// `std::time::Instant` (governor's `MonotonicClock`), not governor's default TSC clock
/// (quanta): consistent across cores with no calibration, and two crates fewer.
///
/// GCRA reads the clock before it updates a bucket, so a call whose thread is descheduled in
/// between arrives "from the past": a bucket whose span (`burst / rate`) is shorter than such a
/// delay can refuse it although tokens are left. Seen here with a 1 ms span on a loaded machine
/// (1 call in 40,000); spans of a second or more (production's: 2 s) never meet it.
type Limiter<K> = RateLimiter<K, Bounded<K>, MonotonicClock>;

/// One bucket table and the quota it enforces, as the refusal describes it.
#[derive(Debug)]
struct Table<K: Hash + Eq + Clone> {
    limiter: Limiter<K>,
    limits: QuotaLimits,
    /// Calls its store sent to the overflow bucket.
    overflowed: Arc<AtomicU64>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(limits: &QuotaLimits, max: usize, clock: &MonotonicClock) -> Self {
        let overflowed = Arc::default();
        Self {
            limiter: RateLimiter::new(
                quota(limits),
                Bounded::new(max, Arc::clone(&overflowed)),
                clock.clone(),
            ),
            limits: limits.clone(),
            overflowed,
        }
    }

    /// Calls that drew from the overflow bucket since the last look.
    fn overflowed(&self) -> u64 {
        self.overflowed.swap(0, Ordering::Relaxed)
    }

    /// `Ok`, or how long until the key's bucket has a token again.
    fn check(&self, key: &K, clock: &MonotonicClock) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(clock.now()))
    }
}

/// governor's quota for `limits`, which `check.rs` has bounded (`[quota]` is checked at load).
fn quota(limits: &QuotaLimits) -> Quota {
    let period = Duration::from_secs_f64(1.0 / limits.rate);
    let burst = NonZeroU32::new(limits.burst).expect("quota.burst is checked to be at least 1");
    Quota::with_period(period)
        .expect("quota.rate is checked to give a period of at least a nanosecond")
        .allow_burst(burst)
}

/// A bucket table for each kind of caller, of the same size of bucket: callers with credentials,
/// and anonymous peers, each with its own bound and its own overflow bucket.
#[derive(Debug)]
struct Split {
    named: Table<Key>,
    anonymous: Table<Key>,
}

impl Split {
    fn new(limits: &QuotaLimits, config: &QuotaConfig, clock: &MonotonicClock) -> Self {
        Self {
            named: Table::new(limits, config.max_callers, clock),
            anonymous: Table::new(limits, config.anonymous_max_callers, clock),
        }
    }

    fn of(&self, class: Class) -> &Table<Key> {
        if class == Class::Anonymous {
            &self.anonymous
        } else {
            &self.named
        }
    }
}

/// Every bucket table of a server, built once from `[quota]`.
#[derive(Debug)]
pub struct Quotas {
    clock: MonotonicClock,
    hasher: RandomState,
    anonymous: AnonymousQuota,
    default: Split,
    /// Identities with buckets of their own size, by name; within, the whole identity (class, and
    /// issuer for JWTs) picks the entry.
    identities: HashMap<Box<str>, Vec<Override>>,
    /// `None` when no pattern is configured: calls skip the lookup.
    methods: Option<MethodTable<Arc<MethodQuota>>>,
    /// The same tables, for forgetting idle callers.
    method_tables: Vec<Arc<MethodQuota>>,
    refusals: QuotaRefusals,
    /// `quota.store = "redis"`: the buckets that count; the tables above then serve
    /// `on_error = "local"` only.
    shared: Option<RedisStore>,
}

/// One `quota.identities` entry: the rest of the identity its name must come with, and its bucket.
#[derive(Debug)]
struct Override {
    class: Class,
    issuer: Option<Box<str>>,
    table: Table<()>,
}

/// The buckets of one `quota.methods` pattern, one per caller.
#[derive(Debug)]
struct MethodQuota {
    pattern: String,
    tables: Split,
}

/// What the layer does with a call.
enum Decision {
    Admit,
    Refuse(Status),
    /// The shared store decides.
    Ask(Ask),
}

/// One call's buckets, for the shared store.
struct Ask {
    caller: String,
    class: Class,
    own: redis::Bucket,
    method: Option<Arc<MethodQuota>>,
}

/// Which bucket refused a call, and when it has a token again.
#[derive(Debug, PartialEq)]
struct Refused {
    /// `Some(pattern)`: the caller's bucket for the methods of a `quota.methods` pattern.
    pattern: Option<String>,
    limits: QuotaLimits,
    retry_after: Duration,
}

impl Quotas {
    /// The tables of an enabled `[quota]`; `refusals` counts by [`CLASSES`].
    pub fn new(config: &QuotaConfig, refusals: QuotaRefusals) -> Self {
        let clock = MonotonicClock;
        let default = QuotaLimits {
            rate: config.rate,
            burst: config.burst,
        };
        let mut identities = HashMap::<Box<str>, Vec<Override>>::new();
        for (key, identity) in &config.identities {
            let name = identity.name.as_deref().unwrap_or(key);
            identities.entry(name.into()).or_default().push(Override {
                class: match identity.class {
                    IdentityClass::Token => Class::Token,
                    IdentityClass::Jwt => Class::Jwt,
                    IdentityClass::Cert => Class::Cert,
                },
                issuer: identity.issuer.as_deref().map(Into::into),
                table: Table::new(&identity.limits(), 1, &clock),
            });
        }
        let method_tables: Vec<_> = config
            .methods
            .iter()
            .map(|(pattern, limits)| {
                Arc::new(MethodQuota {
                    pattern: pattern.clone(),
                    tables: Split::new(limits, config, &clock),
                })
            })
            .collect();
        let methods = (!method_tables.is_empty()).then(|| {
            MethodTable::new(
                method_tables
                    .iter()
                    .map(|method| (method.pattern.clone(), Arc::clone(method))),
            )
        });
        Self {
            default: Split::new(&default, config, &clock),
            clock,
            hasher: RandomState::new(),
            anonymous: config.anonymous,
            identities,
            methods,
            method_tables,
            refusals,
            shared: None,
        }
    }

    /// Counts in `store`, shared with every process pointed at it, instead of this process.
    #[must_use]
    pub fn shared_in(self, store: RedisStore) -> Self {
        Self {
            shared: Some(store),
            ..self
        }
    }

    /// The override of exactly this identity, if one is configured.
    fn own(&self, identity: &Identity<'_>) -> Option<&Table<()>> {
        let overrides = self.identities.get(identity.name?)?;
        overrides
            .iter()
            .find(|o| o.class == identity.class && o.issuer.as_deref() == identity.issuer)
            .map(|o| &o.table)
    }

    /// Takes a token from each bucket the call draws from: its method's (when a pattern names
    /// it), then its caller's. A call refused by the caller's bucket has spent its method token.
    fn admit(&self, identity: &Identity<'_>, path: &str) -> Result<(), Refused> {
        if let Some(method) = self.methods.as_ref().and_then(|m| m.lookup(path)) {
            let table = method.tables.of(identity.class);
            table
                .check(&identity.key, &self.clock)
                .map_err(|retry_after| Refused {
                    pattern: Some(method.pattern.clone()),
                    limits: table.limits.clone(),
                    retry_after,
                })?;
        }
        let result = match self.own(identity) {
            Some(table) => table
                .check(&(), &self.clock)
                .map_err(|d| (d, &table.limits)),
            None => {
                let table = self.default.of(identity.class);
                table
                    .check(&identity.key, &self.clock)
                    .map_err(|d| (d, &table.limits))
            }
        };
        result.map_err(|(retry_after, limits)| Refused {
            pattern: None,
            limits: limits.clone(),
            retry_after,
        })
    }

    /// What happens to `request`: decided here, or to be asked of the shared store.
    fn decide<B>(&self, request: &http::Request<B>) -> Decision {
        let extensions = request.extensions();
        let identity = identify(
            extensions.get::<Caller>(),
            extensions.get::<PeerInfo>(),
            &self.hasher,
        );
        if identity.class == Class::Anonymous && self.anonymous == AnonymousQuota::Exempt {
            return Decision::Admit;
        }
        let path = request.uri().path();
        if self.shared.is_some() {
            let (table, limits) = match self.own(&identity) {
                Some(table) => ("o", &table.limits),
                None => ("d", &self.default.of(identity.class).limits),
            };
            let own = redis::Bucket {
                table: table.into(),
                limits: limits.clone(),
            };
            let method = self.methods.as_ref().and_then(|m| m.lookup(path)).cloned();
            return Decision::Ask(Ask {
                caller: redis::caller_tag(&identity),
                class: identity.class,
                own,
                method,
            });
        }
        self.verdict(identity.class, path, self.admit(&identity, path))
    }

    /// The shared store's answer for `ask`, or `quota.redis.on_error`'s when it has none.
    async fn ask(&self, ask: Ask, request: &http::request::Parts) -> Decision {
        let store = self
            .shared
            .as_ref()
            .expect("asked only with a shared store");
        let method = ask.method.as_ref().map(|m| {
            let bucket = redis::Bucket {
                table: format!("m:{}", m.pattern),
                limits: m.tables.named.limits.clone(),
            };
            (m, bucket)
        });
        let path = request.uri.path();
        let result = match store
            .check(&ask.caller, &ask.own, method.as_ref().map(|(_, b)| b))
            .await
        {
            Ok(redis::Verdict::Admitted) => Ok(()),
            Ok(redis::Verdict::Refused {
                by_method,
                retry_after,
            }) => {
                let (pattern, limits) = match (&method, by_method) {
                    (Some((m, _)), true) => {
                        (Some(m.pattern.clone()), m.tables.named.limits.clone())
                    }
                    _ => (None, ask.own.limits.clone()),
                };
                Err(Refused {
                    pattern,
                    limits,
                    retry_after,
                })
            }
            Err(_) => match store.on_error {
                RedisFallback::Allow => Ok(()),
                RedisFallback::Deny => {
                    return Decision::Refuse(Status::unavailable(
                        "the quota store (Redis) is not answering, and quota.redis.on_error = \
                         \"deny\": retry later",
                    ));
                }
                RedisFallback::Local => {
                    let extensions = &request.extensions;
                    let identity = identify(
                        extensions.get::<Caller>(),
                        extensions.get::<PeerInfo>(),
                        &self.hasher,
                    );
                    self.admit(&identity, path)
                }
            },
        };
        self.verdict(ask.class, path, result)
    }

    /// Counts a refusal and turns it into its status.
    fn verdict(&self, class: Class, path: &str, result: Result<(), Refused>) -> Decision {
        match result {
            Ok(()) => Decision::Admit,
            Err(refused) => {
                self.refusals.inc(path, class as usize);
                tracing::debug!(
                    path,
                    class = class.as_str(),
                    retry_after = ?refused.retry_after,
                    "call refused: over quota"
                );
                Decision::Refuse(layer::refusal(&refused, class))
            }
        }
    }

    /// Forgets callers whose buckets are full again (indistinguishable from new ones), every
    /// `FORGET_INTERVAL` until `stop`.
    pub fn spawn_forgetting(self: &Arc<Self>, stop: CancellationToken) {
        let quotas = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FORGET_INTERVAL);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => quotas.forget_idle(),
                }
            }
        });
    }

    /// Also gives back the tables' spare capacity, so the memory a flood of callers took is
    /// returned once they are forgotten, and warns when callers with credentials were crowded
    /// into an overflow bucket: an honest fleet larger than `quota.max_callers`.
    fn forget_idle(&self) {
        let splits =
            std::iter::once(&self.default).chain(self.method_tables.iter().map(|m| &m.tables));
        for split in splits {
            for table in [&split.named, &split.anonymous] {
                table.limiter.retain_recent();
                table.limiter.shrink_to_fit();
            }
            let crowded = split.named.overflowed();
            if crowded > 0 {
                tracing::warn!(
                    calls = crowded,
                    tracked = split.named.limiter.len(),
                    "quota: callers with credentials beyond quota.max_callers shared one bucket; \
                     raise quota.max_callers to fit the fleet"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
