//! Typed configuration, layered and validated before anything binds.
//!
//! Layers, later wins: the embedded default (`config/default.toml`, compiled in), each `--config`
//! file in order, `GREETER__SECTION__KEY` environment variables, then command-line overrides.
//! Every error names the key and the layer it came from, because "invalid type: string" alone
//! sends an operator hunting through four layers.
//!
//! The configuration holds no secrets by design: TLS keys and token hashes live in files the config
//! only points to, so `greeter config show` can print it whole.
//!
//! Here: the types, one per section. [`load`](Config::load) layers the sources and names where
//! each value came from (`load.rs`); `check.rs` holds the checks types alone cannot express;
//! `values.rs` how some values are written (removable map entries, octal modes, optional
//! addresses); `secret.rs` how errors about the files holding secrets stay silent about them.

mod check;
mod load;
pub mod paths;
mod quota;
pub mod secret;
mod values;

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub use check::{Problem, Section};
pub use load::{ConfigError, Sources, env_var_name};
pub use quota::{
    AnonymousQuota, IdentityClass, IdentityQuota, QuotaConfig, QuotaLimits, QuotaStore,
    RedisFallback, RedisQuotaConfig,
};

/// The embedded default: what `greeter serve` runs with when given no file.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The whole configuration. Every section is required after merging, which the embedded default
/// guarantees, so no value here has a second, hidden default in Rust code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub probe: ProbeConfig,
    pub deadline: DeadlineConfig,
    pub limits: LimitsConfig,
    pub connection: ConnectionConfig,
    pub compression: CompressionConfig,
    pub greeter: GreeterConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub web: WebConfig,
    pub health: HealthConfig,
    pub tracing: TracingConfig,
    pub quota: QuotaConfig,
    pub connect: ConnectConfig,
    pub faults: FaultsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    /// Explicit opt-out of the secure-by-default guard for non-loopback addresses.
    pub allow_insecure: bool,
    /// A Unix domain socket serving the same calls, for clients on this host (sidecars);
    /// empty: none.
    pub unix: PathBuf,
    /// Permission bits of the socket file; connecting needs write permission on it.
    #[serde(with = "values::octal_mode")]
    pub unix_mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching `cert`.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; empty: no client certificates.
    pub client_ca: PathBuf,
    /// PEM certificate revocation lists of the client CA (and its intermediates): a client
    /// certificate they revoke is refused at the handshake. Re-read with the CA.
    pub client_crl_files: Vec<PathBuf>,
    pub client_auth: ClientAuth,
    /// A TLS handshake not finished within this is dropped, so idle sockets cannot pile up.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the certificate, key and CA files are re-read (SIGHUP re-reads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// Whether the TLS listener asks for client certificates (mTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Never ask.
    None,
    /// Ask; verify one if presented, admit clients without.
    Optional,
    /// Refuse the handshake without a certificate from `tls.client_ca`.
    Required,
}

impl ClientAuth {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub enabled: bool,
    /// TOML file of `[[tokens]]` entries: name, sha256 (hex) of the token, scopes.
    pub tokens_file: PathBuf,
    /// What authenticates a caller.
    pub mode: AuthMode,
    /// Scopes granted to a caller authenticated by a verified client certificate.
    pub client_cert_scopes: Vec<String>,
    /// How often the tokens file is re-read (SIGHUP re-reads at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Method pattern -> "open" or the scope a caller needs. Patterns are a full method path
    /// (`/helloworld.Greeter/SayHello`), a service (`/helloworld.Greeter/*`) or `*`; the most
    /// specific wins. Methods no pattern matches are refused: fail closed. A later layer removes
    /// an entry by setting it to `""`.
    #[serde(deserialize_with = "values::removable::map")]
    pub policy: BTreeMap<String, String>,
    /// JWT bearer tokens (Kubernetes service-account tokens, OIDC ID tokens) beside the static
    /// tokens: a bearer with three dot-separated parts goes to these issuers when any is set.
    #[serde(default)]
    pub jwt: JwtConfig,
    /// Client certificate identity -> scopes; a certificate no rule matches gets
    /// `client_cert_scopes`.
    #[serde(default)]
    pub cert_rules: Vec<CertRule>,
}

