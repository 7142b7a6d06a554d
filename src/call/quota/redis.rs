//! The shared quota store (`quota.store = "redis"`): buckets in Redis, so that `quota.rate` is
//! the fleet's, not each pod's.
//!
//! The algorithm is the local store's, GCRA, run inside Redis as one Lua script (loaded once,
//! then called by its SHA): each bucket key holds its theoretical arrival time, the script takes
//! the method's token and the caller's in one atomic round trip, and every key expires when its
//! bucket is full again, so Redis holds only callers active in the last span (`burst / rate`).
//! Redis's own clock (`TIME`) is the only clock, so pods with skewed clocks agree.
//!
//! Keys are `<key_prefix>{<caller>}:<table>`: the caller is a hash of its whole identity (never
//! its name: Redis needs no list of who calls), or its address for anonymous peers; the braces
//! keep one caller's buckets in one cluster slot. Tables: `d` (the default bucket), `o` (an
//! identity's own size), `m:<pattern>` (a `quota.methods` pattern).
//!
//! A check that Redis does not answer within `quota.redis.timeout` (down, slow, a connection being
//! re-established) is decided by `quota.redis.on_error`; the connection manager reconnects in the
//! background, and the next answered check is shared again.

use std::{path::Path, time::Duration};

use redis::{
    Client, ErrorKind, IntoConnectionInfo as _, RedisError, Script, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use ring::digest;

use super::{Identity, Key};
use crate::{
    config::{QuotaLimits, RedisFallback, RedisQuotaConfig},
    ops::metrics::QuotaStoreMetrics,
};

/// What `greeter_quota_store_errors_total{kind}` counts by.
pub const ERROR_KINDS: &[&str] = &["timeout", "connection", "response"];
/// What `greeter_quota_store_fallbacks_total{on_error}` counts by.
pub const FALLBACKS: &[&str] = &["local", "allow", "deny"];

/// GCRA over one or two buckets, atomically. KEYS: the method's bucket (when a pattern names the
/// method), then the caller's. ARGV: the caller's interval (microseconds per token) and burst,
/// then the method's. Returns `{0, 0}` when admitted, or `{which, microseconds until a token}`:
/// 1 for the method's bucket, 2 for the caller's. A refusal by the caller's bucket has spent the
/// method's token, as in the local store.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function take(key, interval, burst)
  local tat = tonumber(redis.call('GET', key))
  if not tat or tat < now then tat = now end
  local next_tat = tat + interval
  local over = next_tat - now - interval * burst
  if over > 0 then return math.ceil(over) end
  local ttl = math.ceil((next_tat - now) / 1000)
  redis.call('SET', key, string.format('%.17g', next_tat), 'PX', string.format('%d', ttl))
  return 0
end
local n = #KEYS
if n == 2 then
  local wait = take(KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if wait > 0 then return {1, wait} end
end
local wait = take(KEYS[n], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {2, wait} end
return {0, 0}
";

/// Why the shared store cannot be used: each names the key and the file, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum RedisStoreError {
    #[error(
        "quota.redis.password_file: {path}: cannot read: {source}{}",
        crate::config::paths::relative_note(.path)
    )]
    Password {
        path: String,
        source: std::io::Error,
    },
    #[error("quota.redis.password_file: {path}: the file is empty")]
    EmptyPassword { path: String },
    #[error(
        "quota.redis.ca_file: {path}: cannot read: {source}{}",
        crate::config::paths::relative_note(.path)
    )]
    Ca {
        path: String,
        source: std::io::Error,
    },
    #[error("quota.redis.url: {0}")]
    Client(String),
    #[error(
        "quota.redis: Redis refused to authenticate us ({0}): check quota.redis.password_file \
         against the server's password"
    )]
    Auth(String),
}

/// A bucket in the shared store: its table and size.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub table: String,
    pub limits: QuotaLimits,
}

/// What the store said about one call.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Admitted,
    /// `by_method`: the method's bucket refused, else the caller's.
    Refused {
        by_method: bool,
        retry_after: Duration,
    },
}

