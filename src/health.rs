//! `grpc.health.v1.Health`, as the gRPC health-checking protocol specifies it.
//!
//! tonic-health's service answers `Watch` for an unknown service with NOT_FOUND and ends the call;
//! the protocol (grpc/grpc doc/health-checking.md) says the server must send SERVICE_UNKNOWN and
//! keep the stream open, sending SERVING later if the service appears. Clients such as grpc-go's
//! health-checking balancer rely on that, so greeter serves its own implementation over
//! tonic-health's generated types. The set of services is fixed when the server is built.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{self, HealthServer},
};

/// The health of every service the server reports on; cheap to clone, shared by all listeners.
#[derive(Debug, Clone)]
pub struct Health {
    services: Arc<HashMap<String, watch::Sender<ServingStatus>>>,
}

impl Health {
    /// Reports on `services` (use `""` for the server as a whole), all NOT_SERVING at first.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>) -> Self {
        let services = services
            .into_iter()
            .map(|name| (name.to_owned(), watch::channel(ServingStatus::NotServing).0))
            .collect();
        Self {
            services: Arc::new(services),
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

    /// The gRPC service, to add to a router.
    pub fn service(&self) -> HealthServer<Self> {
        HealthServer::new(self.clone())
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
    /// and the stream stays open (the set of services is fixed, so nothing follows).
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let updates: WatchUpdates = match self.services.get(&request.get_ref().service) {
            Some(sender) => Box::pin(WatchStream::new(sender.subscribe()).map(|s| Ok(response(s)))),
            None => Box::pin(
                tokio_stream::once(Ok(response(ServingStatus::ServiceUnknown)))
                    .chain(tokio_stream::pending()),
            ),
        };
        Ok(Response::new(updates))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::health_server::Health as _;

    use super::*;

    fn request(service: &str) -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: service.into(),
        })
    }

    #[tokio::test]
    async fn check_knows_only_the_registered_services() {
        let health = Health::new(["", "helloworld.Greeter"]);
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
        let health = Health::new([""]);
        let mut updates = health.watch(request("")).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::NotServing);
        health.set_all(ServingStatus::Serving);
        let next = updates.next().await.unwrap().unwrap();
        assert_eq!(next.status(), ServingStatus::Serving);
    }

    #[tokio::test]
    async fn watch_of_an_unknown_service_says_so_and_stays_open() {
        let health = Health::new([""]);
        let mut updates = health.watch(request("nope")).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
        let more = tokio::time::timeout(Duration::from_millis(100), updates.next()).await;
        assert!(more.is_err(), "the stream stays open");
    }
}
