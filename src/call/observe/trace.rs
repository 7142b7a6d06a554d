//! The call's OpenTelemetry server span, after the RPC semantic conventions: the child of the
//! caller's span when the call carries a W3C `traceparent` (and `tracestate`); named
//! `package.Service/Method`; `rpc.system`, `rpc.service`, `rpc.method`, the peer's address at
//! start; `rpc.grpc.status_code`, how the caller authenticated, and the messages each way at the
//! end; events for a deadline exceeded, a cancellation, a shed call. Exists only with
//! `tracing.enabled`: the layer holds no tracer otherwise.

use std::sync::Arc;

use opentelemetry::{
    KeyValue,
    propagation::TextMapPropagator,
    trace::{Span as _, SpanKind, Status, Tracer as _},
};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{SdkTracer, Span},
};
use prometheus_client::metrics::counter::Counter;
use tonic::codegen::http::{HeaderMap, HeaderValue, header::HeaderName};

use crate::{
    call::limit::ShedBy,
    ops::metrics::grpc::CODE_NAMES,
    transport::listener::{PeerAddr, PeerInfo},
};

/// The response header carrying the call's trace id (32 lowercase hex digits), with
/// `tracing.response_header = true`.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("greeter-trace-id");

/// The `rpc.method` of a path no service has: the conventions' name for a method outside the
/// known set, and no client-chosen text in the span.
const OTHER_METHOD: &str = "_OTHER";

const CANCELLED: u8 = 1;
const DEADLINE_EXCEEDED: u8 = 4;

/// Starts the spans; shared by every connection of a listener.
#[derive(Debug, Clone)]
pub struct CallTracer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    response_header: bool,
}

impl CallTracer {
    pub fn new(tracer: SdkTracer, response_header: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                tracer,
                propagator: TraceContextPropagator::new(),
                response_header,
            }),
        }
    }

    /// The span of a call to `path` (`None` for a path no service has), started now.
    pub fn start(
        &self,
        headers: &HeaderMap,
        path: Option<&str>,
        peer: Option<&PeerInfo>,
        request_id: &HeaderValue,
    ) -> CallSpan {
        let parent = self.inner.propagator.extract(&HeaderExtractor(headers));
        let (service, method) = path
            .and_then(|path| path.trim_start_matches('/').split_once('/'))
            .unwrap_or(("", OTHER_METHOD));
        let name = if service.is_empty() {
            OTHER_METHOD.to_owned()
        } else {
            format!("{service}/{method}")
        };
        let builder = self
            .inner
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server);
        // The samplers decide on the trace id and the parent alone: the attributes are built only
        // for a span that will be exported.
        let mut span = self.inner.tracer.build_with_context(builder, &parent);
        if span.is_recording() {
            span.set_attributes(attributes(service, method, peer, request_id));
        }
        let mut trace_id = [0; 32];
        hex::encode_to_slice(span.span_context().trace_id().to_bytes(), &mut trace_id)
            .expect("16 bytes make 32 hex digits");
        CallSpan {
            span,
            trace_id,
            header: self.inner.response_header,
            received: Counter::default(),
            sent: 0,
            auth: if peer.is_some_and(|p| p.client_cert.is_some()) {
                "client_cert"
            } else {
                "none"
            },
            shed: None,
        }
    }
}

/// The attributes known when a call starts.
fn attributes(
    service: &str,
    method: &str,
    peer: Option<&PeerInfo>,
    request_id: &HeaderValue,
) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(7);
    attributes.push(KeyValue::new("rpc.system", "grpc"));
    if !service.is_empty() {
        attributes.push(KeyValue::new("rpc.service", service.to_owned()));
    }
    attributes.push(KeyValue::new("rpc.method", method.to_owned()));
    match peer.map(|p| p.remote_addr) {
        Some(PeerAddr::Tcp(addr)) => {
            attributes.push(KeyValue::new("network.transport", "tcp"));
            attributes.push(KeyValue::new("network.peer.address", addr.ip().to_string()));
            attributes.push(KeyValue::new("network.peer.port", i64::from(addr.port())));
        }
        Some(PeerAddr::Unix { .. }) => {
            attributes.push(KeyValue::new("network.transport", "unix"));
        }
        None => {}
    }
    if let Ok(id) = request_id.to_str() {
        attributes.push(KeyValue::new("greeter.request_id", id.to_owned()));
    }
    attributes
}

/// One call's span, ended with [`CallSpan::finish`] when the call's record is.
pub struct CallSpan {
    span: Span,
    /// Lowercase hex.
    trace_id: [u8; 32],
    header: bool,
    /// Request messages read: the request body counts into it.
    pub received: Counter,
    /// Response messages sent.
    pub sent: u64,
    /// How the caller authenticated: `token`, `client_cert` or `none`.
    pub auth: &'static str,
    /// The limit that shed the call, if one did.
    pub shed: Option<ShedBy>,
}

impl CallSpan {
    /// The trace id, as the access line and the response header carry it.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).expect("hex is ASCII")
    }

    /// The `greeter-trace-id` value, when the configuration returns it.
    pub fn response_header(&self) -> Option<HeaderValue> {
        self.header
            .then(|| HeaderValue::from_bytes(&self.trace_id).expect("hex is a header value"))
    }

    /// Records how the call ended and ends the span.
    pub fn finish(mut self, code: u8) {
        if !self.span.is_recording() {
            return;
        }
        let span = &mut self.span;
        span.set_attributes([
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
            KeyValue::new("greeter.auth", self.auth),
            KeyValue::new("greeter.messages_received", self.received.get() as i64),
            KeyValue::new("greeter.messages_sent", self.sent as i64),
        ]);
        match code {
            DEADLINE_EXCEEDED => span.add_event("deadline_exceeded", Vec::new()),
            CANCELLED => span.add_event("cancelled", Vec::new()),
            _ => {}
        }
        if let Some(by) = self.shed {
            span.add_event(
                "shed",
                vec![KeyValue::new("greeter.shed_limit", by.as_str())],
            );
        }
        // The conventions' server errors; a client's mistake (NOT_FOUND, INVALID_ARGUMENT, ...)
        // leaves the status unset.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            span.set_status(Status::error(CODE_NAMES[usize::from(code)]));
        }
        span.end();
    }
}
