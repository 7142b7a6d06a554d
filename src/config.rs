//! Typed configuration, layered and validated before anything binds.
//!
//! Layers, later wins: the embedded default (`config/default.toml`, compiled in), each `--config`
//! file in order, `GREETER__SECTION__KEY` environment variables, then command-line overrides.
//! Every error names the key and the layer it came from, because "invalid type: string" alone
//! sends an operator hunting through four layers.
//!
//! The configuration holds no secrets by design: TLS keys and token hashes live in files the config
//! only points to, so `greeter config show` can print it whole.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use config::{Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::methods;

/// The embedded default: what `greeter serve` runs with when given no file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

const ENV_PREFIX: &str = "GREETER";
const ENV_SEPARATOR: &str = "__";
const EMBEDDED_ORIGIN: &str = "the embedded default config";
const OVERRIDE_ORIGIN: &str = "the command line";

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
    #[serde(with = "octal_mode")]
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
    #[serde(deserialize_with = "removable::map")]
    pub policy: BTreeMap<String, String>,
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
    #[serde(with = "optional_addr")]
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
    #[serde(deserialize_with = "removable::map")]
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
    #[serde(with = "optional_addr")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

/// A configuration that could not be loaded: which layer, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    /// The file path, environment variable or "the command line" that set the offending value.
    pub origin: String,
    /// The dotted key, when the error is about one key.
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn new(origin: impl Into<String>, key: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }
}

