//! The life of one call after it is admitted: its deadline, its end at shutdown, and noticing
//! when the client leaves.
//!
//! - Deadline ([`crate::call::deadline`]): a handler still running when it passes is dropped and the
//!   call answers DEADLINE_EXCEEDED; a stream still sending ends with DEADLINE_EXCEEDED in its
//!   trailers and its producer is dropped at once.
//! - Shutdown: once the server drains, every server stream ends with UNAVAILABLE "server shutting
//!   down" after the replies already produced; unary calls finish normally.
//! - Cancellation: a response body dropped before it ended means the client reset the stream or
//!   went away. The handler's work is dropped with it; the event is counted and logged.
//! - Message size: tonic reports a message over the size limit as OUT_OF_RANGE; the gRPC spec
//!   and every other stack (grpc-go, grpc-java, grpc-core) say RESOURCE_EXHAUSTED, and clients
//!   branch on it, so the status is rewritten on its way out.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, codegen::http};
use tower::{Layer, Service};

use crate::call::{
    deadline,
    grpc_headers::{GRPC_MESSAGE, GRPC_STATUS, grpc_status},
    resolve::Resolved,
};

/// The log target of a call's end (deadline, client gone): `greeter::call=debug` in `log.filter`
/// shows them, wherever this module lives.
const TARGET: &str = "greeter::call";

/// How calls ended abnormally, for operators (and tests).
#[derive(Debug, Default)]
pub struct CallStats {
    deadline_exceeded: AtomicU64,
    cancelled: AtomicU64,
    ended_by_shutdown: AtomicU64,
}

impl CallStats {
    /// Calls ended by the server because their deadline passed.
    pub fn deadline_exceeded(&self) -> u64 {
        self.deadline_exceeded.load(Ordering::Relaxed)
    }

    /// Calls whose client reset the stream or disconnected before the end.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Server streams ended with UNAVAILABLE because the server was shutting down.
    pub fn ended_by_shutdown(&self) -> u64 {
        self.ended_by_shutdown.load(Ordering::Relaxed)
    }
}

/// Shared by every connection of a server.
#[derive(Debug, Clone)]
pub struct CallLayer {
    draining: CancellationToken,
    stats: Arc<CallStats>,
}

impl CallLayer {
    pub fn new(draining: CancellationToken, stats: Arc<CallStats>) -> Self {
        Self { draining, stats }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallService<S> {
    inner: S,
    layer: CallLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Body + Default,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let layer = &self.layer;
        let method = Resolved::of(&request);
        let budget = deadline::budget(&method.deadline, request.headers());
        let streams = method.kind.is_some_and(|kind| kind.server_streams());
        let ending = Ending {
            deadline: budget.map(Deadline::new),
            drain: streams.then(|| Box::pin(layer.draining.clone().cancelled_owned())),
            stats: Arc::clone(&layer.stats),
            method: Some(Arc::clone(method)),
        };
        CallFuture {
            inner: self.inner.call(request),
            ending: Some(ending),
        }
    }
}

/// A call's deadline. The timer is armed only when the call has to wait (a handler or a body
/// returned `Pending`): most unary calls answer without waiting, and then cost one clock read
/// instead of a boxed timer registered with (and removed from) the runtime's timer wheel.
struct Deadline {
    at: Instant,
    budget: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn new(budget: Duration) -> Self {
        Self {
            at: Instant::now() + budget,
            budget,
            timer: None,
        }
    }

    /// Whether the deadline has passed; with the timer armed, also registers for its wake-up.
    fn passed(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            None => Instant::now() >= self.at,
        }
    }

    /// Arms the timer (the caller is about to return `Pending`) and reports whether it passed.
    fn arm(&mut self, cx: &mut Context<'_>) -> bool {
        let at = self.at;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }
}

/// What can end a call before its handler does.
#[derive(Default)]
struct Ending {
    deadline: Option<Deadline>,
    drain: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    stats: Arc<CallStats>,
    /// For the debug lines: its path names the method (the shared `unknown` for a path no service
    /// has, which is answered at once). An `Arc`'s count where the request's URI cost ~75
    /// instructions to clone.
    method: Option<Arc<Resolved>>,
}

impl Ending {
    fn path(&self) -> &str {
        self.method
            .as_deref()
            .map_or("", |method| method.metrics.path())
    }
}

impl Ending {
    fn deadline_exceeded(&mut self) -> Status {
        let budget = self.deadline.take().map(|d| d.budget).unwrap_or_default();
        self.stats.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            target: TARGET,
            path = self.path(),
            ?budget,
            "deadline exceeded; call ended"
        );
        Status::deadline_exceeded(format!("deadline exceeded after {budget:?}"))
    }

    /// The status to end the call with now, if any.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        if let Some(deadline) = &mut self.deadline
            && deadline.passed(cx)
        {
            return Some(self.deadline_exceeded());
        }
        if let Some(drain) = &mut self.drain
            && drain.as_mut().poll(cx).is_ready()
        {
            self.stats.ended_by_shutdown.fetch_add(1, Ordering::Relaxed);
            return Some(Status::unavailable("server shutting down"));
        }
        None
    }
}

