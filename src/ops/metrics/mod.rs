//! Prometheus metrics: the registry, the metrics of the server as a whole, and how they are served.
//!
//! Every series a server exposes is created when the server starts, at zero, so that `rate()` and
//! `absent()` work before the first event and the hot path never builds a label set: layers and
//! tasks hold cloned handles (an `Arc`'d atomic each) and only increment them.
//!
//! - [`grpc`]: go-grpc-prometheus' `grpc_server_*` families, per method.
//! - [`process`]: `process_*`, read from `/proc` at each scrape.
//! - [`exporter`]: what the metrics listener answers (`GET /metrics`); the listener itself is
//!   `transport::listener::serve_http1`.
//! - [`by_method`]: `greeter_*` counters by method and one more label (quota refusals, faults).
//! - [`quota`]: quota refusals, and the shared quota store's health.
//! - here: `greeter_*`, what the server itself does (connections, TLS, auth, reloads), and what
//!   it is (build, worst-case memory).

pub mod by_method;
pub mod exporter;
pub mod grpc;
pub mod process;
pub mod quota;

use std::fmt;

use crate::config::{ClientAuth, TlsConfig};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use by_method::{Descriptor, MethodCounters};
pub use grpc::{GrpcMetrics, MethodMetrics};
pub use quota::{QuotaRefusals, QuotaStoreMetrics};

/// `greeter_faults_injected_total`; its `kind` values are the fault layer's.
pub fn faults_injected(kinds: &'static [&'static str]) -> Descriptor {
    Descriptor {
        name: "greeter_faults_injected",
        help: "Faults injected on purpose ([faults]: a method's percentage or a caller's \
               greeter-fault header), by kind (error: answered with the configured code; delay: \
               held before the handler ran) and method: a rehearsal, not an incident",
        label: "kind",
        values: kinds,
    }
}

/// One label pair with static key and value: every `greeter_*` label value is known up front.
pub type Label = [(&'static str, &'static str); 1];

