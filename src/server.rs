//! The gRPC server: listeners, the tower stack, routes, health, reloads and shutdown, assembled in
//! one place so the path of a call reads top to bottom in [`Server::serve`].

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tracing::{info, warn};

use crate::{
    auth::{AuthLayer, Authenticator, TokenStore, TokensError},
    config::{AuthMode, Config},
    listener::{self, TlsAccept},
    pb::{self, greeter_server::GreeterServer},
    reload,
    service::Greeter,
    tls::{self, CertSummary, Reloadable, TlsError},
};

/// The service name health reports for the Greeter, as gRPC's health protocol spells it.
pub const GREETER_SERVICE: &str = "helloworld.Greeter";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("TLS (tls.*): {0}")]
    Tls(#[from] TlsError),
    #[error("tokens (auth.tokens_file): {0}")]
    Tokens(#[from] TokensError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// TLS and token material, loaded and checked: what `config check` verifies beyond the config
/// file itself, and what `bind` needs before it opens a socket.
pub struct Credentials {
    pub tls: Option<(Reloadable, CertSummary)>,
    pub auth: Option<Authenticator>,
}

impl Credentials {
    pub fn load(config: &Config) -> Result<Self, ServerError> {
        let tls = if config.tls.enabled {
            let material = tls::load(&config.tls)?;
            Some((Reloadable::new(material.config), material.leaf))
        } else {
            None
        };
        let auth = if config.auth.enabled {
            let tokens = if uses_tokens(config) {
                TokenStore::load(&config.auth.tokens_file)?
            } else {
                TokenStore::default()
            };
            Some(Authenticator::new(&config.auth, tokens))
        } else {
            None
        };
        Ok(Self { tls, auth })
    }
}

fn uses_tokens(config: &Config) -> bool {
    config.auth.mode != AuthMode::ClientCert
}

/// A bound, not yet serving, greeter server. Binding first lets callers (tests, the CLI) learn the
/// real address of a `:0` listener before any call is made.
pub struct Server {
    config: Config,
    credentials: Credentials,
    listener: TcpListener,
    probe_listener: Option<TcpListener>,
    health: HealthReporter,
}

impl Server {
    /// Loads TLS and token material and binds the listeners. Health starts NOT_SERVING for every
    /// service until [`Server::serve`] runs, so a probe never sees SERVING before calls can be
    /// answered.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let credentials = Credentials::load(&config)?;
        let listener = bind(config.server.listen, "server.listen").await?;
        let probe_listener = match config.probe.listen {
            Some(addr) => Some(bind(addr, "probe.listen").await?),
            None => None,
        };
        let health = HealthReporter::new();
        set_all(&health, ServingStatus::NotServing).await;
        Ok(Self {
            config,
            credentials,
            listener,
            probe_listener,
            health,
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        local_addr(&self.listener)
    }

    /// The probe listener's address, when one is configured.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe_listener.as_ref().map(local_addr)
    }

    /// A handle on the health state, e.g. to take the service out of rotation.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves until `shutdown` completes, then drains: health turns NOT_SERVING, the server keeps
    /// answering for `shutdown.delay`, the listeners close, and open calls get `shutdown.grace` to
    /// finish before this returns regardless.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let local_addr = self.local_addr();
        let probe_addr = self.probe_addr();
        let Self {
            config,
            credentials,
            listener,
            probe_listener,
            health,
        } = self;

        // Stops the accept loops (and with them tonic's accept loop); then connections drain.
        let stop_accepting = CancellationToken::new();
        // Stops background work (reloaders) once serving is over.
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        spawn_reloaders(&config, &credentials, &background);

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
        let health_service =
            || HealthServer::new(HealthService::from_health_reporter(health.clone()));

        // The path of a call, outermost first: connection (TCP, TLS) -> auth -> route -> handler.
        let tls = credentials.tls.as_ref().map(|(material, _)| TlsAccept {
            material: material.clone(),
            handshake_timeout: config.tls.handshake_timeout,
        });
        let main = tonic::transport::Server::builder()
            .layer(AuthLayer::new(credentials.auth.clone()))
            .add_service(GreeterServer::new(Greeter::new(config.greeter.clone())))
            .add_service(health_service())
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .serve_with_incoming_shutdown(
                listener::incoming(listener, tls, stop_accepting.clone()),
                stop_accepting.clone().cancelled_owned(),
            );

        // The probe listener: plaintext, health only, same health state.
        let probe = async {
            let Some(probe_listener) = probe_listener else {
                return Ok(());
            };
            tonic::transport::Server::builder()
                .add_service(health_service())
                .serve_with_incoming_shutdown(
                    listener::incoming(probe_listener, None, stop_accepting.clone()),
                    stop_accepting.clone().cancelled_owned(),
                )
                .await
        };

        set_all(&health, ServingStatus::Serving).await;
        info!(
            listen = %local_addr,
            probe = ?probe_addr,
            tls = config.tls.enabled,
            client_auth = ?config.tls.client_auth,
            auth = config.auth.enabled,
            cert_serial = credentials.tls.as_ref().map(|(_, leaf)| leaf.serial.as_str()),
            "greeter serving"
        );
        if config.is_insecure_exposed() {
            warn!(listen = %local_addr, "serving plaintext or unauthenticated calls beyond loopback (server.allow_insecure = true)");
        }

        let drain = {
            let health = health.clone();
            let stop_accepting = stop_accepting.clone();
            let delay = config.shutdown.delay;
            async move {
                shutdown.await;
                set_all(&health, ServingStatus::NotServing).await;
                info!(delay = ?delay, "shutting down: health NOT_SERVING");
                tokio::time::sleep(delay).await;
                info!("closing listeners; draining open calls");
                stop_accepting.cancel();
                std::future::pending::<()>().await;
            }
        };

        let grace = config.shutdown.grace;
        tokio::select! {
            (main, probe) = async { tokio::join!(main, probe) } => {
                main?;
                probe?;
                info!("all calls finished; stopped");
            }
            () = expire(&stop_accepting, grace) => {
                warn!(grace = ?grace, "shutdown grace expired; abandoning the calls still open");
            }
            () = drain => unreachable!("drain never completes"),
        }
        Ok(())
    }
}

/// Re-reads TLS material and tokens when their files change or SIGHUP arrives.
fn spawn_reloaders(config: &Config, credentials: &Credentials, stop: &CancellationToken) {
    let hangups = reload::hangups();
    if let Some((material, _)) = &credentials.tls {
        let settings = config.tls.clone();
        let mut paths = vec![settings.cert.clone(), settings.key.clone()];
        if !settings.client_ca.as_os_str().is_empty() {
            paths.push(settings.client_ca.clone());
        }
        let material = material.clone();
        reload::spawn(
            "tls",
            paths,
            settings.reload_interval,
            hangups.clone(),
            stop.clone(),
            move || {
                tls::load(&settings).map(|loaded| {
                    material.replace(loaded.config);
                    format!(
                        "certificate serial {} ({})",
                        loaded.leaf.serial, loaded.leaf.subject
                    )
                })
            },
        );
    }
    if let Some(auth) = &credentials.auth
        && uses_tokens(config)
    {
        let path = config.auth.tokens_file.clone();
        let auth = auth.clone();
        reload::spawn(
            "tokens",
            vec![path.clone()],
            config.auth.reload_interval,
            hangups,
            stop.clone(),
            move || {
                TokenStore::load(&path).map(|tokens| {
                    let count = tokens.len();
                    auth.replace_tokens(tokens);
                    format!("{count} tokens")
                })
            },
        );
    }
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, key, source })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener has a local address")
}

/// Completes `grace` after the listeners close; never before.
async fn expire(stop_accepting: &CancellationToken, grace: Duration) {
    stop_accepting.cancelled().await;
    tokio::time::sleep(grace).await;
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    for service in ["", GREETER_SERVICE] {
        health.set_service_status(service, status).await;
    }
}
