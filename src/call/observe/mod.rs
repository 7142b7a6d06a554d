//! The record of every call: its request id, the span its log lines carry, the go-grpc-prometheus
//! metrics, and one access log line when it ends. The outermost per-call layer, so that calls
//! refused further in (shed, unauthenticated) are counted and logged like any other.
//!
//! A call ends with the status in its response headers (a trailers-only response: every refusal
//! and most errors), with the status in its trailers, or without either when the client resets
//! the stream or goes away, which counts as `Canceled`, as grpc-go reports it. The record is
//! finished when the response body is dropped, so every call is counted exactly once, however it
//! ends.

pub mod frames;
pub mod request_id;
pub mod trace;

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tower::{Layer, Service};
use tracing::{Level, Span};

pub use frames::CountedBody;
use frames::Counting;
use frames::MessageCounter;
use trace::{CallSpan, CallTracer};

use crate::{
    call::auth::{AuthRefused, Caller},
    call::faults::InjectedFault,
    call::grpc_headers::grpc_status,
    call::limit::ShedBy,
    call::resolve::Resolver,
    ops::logging::access::{self, AccessLine},
    ops::metrics::{MethodMetrics, grpc::CODE_NAMES},
    transport::listener::PeerInfo,
};

/// The target of the per-call log line: `greeter::access=off` in `log.filter` switches it off.
pub const ACCESS_TARGET: &str = access::TARGET;

/// The target of the per-call span, at DEBUG: `greeter::request=debug` (or any filter enabling
/// debug for it, like `greeter=debug`) puts the call's request id on every line logged while the
/// call runs. Off at the production level (info), where no line is logged inside a call but the
/// access line, which carries the id itself: a span per call costs about 2% of a unary call's
/// CPU with the fmt subscriber (benches/observability.rs), most of the observability budget.
pub const SPAN_TARGET: &str = "greeter::request";

/// Bytes of an unknown method's path that the access line keeps: anyone can send a path as long
/// as the header limit allows (16 KiB), and a log is no place to store it.
const LOGGED_PATH_BYTES: usize = 256;

/// `path`, cut to [`LOGGED_PATH_BYTES`] (at a character boundary) with an ellipsis.
fn shortened(path: &str) -> Box<str> {
    if path.len() <= LOGGED_PATH_BYTES {
        return path.into();
    }
    let cut = (0..=LOGGED_PATH_BYTES)
        .rev()
        .find(|&i| path.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &path[..cut]).into()
}

/// Calls to this service are logged at DEBUG: probes would otherwise flood the access log.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

const CANCELED: u8 = 1;
const UNKNOWN: u8 = 2;
const INTERNAL: u8 = 13;

/// Shared by every connection of a server.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    methods: Arc<Resolver>,
    /// Whether to keep metrics at all: off when nothing can scrape them (`metrics.listen = ""`).
    count: bool,
    /// A span per call, with `tracing.enabled`.
    tracer: Option<CallTracer>,
    /// What the log's filter lets through, asked once, when the server is built: the filter is
    /// fixed when the process starts (`log.filter`, `RUST_LOG`), and asking the subscriber per
    /// call cost ~380 instructions (a per-layer filter's callsite interest is "sometimes", so
    /// tracing cannot cache the answer itself).
    logs: Logs,
}

/// See [`ObserveLayer::logs`].
#[derive(Debug, Clone, Copy)]
struct Logs {
    /// The access line at INFO: every call but health checks.
    calls: bool,
    /// The access line at DEBUG: health checks, which probes would otherwise flood the log with.
    health: bool,
    /// The call's span ([`SPAN_TARGET`], DEBUG).
    spans: bool,
}

impl Logs {
    fn asked() -> Self {
        Self {
            calls: tracing::enabled!(target: ACCESS_TARGET, Level::INFO),
            health: tracing::enabled!(target: ACCESS_TARGET, Level::DEBUG),
            spans: tracing::enabled!(target: SPAN_TARGET, Level::DEBUG),
        }
    }
}