/// Counters of one family, one per value of its single label, all created up front.
#[derive(Debug, Clone)]
pub struct CounterSet {
    counters: std::sync::Arc<[(&'static str, Counter)]>,
}

impl CounterSet {
    /// Registers `name{label=value}` for each of `values`.
    pub fn register(
        registry: &mut Registry,
        name: &str,
        help: &str,
        label: &'static str,
        values: &[&'static str],
    ) -> Self {
        let family = Family::<Label, Counter>::default();
        registry.register(name, help, family.clone());
        let counters = values
            .iter()
            .map(|&value| (value, family.get_or_create_owned(&[(label, value)])))
            .collect();
        Self { counters }
    }

    /// Counts one event with this label value.
    ///
    /// # Panics
    /// In debug builds, for a value the set was not registered with: a programming error.
    pub fn inc(&self, value: &str) {
        match self.counters.iter().find(|(v, _)| *v == value) {
            Some((_, counter)) => {
                counter.inc();
            }
            None => debug_assert!(false, "{value:?} is not a registered label value"),
        }
    }
}

/// `greeter_reloads_total{kind, outcome}`: series exist only for the kinds of file in use. JWKS
/// files are counted per issuer too (`issuer`, one of the configured issuers): each reloads on
/// its own.
#[derive(Debug, Clone)]
pub struct Reloads(Family<Vec<(&'static str, String)>, Counter>);

impl Reloads {
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::default();
        registry.register(
            "greeter_reloads",
            "Reloads of rotated files by kind (tls, tokens, jwks; jwks per issuer) and outcome: \
             success; failure (the file did not load, the previous version stays in force); \
             revoked (the file is gone: every token, or every client certificate, or the \
             issuer's JWTs, are refused until it is back)",
            family.clone(),
        );
        Self(family)
    }

    /// The counters of one kind of file, created at zero.
    pub fn kind(&self, kind: &'static str) -> ReloadOutcomes {
        self.outcomes(vec![("kind", kind.to_owned())])
    }

    /// The counters of one JWT issuer's JWKS file (`kind="jwks"`), created at zero.
    pub fn jwks_issuer(&self, issuer: &str) -> ReloadOutcomes {
        self.outcomes(vec![
            ("kind", "jwks".to_owned()),
            ("issuer", issuer.to_owned()),
        ])
    }

    fn outcomes(&self, labels: Vec<(&'static str, String)>) -> ReloadOutcomes {
        let counter = |outcome: &str| {
            let mut labels = labels.clone();
            labels.push(("outcome", outcome.to_owned()));
            self.0.get_or_create_owned(&labels)
        };
        ReloadOutcomes {
            success: counter("success"),
            failure: counter("failure"),
            revoked: counter("revoked"),
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Success,
    Failure,
    Revoked,
}

/// The outcome counts of reloading one kind of file.
#[derive(Debug, Clone)]
pub struct ReloadOutcomes {
    success: Counter,
    failure: Counter,
    revoked: Counter,
}

impl ReloadOutcomes {
    pub fn record(&self, outcome: ReloadOutcome) {
        match outcome {
            ReloadOutcome::Success => &self.success,
            ReloadOutcome::Failure => &self.failure,
            ReloadOutcome::Revoked => &self.revoked,
        }
        .inc();
    }
}

/// The gauges and counters of the server as a whole (the per-call ones are in [`GrpcMetrics`]).
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    pub connections_open: Gauge,
    /// TLS handshakes that did not complete, by `reason`: `error` or `timeout`.
    pub tls_handshake_failures: CounterSet,
    /// Connections sent GOAWAY because a reload stopped trusting their client's certificate.
    pub tls_connections_revoked: Counter,
    /// Calls refused by the auth layer, by `reason`.
    pub auth_failures: CounterSet,
}

impl ServerMetrics {
    /// `auth_refusals` are the reasons the auth layer refuses calls for: it owns them.
    pub fn register(registry: &mut Registry, auth_refusals: &'static [&'static str]) -> Self {
        let connections_open = Gauge::default();
        registry.register(
            "greeter_connections_open",
            "Connections open now (TLS ones once their handshake succeeded), probe port included",
            connections_open.clone(),
        );
        let tls_connections_revoked = Counter::default();
        registry.register(
            "greeter_tls_connections_revoked",
            "Open connections sent GOAWAY (then closed once their calls finish, within \
             connection.max_age_grace) because a reload of tls.client_ca or tls.client_crl_files \
             stopped trusting the client certificate they were authenticated with",
            tls_connections_revoked.clone(),
        );
        Self {
            connections_open,
            tls_connections_revoked,
            tls_handshake_failures: CounterSet::register(
                registry,
                "greeter_tls_handshake_failures",
                "TLS handshakes that failed or did not finish within tls.handshake_timeout",
                "reason",
                &["error", "timeout"],
            ),
            auth_failures: CounterSet::register(
                registry,
                "greeter_auth_failures",
                "Calls refused by authentication or authorization, by reason",
                "reason",
                auth_refusals,
            ),
        }
    }
}

/// The counters the server keeps for its own use (atomics on its hot paths), each read at a
/// scrape: the server supplies the readers, this names and explains the series.
pub struct ServerCounters {
    pub connections_accepted: CounterFn,
    /// By `limit`: `connection`, `server`, `anonymous_connection`, `anonymous`.
    pub calls_shed: CounterFnSet,
    pub requests_refused_oversize: CounterFn,
    pub calls_deadline_exceeded: CounterFn,
    pub calls_cancelled: CounterFn,
    pub streams_ended_by_shutdown: CounterFn,
    /// By `listener`: `main`, `probe`.
    pub connections_refused_per_peer: CounterFnSet,
    pub log_lines_dropped: CounterFn,
    /// By `reason`: `queue_full`, `export_failed`.
    pub trace_spans_dropped: CounterFnSet,
}

impl ServerCounters {
    pub fn register(self, registry: &mut Registry) {
        registry.register(
            "greeter_connections_accepted",
            "Connections accepted (TLS ones once their handshake succeeded), probe port included",
            self.connections_accepted,
        );
        registry.register(
            "greeter_calls_shed",
            "Calls refused with RESOURCE_EXHAUSTED at once because a concurrency limit was \
             reached, by limit (connection: max_concurrent_calls_per_connection, server: \
             max_concurrent_calls, anonymous_connection: max_anonymous_calls_per_connection, \
             anonymous: max_anonymous_calls)",
            self.calls_shed,
        );
        registry.register(
            "greeter_requests_refused_oversize",
            "Calls refused with RESOURCE_EXHAUSTED because a request message was larger than its \
             method accepts or limits.max_buffered_request_bytes was reached",
            self.requests_refused_oversize,
        );
        registry.register(
            "greeter_calls_deadline_exceeded",
            "Calls the server ended with DEADLINE_EXCEEDED because their deadline passed",
            self.calls_deadline_exceeded,
        );
        registry.register(
            "greeter_calls_cancelled",
            "Calls whose client reset the stream or disconnected before the call ended",
            self.calls_cancelled,
        );
        registry.register(
            "greeter_streams_ended_by_shutdown",
            "Server streams ended with UNAVAILABLE because the server was shutting down",
            self.streams_ended_by_shutdown,
        );
        registry.register(
            "greeter_connections_refused_per_peer",
            "Connections closed at once because their IP address already had as many open as \
             allowed (limits.max_connections_per_peer; 8 on the probe port)",
            self.connections_refused_per_peer,
        );
        registry.register(
            "greeter_log_lines_dropped",
            "Log lines dropped because the log writer's queue was full (stderr slower than the \
             lines arrive); calls never wait for the log",
            self.log_lines_dropped,
        );
        registry.register(
            "greeter_trace_spans_dropped",
            "Sampled spans never exported, by reason (queue_full: tracing.max_queue_size spans \
             were already waiting; export_failed: the collector refused them, was unreachable or \
             did not answer within tracing.export_timeout); calls never wait for their span",
            self.trace_spans_dropped,
        );
    }
}

/// Registers `greeter_jwt_signature_checks_total{outcome}` (`valid`, `invalid`), read from the
/// auth layer at each scrape; only when JWTs are accepted.
pub fn register_jwt_signature_checks(registry: &mut Registry, checks: CounterFnSet) {
    registry.register(
        "greeter_jwt_signature_checks",
        "JWT signature checks made (tokens answered from the caches of verified and refused \
         tokens, or refused for a spent auth.jwt.peer_failure_burst, are not checked), by \
         outcome: valid (signature and claims), invalid",
        checks,
    );
}

/// The dates of the TLS material that end something: the serving certificate's `notAfter`, the
/// client CA's (the first of its certificates to expire) and the revocation lists' `nextUpdate`
/// (the earliest). The TLS reloader keeps them current; alerts page before any of them passes.
#[derive(Debug, Clone)]
pub struct TlsExpiry {
    certificate: Gauge,
    client_ca: Option<Gauge>,
    crl: Option<Gauge>,
}

impl TlsExpiry {
    /// Registers a series for each date the configuration has: the client CA's with client
    /// certificates on, the CRLs' with `tls.client_crl_files`.
    pub fn register(registry: &mut Registry, tls: &TlsConfig) -> Self {
        let client_ca = tls.client_auth != ClientAuth::None;
        let crls = !tls.client_crl_files.is_empty();
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        Self {
            certificate: gauge(
                "greeter_tls_certificate_expiry_timestamp_seconds",
                "When the serving TLS certificate expires (notAfter), as a Unix timestamp; \
                 follows reloads",
            ),
            client_ca: client_ca.then(|| {
                gauge(
                    "greeter_tls_client_ca_expiry_timestamp_seconds",
                    "When the first certificate of the client CA bundle (tls.client_ca) expires \
                     (notAfter), as a Unix timestamp; follows reloads",
                )
            }),
            crl: crls.then(|| {
                gauge(
                    "greeter_tls_crl_next_update_timestamp_seconds",
                    "The earliest nextUpdate of the revocation lists (tls.client_crl_files), as \
                     a Unix timestamp: when their issuer promised a newer list; follows reloads",
                )
            }),
        }
    }

    /// Sets the dates of material just loaded; a date the material does not have (a CRL
    /// without nextUpdate) leaves its gauge as it was.
    pub fn set(&self, certificate: i64, client_ca: Option<i64>, crl: Option<i64>) {
        self.certificate.set(certificate);
        for (gauge, value) in [(&self.client_ca, client_ca), (&self.crl, crl)] {
            if let (Some(gauge), Some(value)) = (gauge, value) {
                gauge.set(value);
            }
        }
    }
}

/// `greeter_build_info{version, commit} 1`, and `greeter_memory_worst_case_bytes`: what the
/// build is (to tell a rollout's versions apart on a dashboard) and the most memory the
/// configuration lets clients make the process hold (`greeter config check` prints the same), so
/// an alert can compare the process's resident memory with it.
pub fn register_facts(registry: &mut Registry, version: &str, commit: &str, worst_case: u64) {
    let info = Family::<[(&'static str, String); 2], Gauge>::default();
    info.get_or_create(&[
        ("version", version.to_owned()),
        ("commit", commit.to_owned()),
    ])
    .set(1);
    registry.register(
        "greeter_build_info",
        "The build serving: its version and git commit; always 1",
        info,
    );
    let bytes: Gauge = Gauge::default();
    bytes.set(i64::try_from(worst_case).unwrap_or(i64::MAX));
    registry.register(
        "greeter_memory_worst_case_bytes",
        "The most memory the configured limits let clients make the server hold (greeter \
         config check prints it): set the container's memory limit at or above it",
        bytes,
    );
}

type Read = Box<dyn Fn() -> u64 + Send + Sync>;

/// A counter whose value lives elsewhere (an atomic the server keeps for its own use), read at
/// each scrape, like client_golang's `CounterFunc`: counting it twice would cost the hot path.
pub struct CounterFn(Read);

impl CounterFn {
    pub fn new(read: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Box::new(read))
    }
}

impl fmt::Debug for CounterFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CounterFn").field(&(self.0)()).finish()
    }
}

impl TypedMetric for CounterFn {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for CounterFn {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&(self.0)(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// [`CounterFn`]s of one family, one per value of its single label.
pub struct CounterFnSet {
    label: &'static str,
    series: Vec<(&'static str, Read)>,
}

impl CounterFnSet {
    pub fn new(label: &'static str) -> Self {
        Self {
            label,
            series: Vec::new(),
        }
    }

    pub fn with(
        mut self,
        value: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.series.push((value, Box::new(read)));
        self
    }
}

impl fmt::Debug for CounterFnSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values: Vec<_> = self.series.iter().map(|(v, read)| (v, read())).collect();
        f.debug_struct("CounterFnSet")
            .field("label", &self.label)
            .field("series", &values)
            .finish()
    }
}

impl TypedMetric for CounterFnSet {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for CounterFnSet {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (value, read) in &self.series {
            encoder
                .encode_family(&[(self.label, *value)])?
                .encode_counter::<NoLabelSet, _, u64>(&read(), None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn counter_sets_start_at_zero_and_count_by_label() {
        let mut registry = Registry::default();
        let set = CounterSet::register(&mut registry, "x_events", "Events", "reason", &["a", "b"]);
        set.inc("b");
        set.inc("b");
        let out = text(&registry);
        assert!(out.contains("# TYPE x_events_total counter\n"), "{out}");
        assert!(out.contains("x_events_total{reason=\"a\"} 0\n"), "{out}");
        assert!(out.contains("x_events_total{reason=\"b\"} 2\n"), "{out}");
    }

    #[test]
    fn counter_fns_read_their_atomic_at_scrape_time() {
        let value = Arc::new(AtomicU64::new(0));
        let mut registry = Registry::default();
        let read = Arc::clone(&value);
        registry.register(
            "x_accepted",
            "Accepted",
            CounterFn::new(move || read.load(Ordering::Relaxed)),
        );
        let read = Arc::clone(&value);
        registry.register(
            "x_shed",
            "Shed",
            CounterFnSet::new("limit")
                .with("server", move || read.load(Ordering::Relaxed))
                .with("connection", || 7),
        );
        value.store(3, Ordering::Relaxed);
        let out = text(&registry);
        assert!(out.contains("x_accepted_total 3\n"), "{out}");
        assert!(out.contains("x_shed_total{limit=\"server\"} 3\n"), "{out}");
        assert!(
            out.contains("x_shed_total{limit=\"connection\"} 7\n"),
            "{out}"
        );
    }

    #[test]
    fn reload_outcomes_count_per_kind() {
        let mut registry = Registry::default();
        let reloads = Reloads::register(&mut registry);
        assert_eq!(text(&registry), "", "no series before a kind is in use");
        let (tls, tokens) = (reloads.kind("tls"), reloads.kind("tokens"));
        tls.record(ReloadOutcome::Success);
        tokens.record(ReloadOutcome::Failure);
        tokens.record(ReloadOutcome::Revoked);
        reloads
            .jwks_issuer("https://a.example")
            .record(ReloadOutcome::Failure);
        let out = text(&registry);
        for line in [
            "greeter_reloads_total{kind=\"tls\",outcome=\"success\"} 1\n",
            "greeter_reloads_total{kind=\"tls\",outcome=\"failure\"} 0\n",
            "greeter_reloads_total{kind=\"tls\",outcome=\"revoked\"} 0\n",
            "greeter_reloads_total{kind=\"tokens\",outcome=\"failure\"} 1\n",
            "greeter_reloads_total{kind=\"tokens\",outcome=\"revoked\"} 1\n",
            "greeter_reloads_total{kind=\"jwks\",issuer=\"https://a.example\",outcome=\"failure\"} 1\n",
            "greeter_reloads_total{kind=\"jwks\",issuer=\"https://a.example\",outcome=\"success\"} 0\n",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
    }
}