/// `[auth.jwt]`: who may issue tokens, and how their claims become scopes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Trusted issuers; none: JWTs are not accepted (a bearer is looked up in `tokens_file`).
    #[serde(default)]
    pub issuers: Vec<JwtIssuer>,
    /// Claim patterns -> scopes; every matching rule adds its scopes.
    #[serde(default)]
    pub rules: Vec<ClaimRule>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(with = "humantime_serde", default = "JwtConfig::default_leeway")]
    pub leeway: Duration,
    /// Verified tokens remembered (by SHA-256) until they expire, so a reused token is not
    /// verified again; 0 turns the cache off.
    #[serde(default = "JwtConfig::default_cache_size")]
    pub cache_size: usize,
    /// Refused tokens remembered (by SHA-256) until the next JWKS reload, so a bad token sent
    /// again is refused without being verified again; 0 turns the cache off.
    #[serde(default = "JwtConfig::default_cache_size")]
    pub failure_cache_size: usize,
    /// Signature checks that fail, per peer address (IPv4 address, IPv6 /64, Unix socket user):
    /// `peer_failure_burst` at once, refilled at `peer_failure_rate` per second. Once spent, a
    /// JWT from that address that is not in the cache of verified tokens is refused with
    /// RESOURCE_EXHAUSTED without a signature check, so forged tokens cost what garbage costs.
    #[serde(default = "JwtConfig::default_peer_failure_rate")]
    pub peer_failure_rate: f64,
    #[serde(default = "JwtConfig::default_peer_failure_burst")]
    pub peer_failure_burst: u32,
}

impl JwtConfig {
    fn default_leeway() -> Duration {
        Duration::from_secs(30)
    }

    fn default_cache_size() -> usize {
        4096
    }

    fn default_peer_failure_rate() -> f64 {
        1.0
    }

    fn default_peer_failure_burst() -> u32 {
        10
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            rules: Vec::new(),
            leeway: Self::default_leeway(),
            cache_size: Self::default_cache_size(),
            failure_cache_size: Self::default_cache_size(),
            peer_failure_rate: Self::default_peer_failure_rate(),
            peer_failure_burst: Self::default_peer_failure_burst(),
        }
    }
}

/// `[[auth.jwt.issuers]]`: one issuer (`iss`) and the keys it signs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// A JWKS (`{"keys": [...]}`), re-read like `tokens_file`.
    pub jwks_file: PathBuf,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// A claim holding scopes: a space-separated string (`scope`) or an array (`scp`).
    #[serde(default)]
    pub scopes_claim: Option<String>,
}

/// `[[auth.jwt.rules]]`: a claim whose value matches `pattern` grants `scopes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRule {
    /// A top-level claim (`sub`, `email`, `groups`, ...); for an array claim, any element.
    pub claim: String,
    /// A glob: `*` matches any run of characters.
    pub pattern: String,
    pub scopes: Vec<String>,
    /// Only for tokens of this issuer; unset: any configured issuer.
    #[serde(default)]
    pub issuer: Option<String>,
}

/// `[[auth.cert_rules]]`: a client certificate whose URI SAN (SPIFFE ID), DNS SAN or subject
/// matches grants `scopes`. Exactly one of `uri`, `dns`, `subject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRule {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub dns: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    pub scopes: Vec<String>,
}

/// Which credentials a call must carry when `auth.enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// A bearer token.
    Token,
    /// A client certificate verified against `tls.client_ca`.
    ClientCert,
    /// Either one (a token, when present, decides).
    Either,
    /// Both: the certificate proves the machine, the token's scopes decide.
    Both,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Plaintext listener serving only grpc.health.v1.Health; empty string: none.
    #[serde(with = "values::optional_addr")]
    pub listen: Option<SocketAddr>,
}

