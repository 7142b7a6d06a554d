//! The gRPC server, wired: the listeners ([`crate::transport`]), the per-call layers
//! ([`crate::call`]) stacked in the order a call crosses them, the routes ([`crate::service`]),
//! and beside them the metrics, reloaders and drain ([`crate::ops`]). What each piece does lives
//! in its module; here is only how they connect, so the path of a call reads top to bottom in
//! [`Server::serve`].

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::future::Either;
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::service::Routes;
use tonic_health::pb::health_check_response::ServingStatus;
use tower::ServiceBuilder;
use tower_http::add_extension::AddExtensionLayer;
use tracing::{info, warn};

use crate::{
    call::auth::{self, AuthLayer, Authenticator, JwksError, TokensError},
    call::connect::{ConnectError, ConnectLayer, Translator},
    call::deadline::DeadlinePolicy,
    call::faults::{self, FaultLayer},
    call::gate::{GateLayer, Speaks},
    call::intake::IntakeLayer,
    call::lifetime::CallLayer,
    call::limit::{Budget, Budgets, LimitLayer},
    call::observe::{ObserveLayer, trace::CallTracer},
    call::quota::{QuotaLayer, RedisStoreError},
    call::resolve::{Resolver, Tables},
    call::web::WebLayer,
    config::{Config, ProbeConfig},
    methods::{self, served_methods},
    ops::memory::WorstCase,
    ops::metrics::{self, GrpcMetrics, MethodCounters, ServerMetrics, exporter},
    ops::shutdown,
    ops::telemetry::{Telemetry, TelemetryError},
    pb::greeter_server::GreeterServer,
    service::health::Health,
    service::{self, Greeter, compressed},
    transport::connection::{self, Activity},
    transport::listener::{
        self, Connection, ConnectionBudget, ConnectionSlot, Listener, OnConnection, PeerCounts,
        TlsAccept,
    },
    transport::tls::TlsError,
    transport::unix_socket::{UnixSocket, UnixSocketError},
};

mod counters;
mod credentials;
mod own;
mod tables;

use counters::{OpenConnection, server_counters};
use credentials::spawn_reloaders;
use tables::{message_limits, quotas};