impl ObserveLayer {
    /// Built after the process's subscriber is installed: the layer asks it once what the log
    /// filter lets through.
    pub fn new(methods: Arc<Resolver>, count: bool) -> Self {
        Self {
            methods,
            count,
            tracer: None,
            logs: Logs::asked(),
        }
    }

    /// Starts an OpenTelemetry span per call (`None`: none, at no cost).
    pub fn traced(self, tracer: Option<CallTracer>) -> Self {
        Self { tracer, ..self }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Observe<S>
where
    S: Service<http::Request<CountedBody<ReqBody>>, Response = http::Response<ResBody>>,
    ResBody: Body,
{
    type Response = http::Response<ObserveBody<ResBody>>;
    type Error = S::Error;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        // The one lookup of the call's method: the layers further in read it from here.
        let resolved = self.layer.methods.resolve(path);
        let method = &resolved.metrics;
        let count = self.layer.count;
        // A switched-off access log costs neither the fields' copies nor the formatting.
        let quiet = method.service() == HEALTH_SERVICE;
        let logs = self.layer.logs;
        let log = if quiet { logs.health } else { logs.calls };
        let request_id = request_id::for_request(request.headers());
        let span = if logs.spans {
            tracing::debug_span!(
                target: SPAN_TARGET,
                "grpc",
                request_id = request_id.to_str().unwrap_or_default()
            )
        } else {
            Span::none()
        };
        let peer = request.extensions().get::<PeerInfo>();
        let trace = self.layer.tracer.as_ref().map(|tracer| {
            let path = (!method.is_unknown()).then(|| method.path());
            Box::new(tracer.start(request.headers(), path, peer, &request_id))
        });
        let tally = trace.as_ref().map(|trace| trace.received.clone());
        // Boxed: the response body that carries the record is moved by every layer and by hyper;
        // copying it cost more than the box.
        let record = (count || log || trace.is_some()).then(|| {
            Box::new(CallRecord {
                method: Arc::clone(method),
                count,
                started: Instant::now(),
                code: None,
                ended: false,
                trace,
                log: log.then(|| AccessLog {
                    quiet,
                    request_id: request_id.clone(),
                    peer: peer.cloned(),
                    unknown_path: method.is_unknown().then(|| shortened(path)),
                    caller: None,
                    fault: None,
                    refused: None,
                }),
            })
        });
        let received = count.then(|| {
            method.started();
            method.msg_received.clone()
        });
        request.extensions_mut().insert(Arc::clone(resolved));
        let request = request.map(|body| CountedBody::new(body, Counting::new(received, tally)));
        ObserveFuture {
            inner: span.in_scope(|| self.inner.call(request)),
            span,
            request_id: Some(request_id),
            record,
        }
    }
}

/// What is known about a call until it ends; its end is counted and logged when this is dropped.
struct CallRecord {
    method: Arc<MethodMetrics>,
    count: bool,
    started: Instant,
    /// The final status code, once seen.
    code: Option<u8>,
    /// The response body reached its end (with or without a status).
    ended: bool,
    /// The call's span, with `tracing.enabled`. Boxed on its own: OpenTelemetry's trace id is a
    /// `u128`, whose 16-byte alignment would otherwise make every record an over-aligned
    /// allocation, which mimalloc serves on its slow path (~260 instructions a call), tracing on
    /// or off. It also keeps the record small (~150 bytes instead of ~580).
    trace: Option<Box<CallSpan>>,
    /// `None` when the access log is switched off.
    log: Option<AccessLog>,
}

/// The fields only the access log needs.
struct AccessLog {
    quiet: bool,
    request_id: HeaderValue,
    peer: Option<PeerInfo>,
    /// The path as the client sent it, for a method no service has.
    unknown_path: Option<Box<str>>,
    /// Who the auth layer admitted the call as.
    caller: Option<Caller>,
    /// What `[faults]` did to the call, on purpose.
    fault: Option<InjectedFault>,
    /// Why the auth layer refused the call.
    refused: Option<AuthRefused>,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let code = match (self.code, self.ended) {
            (Some(code), _) => code,
            (None, true) => UNKNOWN,
            (None, false) => CANCELED,
        };
        let took = self.started.elapsed();
        if self.count {
            self.method.handled(usize::from(code), took);
        }
        let trace = self.trace.take();
        let Some(log) = &self.log else {
            if let Some(trace) = trace {
                trace.finish(code);
            }
            return;
        };
        let (auth, identity) = identity(log.caller.as_ref(), log.peer.as_ref());
        let line = AccessLine {
            level: if log.quiet { Level::DEBUG } else { Level::INFO },
            method: log.unknown_path.as_deref().unwrap_or(self.method.path()),
            served: log.unknown_path.is_none(),
            peer: log.peer.as_ref().map(PeerInfo::remote_text),
            auth,
            identity,
            code: CODE_NAMES[usize::from(code)],
            // Microseconds fit a u64 for 584,000 years.
            duration_us: took.as_micros() as u64,
            request_id: log.request_id.to_str().unwrap_or_default(),
            trace_id: trace.as_deref().map(CallSpan::trace_id),
            fault: log.fault.as_ref().map(|f| &*f.0),
            refused: log.refused.map(|r| r.0),
        };
        line.log();
        if let Some(trace) = trace {
            trace.finish(code);
        }
    }
}

