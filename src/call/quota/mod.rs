//! Per-caller quotas: token buckets (governor's GCRA) per identity, and per identity and method,
//! so one caller with valid credentials cannot take every slot. A call over its quota is answered
//! RESOURCE_EXHAUSTED at once, with `google.rpc.RetryInfo` (when a token is back) and
//! `google.rpc.QuotaFailure` (which quota) in the status details, as Google APIs do.
//!
//! The layer runs right after auth, which has put the call's [`Caller`] in the request: refused
//! calls never take a concurrency slot. Each caller's bucket is keyed by its identity class and a
//! hash of its identity (fixed-size keys: no allocation per call, and a caller's name never
//! grows the tables); callers without credentials by their peer address. The tables are bounded
//! (`quota.max_callers`): beyond it, callers not yet tracked share one overflow bucket, and a
//! timer forgets callers whose bucket is full again.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    num::NonZeroU32,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::{Either, Ready, ready};
use governor::{
    Quota, RateLimiter,
    clock::{Clock as _, MonotonicClock},
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, codegen::http};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower::{Layer, Service};

mod check;
mod store;

use store::Bounded;

use crate::{
    call::auth::Caller,
    config::{AnonymousQuota, QuotaConfig, QuotaLimits},
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
struct Identity<'a> {
    class: Class,
    /// The name overrides are looked up by; `None` for callers without credentials.
    name: Option<&'a str>,
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
        key: Key::Named(class, hasher.hash_one((class, name))),
    };
    match caller {
        Some(Caller::Token(name)) => named(Class::Token, name),
        // Overrides name the subject; the bucket is the issuer's subject (two clusters may both
        // have a `system:serviceaccount:shop:checkout`).
        Some(Caller::Jwt { subject, issuer }) => Identity {
            class: Class::Jwt,
            name: Some(subject),
            key: Key::Named(Class::Jwt, hasher.hash_one((Class::Jwt, issuer, subject))),
        },
        Some(Caller::ClientCert(subject)) => named(Class::Cert, subject),
        Some(Caller::Anonymous) | None => Identity {
            class: Class::Anonymous,
            name: None,
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
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(limits: &QuotaLimits, max: usize, clock: &MonotonicClock) -> Self {
        Self {
            limiter: RateLimiter::new(quota(limits), Bounded::new(max), clock.clone()),
            limits: limits.clone(),
        }
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

/// Every bucket table of a server, built once from `[quota]`.
#[derive(Debug)]
pub struct Quotas {
    clock: MonotonicClock,
    hasher: RandomState,
    anonymous: AnonymousQuota,
    default: Table<Key>,
    /// Identities with buckets of their own size, keyed by class within (a token holder and a
    /// certificate subject of the same name are two callers).
    identities: HashMap<Box<str>, Table<Class>>,
    /// `None` when no pattern is configured: calls skip the lookup.
    methods: Option<MethodTable<Arc<MethodQuota>>>,
    /// The same tables, for forgetting idle callers.
    method_tables: Vec<Arc<MethodQuota>>,
    refusals: QuotaRefusals,
}

/// The buckets of one `quota.methods` pattern, one per caller.
#[derive(Debug)]
struct MethodQuota {
    pattern: String,
    table: Table<Key>,
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
        let identities = config
            .identities
            .iter()
            .map(|(name, limits)| {
                let table = Table::new(limits, CLASSES.len(), &clock);
                (name.as_str().into(), table)
            })
            .collect();
        let method_tables: Vec<_> = config
            .methods
            .iter()
            .map(|(pattern, limits)| {
                Arc::new(MethodQuota {
                    pattern: pattern.clone(),
                    table: Table::new(limits, config.max_callers, &clock),
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
            default: Table::new(&default, config.max_callers, &clock),
            clock,
            hasher: RandomState::new(),
            anonymous: config.anonymous,
            identities,
            methods,
            method_tables,
            refusals,
        }
    }

    /// Takes a token from each bucket the call draws from: its method's (when a pattern names
    /// it), then its caller's. A call refused by the caller's bucket has spent its method token.
    fn admit(&self, identity: &Identity<'_>, path: &str) -> Result<(), Refused> {
        if let Some(method) = self.methods.as_ref().and_then(|m| m.lookup(path)) {
            let table = &method.table;
            table
                .check(&identity.key, &self.clock)
                .map_err(|retry_after| Refused {
                    pattern: Some(method.pattern.clone()),
                    limits: table.limits.clone(),
                    retry_after,
                })?;
        }
        let own = identity.name.and_then(|name| self.identities.get(name));
        let result = match own {
            Some(table) => table
                .check(&identity.class, &self.clock)
                .map_err(|d| (d, &table.limits)),
            None => self
                .default
                .check(&identity.key, &self.clock)
                .map_err(|d| (d, &self.default.limits)),
        };
        result.map_err(|(retry_after, limits)| Refused {
            pattern: None,
            limits: limits.clone(),
            retry_after,
        })
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
    /// returned once they are forgotten.
    fn forget_idle(&self) {
        for limiter in std::iter::once(&self.default.limiter)
            .chain(self.method_tables.iter().map(|m| &m.table.limiter))
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure: clients that read rich errors (grpcio's
/// `grpc_status`, tonic-types, grpcurl) learn when to retry and which quota they hit.
fn refusal(refused: &Refused, class: Class) -> Status {
    let QuotaLimits { rate, burst } = refused.limits;
    let wait = refused.retry_after.as_secs_f64();
    let (subject, quota) = match &refused.pattern {
        None => (
            format!("caller:{}", class.as_str()),
            "this caller".to_owned(),
        ),
        Some(pattern) => (
            format!("method:{pattern}"),
            format!("this caller on {pattern}"),
        ),
    };
    let description =
        format!("quota of {quota}: {rate} calls per second, burst {burst}; retry in {wait:.3}s");
    let mut details = ErrorDetails::with_retry_info(Some(refused.retry_after));
    details.add_quota_failure_violation(subject, description.clone());
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("over quota: {description}"),
        details,
    )
}

/// The tower layer; `None`: quotas off (or a listener that never counts, the probe port).
#[derive(Debug, Clone)]
pub struct QuotaLayer {
    quotas: Option<Arc<Quotas>>,
}

impl QuotaLayer {
    pub fn new(quotas: Option<Arc<Quotas>>) -> Self {
        Self { quotas }
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            quotas: self.quotas.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuotaService<S> {
    inner: S,
    quotas: Option<Arc<Quotas>>,
}

impl<S, B, ResBody> Service<http::Request<B>> for QuotaService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(quotas) = &self.quotas {
            let extensions = request.extensions();
            let identity = identify(
                extensions.get::<Caller>(),
                extensions.get::<PeerInfo>(),
                &quotas.hasher,
            );
            let exempt =
                identity.class == Class::Anonymous && quotas.anonymous == AnonymousQuota::Exempt;
            if !exempt {
                let path = request.uri().path();
                if let Err(refused) = quotas.admit(&identity, path) {
                    quotas.refusals.inc(path, identity.class as usize);
                    tracing::debug!(
                        path,
                        class = identity.class.as_str(),
                        retry_after = ?refused.retry_after,
                        "call refused: over quota"
                    );
                    return Either::Left(ready(Ok(refusal(&refused, identity.class).into_http())));
                }
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::Config;

    fn config(rate: f64, burst: u32) -> QuotaConfig {
        QuotaConfig {
            enabled: true,
            rate,
            burst,
            max_callers: 2,
            ..Config::embedded().quota
        }
    }

    fn quotas(config: &QuotaConfig) -> Quotas {
        let refusals = QuotaRefusals::register(&mut Default::default(), CLASSES, &[]);
        Quotas::new(config, refusals)
    }

    fn peer(addr: &str) -> PeerInfo {
        use crate::transport::listener::PeerAddr;
        PeerInfo {
            remote_addr: PeerAddr::Tcp(addr.parse::<SocketAddr>().unwrap()),
            client_cert: None,
        }
    }

    #[test]
    fn keys_are_small() {
        // What ops::memory counts per tracked caller assumes a 16-byte key.
        assert_eq!(std::mem::size_of::<Key>(), 16);
    }

    #[test]
    fn a_burst_then_a_refusal_that_says_when_to_retry() {
        let quotas = quotas(&QuotaConfig {
            max_callers: 8,
            ..config(0.01, 2)
        });
        let caller = Caller::Token("ci".into());
        let identity = identify(Some(&caller), None, &quotas.hasher);
        assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()));
        assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()));
        let refused = quotas.admit(&identity, "/a.S/M").unwrap_err();
        assert_eq!(refused.pattern, None);
        // One token every 100s; the bucket has just been emptied.
        assert!(refused.retry_after > Duration::from_secs(99), "{refused:?}");
        assert!(
            refused.retry_after <= Duration::from_secs(100),
            "{refused:?}"
        );

        // Another holder, a certificate and JWTs of the same name, have buckets of their own;
        // one subject from two issuers is two callers.
        let other = Caller::Token("other".into());
        let cert = Caller::ClientCert("ci".into());
        let jwt = |issuer: &str| Caller::Jwt {
            subject: "ci".into(),
            issuer: issuer.into(),
        };
        let (east, west) = (jwt("https://east"), jwt("https://west"));
        for caller in [&other, &cert, &east, &west] {
            let identity = identify(Some(caller), None, &quotas.hasher);
            assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()), "{caller:?}");
            assert_eq!(quotas.admit(&identity, "/a.S/M"), Ok(()), "{caller:?}");
        }
    }

    #[test]
    fn anonymous_callers_are_counted_by_address_and_ipv6_by_64() {
        let quotas = quotas(&config(0.01, 1));
        let admit = |addr: &str| {
            let peer = peer(addr);
            let identity = identify(Some(&Caller::Anonymous), Some(&peer), &quotas.hasher);
            quotas.admit(&identity, "/a.S/M").is_ok()
        };
        assert!(admit("10.0.0.1:1000"));
        assert!(!admit("10.0.0.1:2000"), "same address, another port");
        assert!(admit("[2001:db8::1]:1"));
        assert!(!admit("[2001:db8::2]:1"), "same /64");
        assert!(admit("[2001:db8:0:1::1]:1"), "the next /64");
    }

    #[test]
    fn a_full_table_puts_newcomers_in_one_shared_bucket() {
        let quotas = quotas(&config(0.01, 1));
        let admit = |name: &str| {
            let caller = Caller::Token(name.into());
            let identity = identify(Some(&caller), None, &quotas.hasher);
            quotas.admit(&identity, "/a.S/M").is_ok()
        };
        assert!(quotas.default.limiter.is_empty());
        assert!(admit("a"));
        assert!(admit("b"));
        assert_eq!(quotas.default.limiter.len(), 2);
        assert!(!quotas.default.limiter.is_empty());
        // max_callers = 2: c takes the overflow bucket's one token, d finds it empty.
        assert!(admit("c"));
        assert!(!admit("d"));
        assert_eq!(quotas.default.limiter.len(), 2);
    }

    #[test]
    fn callers_whose_bucket_is_full_again_are_forgotten() {
        let caller = Caller::Token("ci".into());
        // One token every 100s: the bucket stays short of full, the caller is kept.
        let slow = quotas(&config(0.01, 1));
        let identity = identify(Some(&caller), None, &slow.hasher);
        assert_eq!(slow.admit(&identity, "/a.S/M"), Ok(()));
        slow.forget_idle();
        assert_eq!(slow.default.limiter.len(), 1);
        // One token every 10ms: full again 10ms after the call, and forgotten.
        let fast = quotas(&config(100.0, 1));
        let identity = identify(Some(&caller), None, &fast.hasher);
        assert_eq!(fast.admit(&identity, "/a.S/M"), Ok(()));
        std::thread::sleep(Duration::from_millis(30));
        fast.forget_idle();
        assert_eq!(fast.default.limiter.len(), 0);
    }

    #[tokio::test]
    async fn forgetting_runs_in_the_background() {
        let fast = Arc::new(quotas(&config(100.0, 1)));
        let caller = Caller::Token("ci".into());
        let identity = identify(Some(&caller), None, &fast.hasher);
        assert_eq!(fast.admit(&identity, "/a.S/M"), Ok(()));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stop = CancellationToken::new();
        // The first round is at once; the next FORGET_INTERVAL later.
        fast.spawn_forgetting(stop.clone());
        tokio::time::timeout(Duration::from_secs(10), async {
            while !fast.default.limiter.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the idle caller forgotten");
        assert_eq!(fast.default.limiter.len(), 0);
        stop.cancel();
    }

    #[test]
    fn method_and_identity_overrides_have_their_own_buckets() {
        let mut config = config(0.01, 1);
        config.identities.insert(
            "ci".into(),
            QuotaLimits {
                rate: 0.01,
                burst: 3,
            },
        );
        config.methods.insert(
            "/a.S/Slow".into(),
            QuotaLimits {
                rate: 0.01,
                burst: 1,
            },
        );
        let quotas = quotas(&config);
        let caller = Caller::Token("ci".into());
        let ci = identify(Some(&caller), None, &quotas.hasher);
        assert_eq!(quotas.admit(&ci, "/a.S/Slow"), Ok(()));
        let refused = quotas.admit(&ci, "/a.S/Slow").unwrap_err();
        assert_eq!(refused.pattern.as_deref(), Some("/a.S/Slow"));
        // ci's own bucket (burst 3) gave one token to the first call: two are left.
        assert_eq!(quotas.admit(&ci, "/a.S/Fast"), Ok(()));
        assert_eq!(quotas.admit(&ci, "/a.S/Fast"), Ok(()));
        let refused = quotas.admit(&ci, "/a.S/Fast").unwrap_err();
        assert_eq!((refused.pattern, refused.limits.burst), (None, 3));
    }

    #[test]
    fn the_refusal_carries_retry_info_and_quota_failure() {
        let refused = Refused {
            pattern: None,
            limits: QuotaLimits {
                rate: 2.0,
                burst: 4,
            },
            retry_after: Duration::from_millis(250),
        };
        let status = refusal(&refused, Class::Token);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "over quota: quota of this caller: 2 calls per second, burst 4; retry in 0.250s"
        );
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(250))
        );
        let violation = &details.quota_failure().unwrap().violations[0];
        assert_eq!(violation.subject, "caller:token");
    }
}
