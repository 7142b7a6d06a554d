//! `greeter_quota_refused_total{class, grpc_service, grpc_method}`: calls refused for quota, by
//! the caller's identity class (a handful of values the quota layer owns, never the caller's own
//! name) and the method ([`MethodCounters`]: every series from the start, at zero; a refusal
//! costs one hash lookup of the path and one atomic increment); and the shared store's health.

use prometheus_client::{metrics::histogram::Histogram, registry::Registry};

use super::{Descriptor, MethodCounters};
use crate::methods::Method;

/// The refusal counters of every (class, method).
#[derive(Debug, Clone)]
pub struct QuotaRefusals(MethodCounters);

impl QuotaRefusals {
    /// `classes` are the identity classes the quota layer counts by, indexed as it indexes them.
    pub fn register(
        registry: &mut Registry,
        classes: &'static [&'static str],
        served: &[Method],
    ) -> Self {
        let family = Descriptor {
            name: "greeter_quota_refused",
            help: "Calls refused with RESOURCE_EXHAUSTED because the caller was over its quota \
                   ([quota]), by identity class and method",
            label: "class",
            values: classes,
        };
        Self(MethodCounters::register(registry, &family, served))
    }

    /// Counts one refusal of a call to `path` by a caller of the class at `class` in the list
    /// the set was registered with.
    pub fn inc(&self, path: &str, class: usize) {
        self.0.inc(path, class);
    }
}

/// The shared quota store's health (`quota.store = "redis"`): how long each check took, what
/// went wrong, and how often `quota.redis.on_error` decided instead of Redis.
#[derive(Debug, Clone)]
pub struct QuotaStoreMetrics {
    pub seconds: Histogram,
    pub errors: super::CounterSet,
    pub fallbacks: super::CounterSet,
}

impl QuotaStoreMetrics {
    /// `error_kinds` and `fallbacks` are the label values the store counts by.
    pub fn register(
        registry: &mut Registry,
        error_kinds: &[&'static str],
        fallbacks: &[&'static str],
    ) -> Self {
        let seconds = Histogram::new([
            0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
        ]);
        registry.register(
            "greeter_quota_store_seconds",
            "Time one quota check took in the shared store (Redis), answered or not",
            seconds.clone(),
        );
        let errors = super::CounterSet::register(
            registry,
            "greeter_quota_store_errors",
            "Quota checks the shared store (Redis) did not answer, by kind: timeout (past \
             quota.redis.timeout), connection (no connection to Redis), response (Redis answered \
             with an error)",
            "kind",
            error_kinds,
        );
        let fallbacks = super::CounterSet::register(
            registry,
            "greeter_quota_store_fallbacks",
            "Calls whose quota was decided by quota.redis.on_error because the shared store did \
             not answer, by what it did (local, allow, deny)",
            "on_error",
            fallbacks,
        );
        Self {
            seconds,
            errors,
            fallbacks,
        }
    }
}
