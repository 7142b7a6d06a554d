//! The quota layer: runs right after auth, which has put the call's caller in the request, and
//! answers RESOURCE_EXHAUSTED before the call takes a concurrency slot. With the local store the
//! decision is made in place; with the shared store the call waits for one Redis round trip
//! (bounded by `quota.redis.timeout`), then goes on or is refused.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{BoxFuture, Either, Ready, ready};
use tonic::{Code, Status, codegen::http};
use tonic_types::{ErrorDetails, StatusExt as _};
use tower::{Layer, Service};

use super::{Class, Decision, Quotas, Refused};
use crate::config::QuotaLimits;

/// RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure: clients that read rich errors (grpcio's
/// `grpc_status`, tonic-types, grpcurl) learn when to retry and which quota they hit.
pub(super) fn refusal(refused: &Refused, class: Class) -> Status {
    let QuotaLimits { rate, burst } = refused.limits;
    let wait = refused.retry_after.as_secs_f64();
    let (subject, quota) = match &refused.pattern {
        None => (
            format!("caller:{}", class.as_str()),
            "this caller".to_owned(),
        ),
        Some(pattern) => (
            format!("method:{pattern}"),
            format!("this caller on {pattern}"),
        ),
    };
    let description =
        format!("quota of {quota}: {rate} calls per second, burst {burst}; retry in {wait:.3}s");
    let mut details = ErrorDetails::with_retry_info(Some(refused.retry_after));
    details.add_quota_failure_violation(subject, description.clone());
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("over quota: {description}"),
        details,
    )
}

/// The tower layer; `None`: quotas off (or a listener that never counts, the probe port).
#[derive(Debug, Clone)]
pub struct QuotaLayer {
    quotas: Option<Arc<Quotas>>,
}

impl QuotaLayer {
    pub fn new(quotas: Option<Arc<Quotas>>) -> Self {
        Self { quotas }
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            quotas: self.quotas.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuotaService<S> {
    inner: S,
    quotas: Option<Arc<Quotas>>,
}

impl<S, B, ResBody> Service<http::Request<B>> for QuotaService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<
        Ready<Result<Self::Response, Self::Error>>,
        Either<S::Future, BoxFuture<'static, Result<Self::Response, Self::Error>>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(quotas) = &self.quotas else {
            return Either::Right(Either::Left(self.inner.call(request)));
        };
        match quotas.decide(&request) {
            Decision::Admit => Either::Right(Either::Left(self.inner.call(request))),
            Decision::Refuse(status) => Either::Left(ready(Ok(status.into_http()))),
            Decision::Ask(ask) => {
                let quotas = Arc::clone(quotas);
                // The clone that was polled ready goes with the call.
                let fresh = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, fresh);
                // The parts only, across the wait: a body need not be `Sync`.
                let (parts, body) = request.into_parts();
                Either::Right(Either::Right(Box::pin(async move {
                    match quotas.ask(ask, &parts).await {
                        Decision::Refuse(status) => Ok(status.into_http()),
                        _ => inner.call(http::Request::from_parts(parts, body)).await,
                    }
                })))
            }
        }
    }
}
