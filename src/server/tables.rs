//! Tables built once at startup from the config and the served methods: the quota tables (and
//! their shared store), and each method's largest request message.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{GREETER_SERVICE, ServerError};
use crate::{
    call::quota::{self, Quotas, RedisStore},
    config::{Config, QuotaConfig, QuotaStore},
    methods::{Method, MethodTable, served_methods},
    ops::metrics::{QuotaRefusals, QuotaStoreMetrics},
    service::{self, health},
};

/// The largest reflection request: a file name or a symbol, with room to spare.
const REFLECTION_MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The quota tables, and the shared store when `quota.store = "redis"` (tried once here: a
/// refused password stops startup, an unreachable Redis does not).
pub(super) async fn quotas(
    config: &QuotaConfig,
    registry: &mut Registry,
    descriptor_sets: &[&[u8]],
    background: &CancellationToken,
) -> Result<Arc<Quotas>, ServerError> {
    let refusals =
        QuotaRefusals::register(registry, quota::CLASSES, &served_methods(descriptor_sets));
    let mut quotas = Quotas::new(config, refusals);
    if config.store == QuotaStore::Redis {
        let metrics =
            QuotaStoreMetrics::register(registry, quota::STORE_ERROR_KINDS, quota::STORE_FALLBACKS);
        let store = RedisStore::connect(&config.redis, metrics).await?;
        tracing::info!(
            url = %config.redis.url,
            password = if config.redis.password_file.as_os_str().is_empty() { "none" } else { "from quota.redis.password_file" },
            timeout = ?config.redis.timeout,
            on_error = ?config.redis.on_error,
            "quota store: Redis, shared by every process pointed at it"
        );
        quotas = quotas.shared_in(store);
    }
    let quotas = Arc::new(quotas);
    quotas.spawn_forgetting(background.clone());
    Ok(quotas)
}

/// The largest request message any served method accepts: a Connect call may buffer twice it
/// (JSON), which `greeter config check`'s worst case counts ([`crate::ops::memory`]).
pub fn largest_request_bytes(config: &Config) -> usize {
    let limits = message_limits(config, &[]);
    limits.greeter.max(limits.reflection)
}

/// The largest request message each method accepts: what its request type can usefully hold,
/// never more than `limits.max_recv_message_bytes` (which applies to paths no service has).
pub(super) struct MessageLimits {
    pub(super) table: MethodTable<usize>,
    pub(super) greeter: usize,
    pub(super) reflection: usize,
}

pub(super) fn message_limits(config: &Config, served: &[Method]) -> MessageLimits {
    let any = config.limits.max_recv_message_bytes;
    let cap = |bytes: usize| bytes.min(any);
    let greeter = cap(service::max_request_bytes(&config.greeter));
    let reflection = cap(REFLECTION_MAX_REQUEST_BYTES);
    let health = cap(health::MAX_REQUEST_BYTES);
    let served = served.iter().map(|method| {
        let max_bytes = match method.service.as_str() {
            GREETER_SERVICE => greeter,
            "grpc.health.v1.Health" => health,
            s if s.starts_with("grpc.reflection.") => reflection,
            _ => any,
        };
        (method.path(), max_bytes)
    });
    MessageLimits {
        table: MethodTable::new(std::iter::once(("*".to_owned(), any)).chain(served)),
        greeter,
        reflection,
    }
}