/// Where the layers come from. Tests pass their own environment instead of mutating the process's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config` files, in order; later files win.
    pub files: Vec<PathBuf>,
    /// `(name, value)` pairs to read `GREETER__*` variables from.
    pub env: Vec<(String, String)>,
    /// `(dotted key, value)` pairs from command-line flags.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// Files and flags as given, environment from this process.
    pub fn from_process(files: Vec<PathBuf>, overrides: Vec<(String, String)>) -> Self {
        Self {
            files,
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

impl Config {
    /// The embedded default alone.
    pub fn embedded() -> Self {
        Self::load(&Sources::default()).expect("the embedded default config is valid")
    }

    /// Merges every layer, then validates the result.
    ///
    /// Each layer is first checked on its own on top of the embedded default, so that an unknown
    /// key or a value of the wrong type is reported against the file or variable that holds it
    /// rather than against the merged whole.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        for file in &sources.files {
            if !file.is_file() {
                return Err(ConfigError::new(
                    file.display().to_string(),
                    None,
                    "config file not found (or not a regular file)",
                ));
            }
            let layer = embedded_builder().add_source(file_source(file));
            let shown = file.display().to_string();
            // Name the file as the operator wrote it: the config crate reports paths relative to
            // the working directory, which reads like a different file.
            build(layer, &shown).map_err(|error| ConfigError {
                origin: shown,
                ..error
            })?;
        }
        build(add_env(embedded_builder(), &sources.env), "the environment")?;
        let mut overrides = embedded_builder();
        for (key, value) in &sources.overrides {
            overrides = overrides
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| convert(e, OVERRIDE_ORIGIN))?;
        }
        build(overrides, OVERRIDE_ORIGIN)?;

        let mut merged = embedded_builder();
        for file in &sources.files {
            merged = merged.add_source(file_source(file));
        }
        merged = add_env(merged, &sources.env);
        for (key, value) in &sources.overrides {
            merged = merged
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| convert(e, OVERRIDE_ORIGIN))?;
        }
        let config = build(merged, "the merged config")?;
        config.validate(&Origins(sources))?;
        Ok(config)
    }

    /// Checks what types alone cannot: ranges, non-empty lists, and the secure-by-default guard.
    fn validate(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| Err(origins.error(key, message));

        if self.greeter.max_name_bytes == 0 {
            return fail("greeter.max_name_bytes", "must be at least 1".into());
        }
        if self.greeter.stream_greetings.is_empty() {
            return fail(
                "greeter.stream_greetings",
                "must hold at least one greeting".into(),
            );
        }
        if let Some(bad) = self
            .greeter
            .stream_greetings
            .iter()
            .find(|g| g.trim().is_empty() || g.chars().any(char::is_control))
        {
            return fail(
                "greeter.stream_greetings",
                format!("{bad:?} is empty or holds a control character"),
            );
        }
        self.validate_limits(origins)?;
        self.validate_web(origins)?;
        if self.server.unix_mode > 0o777 {
            return fail(
                "server.unix_mode",
                format!(
                    "{:o} is not a file mode (at most \"0777\")",
                    self.server.unix_mode
                ),
            );
        }
        // The directory's owner and mode are part of who may reach the socket: greeter does not
        // make it, so a missing one is caught here, by `config check` too, not at bind time.
        if let Some(dir) = self.server.unix.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return fail(
                "server.unix",
                format!(
                    "the socket's directory {} does not exist; create it first (greeter does not)",
                    dir.display()
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.filter) {
            return fail("log.filter", format!("not a valid log filter: {e}"));
        }
        if self.tls.enabled {
            for (key, path) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                if path.as_os_str().is_empty() {
                    return fail(key, "required when tls.enabled = true".into());
                }
            }
        }
        let has_ca = !self.tls.client_ca.as_os_str().is_empty();
        match (self.tls.client_auth, has_ca) {
            (ClientAuth::None, true) => {
                return fail(
                    "tls.client_ca",
                    "is set but tls.client_auth = \"none\": set client_auth to \"optional\" \
                     or \"required\", or remove client_ca"
                        .into(),
                );
            }
            (ClientAuth::Optional | ClientAuth::Required, false) => {
                return fail(
                    "tls.client_auth",
                    "client certificates need tls.client_ca (the CA bundle to verify them)".into(),
                );
            }
            _ => {}
        }
        if self.auth.enabled {
            self.validate_auth(origins)?;
        }
        let listen = self.server.listen;
        let exposed = !listen.ip().is_loopback();
        let unprotected = !self.tls.enabled || !self.auth.enabled;
        if exposed && unprotected && !self.server.allow_insecure {
            return fail(
                "server.listen",
                format!(
                    "refusing to serve {listen} (not a loopback address) without TLS and \
                     authentication: enable both (tls.enabled = true, auth.enabled = true), \
                     listen on 127.0.0.1 / [::1], or opt out explicitly with \
                     server.allow_insecure = true"
                ),
            );
        }
        Ok(())
    }

    fn validate_limits(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
        let l = &self.limits;
        let positive = [
            (
                "limits.max_recv_message_bytes",
                l.max_recv_message_bytes as u64,
            ),
            (
                "limits.max_send_message_bytes",
                l.max_send_message_bytes as u64,
            ),
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_concurrent_calls", l.max_concurrent_calls as u64),
            (
                "limits.max_concurrent_calls_per_connection",
                l.max_concurrent_calls_per_connection as u64,
            ),
            (
                "limits.max_concurrent_streams",
                u64::from(l.max_concurrent_streams),
            ),
            (
                "limits.max_header_list_bytes",
                u64::from(l.max_header_list_bytes),
            ),
            ("limits.max_anonymous_calls", l.max_anonymous_calls as u64),
            (
                "limits.max_anonymous_calls_per_connection",
                l.max_anonymous_calls_per_connection as u64,
            ),
            (
                "limits.max_buffered_request_bytes",
                l.max_buffered_request_bytes as u64,
            ),
            (
                "health.max_watch_streams",
                self.health.max_watch_streams as u64,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(origins.error(key, "must be at least 1".into()));
        }
        // Durations for which zero cannot work: every handshake would fail, every connection
        // would close at once, a reloader would spin.
        let durations = [
            ("tls.handshake_timeout", self.tls.handshake_timeout),
            ("tls.reload_interval", self.tls.reload_interval),
            ("auth.reload_interval", self.auth.reload_interval),
            (
                "connection.first_call_timeout",
                self.connection.first_call_timeout,
            ),
            ("health.watch_max_age", self.health.watch_max_age),
        ];
        if let Some((key, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(origins.error(key, "must be above zero (e.g. \"10s\")".into()));
        }
        for pattern in self.deadline.methods.keys() {
            if let Err(problem) = methods::check_pattern(pattern) {
                return Err(origins.error(
                    "deadline.methods",
                    format!("deadline.methods.\"{pattern}\": {problem}"),
                ));
            }
        }
        // RFC 9113 bounds SETTINGS_MAX_FRAME_SIZE and the flow-control windows.
        if !(16_384..=16_777_215).contains(&l.max_frame_bytes) {
            return Err(origins.error(
                "limits.max_frame_bytes",
                "must be between 16384 and 16777215 (RFC 9113)".into(),
            ));
        }
        for (key, window) in [
            (
                "limits.initial_stream_window_bytes",
                l.initial_stream_window_bytes,
            ),
            (
                "limits.initial_connection_window_bytes",
                l.initial_connection_window_bytes,
            ),
        ] {
            if !(65_535..=2_147_483_647).contains(&window) {
                return Err(origins.error(key, "must be between 65535 and 2147483647".into()));
            }
        }
        let c = &self.connection;
        if !c.keepalive_interval.is_zero() && c.keepalive_timeout.is_zero() {
            return Err(origins.error(
                "connection.keepalive_timeout",
                "must be above zero when keepalive_interval is set".into(),
            ));
        }
        Ok(())
    }

    fn validate_web(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
        let allowed = &self.web.allowed_origins;
        if allowed.iter().any(|o| o == "*") {
            if allowed.len() > 1 {
                return Err(origins.error(
                    "web.allowed_origins",
                    "\"*\" allows every origin: give it alone, or list origins".into(),
                ));
            }
            return Ok(());
        }
        for origin in allowed {
            if let Some(problem) = origin_problem(origin) {
                return Err(origins.error(
                    "web.allowed_origins",
                    format!("{origin:?} is not an origin as browsers send it: {problem}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_auth(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
        let auth = &self.auth;
        let uses_tokens = matches!(
            auth.mode,
            AuthMode::Token | AuthMode::Either | AuthMode::Both
        );
        let uses_certs = auth.mode != AuthMode::Token;
        if uses_tokens && auth.tokens_file.as_os_str().is_empty() {
            return Err(origins.error(
                "auth.tokens_file",
                format!("required with auth.mode = \"{}\"", auth.mode.as_str()),
            ));
        }
        if uses_certs && !(self.tls.enabled && self.tls.client_auth != ClientAuth::None) {
            return Err(origins.error(
                "auth.mode",
                format!(
                    "\"{}\" needs client certificates: tls.enabled = true and tls.client_auth \
                     = \"optional\" or \"required\"",
                    auth.mode.as_str()
                ),
            ));
        }
        if auth.mode == AuthMode::Both && self.tls.client_auth != ClientAuth::Required {
            return Err(origins.error(
                "tls.client_auth",
                "must be \"required\" with auth.mode = \"both\"".into(),
            ));
        }
        for (pattern, rule) in &auth.policy {
            let key = format!("auth.policy.\"{pattern}\"");
            if let Err(problem) = methods::check_pattern(pattern) {
                return Err(origins.error("auth.policy", format!("{key}: {problem}")));
            }
            if rule.trim().is_empty() {
                return Err(origins.error(
                    "auth.policy",
                    format!("{key}: give \"open\" or a scope name"),
                ));
            }
        }
        Ok(())
    }

    /// True when the server will accept plaintext, unauthenticated calls from beyond this host:
    /// worth a warning at every start.
    pub fn is_insecure_exposed(&self) -> bool {
        !self.server.listen.ip().is_loopback() && (!self.tls.enabled || !self.auth.enabled)
    }

    /// The effective configuration as TOML, for `greeter config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes to TOML")
    }
}

/// Answers "which layer set this key?" for errors found after merging, by asking the layers in
/// reverse order of precedence (the config crate's merged values do not keep their origin).
struct Origins<'a>(&'a Sources);

impl Origins<'_> {
    fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError::new(self.origin_of(key), Some(key), message)
    }

    fn origin_of(&self, key: &str) -> String {
        if self.0.overrides.iter().any(|(k, _)| k == key) {
            return OVERRIDE_ORIGIN.to_owned();
        }
        let var = env_var_name(key);
        if self.0.env.iter().any(|(name, _)| *name == var) {
            return format!("environment variable {var}");
        }
        self.0
            .files
            .iter()
            .rev()
            .find(|file| file_sets(file, key))
            .map_or_else(
                || EMBEDDED_ORIGIN.to_owned(),
                |file| file.display().to_string(),
            )
    }
}

/// Whether the TOML file at `path` sets the dotted `key` (it parsed once already, in `load`).
fn file_sets(path: &Path, key: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let mut parts = key.split('.');
    let mut value = parts.next().and_then(|first| table.get(first));
    for part in parts {
        value = value.and_then(|v| v.get(part));
    }
    value.is_some()
}

/// The config crate names layers by URI ("config/x.toml", "the environment"); we name the exact
/// variable for environment values so the operator can `unset` it.
fn describe_origin(origin: &str, key: &str) -> String {
    if origin == "the environment" || origin.eq_ignore_ascii_case("environment") {
        format!("environment variable {}", env_var_name(key))
    } else {
        origin.to_owned()
    }
}

/// `server.listen` -> `GREETER__SERVER__LISTEN`.
pub fn env_var_name(key: &str) -> String {
    let path = key.to_uppercase().replace('.', ENV_SEPARATOR);
    format!("{ENV_PREFIX}{ENV_SEPARATOR}{path}")
}

type Builder = config::ConfigBuilder<config::builder::DefaultState>;

fn embedded_builder() -> Builder {
    config::Config::builder().add_source(
        File::from_str(DEFAULT_TOML, FileFormat::Toml), // origin: None, named EMBEDDED_ORIGIN
    )
}

fn file_source(path: &Path) -> File<config::FileSourceFile, FileFormat> {
    File::from(path).format(FileFormat::Toml).required(true)
}

/// Environment variables hold text; numbers and booleans are recognised by parsing. A key whose
/// value is text that looks like a number (a file mode's "0660") is read as text, as written.
const ENV_TEXT_KEYS: [&str; 1] = ["GREETER__SERVER__UNIX_MODE"];

fn add_env(builder: Builder, vars: &[(String, String)]) -> Builder {
    let (text, parsed): (Vec<_>, Vec<_>) = vars
        .iter()
        .cloned()
        .partition(|(name, _)| ENV_TEXT_KEYS.contains(&name.as_str()));
    builder
        .add_source(
            env_source()
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("greeter.stream_greetings")
                .with_list_parse_key("compression.accept")
                .with_list_parse_key("compression.send")
                .with_list_parse_key("auth.client_cert_scopes")
                .with_list_parse_key("web.allowed_origins")
                .source(Some(parsed.into_iter().collect())),
        )
        .add_source(env_source().source(Some(text.into_iter().collect())))
}

fn env_source() -> Environment {
    Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
}

/// Builds and deserializes one layer on top of the embedded default; errors name `origin`.
fn build(builder: Builder, origin: &str) -> Result<Config, ConfigError> {
    builder
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| convert(e, origin))
}

/// Turns the config crate's error into ours, keeping the most precise origin and key it knows.
fn convert(error: config::ConfigError, fallback_origin: &str) -> ConfigError {
    let (origin, key, message) = unpack(error);
    let origin = origin.unwrap_or_else(|| fallback_origin.to_owned());
    let key = key.filter(|k| !k.is_empty());
    ConfigError {
        origin: describe_origin(&origin, key.as_deref().unwrap_or_default()),
        key,
        message,
    }
}

/// `(origin, dotted key, message)` of a config crate error.
fn unpack(error: config::ConfigError) -> (Option<String>, Option<String>, String) {
    use config::ConfigError as E;
    match error {
        E::FileParse { uri, cause } => (
            Some(uri.unwrap_or_else(|| EMBEDDED_ORIGIN.to_owned())),
            None,
            format!("not valid TOML: {}", cause.to_string().trim_end()),
        ),
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            origin,
            key,
            format!("expected {expected}, found {unexpected}"),
        ),
        E::At { error, origin, key } => {
            let (inner_origin, inner_key, message) = unpack(*error);
            let key = match (key, inner_key) {
                (Some(parent), Some(child)) if message.starts_with("unknown field") => {
                    Some(format!("{parent}.{child}"))
                }
                (key, inner_key) => key.or(inner_key),
            };
            (origin.or(inner_origin), key, message)
        }
        E::Message(message) => {
            // serde reports an unknown key as a message about its parent; name the key itself.
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field.to_owned());
            (None, unknown, message)
        }
        E::NotFound(key) => (None, Some(key), "missing".to_owned()),
        other => (None, None, other.to_string()),
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

/// Why `text` is not an origin as browsers send it in `Origin` (CORS compares it byte for byte):
/// `http` or `https`, a lowercase host, a port only when not the scheme's default, nothing after.
fn origin_problem(text: &str) -> Option<&'static str> {
    let Ok(uri) = text.parse::<http::Uri>() else {
        return Some("write scheme://host[:port], no path");
    };
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Some("write scheme://host[:port], no path");
    };
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Some("the scheme is http or https"),
    };
    if text.ends_with('/')
        || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        || text.contains('@')
    {
        return Some("write scheme://host[:port], no path");
    }
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some("browsers send it in lowercase");
    }
    if authority.port_u16() == Some(default_port) {
        return Some("browsers leave out the scheme's default port");
    }
    None
}

