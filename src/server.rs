//! The gRPC server: listeners, the tower stack, routes, health, reloads and shutdown, assembled in
//! one place so the path of a call reads top to bottom in [`Server::serve`].

use std::{
    future::Future,
    io::ErrorKind,
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
    auth::{AuthLayer, Authenticator, TokenStore, TokensError},
    call::{CallLayer, CallStats},
    config::{AuthMode, Config, LimitsConfig},
    connection,
    deadline::DeadlinePolicy,
    health::{self, Health},
    intake::{BufferBudget, IntakeLayer, MessageLimit},
    limit::{Activity, Budget, Budgets, LimitLayer, ShedBy, ShedCount},
    listener::{
        self, Connection, ConnectionBudget, ConnectionSlot, Listener, OnConnection, PeerCounts,
        TlsAccept,
    },
    methods::{self, Catalog, MethodTable},
    metrics::{self, CounterFn, CounterFnSet, GrpcMetrics, Reloads, ServerMetrics, exporter},
    observe::ObserveLayer,
    pb::{self, greeter_server::GreeterServer},
    reload::{self, Reloaded},
    service::{self, Greeter, compressed},
    tls::{self, CertSummary, Reloadable, TlsError},
    unix_socket::{UnixSocket, UnixSocketError},
    web::{OriginError, WebLayer},
};

/// Connections the probe listener accepts at once: probes connect, ask, and leave.
pub const PROBE_MAX_CONNECTIONS: usize = 64;
/// ... from one IP address: the kubelet probes from its node's, one probe at a time.
const PROBE_MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Calls in progress on the probe listener at once, and on one of its connections.
pub const PROBE_MAX_CALLS: usize = 32;
const PROBE_MAX_CALLS_PER_CONNECTION: usize = 4;