pub use counters::Stats;
pub use credentials::Credentials;
pub use own::OwnService;
pub use tables::largest_request_bytes;

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
    #[error("JWT keys (auth.jwt.issuers jwks_file): {0}")]
    Jwks(#[from] JwksError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot serve the Unix socket (server.unix): {0}")]
    Unix(#[from] UnixSocketError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("tracing: {0}")]
    Tracing(#[from] TelemetryError),
    #[error("cannot serve the Connect protocol: {0}")]
    Connect(#[from] ConnectError),
    #[error("quota store: {0}")]
    QuotaStore(#[from] RedisStoreError),
}

impl ServerError {
    /// Whether the fix is in the configuration or a file it names (the process exits 2, as for
    /// an invalid config), rather than in the machine (a port taken, a signal handler refused).
    /// Every variant is decided here, so a new one cannot default to the wrong exit code.
    pub fn is_configuration(&self) -> bool {
        match self {
            Self::Tls(_)
            | Self::Tokens(_)
            | Self::Jwks(_)
            | Self::Tracing(_)
            | Self::QuotaStore(_) => true,
            Self::Unix(error) => matches!(
                error,
                UnixSocketError::NotASocket { .. } | UnixSocketError::Mode { .. }
            ),
            Self::Bind { .. } | Self::Signals(_) | Self::Reflection(_) | Self::Connect(_) => false,
        }
    }
}

/// A bound, not yet serving, greeter server. Binding first lets callers (tests, the CLI) learn the
/// real address of a `:0` listener before any call is made.
pub struct Server {
    config: Config,
    credentials: Credentials,
    listener: TcpListener,
    unix: Option<(UnixSocket, UnixListener)>,
    probe_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    web: Option<WebLayer>,
    health: Health,
    stats: Arc<Stats>,
    own: Vec<OwnService>,
}

impl Server {
    /// Loads TLS and token material and binds the listeners. Health starts NOT_SERVING for every
    /// service until [`Server::serve`] runs, so a probe never sees SERVING before calls can be
    /// answered.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        Self::bind_with(config, Vec::new()).await
    }

    /// [`Server::bind`], serving `own` services beside the built-in ones, through the same layers
    /// (ARCHITECTURE.md, "Adding your own service"). Load `config` with
    /// [`Config::load_serving`], so its per-method tables may name their methods.
    pub async fn bind_with(config: Config, own: Vec<OwnService>) -> Result<Self, ServerError> {
        let credentials = Credentials::load(&config)?;
        let web = config.web.enabled.then(|| WebLayer::new(&config.web));
        let listener = bind(config.server.listen, "server.listen").await?;
        let unix = if config.server.unix.as_os_str().is_empty() {
            None
        } else {
            Some(UnixSocket::bind(&config.server.unix, config.server.unix_mode).await?)
        };
        let probe_listener = match config.probe.listen {
            Some(addr) => Some(bind(addr, "probe.listen").await?),
            None => None,
        };
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(bind(addr, "metrics.listen").await?),
            None => None,
        };
        let names = ["", GREETER_SERVICE]
            .into_iter()
            .chain(own.iter().map(OwnService::name));
        let health = Health::new(names, &config.health);
        let stats = Arc::new(Stats::new(&config.limits));
        Ok(Self {
            config,
            credentials,
            listener,
            unix,
            probe_listener,
            metrics_listener,
            web,
            health,
            stats,
            own,
        })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        local_addr(&self.listener)
    }

    /// The Unix socket's path, when one is configured.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(socket, _)| socket.path())
    }

    /// The probe listener's address, when one is configured.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe_listener.as_ref().map(local_addr)
    }

    /// The metrics listener's address (`GET /metrics`), when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(local_addr)
    }

    /// Counters of calls refused or cut short; they keep counting while the server runs.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// A handle on the health state, e.g. to take the service out of rotation.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves until `shutdown` completes, then drains: health turns NOT_SERVING, the server keeps
    /// answering for `shutdown.delay`, the listeners close, connections get GOAWAY, server
    /// streams end with UNAVAILABLE, and unary calls get up to `shutdown.grace` to finish before
    /// this returns regardless. Metrics stay scrapeable until then.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let local_addr = self.local_addr();
        let probe_addr = self.probe_addr();
        let metrics_addr = self.metrics_addr();
        let Self {
            config,
            credentials,
            listener,
            unix,
            probe_listener,
            metrics_listener,
            web,
            health,
            stats,
            own,
        } = self;
        let (unix_socket, unix_listener) = unix.unzip();

        // Set when the listeners close: connections send GOAWAY, streams end, accept loops stop.
        let draining = CancellationToken::new();
        // Stops background work (reloaders, the metrics listener) once serving is over.
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();

        let limits = &config.limits;
        let own_sets: Vec<_> = own.iter().map(OwnService::descriptor_set).collect();
        let descriptor_sets = methods::descriptor_sets(&own_sets);
        let declared: Vec<_> = own.iter().filter_map(OwnService::declared).collect();
        let message_limits = message_limits(&config, &descriptor_sets, &declared);

        // Every series exists from here on, at zero; the layers and tasks get handles on them.
        let mut registry = Registry::default();
        let grpc_metrics = GrpcMetrics::register(&mut registry, &descriptor_sets);
        let server_metrics = ServerMetrics::register(&mut registry, auth::REFUSAL_REASONS);
        let main_connections = ConnectionBudget {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_peer: (limits.max_connections_per_peer > 0)
                .then(|| PeerCounts::new(limits.max_connections_per_peer)),
        };
        let probe_connections = ConnectionBudget {
            total: Arc::new(Semaphore::new(ProbeConfig::MAX_CONNECTIONS)),
            per_peer: Some(PeerCounts::new(ProbeConfig::MAX_CONNECTIONS_PER_PEER)),
        };
        let telemetry = credentials
            .tracing
            .as_ref()
            .map(|material| Telemetry::start(&config.tracing, material))
            .transpose()?;
        server_counters(
            &stats,
            &main_connections,
            &probe_connections,
            telemetry.as_ref().map(Telemetry::queue),
        )
        .register(&mut registry);
        if let Some(auth) = &credentials.auth {
            auth.register_signature_checks(&mut registry);
        }
        metrics::process::register(&mut registry);
        let quotas = match config.quota.enabled {
            true => {
                Some(quotas(&config.quota, &mut registry, &descriptor_sets, &background).await?)
            }
            false => None,
        };
        let worst_case = WorstCase::of(&config, message_limits.largest).total();
        let (version, commit) = (env!("CARGO_PKG_VERSION"), env!("GREETER_GIT_COMMIT"));
        metrics::register_facts(&mut registry, version, commit, worst_case);
        let injected = metrics::faults_injected(faults::KINDS);
        let injected =
            MethodCounters::register(&mut registry, &injected, &served_methods(&descriptor_sets));
        let faults = (config.faults.enabled)
            .then(|| FaultLayer::new(&config.faults, credentials.auth.clone(), injected));
        spawn_reloaders(&config, &credentials, &background, &mut registry);
        let exporter = metrics_listener.map(|metrics_listener| {
            tokio::spawn(listener::serve_http1(
                metrics_listener,
                exporter::MAX_CONNECTIONS,
                exporter::HEADER_READ_TIMEOUT,
                background.clone(),
                exporter::responder(Arc::new(registry)),
            ))
        });
        let served = served_methods(&descriptor_sets);
        // Every per-method setting, looked up once per method here rather than once per call.
        let resolver = Resolver::new(
            &served,
            &Tables {
                metrics: &grpc_metrics,
                deadlines: &DeadlinePolicy::new(&config.deadline),
                policy: credentials.auth.as_ref().map(Authenticator::policy),
                message_limits: &message_limits.table,
                plain_replies: &service::plain_streams(&config.compression),
            },
        );
        // Connect calls are translated to gRPC for every served method, JSON from the same
        // descriptors reflection serves.
        let connect = if config.connect.enabled {
            let translator = Translator::new(&descriptor_sets, &config.compression, |path| {
                message_limits
                    .table
                    .lookup(path)
                    .copied()
                    .unwrap_or(limits.max_recv_message_bytes)
            })?;
            Some(ConnectLayer::new(Arc::new(translator)))
        } else {
            None
        };
        let web = web.map(|web| web.with_connect(connect.clone()));
        let reflection = || {
            descriptor_sets.iter().fold(
                tonic_reflection::server::Builder::configure().include_reflection_service(false),
                |builder, set| builder.register_encoded_file_descriptor_set(set),
            )
        };
        let greeter = compressed(
            GreeterServer::new(Greeter::new(
                config.greeter.clone(),
                config.compression.min_reply_bytes,
            ))
            .max_decoding_message_size(message_limits.greeter)
            .max_encoding_message_size(limits.max_send_message_bytes),
            &config.compression,
        );
        let routes = Routes::new(greeter)
            .add_service(health.service())
            .add_service(
                reflection()
                    .build_v1()?
                    .max_decoding_message_size(message_limits.reflection),
            )
            .add_service(
                reflection()
                    .build_v1alpha()?
                    .max_decoding_message_size(message_limits.reflection),
            );
        let routes = own
            .iter()
            .fold(routes, |routes, service| service.add_to(routes))
            .prepare();
        let probe_routes = Routes::new(health.probe_service()).prepare();

        // The path of a call, outermost first. Per connection: TCP -> TLS -> HTTP/2, or HTTP/1.1
        // with [web] or [connect] (limits, keepalive, idle, first call, age). Per call: peer info
        // -> what the listener speaks (415), DNS rebinding on plaintext loopback (421) -> with
        // [web]: CORS, the page, grpc-web to gRPC; with [connect]: Connect to gRPC ->
        // request id, log span, metrics and access log -> auth (who is calling) -> quotas per
        // caller -> call budgets by trust (sheds) -> request bytes held (per-method message
        // limits, server-wide budget) -> deadline, drain and cancellation -> with [faults]:
        // failed or delayed on purpose -> route -> handler.
        let shared = Shared {
            observe: ObserveLayer::new(Arc::new(resolver), metrics_addr.is_some()).traced(
                telemetry
                    .as_ref()
                    .map(|t| CallTracer::new(t.tracer(), config.tracing.response_header)),
            ),
            intake: IntakeLayer::new(Arc::clone(&stats.buffered)),
            call_layer: CallLayer::new(draining.clone(), Arc::clone(&stats.calls)),
            accepted: Arc::clone(&stats.connections_accepted),
            connections_open: server_metrics.connections_open.clone(),
            draining: draining.clone(),
            connections: TaskTracker::new(),
        };
        let tls = credentials.tls.as_ref().map(|(material, _)| TlsAccept {
            material: material.clone(),
            handshake_timeout: config.tls.handshake_timeout,
            handshake_failures: server_metrics.tls_handshake_failures.clone(),
            connections_revoked: server_metrics.tls_connections_revoked.clone(),
        });
        let auth_failures = server_metrics.auth_failures;
        let main = shared.on_connection(
            PerListener {
                settings: Arc::new(connection::Settings::new(
                    limits,
                    &config.connection,
                    config.serves_http1(),
                )),
                gate: GateLayer::new(Speaks::new(
                    web.is_some(),
                    connect.is_some(),
                    config.server.listen.ip().is_loopback() && !config.tls.enabled,
                )),
                web,
                connect,
                budgets: Budgets {
                    calls: Budget::new(
                        limits.max_concurrent_calls,
                        limits.max_concurrent_calls_per_connection,
                    ),
                    // With auth off every call is anonymous: one budget, as fast as before.
                    anonymous: config.auth.enabled.then(|| {
                        Budget::new(
                            limits.max_anonymous_calls,
                            limits.max_anonymous_calls_per_connection,
                        )
                    }),
                    shed: Arc::clone(&stats.shed),
                },
                quota: QuotaLayer::new(quotas),
                faults,
            },
            routes,
            AuthLayer::new(credentials.auth.clone(), auth_failures.clone()),
        );
        shared.connections.spawn(listener::accept(
            Listener::Tcp(listener),
            tls,
            main_connections.clone(),
            draining.clone(),
            Arc::clone(&main),
        ));
        if let Some(unix_listener) = unix_listener {
            // The same calls as the main listener, and the same connection budget.
            shared.connections.spawn(listener::accept(
                Listener::Unix(unix_listener),
                None,
                main_connections,
                draining.clone(),
                main,
            ));
        }
        if let Some(probe_listener) = probe_listener {
            // Plaintext HTTP/2, health Check only, the same health state; never behind auth or
            // grpc-web. Budgets of its own, connections and calls: a server full of clients, or
            // under attack on its main port, must still answer the kubelet's probes. Traced only
            // with tracing.probe_spans: the kubelet's checks would outnumber the real calls.
            let probe_shared = if config.tracing.probe_spans {
                shared.clone()
            } else {
                Shared {
                    observe: shared.observe.clone().traced(None),
                    ..shared.clone()
                }
            };
            shared.connections.spawn(listener::accept(
                Listener::Tcp(probe_listener),
                None,
                probe_connections,
                draining.clone(),
                probe_shared.on_connection(
                    PerListener {
                        settings: Arc::new(connection::Settings::probe(limits, &config.connection)),
                        gate: GateLayer::new(Speaks::new(false, false, false)),
                        web: None,
                        connect: None,
                        budgets: Budgets {
                            calls: Budget::new(
                                ProbeConfig::MAX_CALLS,
                                ProbeConfig::MAX_CALLS_PER_CONNECTION,
                            ),
                            anonymous: None,
                            shed: Arc::clone(&stats.shed),
                        },
                        // Probes are never counted against a quota.
                        quota: QuotaLayer::new(None),
                        faults: None,
                    },
                    probe_routes,
                    AuthLayer::new(None, auth_failures),
                ),
            ));
        }

        health.set_all(ServingStatus::Serving);
        info!(
            listen = %local_addr,
            unix = unix_socket.as_ref().map(|socket| tracing::field::display(socket.path().display())),
            probe = probe_addr.map(tracing::field::display),
            metrics = metrics_addr.map(tracing::field::display),
            tls = config.tls.enabled,
            client_auth = config.tls.client_auth.as_str(),
            auth = config.auth.enabled,
            cert_serial = credentials.tls.as_ref().map(|(_, leaf)| leaf.serial.as_str()),
            "greeter serving"
        );
        if config.is_insecure_exposed() {
            warn!(listen = %local_addr, "serving plaintext or unauthenticated calls beyond loopback (server.allow_insecure = true)");
        }

        shutdown.await;
        shutdown::drain(
            &config.shutdown,
            || health.set_all(ServingStatus::NotServing),
            &draining,
            &shared.connections,
        )
        .await;
        // The drain's last calls ended their spans: send them, within tracing.export_timeout.
        if let Some(telemetry) = telemetry {
            telemetry.shutdown().await;
        }
        // Scrapes worked through the drain; the metrics port closes before this returns, so a
        // restarted server can bind it again at once.
        background.cancel();
        if let Some(exporter) = exporter {
            let _ = exporter.await;
        }
        drop(unix_socket);
        Ok(())
    }
}