pin_project! {
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        ending: Option<Ending>,
    }
}

impl<F, B, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Body + Default,
{
    type Output = Result<http::Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            let ending = this.ending.take().expect("polled after completion");
            return Poll::Ready(response.map(|mut r| {
                // Only a trailers-only answer (an empty body) has a status in its headers.
                if r.body().is_end_stream() {
                    size_limit_is_resource_exhausted(r.headers_mut());
                }
                r.map(|inner| CallBody {
                    // A trailers-only answer (every error status) is over before it is sent:
                    // hyper drops it unpolled, which is no cancellation.
                    finished: inner.is_end_stream(),
                    inner: Some(inner),
                    ending,
                })
            }));
        }
        let ending = this.ending.as_mut().expect("polled after completion");
        // Only the deadline can end a call that has not answered yet; a drain lets it finish.
        let Some(deadline) = &mut ending.deadline else {
            return Poll::Pending;
        };
        if !deadline.arm(cx) {
            return Poll::Pending;
        }
        let mut ending = this.ending.take().expect("checked above");
        let status = ending.deadline_exceeded();
        ending.drain = None;
        Poll::Ready(Ok(status.into_http::<B>().map(|inner| CallBody {
            inner: Some(inner),
            ending,
            finished: true,
        })))
    }
}

/// A response body that ends early with a status when the deadline passes or the server drains.
pub struct CallBody<B> {
    inner: Option<B>,
    ending: Ending,
    /// The body reached its end (or was ended by us): dropping it now is no cancellation.
    finished: bool,
}

impl<B> Body for CallBody<B>
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
        if !this.finished
            && let Some(status) = this.ending.poll_due(cx)
        {
            // Drop the producer now: the handler's work stops with it.
            this.inner = None;
            this.finished = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(status)))));
        }
        let mut frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Waiting: now the deadline needs a timer to wake this body when it passes.
                if let Some(deadline) = &mut this.ending.deadline
                    && deadline.arm(cx)
                {
                    let status = this.ending.deadline_exceeded();
                    this.inner = None;
                    this.finished = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers(status)))));
                }
                return Poll::Pending;
            }
        };
        match &mut frame {
            None => this.finished = true,
            Some(Ok(f)) if f.is_trailers() => {
                this.finished = true;
                if let Some(trailers) = f.trailers_mut() {
                    size_limit_is_resource_exhausted(trailers);
                }
            }
            _ => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }
}

/// An empty body that has already ended: what outer layers answer with when they refuse a call.
impl<B> Default for CallBody<B> {
    fn default() -> Self {
        Self {
            inner: None,
            ending: Ending::default(),
            finished: true,
        }
    }
}

impl<B> Drop for CallBody<B> {
    fn drop(&mut self) {
        if !self.finished {
            self.ending.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                target: TARGET,
                path = self.ending.path(),
                "call cancelled by the client; handler work dropped"
            );
        }
    }
}

/// Rewrites tonic's OUT_OF_RANGE for an over-size message to RESOURCE_EXHAUSTED (see module docs).
fn size_limit_is_resource_exhausted(headers: &mut http::HeaderMap) {
    const OUT_OF_RANGE: &str = "11";
    let over_size = grpc_status(headers).is_some_and(|s| s == OUT_OF_RANGE)
        && headers
            .get(GRPC_MESSAGE)
            .and_then(|m| m.to_str().ok())
            // grpc-message is percent-encoded (tonic encodes spaces too).
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if over_size {
        headers.insert(
            GRPC_STATUS,
            http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
}

/// The trailers of a status: `grpc-status`, `grpc-message` (and details), nothing else.
fn trailers(status: Status) -> http::HeaderMap {
    let mut headers = status.into_http::<()>().into_parts().0.headers;
    headers.remove(http::header::CONTENT_TYPE);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_over_size_out_of_range_becomes_resource_exhausted() {
        let too_large = "Error,%20decoded%20message%20length%20too%20large:%20found%205000%20bytes";
        for (status, message, expected) in [
            ("11", too_large, "8"),
            ("11", "value%20out%20of%20range", "11"),
            ("13", too_large, "13"),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-status", status.parse().unwrap());
            headers.insert("grpc-message", message.parse().unwrap());
            size_limit_is_resource_exhausted(&mut headers);
            assert_eq!(headers["grpc-status"], expected, "{status} {message}");
        }
    }
}
