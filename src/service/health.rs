//! `grpc.health.v1.Health`, as the gRPC health-checking protocol specifies it.
//!
//! tonic-health's service answers `Watch` for an unknown service with NOT_FOUND and ends the call;
//! the protocol (grpc/grpc doc/health-checking.md) says the server must send SERVICE_UNKNOWN and
//! keep the stream open, sending SERVING later if the service appears. Clients such as grpc-go's
//! health-checking balancer rely on that, so greeter serves its own implementation over
//! tonic-health's generated types. The set of services is fixed when the server is built.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{self, HealthServer},
};

use crate::config::HealthConfig;

/// The largest request health accepts: a `HealthCheckRequest` is one service name.
pub const MAX_REQUEST_BYTES: usize = 1024;

/// The health of every service the server reports on; cheap to clone, shared by all listeners.
#[derive(Debug, Clone)]
pub struct Health {
    services: Arc<HashMap<String, watch::Sender<ServingStatus>>>,
    /// `None`: `Watch` is not served here (the probe port).
    watchers: Option<Arc<Watchers>>,
}

/// `Watch` streams are open to anyone and last as long as the client likes: bounded in number
/// and in age, so none can be hoarded.
#[derive(Debug)]
struct Watchers {
    open: AtomicUsize,
    max: usize,
    max_age: Duration,
}

impl Health {
    /// Reports on `services` (use `""` for the server as a whole), all NOT_SERVING at first.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, config: &HealthConfig) -> Self {
        let services = services
            .into_iter()
            .map(|name| (name.to_owned(), watch::channel(ServingStatus::NotServing).0))
            .collect();
        Self {
            services: Arc::new(services),
            watchers: Some(Arc::new(Watchers {
                open: AtomicUsize::new(0),
                max: config.max_watch_streams,
                max_age: config.watch_max_age,
            })),
        }
    }

    /// Sets every service's status; watchers see the change at once.
    pub fn set_all(&self, status: ServingStatus) {
        for sender in self.services.values() {
            sender.send_replace(status);
        }
    }

    /// The current status of `service`, if it is known.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        self.services.get(service).map(|s| *s.borrow())
    }

    /// `Watch` streams open now.
    pub fn watch_streams(&self) -> usize {
        self.watchers
            .as_ref()
            .map_or(0, |w| w.open.load(Ordering::Acquire))
    }

    /// The gRPC service, to add to a router.
    pub fn service(&self) -> HealthServer<Self> {
        HealthServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The service for the probe port: `Check` only. Probes (the kubelet's, `greeter health`)
    /// never watch, and a port open to anyone should hold nothing open.
    pub fn probe_service(&self) -> HealthServer<Self> {
        HealthServer::new(Self {
            watchers: None,
            ..self.clone()
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// The stream of a `Watch` call.
pub type WatchUpdates =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

/// A `Watch` stream holding its place among the open ones until it is dropped; it ends after
/// its first error (the one that says it reached its maximum age).
struct Watching {
    updates: WatchUpdates,
    watchers: Arc<Watchers>,
    ended: bool,
}

impl Stream for Watching {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.updates.as_mut().poll_next(cx));
        self.ended = matches!(next, Some(Err(_)) | None);
        Poll::Ready(next)
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.watchers.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        self.status(service)
            .map(|status| Response::new(response(status)))
            .ok_or_else(|| Status::not_found(format!("unknown service {service:?}")))
    }

    type WatchStream = WatchUpdates;

    /// The current status at once, then every change. For an unknown service: SERVICE_UNKNOWN,
    /// and the stream stays open (the set of services is fixed, so nothing follows). Every stream
    /// ends with UNAVAILABLE at `health.watch_max_age`; clients open a new one.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Some(watchers) = &self.watchers else {
            return Err(Status::unimplemented(
                "Watch is not served on the probe port: use Check, or Watch on the main listener",
            ));
        };
        if watchers.open.fetch_add(1, Ordering::AcqRel) >= watchers.max {
            watchers.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Status::resource_exhausted(
                "too many health Watch streams open on this server; retry with backoff",
            ));
        }
        let updates: WatchUpdates = match self.services.get(&request.get_ref().service) {
            Some(sender) => Box::pin(WatchStream::new(sender.subscribe()).map(|s| Ok(response(s)))),
            None => Box::pin(
                tokio_stream::once(Ok(response(ServingStatus::ServiceUnknown)))
                    .chain(tokio_stream::pending()),
            ),
        };
        let max_age = watchers.max_age;
        let expiry = futures_util::stream::once(async move {
            tokio::time::sleep(max_age).await;
            Err(Status::unavailable(
                "health Watch stream reached its maximum age; open a new one",
            ))
        });
        Ok(Response::new(Box::pin(Watching {
            updates: Box::pin(updates.merge(expiry)),
            watchers: Arc::clone(watchers),
            ended: false,
        })))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::health_server::Health as _;

    use super::*;

    fn config(max_watch_streams: usize, watch_max_age: Duration) -> HealthConfig {
        HealthConfig {
            max_watch_streams,
            watch_max_age,
        }
    }

    fn health<'a>(services: impl IntoIterator<Item = &'a str>) -> Health {
        Health::new(services, &config(8, Duration::from_secs(600)))
    }

    fn request(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: service.into(),
        })
    }

    #[tokio::test]
    async fn check_knows_only_the_registered_services() {
        let health = health(["", "helloworld.Greeter"]);
        let status = health.check(request("")).await.unwrap().into_inner();
        assert_eq!(status.status(), ServingStatus::NotServing);
        health.set_all(ServingStatus::Serving);
        let status = health.check(request("helloworld.Greeter")).await.unwrap();
        assert_eq!(status.into_inner().status(), ServingStatus::Serving);
        let error = health.check(request("nope")).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::NotFound);
    }

    #[tokio::test]
    async fn watch_sends_the_current_status_then_changes() {
        let health = health([""]);
        let mut updates = health.watch(request("")).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::NotServing);
        health.set_all(ServingStatus::Serving);
        let next = updates.next().await.unwrap().unwrap();
        assert_eq!(next.status(), ServingStatus::Serving);
    }

    #[tokio::test]
    async fn watch_of_an_unknown_service_says_so_and_stays_open() {
        let health = health([""]);
        let mut updates = health.watch(request("nope")).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
        let more = tokio::time::timeout(Duration::from_millis(100), updates.next()).await;
        assert!(more.is_err(), "the stream stays open");
    }
}

