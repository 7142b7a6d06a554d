//! The gRPC server metrics of go-grpc-prometheus (grpc-ecosystem), with its exact names, labels,
//! help texts and histogram buckets, so that the dashboards and alerts written for Go services work
//! on greeter unchanged.
//!
//! Like go-grpc-prometheus' `InitializeMetrics`, every method served is registered at startup with
//! every status code. Calls to a path no service has are counted under `grpc_service="unknown"`,
//! `grpc_method="unknown"`, `grpc_type="unknown"`: one series whatever the client sends, so a
//! scanner cannot grow the label space.

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::methods::{Method, served_methods};

/// gRPC status codes as go-grpc-prometheus labels them (`codes.Code.String()` in grpc-go), indexed
/// by code number. Note grpc-go's spelling `Canceled`.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `grpc_server_handling_seconds` buckets: client_golang's `DefBuckets`, which go-grpc-prometheus
/// uses. The same bounds let one `histogram_quantile` aggregate greeter and Go services together.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: Arc<str>,
    grpc_method: Arc<str>,
}

impl EncodeLabelSet for MethodLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        [
            ("grpc_type", self.grpc_type),
            ("grpc_service", &*self.grpc_service),
            ("grpc_method", &*self.grpc_method),
        ]
        .encode(encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HandledLabels {
    method: MethodLabels,
    grpc_code: &'static str,
}

impl EncodeLabelSet for HandledLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        self.method.encode(encoder)?;
        [("grpc_code", self.grpc_code)].encode(encoder)
    }
}

/// The five go-grpc-prometheus families.
struct Families {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    received: Family<MethodLabels, Counter>,
    sent: Family<MethodLabels, Counter>,
    seconds: Family<MethodLabels, Histogram>,
}

/// The series of one method, resolved once.
#[derive(Debug)]
pub struct MethodMetrics {
    /// `/package.Service/Method`, or `unknown`.
    path: Box<str>,
    service: Arc<str>,
    started: Counter,
    handled: [Counter; 17],
    /// Request messages read, for the request body to count into.
    pub msg_received: Counter,
    /// Response messages sent, for the response body to count into.
    pub msg_sent: Counter,
    handling_seconds: Histogram,
    /// Shared by every method: calls started and not yet finished.
    in_flight: Gauge,
}

impl MethodMetrics {
    fn new(families: &Families, labels: MethodLabels, path: Box<str>, in_flight: &Gauge) -> Self {
        let handled = std::array::from_fn(|code| {
            families.handled.get_or_create_owned(&HandledLabels {
                method: labels.clone(),
                grpc_code: CODE_NAMES[code],
            })
        });
        Self {
            path,
            service: Arc::clone(&labels.grpc_service),
            started: families.started.get_or_create_owned(&labels),
            handled,
            msg_received: families.received.get_or_create_owned(&labels),
            msg_sent: families.sent.get_or_create_owned(&labels),
            handling_seconds: families.seconds.get_or_create_owned(&labels),
            in_flight: in_flight.clone(),
        }
    }

    /// The method's path; `unknown` for a path no service has.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The fully qualified service name, e.g. `grpc.health.v1.Health`; `unknown` likewise.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether this is the entry for paths no service has.
    pub fn is_unknown(&self) -> bool {
        &*self.path == UNKNOWN
    }

    pub fn started(&self) {
        self.started.inc();
        self.in_flight.inc();
    }

    /// Counts a finished call with its status code (a number; out of range counts as Unknown).
    pub fn handled(&self, code: usize, took: Duration) {
        self.handled.get(code).unwrap_or(&self.handled[2]).inc();
        self.handling_seconds.observe(took.as_secs_f64());
        self.in_flight.dec();
    }
}

/// Every method's series, looked up by path, and the calls in flight.
#[derive(Debug)]
pub struct GrpcMetrics {
    methods: HashMap<Box<str>, Arc<MethodMetrics>>,
    unknown: Arc<MethodMetrics>,
}