/// The shared store and its connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    script: Script,
    timeout: Duration,
    prefix: String,
    pub on_error: RedisFallback,
    metrics: QuotaStoreMetrics,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Reads the password and CA, and tries Redis once. A refused password is an error (a
    /// mistake to fix before serving); an unreachable Redis is not (it may come up later, and
    /// `on_error` covers the meantime): the connection is retried at each check.
    pub async fn connect(
        config: &RedisQuotaConfig,
        metrics: QuotaStoreMetrics,
    ) -> Result<Self, RedisStoreError> {
        let client_error = |e: RedisError| RedisStoreError::Client(e.to_string());
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(client_error)?;
        if !config.password_file.as_os_str().is_empty() {
            let password = read_password(&config.password_file)?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = if config.ca_file.as_os_str().is_empty() {
            Client::open(info)
        } else {
            let root_cert =
                std::fs::read(&config.ca_file).map_err(|source| RedisStoreError::Ca {
                    path: config.ca_file.display().to_string(),
                    source,
                })?;
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
        }
        .map_err(client_error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(client_error)?;
        let store = Self {
            connection,
            script: Script::new(GCRA),
            timeout: config.timeout,
            prefix: config.key_prefix.clone(),
            on_error: config.on_error,
            metrics,
        };
        let mut connection = store.connection.clone();
        let ping_command = redis::cmd("PING");
        let ping = ping_command.query_async::<String>(&mut connection);
        match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if is_auth(&e) => return Err(RedisStoreError::Auth(e.to_string())),
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                on_error = ?config.on_error,
                "quota store: Redis is not reachable yet; quota.redis.on_error decides until it is"
            ),
            Err(_) => tracing::warn!(
                on_error = ?config.on_error,
                "quota store: Redis did not answer within {CONNECT_TIMEOUT:?}; \
                 quota.redis.on_error decides until it does"
            ),
        }
        Ok(store)
    }

    /// The key of `caller`'s bucket in `table`.
    pub fn key(&self, caller: &str, table: &str) -> String {
        format!("{}{{{caller}}}:{table}", self.prefix)
    }

    /// Takes the method's token (when `method` is given) and the caller's, in one round trip.
    /// `Err(kind)` when Redis did not answer in time: the caller applies `on_error`.
    pub async fn check(
        &self,
        caller: &str,
        own: &Bucket,
        method: Option<&Bucket>,
    ) -> Result<Verdict, &'static str> {
        let mut invocation = self.script.prepare_invoke();
        if let Some(method) = method {
            invocation.key(self.key(caller, &method.table));
        }
        invocation
            .key(self.key(caller, &own.table))
            .arg(interval_us(&own.limits))
            .arg(own.limits.burst);
        if let Some(method) = method {
            invocation
                .arg(interval_us(&method.limits))
                .arg(method.limits.burst);
        }
        let mut connection = self.connection.clone();
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<(i64, i64)>(&mut connection),
        )
        .await;
        self.metrics
            .seconds
            .observe(started.elapsed().as_secs_f64());
        let kind = match answer {
            Ok(Ok((0, _))) => return Ok(Verdict::Admitted),
            Ok(Ok((which, wait_us))) => {
                return Ok(Verdict::Refused {
                    by_method: which == 1,
                    retry_after: Duration::from_micros(wait_us.max(0).unsigned_abs()),
                });
            }
            Err(_) => "timeout",
            Ok(Err(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() =>
            {
                "connection"
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "quota store: Redis answered with an error");
                "response"
            }
        };
        self.metrics.errors.inc(kind);
        self.metrics.fallbacks.inc(match self.on_error {
            RedisFallback::Local => "local",
            RedisFallback::Allow => "allow",
            RedisFallback::Deny => "deny",
        });
        Err(kind)
    }
}

/// How long the first connection (and each reconnection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn is_auth(error: &RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// The password file's first line: Secret mounts and `echo` add a newline the password lacks.
fn read_password(path: &Path) -> Result<String, RedisStoreError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RedisStoreError::Password {
        path: shown.clone(),
        source,
    })?;
    let password = text.lines().next().unwrap_or_default().to_owned();
    if password.is_empty() {
        return Err(RedisStoreError::EmptyPassword { path: shown });
    }
    Ok(password)
}

/// The caller's part of its keys: a hash of its whole identity (class, issuer, name), the same
/// in every pod; an anonymous peer's address as the local store counts it.
pub(super) fn caller_tag(identity: &Identity<'_>) -> String {
    let Identity {
        class,
        name,
        issuer,
        key,
    } = *identity;
    match (name, key) {
        (Some(name), _) => {
            let mut context = digest::Context::new(&digest::SHA256);
            for part in [class.as_str(), issuer.unwrap_or_default(), name] {
                context.update(part.as_bytes());
                context.update(&[0]);
            }
            let hash = context.finish();
            format!("{}:{}", class.as_str(), hex::encode(&hash.as_ref()[..16]))
        }
        (None, Key::V4(ip)) => format!("ip:{}", std::net::Ipv4Addr::from(ip)),
        (None, Key::V6(prefix)) => format!("ip6:{prefix:016x}"),
        (None, Key::Uid(uid)) => format!("uid:{uid}"),
        // Not made by `identify`: a named key always comes with its name.
        (None, Key::Named(class, _)) => class.as_str().to_owned(),
    }
}

/// Microseconds per token: the script's unit.
fn interval_us(limits: &QuotaLimits) -> f64 {
    1e6 / limits.rate
}