#[cfg(test)]
mod bounds {
    use std::time::Duration;

    use tonic::Code;
    use tonic_health::pb::health_server::Health as _;

    use super::*;

    fn request() -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: "nope".into(),
        })
    }

    fn health(max_watch_streams: usize, watch_max_age: Duration) -> Health {
        let config = HealthConfig {
            max_watch_streams,
            watch_max_age,
        };
        Health::new([""], &config)
    }

    #[tokio::test]
    async fn watch_streams_are_bounded_in_number_and_give_their_place_back() {
        let health = health(2, Duration::from_secs(600));
        let first = health.watch(request()).await.unwrap();
        let _second = health.watch(request()).await.unwrap();
        let Err(refused) = health.watch(request()).await else {
            panic!("a third Watch stream is refused");
        };
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(health.watch_streams(), 2);
        drop(first);
        assert_eq!(health.watch_streams(), 1);
        health.watch(request()).await.unwrap();
    }

    #[tokio::test]
    async fn a_watch_stream_ends_unavailable_at_its_maximum_age() {
        let health = health(2, Duration::from_millis(200));
        let mut updates = health.watch(request()).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
        let end = updates.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), Code::Unavailable);
        assert!(updates.next().await.is_none(), "and the stream ends");
        drop(updates);
        assert_eq!(health.watch_streams(), 0);
    }

    #[tokio::test]
    async fn the_probe_port_does_not_serve_watch() {
        let health = health(2, Duration::from_secs(600));
        let probe = Health {
            watchers: None,
            ..health.clone()
        };
        let Err(refused) = probe.watch(request()).await else {
            panic!("the probe port refuses Watch");
        };
        assert_eq!(refused.code(), Code::Unimplemented);
        probe
            .check(Request::new(HealthCheckRequest::default()))
            .await
            .unwrap();
    }
}