/// Who made the call, for the log: how they authenticated ([`Caller::class`]: `token`, `jwt`,
/// `client_cert` or `none`) and as whom ([`Caller::identity`]; `None` for `none`). A verified client
/// certificate names the caller even when auth is off or refused the call.
fn identity<'a>(
    caller: Option<&'a Caller>,
    peer: Option<&'a PeerInfo>,
) -> (&'static str, Option<&'a str>) {
    match caller {
        Some(caller) if *caller != Caller::Anonymous => (caller.class(), caller.identity()),
        _ => match peer.and_then(|p| p.client_cert.as_deref()) {
            Some(cert) => ("client_cert", Some(&cert.subject)),
            None => ("none", None),
        },
    }
}

/// The `grpc-status` of a header block; out-of-range or malformed values are Unknown.
fn status_code(headers: &HeaderMap) -> Option<u8> {
    let value = grpc_status(headers)?.as_bytes();
    let code = match value {
        [d] if d.is_ascii_digit() => d - b'0',
        [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => (a - b'0') * 10 + (b - b'0'),
        _ => UNKNOWN,
    };
    Some(if usize::from(code) < CODE_NAMES.len() {
        code
    } else {
        UNKNOWN
    })
}

pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        request_id: Option<HeaderValue>,
        record: Option<Box<CallRecord>>,
    }
}

impl<F, B, E> Future for ObserveFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Body,
{
    type Output = Result<http::Response<ObserveBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let result = std::task::ready!(this.span.in_scope(|| inner.poll(cx)));
        let mut record = this.record.take();
        let mut request_id = this.request_id.take().expect("polled after completion");
        // Unique to the call, so HPACK's table gains nothing from it: sent as a literal never
        // indexed, it costs no table insertion and evicts none of the headers that repeat.
        request_id.set_sensitive(true);
        let mut response = match result {
            Ok(response) => response,
            Err(e) => {
                if let Some(record) = &mut record {
                    record.code = Some(INTERNAL);
                }
                return Poll::Ready(Err(e));
            }
        };
        if let Some(record) = &mut record {
            // Only a trailers-only answer (an empty body) has a status in its headers.
            if response.body().is_end_stream() {
                record.code = status_code(response.headers());
            }
            if let Some(trace) = &mut record.trace {
                // A verified client certificate was seen at the start; the caller the auth
                // layer admitted, if any, says more.
                if let Some(caller) = response
                    .extensions()
                    .get::<Caller>()
                    .filter(|caller| **caller != Caller::Anonymous)
                {
                    trace.auth = caller.class();
                }
                trace.shed = response.extensions().get::<ShedBy>().copied();
                if let Some(value) = trace.response_header() {
                    response.headers_mut().insert(trace::TRACE_ID_HEADER, value);
                }
            }
            if let Some(log) = &mut record.log {
                log.caller = response.extensions_mut().remove::<Caller>();
                log.fault = response.extensions_mut().remove::<InjectedFault>();
                log.refused = response.extensions_mut().remove::<AuthRefused>();
            }
        }
        response
            .headers_mut()
            .insert(request_id::HEADER, request_id);
        let span = std::mem::replace(this.span, Span::none());
        Poll::Ready(Ok(response.map(|inner| ObserveBody {
            finished: inner.is_end_stream(),
            inner: Some(inner),
            span,
            messages: MessageCounter::default(),
            record,
        })))
    }
}