/// Map entries a later layer can remove: layers merge maps key by key, so without a way to say
/// "gone", a file could change an entry of `auth.policy` or `deadline.methods` but never drop
/// one. An entry set to `""` is removed (an empty string is no valid rule or limit anyway).
mod removable {
    use std::{collections::BTreeMap, fmt, marker::PhantomData};

    use serde::{
        Deserialize, Deserializer,
        de::{self, IntoDeserializer as _, value::MapAccessDeserializer},
    };

    /// One entry: present, or `""` for removed.
    struct Entry<T>(Option<T>);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entry<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(EntryVisitor(PhantomData))
        }
    }

    struct EntryVisitor<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for EntryVisitor<T> {
        type Value = Entry<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value, or \"\" to remove the entry")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Entry<T>, E> {
            if text.is_empty() {
                return Ok(Entry(None));
            }
            T::deserialize(text.into_deserializer()).map(|v| Entry(Some(v)))
        }

        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Entry<T>, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(|v| Entry(Some(v)))
        }
    }

    pub fn map<'de, D, T>(d: D) -> Result<BTreeMap<String, T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let entries = BTreeMap::<String, Entry<T>>::deserialize(d)?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, Entry(value))| value.map(|v| (key, v)))
            .collect())
    }
}

/// File modes written as octal strings ("0660"), as `chmod` takes them. A TOML integer is refused:
/// `0o660` and `660` would both arrive as numbers, and guessing between them is how a socket ends
/// up world-writable.
mod octal_mode {
    use std::fmt;

    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        d.deserialize_any(OctalMode)
    }

    struct OctalMode;

    impl de::Visitor<'_> for OctalMode {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quoted octal file mode like \"0660\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u32, E> {
            u32::from_str_radix(text, 8)
                .map_err(|_| E::custom(format!("{text:?} is not an octal file mode like \"0660\"")))
        }
    }
}

