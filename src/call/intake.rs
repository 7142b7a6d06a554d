//! What a call may make the server hold of its request before a handler sees it.
//!
//! tonic buffers each request message whole before decoding it, so a client that announces a
//! large message and sends it slowly (or never finishes it) holds that memory for as long as the
//! call lives; enough such calls and the pod is OOM-killed. Two bounds, both answered with
//! RESOURCE_EXHAUSTED before the bytes pile up:
//!
//! - each method refuses a message larger than it can accept as soon as the 5-byte gRPC prefix
//!   announces its length (a health request is a service name, a HelloRequest a name), instead of
//!   one server-wide `max_recv_message_bytes` for everything;
//! - bytes of messages still arriving count against one server-wide budget
//!   (`limits.max_buffered_request_bytes`): past it, the call that would go over is refused.
//!
//! A message that arrives whole in one read (almost every unary call) never touches the shared
//! counter.

use std::{
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Status, codegen::http};
use tower::{Layer, Service};

use crate::{
    call::{observe::frames::MessageCounter, resolve::Resolved},
    methods::MethodKind,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request bytes held for messages still arriving, across the server.
#[derive(Debug)]
pub struct BufferBudget {
    held: AtomicUsize,
    limit: usize,
    refused: AtomicU64,
}

impl BufferBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
            refused: AtomicU64::new(0),
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Calls refused because the budget was spent or a message was over its method's limit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: usize) -> bool {
        if self.held.fetch_add(bytes, Ordering::AcqRel) + bytes <= self.limit {
            true
        } else {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
            false
        }
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// Shared by every connection of a server: the budget. What each method accepts comes with the
/// call's resolved method ([`Resolved::max_request_bytes`], and whether the client streams).
#[derive(Debug, Clone)]
pub struct IntakeLayer {
    budget: Arc<BufferBudget>,
}

impl IntakeLayer {
    pub fn new(budget: Arc<BufferBudget>) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for IntakeLayer {
    type Service = Intake<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intake {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Intake<S> {
    inner: S,
    layer: IntakeLayer,
}

impl<S, B, ResBody> Service<http::Request<B>> for Intake<S>
where
    S: Service<http::Request<IntakeBody<B>>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<IntakeResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = IntakeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = Resolved::of(&request);
        let max_message = method.max_request_bytes;
        // When the client streams requests, a refusal reaches the handler in the middle of its
        // stream, and not every handler turns it into the call's status (tonic-reflection ends
        // the call OK), so the refusal is put in the response's trailers here.
        let refusal = method
            .kind
            .is_some_and(MethodKind::client_streams)
            .then(Arc::default);
        let budget = Arc::clone(&self.layer.budget);
        let body_refusal = refusal.clone();
        IntakeFuture {
            inner: self.inner.call(request.map(|inner| IntakeBody {
                inner,
                messages: MessageCounter::default(),
                max_message,
                held: 0,
                budget,
                refusal: body_refusal,
            })),
            refusal,
        }
    }
}

/// The status a streaming request was refused with, for its response's trailers.
type SharedRefusal = Arc<OnceLock<Status>>;

pin_project! {
    pub struct IntakeFuture<F> {
        #[pin]
        inner: F,
        refusal: Option<SharedRefusal>,
    }
}

impl<F, B, E> Future for IntakeFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<IntakeResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        let refusal = this.refusal.take();
        Poll::Ready(Ok(response.map(|inner| IntakeResponseBody {
            inner,
            refusal,
            ended: false,
        })))
    }
}

pin_project! {
    /// A response body whose end carries the request's refusal, if there was one: its trailers
    /// are replaced, or added when the handler ended without any.
    pub struct IntakeResponseBody<B> {
        #[pin]
        inner: B,
        refusal: Option<SharedRefusal>,
        ended: bool,
    }
}

impl<B> Body for IntakeResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        let refused = this.refusal.as_ref().and_then(|r| r.get());
        let Some(status) = refused else {
            return Poll::Ready(frame);
        };
        match frame {
            Some(Ok(frame)) if frame.is_data() => Poll::Ready(Some(Ok(frame))),
            Some(Ok(_)) | None => {
                *this.ended = true;
                let mut trailers = http::HeaderMap::new();
                // The status's own headers: grpc-status, grpc-message (percent-encoded).
                if let Err(e) = status.add_header(&mut trailers) {
                    tracing::debug!("cannot encode a refusal as trailers: {e}");
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An empty body: what a layer outside this one answers refusals with.
impl<B: Default> Default for IntakeResponseBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            refusal: None,
            ended: false,
        }
    }
}

pin_project! {
    /// A request body whose messages are held to their method's limit and the shared budget.
    pub struct IntakeBody<B> {
        #[pin]
        inner: B,
        messages: MessageCounter,
        max_message: usize,
        // Bytes of the message in progress taken from the budget.
        held: usize,
        budget: Arc<BufferBudget>,
        // Where a refusal of a streaming request is left for the response.
        refusal: Option<SharedRefusal>,
    }

    impl<B> PinnedDrop for IntakeBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.budget.give_back(*this.held);
        }
    }
}