/// The probe listener's budgets are fixed, not configured: probes connect, ask, and leave.
impl ProbeConfig {
    /// Connections the probe listener accepts at once.
    pub const MAX_CONNECTIONS: usize = 64;
    /// ... from one IP address: the kubelet probes from its node's, one probe at a time.
    pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
    /// Calls in progress on the probe listener at once, and on one of its connections.
    pub const MAX_CALLS: usize = 32;
    pub const MAX_CALLS_PER_CONNECTION: usize = 4;
}

/// Deadlines: `default` when the client sends none, `max` caps what it asks; zero means none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineConfig {
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Per-method (`/pkg.Service/Method`) or per-service (`/pkg.Service/*`) overrides. A later
    /// layer removes an entry by setting it to `""`.
    #[serde(deserialize_with = "values::removable::map")]
    pub methods: BTreeMap<String, DeadlineLimits>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineLimits {
    #[serde(with = "humantime_serde")]
    pub default: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

/// Sizes and counts that bound memory and work; every HTTP/2 limit is set explicitly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_recv_message_bytes: usize,
    pub max_send_message_bytes: usize,
    pub max_connections: usize,
    pub max_concurrent_calls: usize,
    pub max_concurrent_calls_per_connection: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub max_frame_bytes: u32,
    pub initial_stream_window_bytes: u32,
    pub initial_connection_window_bytes: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    /// Calls to methods the policy marks `"open"` (when auth is on), across the server: they
    /// come from anyone, so they draw from a budget of their own and cannot crowd out callers
    /// with credentials.
    pub max_anonymous_calls: usize,
    pub max_anonymous_calls_per_connection: usize,
    /// Bytes of request messages received but not yet complete (so not yet handed to a handler),
    /// across the server.
    pub max_buffered_request_bytes: usize,
    /// Connections from one IP address on the main TCP listener; 0: no cap.
    pub max_connections_per_peer: usize,
}

/// HTTP/2 connection management: keepalive pings, idle and age limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub max_age_grace: Duration,
    /// A connection that has not started a call this long after it was accepted (after its TLS
    /// handshake) is closed: sockets that never speak cannot hold connection slots.
    #[serde(with = "humantime_serde")]
    pub first_call_timeout: Duration,
}

/// Message compression the Greeter accepts from clients and uses for its replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Encodings a client may compress requests with.
    pub accept: Vec<Encoding>,
    /// Encodings replies are compressed with, when the client accepts one of them.
    pub send: Vec<Encoding>,
    /// Calls whose replies cannot reach this many bytes are answered uncompressed: compressing a
    /// few dozen bytes costs CPU and makes them larger.
    pub min_reply_bytes: usize,
}

/// A gRPC message encoding (`grpc-encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gzip,
    Zstd,
}

impl From<Encoding> for tonic::codec::CompressionEncoding {
    fn from(encoding: Encoding) -> Self {
        match encoding {
            Encoding::Gzip => Self::Gzip,
            Encoding::Zstd => Self::Zstd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GreeterConfig {
    /// Longest accepted name in UTF-8 bytes.
    pub max_name_bytes: usize,
    /// The greetings of `SayHelloStreamReply`, in order.
    pub stream_greetings: Vec<String>,
    /// Pause between two greetings of `SayHelloStreamReply`.
    #[serde(with = "humantime_serde")]
    pub stream_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After a shutdown signal, how long to keep serving with health NOT_SERVING so that load
    /// balancers and endpoints controllers stop sending before the listener closes.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// How long open calls may run after a shutdown signal before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
    pub format: LogFormat,
}

/// Prometheus metrics: a plain HTTP listener of its own, so scrapes never compete with gRPC
/// calls for connection or call limits, and never need the gRPC listener's TLS or tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics`; empty string: no listener, and no per-call metrics kept.
    #[serde(with = "values::optional_addr")]
    pub listen: Option<SocketAddr>,
}

/// grpc-web for browsers, on the main listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Serve grpc-web (over HTTP/1.1 and HTTP/2) and the demo page at `/`.
    pub enabled: bool,
    /// Origins whose pages may call the server (CORS); `"*"` alone allows any. The page the
    /// server serves itself is same-origin and needs no entry.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a CORS preflight answer.
    #[serde(with = "humantime_serde")]
    pub cors_max_age: Duration,
}

/// The Connect protocol (connectrpc.com/docs/protocol) on the main listener: JSON or protobuf over
/// plain HTTP POSTs, for curl, `fetch` and every Connect client, beside gRPC and grpc-web.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// Serve Connect calls (over HTTP/1.1 and HTTP/2) for every method the server serves.
    pub enabled: bool,
}

