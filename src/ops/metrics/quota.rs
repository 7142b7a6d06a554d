//! `greeter_quota_refused_total{class, grpc_service, grpc_method}`: calls refused for quota, by
//! the caller's identity class (a handful of values the quota layer owns, never the caller's own
//! name) and the method (the methods served, or `unknown`). Every series exists from the start, at
//! zero; a refusal costs one hash lookup of the path and one atomic increment.

use std::{collections::HashMap, sync::Arc};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::methods::Method;

type Labels = [(&'static str, Arc<str>); 3];

/// The refusal counters of every (class, method).
#[derive(Debug, Clone)]
pub struct QuotaRefusals {
    by_method: Arc<HashMap<Box<str>, Box<[Counter]>>>,
    unknown: Arc<[Counter]>,
}

impl QuotaRefusals {
    /// `classes` are the identity classes the quota layer counts by, indexed as it indexes them.
    pub fn register(
        registry: &mut Registry,
        classes: &'static [&'static str],
        served: &[Method],
    ) -> Self {
        let family = Family::<Labels, Counter>::default();
        registry.register(
            "greeter_quota_refused",
            "Calls refused with RESOURCE_EXHAUSTED because the caller was over its quota \
             ([quota]), by identity class and method",
            family.clone(),
        );
        let counters = |service: &str, method: &str| -> Box<[Counter]> {
            let (service, method): (Arc<str>, Arc<str>) = (service.into(), method.into());
            classes
                .iter()
                .map(|&class| {
                    family.get_or_create_owned(&[
                        ("class", class.into()),
                        ("grpc_service", Arc::clone(&service)),
                        ("grpc_method", Arc::clone(&method)),
                    ])
                })
                .collect()
        };
        let by_method = served
            .iter()
            .map(|m| (m.path().into_boxed_str(), counters(&m.service, &m.method)))
            .collect();
        Self {
            by_method: Arc::new(by_method),
            unknown: counters("unknown", "unknown").into(),
        }
    }

    /// Counts one refusal of a call to `path` by a caller of the class at `class` in the list
    /// the set was registered with.
    pub fn inc(&self, path: &str, class: usize) {
        let counters = self.by_method.get(path).map_or(&*self.unknown, |c| &**c);
        if let Some(counter) = counters.get(class) {
            counter.inc();
        }
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