/// The response body: counts the messages sent, reads the final status from the trailers, and
/// finishes the call's record when dropped.
pub struct ObserveBody<B> {
    /// `None` once dropped (see `Drop`).
    inner: Option<B>,
    /// The body has ended (or never had anything to send).
    finished: bool,
    span: Span,
    messages: MessageCounter,
    record: Option<Box<CallRecord>>,
}

impl<B> Body for ObserveBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(this.span.in_scope(|| Pin::new(inner).poll_frame(cx)));
        this.finished |= frame
            .as_ref()
            .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers));
        if let Some(record) = &mut this.record {
            match &frame {
                Some(Ok(frame)) => match frame.trailers_ref() {
                    Some(trailers) => {
                        record.code = status_code(trailers).or(record.code);
                        record.ended = true;
                    }
                    None if record.count || record.trace.is_some() => {
                        let completed = frame
                            .data_ref()
                            .map_or(0, |data| this.messages.feed(data).completed);
                        if completed > 0 {
                            if record.count {
                                record.method.msg_sent.inc_by(completed);
                            }
                            if let Some(trace) = &mut record.trace {
                                trace.sent += completed;
                            }
                        }
                    }
                    None => {}
                },
                Some(Err(_)) => record.code = Some(INTERNAL),
                None => record.ended = true,
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for ObserveBody<B> {
    /// Drops an unfinished inner body inside the call's span, so what it logs on the way out (a
    /// cancellation) carries the request id; the record is finished after, outside the span.
    fn drop(&mut self) {
        if !self.finished {
            let _entered = self.span.enter();
            self.inner = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::listener::PeerAddr;

    fn headers(status: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static(status));
        headers
    }

    #[test]
    fn long_unknown_paths_are_cut_for_the_log() {
        assert_eq!(&*shortened("/a.B/C"), "/a.B/C");
        let long = format!("/{}", "é".repeat(200));
        let cut = shortened(&long);
        assert!(
            cut.len() <= LOGGED_PATH_BYTES + '…'.len_utf8(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }

    #[test]
    fn status_codes_parse_and_clamp() {
        assert_eq!(status_code(&HeaderMap::new()), None);
        assert_eq!(status_code(&headers("0")), Some(0));
        assert_eq!(status_code(&headers("16")), Some(16));
        // A leading zero is still a decimal digit.
        assert_eq!(status_code(&headers("09")), Some(9));
        // Bytes just below and above the digits are not codes: ':' is not 10, nor '@' 16.
        for bad in ["17", "99", "-1", "x", "", "123", "/", ":", "@", "1:"] {
            assert_eq!(status_code(&headers(bad)), Some(UNKNOWN), "{bad:?}");
        }
    }

    #[test]
    fn identity_prefers_the_admitted_caller_then_the_certificate() {
        let cert = PeerInfo::new(
            PeerAddr::Tcp("127.0.0.1:1".parse().unwrap()),
            Some(Arc::new(crate::transport::tls::ClientIdentity {
                subject: "CN=client".into(),
                sans: vec![],
            })),
        );
        let token = Caller::Token("ci".into());
        assert_eq!(identity(Some(&token), Some(&cert)), ("token", Some("ci")));
        assert_eq!(
            identity(Some(&Caller::Anonymous), Some(&cert)),
            ("client_cert", Some("CN=client"))
        );
        assert_eq!(identity(None, None), ("none", None));
    }
}