impl GrpcMetrics {
    /// Registers the families with a series for every method of the encoded
    /// `FileDescriptorSet`s (those reflection serves).
    ///
    /// # Panics
    /// If a set does not decode: they are compiled in, so that is a build defect.
    pub fn register(registry: &mut Registry, descriptor_sets: &[&[u8]]) -> Self {
        let families = Families {
            started: Family::default(),
            handled: Family::default(),
            received: Family::default(),
            sent: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
        };
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            families.started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            families.handled.clone(),
        );
        registry.register(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server",
            families.received.clone(),
        );
        registry.register(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server",
            families.sent.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level \
             handled by the server",
            families.seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "greeter_calls_in_flight",
            "gRPC calls started and not yet finished",
            in_flight.clone(),
        );

        let mut methods = HashMap::new();
        for Method {
            service,
            method,
            kind,
        } in served_methods(descriptor_sets)
        {
            let path = format!("/{service}/{method}").into_boxed_str();
            let labels = MethodLabels {
                grpc_type: kind.as_str(),
                grpc_service: service.into(),
                grpc_method: method.into(),
            };
            let metrics = MethodMetrics::new(&families, labels, path.clone(), &in_flight);
            methods.insert(path, Arc::new(metrics));
        }
        let unknown = MethodLabels {
            grpc_type: UNKNOWN,
            grpc_service: UNKNOWN.into(),
            grpc_method: UNKNOWN.into(),
        };
        let unknown = Arc::new(MethodMetrics::new(
            &families,
            unknown,
            UNKNOWN.into(),
            &in_flight,
        ));
        Self { methods, unknown }
    }

    /// The series of the method at `path` (`/package.Service/Method`).
    pub fn method(&self, path: &str) -> &Arc<MethodMetrics> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> (Registry, GrpcMetrics) {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::register(&mut registry, &[crate::pb::FILE_DESCRIPTOR_SET]);
        (registry, metrics)
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn every_method_and_code_is_exposed_at_zero_under_go_names() {
        let (registry, _) = registered();
        let out = text(&registry);
        for line in [
            "# TYPE grpc_server_started_total counter\n",
            "# TYPE grpc_server_handled_total counter\n",
            "# TYPE grpc_server_msg_received_total counter\n",
            "# TYPE grpc_server_msg_sent_total counter\n",
            "# TYPE grpc_server_handling_seconds histogram\n",
            "grpc_server_started_total{grpc_type=\"bidi_stream\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHelloBidiStream\"} 0\n",
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHello\",grpc_code=\"Unauthenticated\"} 0\n",
            "grpc_server_handled_total{grpc_type=\"unknown\",grpc_service=\"unknown\",grpc_method=\"unknown\",grpc_code=\"Canceled\"} 0\n",
            "grpc_server_handling_seconds_bucket{grpc_type=\"server_stream\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHelloStreamReply\",le=\"0.005\"} 0\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        // 5 methods (4 + unknown) x 17 codes.
        assert_eq!(out.matches("grpc_server_handled_total{").count(), 85);
    }

    #[test]
    fn calls_count_under_their_method_and_strangers_under_unknown() {
        let (registry, metrics) = registered();
        let hello = metrics.method("/helloworld.Greeter/SayHello");
        assert_eq!(hello.path(), "/helloworld.Greeter/SayHello");
        assert_eq!(hello.service(), "helloworld.Greeter");
        hello.started();
        hello.handled(3, Duration::from_millis(20));
        hello.handled(99, Duration::from_millis(1));
        let stranger = metrics.method("/evil.Scanner/Probe");
        assert!(stranger.is_unknown());
        stranger.started();
        let out = text(&registry);
        for line in [
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHello\",grpc_code=\"InvalidArgument\"} 1\n",
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHello\",grpc_code=\"Unknown\"} 1\n",
            "grpc_server_handling_seconds_bucket{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHello\",le=\"0.025\"} 2\n",
            "grpc_server_handling_seconds_count{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",grpc_method=\"SayHello\"} 2\n",
            "grpc_server_started_total{grpc_type=\"unknown\",grpc_service=\"unknown\",grpc_method=\"unknown\"} 1\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert!(!out.contains("evil"), "{out}");
    }
}