/// `grpc.health.v1.Health`: what its `Watch` streams, open to anyone, may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `Watch` streams open at once across the server; more are refused RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// A `Watch` stream older than this ends with UNAVAILABLE (clients re-open it).
    #[serde(with = "humantime_serde")]
    pub watch_max_age: Duration,
}

/// OpenTelemetry traces: a server span per call, child of the caller's W3C `traceparent`,
/// exported over OTLP in batches. Off by default; off, the call path holds no tracer at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    pub enabled: bool,
    /// The collector: `http://host:4317` (gRPC) or `http://host:4318` (HTTP, `/v1/traces` is
    /// appended); `https://` for TLS.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Parent-based: a caller's sampled flag decides; calls without one are sampled at this ratio.
    pub sample_ratio: f64,
    /// TOML file of `name = "value"` headers sent with every export (collector credentials), so
    /// the configuration itself stays free of secrets; empty: none.
    pub headers_file: PathBuf,
    /// PEM CA bundle the collector's certificate must chain to (https only); empty: the Web PKI.
    pub ca_file: PathBuf,
    /// PEM client certificate chain and key for a collector that wants mTLS; both or neither.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Spans waiting for export at most; more are dropped and counted, never waited for.
    pub max_queue_size: usize,
    /// Spans in one export request at most.
    pub max_export_batch_size: usize,
    /// How long spans may wait before a batch is sent.
    #[serde(with = "humantime_serde")]
    pub scheduled_delay: Duration,
    /// One export attempt's bound, and the bound on the flush at shutdown.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Return the call's trace id to the caller in the `greeter-trace-id` response header.
    pub response_header: bool,
    /// Trace the probe port's health checks too (the kubelet's, every few seconds).
    pub probe_spans: bool,
    /// `service.instance.id`; empty: the `HOSTNAME` environment variable (the pod's name in
    /// Kubernetes), else the kernel's host name.
    pub service_instance_id: String,
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Fault injection for rehearsals (`call::faults`): failed and delayed calls on purpose, so that
/// a client's retries, a mesh's outlier detection or an alert can be seen to work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsConfig {
    /// Off in the embedded default and, explicitly, in `config/production.toml`: `methods` and
    /// the `greeter-fault` header do nothing (and `methods` is refused) until a config says `true`.
    pub enabled: bool,
    /// Method pattern -> the fault a share of its calls get. A later layer removes an entry by
    /// setting it to `""`.
    #[serde(deserialize_with = "values::removable::map")]
    pub methods: BTreeMap<String, MethodFault>,
}

/// `[faults.methods."PATTERN"]`: `percent` of the calls are delayed by `delay`, then (or instead)
/// answered with `code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodFault {
    pub percent: f64,
    /// A gRPC status code by its canonical name, e.g. `"UNAVAILABLE"`.
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    pub delay: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

impl Config {
    /// The embedded default alone.
    pub fn embedded() -> Self {
        Self::load(&Sources::default()).expect("the embedded default config is valid")
    }

    /// True when the server will accept plaintext, unauthenticated calls from beyond this host:
    /// worth a warning at every start.
    pub fn is_insecure_exposed(&self) -> bool {
        !self.server.listen.ip().is_loopback() && (!self.tls.enabled || !self.auth.enabled)
    }

    /// Whether the main listener accepts HTTP/1.1 (and offers it in TLS ALPN): grpc-web and
    /// Connect clients may use it; gRPC needs HTTP/2.
    pub fn serves_http1(&self) -> bool {
        self.web.enabled || self.connect.enabled
    }

    /// The effective configuration as TOML, for `greeter config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes to TOML")
    }
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::ClientCert => "client_cert",
            Self::Either => "either",
            Self::Both => "both",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

#[cfg(test)]
mod tests;
