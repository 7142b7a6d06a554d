//! `greeter_quota_refused_total{class, grpc_service, grpc_method}`: calls refused for quota, by
//! the caller's identity class (a handful of values the quota layer owns, never the caller's own
//! name) and the method (the methods served, or `unknown`). Every series exists from the start, at
//! zero; a refusal costs one hash lookup of the path and one atomic increment.

use std::{collections::HashMap, sync::Arc};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
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