/// What every listener of a server shares: the per-call layers that are the same for all (observe,
/// which resolves each call's method; intake, with the server-wide request budget; the call
/// lifetime), the connection counters, the drain signal and the tracker of connection tasks.
#[derive(Clone)]
struct Shared {
    observe: ObserveLayer,
    intake: IntakeLayer,
    call_layer: CallLayer,
    accepted: Arc<AtomicU64>,
    connections_open: Gauge,
    draining: CancellationToken,
    connections: TaskTracker,
}

impl Shared {
    /// The per-connection service over `routes`, spawned for each accepted connection.
    fn on_connection(
        &self,
        listener: PerListener,
        routes: Routes,
        auth: AuthLayer,
    ) -> OnConnection {
        let shared = self.clone();
        Arc::new(move |conn: Connection, slot: ConnectionSlot| {
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            let open = OpenConnection::new(shared.connections_open.clone());
            let activity = Arc::new(Activity::default());
            let peer = AddExtensionLayer::new(conn.peer().clone());
            let calls = ServiceBuilder::new()
                .layer(shared.observe.clone())
                .layer(auth.clone())
                .layer(listener.quota.clone())
                .layer(LimitLayer::new(
                    listener.budgets.clone(),
                    Arc::clone(&activity),
                ))
                .layer(shared.intake.clone())
                .layer(shared.call_layer.clone())
                .option_layer(listener.faults.clone())
                .service(routes.clone());
            let (settings, draining) = (Arc::clone(&listener.settings), shared.draining.clone());
            // Monomorphic paths rather than one boxed service: without [web] or [connect], calls
            // pay nothing for them. With [web], Connect sits inside its CORS.
            let serving = match (&listener.web, &listener.connect) {
                (Some(web), _) => {
                    let service = ServiceBuilder::new()
                        .layer(peer)
                        .layer(listener.gate.clone())
                        .layer(web.clone())
                        .service(calls);
                    Either::Left(connection::serve(
                        conn, service, settings, activity, draining,
                    ))
                }
                (None, Some(connect)) => {
                    let service = ServiceBuilder::new()
                        .layer(peer)
                        .layer(listener.gate.clone())
                        .layer(connect.clone())
                        .service(calls);
                    Either::Right(Either::Left(connection::serve(
                        conn, service, settings, activity, draining,
                    )))
                }
                (None, None) => {
                    let service = ServiceBuilder::new()
                        .layer(peer)
                        .layer(listener.gate.clone())
                        .service(calls);
                    Either::Right(Either::Right(connection::serve(
                        conn, service, settings, activity, draining,
                    )))
                }
            };
            shared.connections.spawn(async move {
                serving.await;
                drop(open);
                drop(slot);
            });
        })
    }
}

/// What differs between listeners (main and Unix socket, probe): the HTTP protocol settings,
/// grpc-web or not, Connect or not, the call budgets their calls draw from, the quotas they
/// count against, and the faults injected.
struct PerListener {
    settings: Arc<connection::Settings>,
    gate: GateLayer,
    web: Option<WebLayer>,
    connect: Option<ConnectLayer>,
    budgets: Budgets,
    quota: QuotaLayer,
    /// `[faults]`, on the main listener when enabled; never on the probe port.
    faults: Option<FaultLayer>,
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
