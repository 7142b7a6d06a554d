//! The bounded keyed state store the quota tables keep their buckets in.

use std::{
    hash::Hash,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use governor::{
    nanos::Nanos,
    state::{
        InMemoryState, NotKeyed, StateStore,
        keyed::{DashMapStateStore, ShrinkableKeyedStateStore},
    },
};

/// A keyed state store with at most `max` keys: governor's dashmap store, plus one bucket that
/// every key not yet tracked shares while the map is full. Memory stays bounded under any number
/// of distinct callers; the callers already tracked keep their own buckets.
#[derive(Debug)]
pub(super) struct Bounded<K: Hash + Eq + Clone> {
    map: DashMapStateStore<K>,
    overflow: InMemoryState,
    max: usize,
    /// Calls that drew from `overflow`: a table too small for its callers is worth a warning.
    overflowed: Arc<AtomicU64>,
}

impl<K: Hash + Eq + Clone> Bounded<K> {
    pub(super) fn new(max: usize, overflowed: Arc<AtomicU64>) -> Self {
        Self {
            map: DashMapStateStore::default(),
            overflow: InMemoryState::default(),
            max,
            overflowed,
        }
    }
}

impl<K: Hash + Eq + Clone> StateStore for Bounded<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        // Concurrent newcomers may each pass this check: the map can exceed `max` by the number
        // of calls admitted at that instant, itself bounded.
        if self.map.len() >= self.max {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        self.map
            .entry(key.clone())
            .or_default()
            .measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Bounded<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