/// `listen = ""` means "no such listener": TOML has no null.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{e} ({text:?})")))
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
mod tests {
    use super::*;

    fn with_env(vars: &[(&str, &str)]) -> Sources {
        Sources {
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn embedded_default_is_loopback_plaintext() {
        let config = Config::embedded();
        assert_eq!(config.server.listen, "127.0.0.1:50051".parse().unwrap());
        assert!(!config.tls.enabled && !config.auth.enabled);
        assert!(!config.is_insecure_exposed());
        assert_eq!(config.greeter.max_name_bytes, 1024);
    }

    #[test]
    fn env_overrides_embedded_and_names_the_variable_on_error() {
        let config =
            Config::load(&with_env(&[("GREETER__GREETER__MAX_NAME_BYTES", "16")])).unwrap();
        assert_eq!(config.greeter.max_name_bytes, 16);

        let err =
            Config::load(&with_env(&[("GREETER__GREETER__MAX_NAME_BYTES", "lots")])).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("greeter.max_name_bytes"), "{err}");
        assert!(
            err.origin.contains("GREETER__GREETER__MAX_NAME_BYTES"),
            "{err}"
        );
    }

    #[test]
    fn env_list_is_comma_separated() {
        let config = Config::load(&with_env(&[(
            "GREETER__GREETER__STREAM_GREETINGS",
            "Hi,Yo",
        )]))
        .unwrap();
        assert_eq!(config.greeter.stream_greetings, ["Hi", "Yo"]);
    }

    #[test]
    fn insecure_guard_names_key_and_opt_out() {
        let sources = Sources {
            overrides: vec![("server.listen".into(), "0.0.0.0:50051".into())],
            ..Sources::default()
        };
        let err = Config::load(&sources).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.listen"));
        assert_eq!(err.origin, OVERRIDE_ORIGIN);
        assert!(
            err.message.contains("server.allow_insecure = true"),
            "{err}"
        );

        let mut opted_out = sources.clone();
        opted_out
            .overrides
            .push(("server.allow_insecure".into(), "true".into()));
        assert!(Config::load(&opted_out).unwrap().is_insecure_exposed());
    }

    fn with_overrides(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&Sources {
            overrides: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn zero_durations_that_cannot_work_are_refused() {
        for key in [
            "tls.handshake_timeout",
            "tls.reload_interval",
            "auth.reload_interval",
            "connection.first_call_timeout",
            "health.watch_max_age",
        ] {
            let error = with_overrides(&[(key, "0s")]).unwrap_err();
            assert_eq!(error.key.as_deref(), Some(key), "{error}");
            assert!(error.message.contains("above zero"), "{error}");
        }
        for key in [
            "limits.max_anonymous_calls",
            "limits.max_anonymous_calls_per_connection",
            "limits.max_buffered_request_bytes",
            "health.max_watch_streams",
        ] {
            let error = with_overrides(&[(key, "0")]).unwrap_err();
            assert_eq!(error.key.as_deref(), Some(key), "{error}");
        }
        with_overrides(&[("limits.max_connections_per_peer", "0")]).expect("0: no cap");
    }

    #[test]
    fn a_later_file_removes_a_map_entry_with_an_empty_string() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("later.toml");
        std::fs::write(
            &file,
            "[auth.policy]\n\"/grpc.reflection.v1.ServerReflection/*\" = \"\"\n\
             \"/helloworld.Greeter/SayHello\" = \"open\"\n\
             [deadline.methods]\n\"/helloworld.Greeter/SayHelloBidiStream\" = \"\"\n",
        )
        .unwrap();
        let config = Config::load(&Sources {
            files: vec![file],
            ..Sources::default()
        })
        .unwrap();
        let policy = &config.auth.policy;
        assert!(!policy.contains_key("/grpc.reflection.v1.ServerReflection/*"));
        assert_eq!(policy["/helloworld.Greeter/SayHello"], "open");
        assert_eq!(policy["/helloworld.Greeter/*"], "greeter", "others stay");
        let methods = &config.deadline.methods;
        assert!(!methods.contains_key("/helloworld.Greeter/SayHelloBidiStream"));
        assert!(
            methods.contains_key("/grpc.health.v1.Health/*"),
            "others stay"
        );
    }

    #[test]
    fn deadline_patterns_are_checked_like_policy_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("typo.toml");
        std::fs::write(
            &file,
            "[deadline.methods.\"helloworld.Greeter/SayHello\"]\ndefault = \"1s\"\nmax = \"2s\"\n",
        )
        .unwrap();
        let error = Config::load(&Sources {
            files: vec![file],
            ..Sources::default()
        })
        .unwrap_err();
        assert_eq!(error.key.as_deref(), Some("deadline.methods"), "{error}");
        assert!(error.message.contains("a pattern is"), "{error}");
    }

    #[test]
    fn tls_and_auth_settings_must_agree() {
        let key_of = |pairs: &[(&str, &str)]| with_overrides(pairs).unwrap_err().key.unwrap();
        assert_eq!(key_of(&[("tls.client_ca", "ca.pem")]), "tls.client_ca");
        assert_eq!(
            key_of(&[("tls.client_auth", "required")]),
            "tls.client_auth"
        );
        assert_eq!(
            key_of(&[("auth.enabled", "true"), ("auth.mode", "client_cert")]),
            "auth.mode"
        );
        assert_eq!(
            key_of(&[("auth.enabled", "true"), ("auth.tokens_file", "")]),
            "auth.tokens_file"
        );
        assert_eq!(
            key_of(&[("auth.enabled", "true"), ("auth.policy.bad", "x")]),
            "auth.policy"
        );
        assert!(with_overrides(&[("auth.enabled", "true")]).is_ok());
    }

    #[test]
    fn exposed_addresses_need_both_tls_and_auth() {
        let exposed = [("server.listen", "0.0.0.0:1"), ("tls.enabled", "true")];
        assert_eq!(
            with_overrides(&exposed).unwrap_err().key.as_deref(),
            Some("server.listen")
        );
        let secured = [exposed[0], exposed[1], ("auth.enabled", "true")];
        assert!(!with_overrides(&secured).unwrap().is_insecure_exposed());
    }

    #[test]
    fn probe_listen_is_optional() {
        assert_eq!(Config::embedded().probe.listen, None);
        let config = with_overrides(&[("probe.listen", "127.0.0.1:8081")]).unwrap();
        assert_eq!(config.probe.listen, Some("127.0.0.1:8081".parse().unwrap()));
        assert_eq!(
            with_overrides(&[("probe.listen", "nope")])
                .unwrap_err()
                .key
                .as_deref(),
            Some("probe.listen")
        );
    }

    #[test]
    fn metrics_listen_defaults_to_a_free_loopback_port_and_can_be_disabled() {
        assert_eq!(
            Config::embedded().metrics.listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            with_overrides(&[("metrics.listen", "")])
                .unwrap()
                .metrics
                .listen,
            None
        );
        assert_eq!(
            with_overrides(&[("metrics.listen", "9090")])
                .unwrap_err()
                .key
                .as_deref(),
            Some("metrics.listen")
        );
    }

    #[test]
    fn env_var_names_follow_the_documented_scheme() {
        assert_eq!(env_var_name("server.listen"), "GREETER__SERVER__LISTEN");
    }

    #[test]
    fn show_round_trips_through_toml() {
        let config = Config::embedded();
        let again: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unix_mode_is_octal_text_in_files_and_the_environment() {
        let config = Config::load(&with_env(&[("GREETER__SERVER__UNIX_MODE", "0660")])).unwrap();
        assert_eq!(config.server.unix_mode, 0o660);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mode.toml");
        std::fs::write(&file, "[server]\nunix_mode = \"0640\"\n").unwrap();
        let sources = Sources {
            files: vec![file.clone()],
            ..Sources::default()
        };
        assert_eq!(Config::load(&sources).unwrap().server.unix_mode, 0o640);

        // 0o660 in TOML is the number 432: refused rather than guessed at.
        std::fs::write(&file, "[server]\nunix_mode = 0o660\n").unwrap();
        let err = Config::load(&sources).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.unix_mode"));
        assert!(err.origin.ends_with("mode.toml"), "{err}");

        let err = Config::load(&with_env(&[("GREETER__SERVER__UNIX_MODE", "1777")])).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("server.unix_mode"), "{err}");
    }

    #[test]
    fn allowed_origins_are_origins() {
        let origins = |value: &str| {
            Config::load(&with_env(&[("GREETER__WEB__ALLOWED_ORIGINS", value)]))
                .map(|config| config.web.allowed_origins)
        };
        assert_eq!(
            origins("https://app.example,http://127.0.0.1:8080").unwrap(),
            ["https://app.example", "http://127.0.0.1:8080"]
        );
        assert_eq!(origins("*").unwrap(), ["*"]);
        for bad in [
            "https://app.example/",
            "https://app.example/path",
            "app.example",
            "ftp://app.example",
            "*,https://app.example",
            "https://App.example",
            "https://app.example:443",
            "http://app.example:80",
        ] {
            let err = origins(bad).unwrap_err();
            assert_eq!(
                err.key.as_deref(),
                Some("web.allowed_origins"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn web_is_on_for_the_quick_start_and_off_in_production() {
        assert!(Config::embedded().web.enabled);
        let production = Config::load(&Sources {
            files: vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/production.toml")],
            ..Sources::default()
        })
        .unwrap();
        assert!(!production.web.enabled);
    }
}
