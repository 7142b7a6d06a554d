//! The gRPC server: listener, routes, health, and shutdown, assembled in one place so the path of
//! a call reads top to bottom in [`Server::serve`].

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tracing::{info, warn};

use crate::{
    config::Config,
    pb::{self, greeter_server::GreeterServer},
    service::Greeter,
};

/// The service name health reports for the Greeter, as gRPC's health protocol spells it.
pub const GREETER_SERVICE: &str = "helloworld.Greeter";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} (server.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, greeter server. Binding first lets callers (tests, the CLI) learn the
/// real address of a `:0` listener before any call is made.
pub struct Server {
    config: Config,
    listener: TcpListener,
    health: HealthReporter,
    health_service: HealthServer<HealthService>,
}

impl Server {
    /// Binds the listener. Health starts NOT_SERVING for every service until [`Server::serve`]
    /// runs, so a probe never sees SERVING before calls can be answered.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let health = HealthReporter::new();
        for service in ["", GREETER_SERVICE] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        Ok(Self {
            config,
            listener,
            health,
            health_service,
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// A handle on the health state, e.g. to take the service out of rotation.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves until `shutdown` completes, then drains: health turns NOT_SERVING, the listener
    /// closes, and open calls get `shutdown.grace` to finish before this returns regardless.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let local_addr = self.local_addr();
        let Self {
            config,
            listener,
            health,
            health_service,
        } = self;

        // Both protocols (grpcurl before 1.9 and many tools speak only v1alpha), each describing
        // everything served, the other reflection protocol included, as grpc-go does.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let router = tonic::transport::Server::builder()
            .add_service(GreeterServer::new(Greeter::new(config.greeter.clone())))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let draining = CancellationToken::new();
        let signal = {
            let draining = draining.clone();
            let health = health.clone();
            async move {
                shutdown.await;
                set_all(&health, ServingStatus::NotServing).await;
                info!("shutting down: health NOT_SERVING, no new connections");
                draining.cancel();
            }
        };

        set_all(&health, ServingStatus::Serving).await;
        info!(
            listen = %local_addr,
            tls = config.tls.enabled,
            auth = config.auth.enabled,
            "greeter serving"
        );
        if config.is_insecure_exposed() {
            warn!(listen = %local_addr, "serving plaintext, unauthenticated calls beyond loopback (server.allow_insecure = true)");
        }

        let grace = config.shutdown.grace;
        tokio::select! {
            served = router.serve_with_incoming_shutdown(incoming, signal) => {
                served?;
                info!("all calls finished; stopped");
            }
            () = expire(&draining, grace) => {
                warn!(grace = ?grace, "shutdown grace expired; abandoning the calls still open");
            }
        }
        Ok(())
    }
}

/// Completes `grace` after draining starts; never before.
async fn expire(draining: &CancellationToken, grace: Duration) {
    draining.cancelled().await;
    tokio::time::sleep(grace).await;
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    for service in ["", GREETER_SERVICE] {
        health.set_service_status(service, status).await;
    }
}