/// The largest reflection request: a file name or a symbol, with room to spare.
const REFLECTION_MAX_REQUEST_BYTES: usize = 16 * 1024;

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
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Web(#[from] OriginError),
    #[error("cannot serve the Unix socket (server.unix): {0}")]
    Unix(#[from] UnixSocketError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
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
            let material = tls::load(&config.tls, config.web.enabled)?;
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
    unix: Option<(UnixSocket, UnixListener)>,
    probe_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    web: Option<WebLayer>,
    health: Health,
    stats: Arc<Stats>,
}

impl Server {
    /// Loads TLS and token material and binds the listeners. Health starts NOT_SERVING for every
    /// service until [`Server::serve`] runs, so a probe never sees SERVING before calls can be
    /// answered.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let credentials = Credentials::load(&config)?;
        let web = if config.web.enabled {
            let loopback_only = config.server.listen.ip().is_loopback() && !config.tls.enabled;
            Some(WebLayer::new(&config.web, loopback_only)?)
        } else {
            None
        };
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
        let health = Health::new(["", GREETER_SERVICE], &config.health);
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
        } = self;
        let (unix_socket, unix_listener) = unix.unzip();

        // Set when the listeners close: connections send GOAWAY, streams end, accept loops stop.
        let draining = CancellationToken::new();
        // Stops background work (reloaders, the metrics listener) once serving is over.
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();

        let limits = &config.limits;
        // Both reflection protocols (grpcurl before 1.9 and many tools speak only v1alpha), each
        // describing everything served, the other reflection protocol included, as grpc-go does.
        let descriptor_sets = [
            pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            // google.rpc.Status and BadRequest, so clients can decode error details by reflection.
            tonic_types::pb::FILE_DESCRIPTOR_SET,
        ];

        // Every series exists from here on, at zero; the layers and tasks get handles on them.
        let mut registry = Registry::default();
        let grpc_metrics = Arc::new(GrpcMetrics::register(&mut registry, &descriptor_sets));
        let server_metrics = ServerMetrics::register(&mut registry);
        stats.register(&mut registry);
        let main_connections = ConnectionBudget {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_peer: (limits.max_connections_per_peer > 0)
                .then(|| PeerCounts::new(limits.max_connections_per_peer)),
        };
        let probe_connections = ConnectionBudget {
            total: Arc::new(Semaphore::new(PROBE_MAX_CONNECTIONS)),
            per_peer: Some(PeerCounts::new(PROBE_MAX_CONNECTIONS_PER_PEER)),
        };
        register_connection_refusals(&mut registry, &main_connections, &probe_connections);
        metrics::process::register(&mut registry);
        spawn_reloaders(&config, &credentials, &background, &mut registry);
        let exporter = metrics_listener.map(|metrics_listener| {
            tokio::spawn(exporter::serve(
                metrics_listener,
                Arc::new(registry),
                background.clone(),
            ))
        });
        let message_limits = message_limits(&config, &descriptor_sets);
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
            )
            .prepare();
        let probe_routes = Routes::new(health.probe_service()).prepare();

        // The path of a call, outermost first. Per connection: TCP -> TLS -> HTTP/2, or HTTP/1.1
        // with [web] (limits, keepalive, idle, first call, age). Per call: peer info -> with
        // [web]: CORS, the page, grpc-web to gRPC -> request id, log span, metrics and access log
        // -> auth (who is calling) -> call budgets by trust (sheds) -> request bytes held
        // (per-method message limits, server-wide budget) -> deadline, drain and cancellation ->
        // route -> handler.
        let stack = Stack {
            observe: ObserveLayer::new(grpc_metrics, metrics_addr.is_some()),
            intake: IntakeLayer::new(message_limits.table, Arc::clone(&stats.buffered)),
            call_layer: CallLayer::new(
                DeadlinePolicy::new(&config.deadline),
                Catalog::from_encoded_sets(&descriptor_sets),
                draining.clone(),
                Arc::clone(&stats.calls),
            ),
            accepted: Arc::clone(&stats.connections_accepted),
            connections_open: server_metrics.connections_open.clone(),
            draining: draining.clone(),
            connections: TaskTracker::new(),
        };
        let tls = credentials.tls.as_ref().map(|(material, _)| TlsAccept {
            material: material.clone(),
            handshake_timeout: config.tls.handshake_timeout,
            handshake_failures: server_metrics.tls_handshake_failures.clone(),
        });
        let auth_failures = server_metrics.auth_failures;
        let main = stack.on_connection(
            Front {
                settings: Arc::new(connection::Settings::new(
                    limits,
                    &config.connection,
                    config.web.enabled,
                )),
                web,
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
            },
            routes,
            AuthLayer::new(credentials.auth.clone(), auth_failures.clone()),
        );
        stack.connections.spawn(listener::accept(
            Listener::Tcp(listener),
            tls,
            main_connections.clone(),
            draining.clone(),
            Arc::clone(&main),
        ));
        if let Some(unix_listener) = unix_listener {
            // The same calls as the main listener, and the same connection budget.
            stack.connections.spawn(listener::accept(
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
            // under attack on its main port, must still answer the kubelet's probes.
            stack.connections.spawn(listener::accept(
                Listener::Tcp(probe_listener),
                None,
                probe_connections,
                draining.clone(),
                stack.on_connection(
                    Front {
                        settings: Arc::new(connection::Settings::probe(limits, &config.connection)),
                        web: None,
                        budgets: Budgets {
                            calls: Budget::new(PROBE_MAX_CALLS, PROBE_MAX_CALLS_PER_CONNECTION),
                            anonymous: None,
                            shed: Arc::clone(&stats.shed),
                        },
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
        health.set_all(ServingStatus::NotServing);
        let delay = config.shutdown.delay;
        info!(
            delay = %humantime::format_duration(delay),
            "shutting down: health NOT_SERVING"
        );
        tokio::time::sleep(delay).await;
        info!(
            connections = stack.connections.len(),
            "closing listeners; draining open calls"
        );
        draining.cancel();
        stack.connections.close();
        let grace = config.shutdown.grace;
        if tokio::time::timeout(grace, stack.connections.wait())
            .await
            .is_ok()
        {
            info!("all calls finished; stopped");
        } else {
            warn!(
                grace = %humantime::format_duration(grace),
                "shutdown grace expired; abandoning the calls still open"
            );
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

/// What every connection of a server shares, and how a new connection is served.
#[derive(Clone)]
struct Stack {
    observe: ObserveLayer,
    intake: IntakeLayer,
    call_layer: CallLayer,
    accepted: Arc<AtomicU64>,
    connections_open: Gauge,
    draining: CancellationToken,
    connections: TaskTracker,
}

impl Stack {
    /// The per-connection service over `routes`, spawned for each accepted connection.
    fn on_connection(&self, front: Front, routes: Routes, auth: AuthLayer) -> OnConnection {
        let stack = self.clone();
        Arc::new(move |conn: Connection, slot: ConnectionSlot| {
            stack.accepted.fetch_add(1, Ordering::Relaxed);
            let open = OpenConnection::new(stack.connections_open.clone());
            let activity = Arc::new(Activity::default());
            let peer = AddExtensionLayer::new(conn.peer().clone());
            let calls = ServiceBuilder::new()
                .layer(stack.observe.clone())
                .layer(auth.clone())
                .layer(LimitLayer::new(
                    front.budgets.clone(),
                    Arc::clone(&activity),
                ))
                .layer(stack.intake.clone())
                .layer(stack.call_layer.clone())
                .service(routes.clone());
            let (settings, draining) = (Arc::clone(&front.settings), stack.draining.clone());
            // Two monomorphic paths rather than one boxed service: without [web], calls pay
            // nothing for it.
            let serving = match &front.web {
                Some(web) => {
                    let service = ServiceBuilder::new()
                        .layer(peer)
                        .layer(web.clone())
                        .service(calls);
                    Either::Left(connection::serve(
                        conn, service, settings, activity, draining,
                    ))
                }
                None => {
                    let service = ServiceBuilder::new().layer(peer).service(calls);
                    Either::Right(connection::serve(
                        conn, service, settings, activity, draining,
                    ))
                }
            };
            stack.connections.spawn(async move {
                serving.await;
                drop(open);
                drop(slot);
            });
        })
    }
}

/// How a listener's connections speak HTTP (the protocol settings, grpc-web or not) and the call
/// budgets they draw from.
struct Front {
    settings: Arc<connection::Settings>,
    web: Option<WebLayer>,
    budgets: Budgets,
}

/// One count in `greeter_connections_open` while the connection is served.
struct OpenConnection(Gauge);

impl OpenConnection {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counters of what the server refused or cut short.
#[derive(Debug)]
pub struct Stats {
    pub calls: Arc<CallStats>,
    pub shed: Arc<ShedCount>,
    /// Connections accepted (TLS ones once their handshake succeeded), probe port included.
    pub connections_accepted: Arc<AtomicU64>,
    /// Request bytes held for messages still arriving, and the calls refused over them.
    pub buffered: Arc<BufferBudget>,
}

impl Stats {
    fn new(limits: &LimitsConfig) -> Self {
        Self {
            calls: Arc::default(),
            shed: Arc::default(),
            connections_accepted: Arc::default(),
            buffered: Arc::new(BufferBudget::new(limits.max_buffered_request_bytes)),
        }
    }
}

impl Stats {
    /// Exposes the counters as `greeter_*` metrics, read at each scrape.
    fn register(&self, registry: &mut Registry) {
        let accepted = Arc::clone(&self.connections_accepted);
        registry.register(
            "greeter_connections_accepted",
            "Connections accepted (TLS ones once their handshake succeeded), probe port included",
            CounterFn::new(move || accepted.load(Ordering::Relaxed)),
        );
        let shed_by = ShedBy::ALL
            .into_iter()
            .fold(CounterFnSet::new("limit"), |set, by| {
                let shed = Arc::clone(&self.shed);
                set.with(by.as_str(), move || shed.by(by))
            });
        registry.register(
            "greeter_calls_shed",
            "Calls refused with RESOURCE_EXHAUSTED at once because a concurrency limit was \
             reached, by limit (connection: max_concurrent_calls_per_connection, server: \
             max_concurrent_calls, anonymous_connection: max_anonymous_calls_per_connection, \
             anonymous: max_anonymous_calls)",
            shed_by,
        );
        let buffered = Arc::clone(&self.buffered);
        registry.register(
            "greeter_requests_refused_oversize",
            "Calls refused with RESOURCE_EXHAUSTED because a request message was larger than its \
             method accepts or limits.max_buffered_request_bytes was reached",
            CounterFn::new(move || buffered.refused()),
        );
        let calls = Arc::clone(&self.calls);
        registry.register(
            "greeter_calls_deadline_exceeded",
            "Calls the server ended with DEADLINE_EXCEEDED because their deadline passed",
            CounterFn::new(move || calls.deadline_exceeded()),
        );
        let calls = Arc::clone(&self.calls);
        registry.register(
            "greeter_calls_cancelled",
            "Calls whose client reset the stream or disconnected before the call ended",
            CounterFn::new(move || calls.cancelled()),
        );
        let calls = Arc::clone(&self.calls);
        registry.register(
            "greeter_streams_ended_by_shutdown",
            "Server streams ended with UNAVAILABLE because the server was shutting down",
            CounterFn::new(move || calls.ended_by_shutdown()),
        );
    }
}

/// Connections closed at once because their address had too many open, per listener.
fn register_connection_refusals(
    registry: &mut Registry,
    main: &ConnectionBudget,
    probe: &ConnectionBudget,
) {
    let refused = [("main", main), ("probe", probe)].into_iter().fold(
        CounterFnSet::new("listener"),
        |set, (name, budget)| {
            let counts = budget.per_peer.clone();
            set.with(name, move || counts.as_ref().map_or(0, |c| c.refused()))
        },
    );
    registry.register(
        "greeter_connections_refused_per_peer",
        "Connections closed at once because their IP address already had as many open as \
         allowed (limits.max_connections_per_peer; 8 on the probe port)",
        refused,
    );
}

/// What each method's requests may be: the largest message its request type can usefully
/// hold (never more than `limits.max_recv_message_bytes`), and whether the client streams.
struct MessageLimits {
    table: MethodTable<MessageLimit>,
    greeter: usize,
    reflection: usize,
}

fn message_limits(config: &Config, descriptor_sets: &[&[u8]]) -> MessageLimits {
    let cap = |bytes: usize| bytes.min(config.limits.max_recv_message_bytes);
    let greeter = cap(service::max_request_bytes(&config.greeter));
    let reflection = cap(REFLECTION_MAX_REQUEST_BYTES);
    let health = cap(health::MAX_REQUEST_BYTES);
    let any = MessageLimit {
        max_bytes: config.limits.max_recv_message_bytes,
        request_streams: false,
    };
    let served = methods::served_methods(descriptor_sets)
        .into_iter()
        .map(|method| {
            let max_bytes = match method.service.as_str() {
                GREETER_SERVICE => greeter,
                "grpc.health.v1.Health" => health,
                s if s.starts_with("grpc.reflection.") => reflection,
                _ => any.max_bytes,
            };
            let limit = MessageLimit {
                max_bytes,
                request_streams: method.kind.client_streams(),
            };
            (method.path(), limit)
        });
    MessageLimits {
        table: MethodTable::new(std::iter::once(("*".to_owned(), any)).chain(served)),
        greeter,
        reflection,
    }
}

/// Re-reads TLS material and tokens when their files change or SIGHUP arrives, counting the
/// outcomes and keeping the certificate expiry gauge current.
fn spawn_reloaders(
    config: &Config,
    credentials: &Credentials,
    stop: &CancellationToken,
    registry: &mut Registry,
) {
    let hangups = reload::hangups();
    let reloads = Reloads::register(registry);
    if let Some((material, leaf)) = &credentials.tls {
        let expiry = metrics::register_certificate_expiry(registry, leaf.not_after_unix);
        let settings = config.tls.clone();
        let http1 = config.web.enabled;
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
            reloads.kind("tls"),
            move || {
                tls::reload(&settings, http1).map(|(loaded, revoked)| {
                    material.replace(loaded.config);
                    expiry.set(loaded.leaf.not_after_unix);
                    let summary = format!(
                        "certificate serial {} ({})",
                        loaded.leaf.serial, loaded.leaf.subject
                    );
                    if revoked {
                        Reloaded::Revoked(format!(
                            "{summary}; tls.client_ca {} is missing: no client certificate is \
                             accepted until it is back",
                            settings.client_ca.display()
                        ))
                    } else {
                        Reloaded::Loaded(summary)
                    }
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
            reloads.kind("tokens"),
            move || match TokenStore::load(&path) {
                Ok(tokens) => {
                    let count = tokens.len();
                    auth.replace_tokens(tokens);
                    Ok(Reloaded::Loaded(format!("{count} tokens")))
                }
                // Deleting the file is how an operator revokes everything: honour it. A file that
                // is there but does not load (half-written, malformed) keeps the previous tokens.
                Err(TokensError::Read { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    auth.replace_tokens(TokenStore::default());
                    Ok(Reloaded::Revoked(format!(
                        "auth.tokens_file {} is missing: every token is refused until it is back",
                        path.display()
                    )))
                }
                Err(e) => Err(e),
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
