//! Counters of one family by method and one more label with a handful of values the counting
//! layer owns (never a caller's own name): `greeter_quota_refused_total{class, ...}`,
//! `greeter_faults_injected_total{kind, ...}`. The methods are those served, or `unknown`. Every
//! series exists from the start, at zero; an event costs one hash lookup of the path and one
//! atomic increment.

use std::{collections::HashMap, sync::Arc};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::methods::Method;

type Labels = [(&'static str, Arc<str>); 3];

/// The counters of every (label value, method).
#[derive(Debug, Clone)]
pub struct MethodCounters {
    by_method: Arc<HashMap<Box<str>, Box<[Counter]>>>,
    unknown: Arc<[Counter]>,
}

/// How a [`MethodCounters`] family is named and explained.
pub struct Descriptor {
    pub name: &'static str,
    pub help: &'static str,
    /// The label beside `grpc_service` and `grpc_method`.
    pub label: &'static str,
    /// Its values, indexed as the counting layer indexes them.
    pub values: &'static [&'static str],
}

impl MethodCounters {
    pub fn register(registry: &mut Registry, family: &Descriptor, served: &[Method]) -> Self {
        let counters_family = Family::<Labels, Counter>::default();
        registry.register(family.name, family.help, counters_family.clone());
        let counters = |service: &str, method: &str| -> Box<[Counter]> {
            let (service, method): (Arc<str>, Arc<str>) = (service.into(), method.into());
            family
                .values
                .iter()
                .map(|&value| {
                    counters_family.get_or_create_owned(&[
                        (family.label, value.into()),
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

    /// Counts one event of a call to `path`, for the label value at `value` in the list the
    /// family was registered with.
    pub fn inc(&self, path: &str, value: usize) {
        let counters = self.by_method.get(path).map_or(&*self.unknown, |c| &**c);
        if let Some(counter) = counters.get(value) {
            counter.inc();
        }
    }
}
