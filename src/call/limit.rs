//! Concurrency limits that shed instead of queueing: a call over the global or the per-connection
//! limit is answered RESOURCE_EXHAUSTED at once (grpc-go's convention for server overload).
//!
//! Budgets by trust: calls to methods anyone may call (health, with auth on) have a budget of
//! their own, so an unauthenticated flood sheds itself and never a caller with credentials. The
//! layer runs after auth, which has decided who the caller is; calls auth refuses cost no slot.
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

use pin_project_lite::pin_project;
use tonic::{Status, codegen::http};
use tower::{Layer, Service};

use crate::{
    call::{
        auth::Caller,
        body::{Watch, Watched},
    },
    transport::connection::Activity,
};

/// Which limit refused a call; each is counted in `greeter_calls_shed_total{limit}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedBy {
    /// `limits.max_concurrent_calls_per_connection`.
    Connection,
    /// `limits.max_concurrent_calls`.
    Server,
    /// `limits.max_anonymous_calls_per_connection`.
    AnonymousConnection,
    /// `limits.max_anonymous_calls`.
    Anonymous,
}

impl ShedBy {
    pub const ALL: [Self; 4] = [
        Self::Connection,
        Self::Server,
        Self::AnonymousConnection,
        Self::Anonymous,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Server => "server",
            Self::AnonymousConnection => "anonymous_connection",
            Self::Anonymous => "anonymous",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Connection => {
                "server overloaded: too many concurrent calls on this connection; retry with backoff"
            }
            Self::Server => {
                "server overloaded: too many concurrent calls on this server; retry with backoff"
            }
            Self::AnonymousConnection => {
                "too many concurrent unauthenticated calls on this connection; retry with backoff"
            }
            Self::Anonymous => {
                "too many concurrent unauthenticated calls on this server; retry with backoff"
            }
        }
    }
}

/// Counts calls refused for overload, by the limit that refused them.
#[derive(Debug, Default)]
pub struct ShedCount([AtomicU64; 4]);

impl ShedCount {
    /// Calls refused by one limit.
    pub fn by(&self, by: ShedBy) -> u64 {
        self.0[by as usize].load(Ordering::Relaxed)
    }

    fn record(&self, by: ShedBy) {
        self.0[by as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Calls in progress across the server, against a limit. An atomic counter, not a semaphore:
/// nothing ever waits for a slot (over the limit sheds), and releasing a tokio semaphore permit
/// takes its waiters' mutex, twice per call with the connection's.
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

    fn try_acquire(&self) -> bool {
        acquire(&self.in_use, self.limit)
    }
}

/// Adds one to `count` unless that would pass `limit`.
fn acquire(count: &AtomicUsize, limit: usize) -> bool {
    if count.fetch_add(1, Ordering::AcqRel) < limit {
        true
    } else {
        count.fetch_sub(1, Ordering::AcqRel);
        false
    }
}

/// Concurrent calls allowed: server-wide (shared by every connection of the listeners that use
/// this budget) and on one connection.
#[derive(Debug, Clone)]
pub struct Budget {
    pub server: Arc<CallCount>,
    pub per_connection: usize,
}

impl Budget {
    pub fn new(server: usize, per_connection: usize) -> Self {
        Self {
            server: Arc::new(CallCount::new(server)),
            per_connection,
        }
    }
}

/// The budgets of a listener, by trust: calls with credentials draw from `calls`; calls to open
/// methods, which anyone can make, from `anonymous` when there is one (auth on). Every call also
/// counts against `calls.per_connection` on its connection.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub calls: Budget,
    pub anonymous: Option<Budget>,
    pub shed: Arc<ShedCount>,
}

/// One instance per connection.
#[derive(Debug, Clone)]
pub struct LimitLayer {
    budgets: Budgets,
    activity: Arc<Activity>,
}

impl LimitLayer {
    pub fn new(budgets: Budgets, activity: Arc<Activity>) -> Self {
        Self { budgets, activity }
    }

    /// Takes the call's places in the counts, or says which limit refuses it. `anonymous` calls
    /// draw from the anonymous budget when there is one.
    fn admit(&self, anonymous: bool) -> Result<CallPermit, ShedBy> {
        let budgets = &self.budgets;
        let activity = &self.activity;
        if !acquire(&activity.in_flight, budgets.calls.per_connection) {
            return Err(ShedBy::Connection);
        }
        let anonymous_budget = budgets.anonymous.as_ref().filter(|_| anonymous);
        let refused = match anonymous_budget {
            None => (!budgets.calls.server.try_acquire()).then_some(ShedBy::Server),
            Some(budget) => {
                if !acquire(&activity.anonymous_in_flight, budget.per_connection) {
                    Some(ShedBy::AnonymousConnection)
                } else if !budget.server.try_acquire() {
                    activity.anonymous_in_flight.fetch_sub(1, Ordering::AcqRel);
                    Some(ShedBy::Anonymous)
                } else {
                    None
                }
            }
        };
        if let Some(by) = refused {
            activity.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(by);
        }
        activity.started.fetch_add(1, Ordering::AcqRel);
        Ok(CallPermit {
            server: Arc::clone(&anonymous_budget.unwrap_or(&budgets.calls).server),
            anonymous: anonymous_budget.is_some(),
            activity: Arc::clone(activity),
        })
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

/// One call's place in the server's and the connection's counts, released when its response
/// body is dropped.
#[derive(Debug)]
pub struct CallPermit {
    server: Arc<CallCount>,
    anonymous: bool,
    activity: Arc<Activity>,
}

impl Drop for CallPermit {
    fn drop(&mut self) {
        self.server.in_use.fetch_sub(1, Ordering::AcqRel);
        if self.anonymous {
            self.activity
                .anonymous_in_flight
                .fetch_sub(1, Ordering::AcqRel);
        }
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
        // The auth layer, which runs first, marks every call it admits with credentials with its
        // caller: a call without one is anonymous.
        let anonymous = request
            .extensions()
            .get::<Caller>()
            .is_none_or(|caller| *caller == Caller::Anonymous);
        match self.limits.admit(anonymous) {
            Ok(permit) => LimitFuture::Admitted {
                inner: self.inner.call(request),
                permit: Some(permit),
            },
            Err(by) => {
                self.limits.budgets.shed.record(by);
                let mut response = Status::resource_exhausted(by.message()).into_http();
                // For the call's span (observe), which records which limit shed it.
                response.extensions_mut().insert(by);
                LimitFuture::Shed {
                    response: Some(response),
                }
            }
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
                Poll::Ready(Ok(response.map(|inner| PermitBody::new(inner, permit))))
            }
            LimitFutureProj::Shed { response } => {
                let response = response.take().expect("polled after completion");
                Poll::Ready(Ok(response.map(|()| PermitBody::default())))
            }
        }
    }
}

/// A response body that holds its call's permits until it is dropped; the default, holding none,
/// is what a layer outside this one answers refusals with.
pub type PermitBody<B> = Watched<B, Option<CallPermit>>;

impl Watch for Option<CallPermit> {}
