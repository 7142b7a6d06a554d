//! The call's OpenTelemetry server span, after the RPC semantic conventions: the child of the
//! caller's span when the call carries a W3C `traceparent` (and `tracestate`), or else gRPC's
//! binary `grpc-trace-bin`; named
//! `package.Service/Method`; `rpc.system`, `rpc.service`, `rpc.method`, the peer's address at
//! start; `rpc.grpc.status_code`, how the caller authenticated, and the messages each way at the
//! end; events for a deadline exceeded, a cancellation, a shed call. Exists only with
//! `tracing.enabled`: the layer holds no tracer otherwise.

use std::sync::Arc;

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _,
    },
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

/// OpenCensus' binary trace context, which gRPC's older tracing integrations send.
const GRPC_TRACE_BIN: HeaderName = HeaderName::from_static("grpc-trace-bin");

/// gRPC's `-bin` header values are base64, padded or not.
const BIN_VALUE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

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
        let mut parent = self.inner.propagator.extract(&HeaderExtractor(headers));
        if !parent.span().span_context().is_valid()
            && let Some(remote) = headers.get(GRPC_TRACE_BIN).and_then(binary_parent)
        {
            parent = Context::new().with_remote_span_context(remote);
        }
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

/// The caller's span from a `grpc-trace-bin` value: version 0, then field 0 the trace id (16
/// bytes), field 1 the span id (8), field 2 the trace options (1: bit 0 is "sampled"). Fields a
/// later version appends are ignored, as the format asks; anything else is no parent.
fn binary_parent(value: &HeaderValue) -> Option<SpanContext> {
    let bytes = BIN_VALUE.decode(value.as_bytes()).ok()?;
    let [0, 0, rest @ ..] = bytes.as_slice() else {
        return None;
    };
    let (trace_id, rest) = rest.split_first_chunk::<16>()?;
    let [1, rest @ ..] = rest else { return None };
    let (span_id, rest) = rest.split_first_chunk::<8>()?;
    let [2, options, ..] = rest else { return None };
    let context = SpanContext::new(
        TraceId::from_bytes(*trace_id),
        SpanId::from_bytes(*span_id),
        TraceFlags::new(options & 1),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
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
    /// How the caller authenticated: `token`, `jwt`, `client_cert` or `none`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(bytes: &[u8]) -> HeaderValue {
        HeaderValue::from_str(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes))
            .unwrap()
    }

    #[test]
    fn grpc_trace_bin_gives_the_callers_span() {
        let mut bytes = vec![0, 0];
        bytes.extend(1..=16);
        bytes.push(1);
        bytes.extend(17..=24);
        bytes.extend([2, 1]);
        let context = binary_parent(&bin(&bytes)).expect("a valid context");
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("0102030405060708090a0b0c0d0e0f10").unwrap()
        );
        assert_eq!(
            context.span_id(),
            SpanId::from_hex("1112131415161718").unwrap()
        );
        assert!(context.is_sampled() && context.is_remote());
        // A later version's extra fields are ignored; options 0 is not sampled.
        let mut unsampled = bytes.clone();
        *unsampled.last_mut().unwrap() = 0;
        unsampled.extend([3, 9, 9]);
        assert!(!binary_parent(&bin(&unsampled)).unwrap().is_sampled());
        // Padded base64 is accepted too.
        let padded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert!(binary_parent(&HeaderValue::from_str(&padded).unwrap()).is_some());
        let mut version_1 = bytes.clone();
        version_1[0] = 1;
        let mut zero_trace = bytes.clone();
        zero_trace[2..18].fill(0);
        for bad in [&bytes[..28], &version_1, &zero_trace] {
            assert_eq!(binary_parent(&bin(bad)), None, "{bad:?}");
        }
        assert_eq!(binary_parent(&HeaderValue::from_static("!!")), None);
    }
}