impl<B> Body for IntakeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let announced = this.messages.feed(data).largest_announced as usize;
        let refusal = if announced > *this.max_message {
            Some(Status::resource_exhausted(format!(
                "request message of {announced} bytes exceeds this method's limit of {} bytes",
                this.max_message
            )))
        } else {
            let partial = usize::try_from(this.messages.partial_bytes()).unwrap_or(usize::MAX);
            if partial > *this.held && !this.budget.try_take(partial - *this.held) {
                Some(Status::resource_exhausted(
                    "server is buffering too many incomplete request messages \
                     (limits.max_buffered_request_bytes); retry with backoff",
                ))
            } else {
                this.budget.give_back(this.held.saturating_sub(partial));
                *this.held = partial;
                None
            }
        };
        match refusal {
            None => Poll::Ready(Some(Ok(frame))),
            Some(status) => {
                this.budget.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(refusal) = this.refusal {
                    let _ = refusal.set(status.clone());
                }
                Poll::Ready(Some(Err(status.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    fn prefix(len: u32) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes
    }

    fn body(
        chunks: Vec<Vec<u8>>,
        max_message: usize,
        budget: &Arc<BufferBudget>,
    ) -> IntakeBody<impl Body<Data = Bytes, Error = Infallible>> {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        IntakeBody {
            inner: StreamBody::new(futures_util::stream::iter(frames)),
            messages: MessageCounter::default(),
            max_message,
            held: 0,
            budget: Arc::clone(budget),
            refusal: None,
        }
    }

    fn code(error: &BoxError) -> tonic::Code {
        error.downcast_ref::<Status>().expect("a status").code()
    }

    #[tokio::test]
    async fn a_message_over_the_methods_limit_is_refused_at_its_prefix() {
        let budget = Arc::new(BufferBudget::new(1 << 20));
        let mut body = body(vec![prefix(4 << 20), vec![0; 100]], 1024, &budget);
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(code(&error), tonic::Code::ResourceExhausted);
        assert!(error.to_string().contains("4194304 bytes"), "{error}");
        assert_eq!(budget.refused(), 1);
    }

    #[tokio::test]
    async fn a_message_of_exactly_the_methods_limit_is_accepted() {
        let budget = Arc::new(BufferBudget::new(1 << 20));
        let mut exact = prefix(1024);
        exact.extend(vec![0; 1024]);
        let mut body = body(vec![exact], 1024, &budget);
        body.frame().await.unwrap().unwrap();
        assert_eq!(budget.refused(), 0);
    }

    #[tokio::test]
    async fn incomplete_messages_hold_budget_until_complete_or_dropped() {
        let budget = Arc::new(BufferBudget::new(100));
        let mut first = body(vec![prefix(60), vec![0; 30], vec![0; 30]], 1024, &budget);
        first.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 5);
        first.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 35);

        // A second call whose message would take the budget past its limit is refused.
        let mut second = body(vec![prefix(90), vec![0; 80]], 1024, &budget);
        second.frame().await.unwrap().unwrap();
        let error = second.frame().await.unwrap().unwrap_err();
        assert_eq!(code(&error), tonic::Code::ResourceExhausted);
        drop(second);
        assert_eq!(budget.held(), 35);

        first.frame().await.unwrap().unwrap();
        assert_eq!(
            budget.held(),
            0,
            "a complete message is the decoder's, not held"
        );
        let mut more = body(vec![prefix(60), vec![0; 10]], 1024, &budget);
        more.frame().await.unwrap().unwrap();
        more.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 15);
        drop(more);
        assert_eq!(budget.held(), 0, "a dropped call gives its bytes back");
    }

    #[tokio::test]
    async fn whole_messages_never_touch_the_budget() {
        let budget = Arc::new(BufferBudget::new(1));
        let mut whole = prefix(3);
        whole.extend([1, 2, 3]);
        let mut body = body(vec![whole.clone(), whole], 1024, &budget);
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.refused(), 0);
    }

    /// A bidi stream's replies made before its refusal landed go out; the refusal replaces the
    /// handler's trailers (its OK) at the end, not a reply already made.
    #[tokio::test]
    async fn a_refusal_ends_the_reply_after_the_replies_already_made() {
        let refusal = SharedRefusal::default();
        refusal.set(Status::resource_exhausted("too_big")).unwrap();
        let mut ok = http::HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = [
            Frame::data(Bytes::from_static(b"reply")),
            Frame::trailers(ok),
        ];
        let body = IntakeResponseBody {
            inner: StreamBody::new(futures_util::stream::iter(
                frames.into_iter().map(Ok::<_, Infallible>),
            )),
            refusal: Some(refusal),
            ended: false,
        };
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"reply"));
        assert_eq!(trailers["grpc-status"], "8");
        assert_eq!(trailers["grpc-message"], "too_big");
    }
}
