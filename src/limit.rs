//! Concurrency limits that shed instead of queueing: a call over the global or the per-connection
//! limit is answered RESOURCE_EXHAUSTED at once (grpc-go's convention for server overload).
//!
//! tower's `ConcurrencyLimit` + `LoadShed` release their permit when the response *headers* are
//! ready, which for a gRPC stream is the moment it starts; here the permit lives in the response
//! body, so a stream counts until it ends and the limit bounds real work and memory.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Status, codegen::http};
use tower::{Layer, Service};

/// What one connection is doing, for idle detection.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    started: AtomicU64,
}

impl Activity {
    /// Calls in progress on the connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Calls ever started on the connection: unchanged between two looks means none started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }
}

/// Counts calls refused for overload, by the limit that refused them.
#[derive(Debug, Default)]
pub struct ShedCount {
    connection: AtomicU64,
    server: AtomicU64,
}

impl ShedCount {
    /// Calls refused by either limit.
    pub fn get(&self) -> u64 {
        self.on_connection() + self.on_server()
    }

    /// Calls refused by `limits.max_concurrent_calls_per_connection`.
    pub fn on_connection(&self) -> u64 {
        self.connection.load(Ordering::Relaxed)
    }

    /// Calls refused by `limits.max_concurrent_calls`.
    pub fn on_server(&self) -> u64 {
        self.server.load(Ordering::Relaxed)
    }
}

/// Calls in progress across the server, against `limits.max_concurrent_calls`. An atomic
/// counter, not a semaphore: nothing ever waits for a slot (over the limit sheds), and releasing
/// a tokio semaphore permit takes its waiters' mutex, twice per call with the connection's.
#[derive(Debug)]
pub struct CallCount {
    in_use: AtomicUsize,
    limit: usize,
}

impl CallCount {
    pub fn new(limit: usize) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            limit,
        }
    }

    /// Calls in progress now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    fn try_acquire(&self) -> bool {
        if self.in_use.fetch_add(1, Ordering::AcqRel) < self.limit {
            true
        } else {
            self.in_use.fetch_sub(1, Ordering::AcqRel);
            false
        }
    }
}

/// One instance per connection: the global count is shared; the connection's count is its
/// [`Activity::in_flight`].
#[derive(Debug, Clone)]
pub struct LimitLayer {
    global: Arc<CallCount>,
    per_connection: usize,
    activity: Arc<Activity>,
    shed: Arc<ShedCount>,
}

impl LimitLayer {
    pub fn new(
        global: Arc<CallCount>,
        per_connection: usize,
        activity: Arc<Activity>,
        shed: Arc<ShedCount>,
    ) -> Self {
        Self {
            global,
            per_connection,
            activity,
            shed,
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limit {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limit<S> {
    inner: S,
    limits: LimitLayer,
}

/// One call's place in the global and the connection's counts, released when its response body
/// is dropped.
#[derive(Debug)]
pub struct CallPermit {
    global: Arc<CallCount>,
    activity: Arc<Activity>,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        self.global.in_use.fetch_sub(1, Ordering::AcqRel);
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Limit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let limits = &self.limits;
        let in_flight = &limits.activity.in_flight;
        let connection_ok = in_flight.fetch_add(1, Ordering::AcqRel) < limits.per_connection;
        let permit = match (connection_ok, connection_ok && limits.global.try_acquire()) {
            (true, true) => CallPermit {
                global: Arc::clone(&limits.global),
                activity: Arc::clone(&limits.activity),
            },
            (connection_ok, _) => {
                in_flight.fetch_sub(1, Ordering::AcqRel);
                let (count, scope) = if !connection_ok {
                    (&limits.shed.connection, "on this connection")
                } else {
                    (&limits.shed.server, "on this server")
                };
                count.fetch_add(1, Ordering::Relaxed);
                let status = Status::resource_exhausted(format!(
                    "server overloaded: too many concurrent calls {scope}; retry with backoff"
                ));
                return LimitFuture::Shed {
                    response: Some(status.into_http()),
                };
            }
        };
        limits.activity.started.fetch_add(1, Ordering::AcqRel);
        LimitFuture::Admitted {
            inner: self.inner.call(request),
            permit: Some(permit),
        }
    }
}

pin_project! {
    #[project = LimitFutureProj]
    pub enum LimitFuture<F> {
        Admitted { #[pin] inner: F, permit: Option<CallPermit> },
        Shed { response: Option<http::Response<()>> },
    }
}

impl<F, B, E> Future for LimitFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Default,
{
    type Output = Result<http::Response<PermitBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitFutureProj::Admitted { inner, permit } => {
                let response = std::task::ready!(inner.poll(cx))?;
                let permit = permit.take();
                Poll::Ready(Ok(response.map(|inner| PermitBody { inner, permit })))
            }
            LimitFutureProj::Shed { response } => {
                let response = response.take().expect("polled after completion");
                Poll::Ready(Ok(response.map(|()| PermitBody {
                    inner: B::default(),
                    permit: None,
                })))
            }
        }
    }
}

pin_project! {
    /// A response body that holds its call's permits until it is dropped.
    pub struct PermitBody<B> {
        #[pin]
        inner: B,
        permit: Option<CallPermit>,
    }
}

impl<B: Body<Data = Bytes>> Body for PermitBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
