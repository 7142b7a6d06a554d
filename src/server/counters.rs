//! The server's own counters: what it refused or cut short, read at each scrape as `greeter_*`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::metrics::gauge::Gauge;

use crate::{
    call::intake::BufferBudget,
    call::lifetime::CallStats,
    call::limit::{ShedBy, ShedCount},
    config::LimitsConfig,
    ops::logging,
    ops::metrics::{CounterFn, CounterFnSet, ServerCounters},
    ops::telemetry::SpanQueue,
    transport::listener::ConnectionBudget,
};

/// One count in `greeter_connections_open` while the connection is served.
pub(super) struct OpenConnection(Gauge);

impl OpenConnection {
    pub(super) fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counters of what the server refused or cut short.
#[derive(Debug)]
pub struct Stats {
    pub calls: Arc<CallStats>,
    pub shed: Arc<ShedCount>,
    /// Connections accepted (TLS ones once their handshake succeeded), probe port included.
    pub connections_accepted: Arc<AtomicU64>,
    /// Request bytes held for messages still arriving, and the calls refused over them.
    pub buffered: Arc<BufferBudget>,
}

impl Stats {
    pub(super) fn new(limits: &LimitsConfig) -> Self {
        Self {
            calls: Arc::default(),
            shed: Arc::default(),
            connections_accepted: Arc::default(),
            buffered: Arc::new(BufferBudget::new(limits.max_buffered_request_bytes)),
        }
    }
}

/// The server's own counters as `greeter_*` metrics, read at each scrape.
pub(super) fn server_counters(
    stats: &Stats,
    main: &ConnectionBudget,
    probe: &ConnectionBudget,
    spans: Option<Arc<SpanQueue>>,
) -> ServerCounters {
    let shed = Arc::clone(&stats.shed);
    ServerCounters {
        connections_accepted: {
            let accepted = Arc::clone(&stats.connections_accepted);
            CounterFn::new(move || accepted.load(Ordering::Relaxed))
        },
        calls_shed: ShedBy::ALL
            .into_iter()
            .fold(CounterFnSet::new("limit"), |set, by| {
                let shed = Arc::clone(&shed);
                set.with(by.as_str(), move || shed.by(by))
            }),
        requests_refused_oversize: {
            let buffered = Arc::clone(&stats.buffered);
            CounterFn::new(move || buffered.refused())
        },
        calls_deadline_exceeded: {
            let calls = Arc::clone(&stats.calls);
            CounterFn::new(move || calls.deadline_exceeded())
        },
        calls_cancelled: {
            let calls = Arc::clone(&stats.calls);
            CounterFn::new(move || calls.cancelled())
        },
        streams_ended_by_shutdown: {
            let calls = Arc::clone(&stats.calls);
            CounterFn::new(move || calls.ended_by_shutdown())
        },
        connections_refused_per_peer: [("main", main), ("probe", probe)].into_iter().fold(
            CounterFnSet::new("listener"),
            |set, (name, budget)| {
                let counts = budget.per_peer.clone();
                set.with(name, move || counts.as_ref().map_or(0, |c| c.refused()))
            },
        ),
        log_lines_dropped: CounterFn::new(logging::dropped_lines),
        trace_spans_dropped: [
            (
                "queue_full",
                SpanQueue::dropped_queue_full as fn(&SpanQueue) -> u64,
            ),
            ("export_failed", SpanQueue::dropped_export_failed),
        ]
        .into_iter()
        .fold(CounterFnSet::new("reason"), |set, (reason, read)| {
            let spans = spans.clone();
            set.with(reason, move || spans.as_deref().map_or(0, read))
        }),
    }
}
