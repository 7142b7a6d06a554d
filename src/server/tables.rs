//! Tables built once at startup from the config and the served methods: the quota tables (and
//! their shared store), and each method's largest request message, derived from its request type
//! where the type bounds it.

use std::{collections::HashMap, sync::Arc};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use tonic_health::pb::health_server;
use tonic_reflection::pb::{
    v1::server_reflection_server as reflection_v1,
    v1alpha::server_reflection_server as reflection_v1alpha,
};

use super::ServerError;
use crate::{
    call::quota::{self, Quotas, RedisStore},
    config::{Config, QuotaConfig, QuotaStore},
    methods::{DESCRIPTOR_SETS, MethodTable, largest_requests, served_methods},
    ops::metrics::{QuotaRefusals, QuotaStoreMetrics},
    pb::greeter_server,
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

/// The largest request message any method the built-in server serves accepts: a Connect call may
/// buffer twice it (JSON), which `greeter config check`'s worst case counts
/// ([`crate::ops::memory`]).
pub fn largest_request_bytes(config: &Config) -> usize {
    message_limits(config, &DESCRIPTOR_SETS, &[]).largest
}

/// Room beyond the largest encoding of a request type, for the fields a client built from a newer
/// version of the proto sends and this server skips: refusing those would break the compatibility
/// protobuf is designed for.
const NEWER_FIELDS_BYTES: usize = 1024;

/// The largest request message each method accepts, never more than
/// `limits.max_recv_message_bytes` (which applies to paths no service has): the largest encoding
/// of its request type, with [`NEWER_FIELDS_BYTES`] of room, when the type has one; else what its
/// service declares its requests can usefully hold; else `limits.max_recv_message_bytes`.
pub(super) struct MessageLimits {
    pub(super) table: MethodTable<usize>,
    pub(super) greeter: usize,
    pub(super) reflection: usize,
    /// The largest of them all.
    pub(super) largest: usize,
}

/// `own`: what services of one's own declare ([`super::OwnService::max_request_bytes`]), by
/// name.
pub(super) fn message_limits(
    config: &Config,
    descriptor_sets: &[&[u8]],
    own: &[(&str, usize)],
) -> MessageLimits {
    let any = config.limits.max_recv_message_bytes;
    let cap = |bytes: usize| bytes.min(any);
    let greeter = cap(service::max_request_bytes(&config.greeter));
    let reflection = cap(REFLECTION_MAX_REQUEST_BYTES);
    let declared: HashMap<&str, usize> = [
        (greeter_server::SERVICE_NAME, greeter),
        (health_server::SERVICE_NAME, health::MAX_REQUEST_BYTES),
        (reflection_v1::SERVICE_NAME, reflection),
        (reflection_v1alpha::SERVICE_NAME, reflection),
    ]
    .into_iter()
    .chain(own.iter().copied())
    .collect();
    let largest_encodings = largest_requests(descriptor_sets);
    let served: Vec<(String, usize)> = served_methods(descriptor_sets)
        .iter()
        .map(|method| {
            let path = method.path();
            let max_bytes = largest_encodings
                .get(&path)
                .map(|bytes| bytes.saturating_add(NEWER_FIELDS_BYTES))
                .or_else(|| declared.get(method.service.as_str()).copied())
                .unwrap_or(any);
            (path, cap(max_bytes))
        })
        .collect();
    let largest = served.iter().map(|&(_, bytes)| bytes).max().unwrap_or(any);
    MessageLimits {
        table: MethodTable::new(std::iter::once(("*".to_owned(), any)).chain(served)),
        greeter,
        reflection,
        largest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `examples/proto`'s descriptor set: tally.v1.Tally, whose requests are scalars only.
    const EXAMPLES: &[u8] = tonic::include_file_descriptor_set!("examples_descriptor");

    #[test]
    fn limits_are_derived_from_request_types_or_declared_by_their_service() {
        let config = Config::embedded();
        let sets = crate::methods::descriptor_sets(&[EXAMPLES]);
        let limits = message_limits(&config, &sets, &[("tally.v1.Tally", 100)]);
        let limit = |path| *limits.table.lookup(path).unwrap();
        // A sint64 takes at most 10 bytes and its tag 1: what a request type bounds wins over what
        // its service declares, with room for the fields of a newer proto.
        assert_eq!(limit("/tally.v1.Tally/Add"), 11 + NEWER_FIELDS_BYTES);
        assert_eq!(limit("/tally.v1.Tally/Watch"), 12 + NEWER_FIELDS_BYTES);
        // Requests holding a string: what their service declares.
        assert_eq!(
            limit("/helloworld.Greeter/SayHello"),
            service::max_request_bytes(&config.greeter)
        );
        assert_eq!(
            limit("/grpc.health.v1.Health/Check"),
            health::MAX_REQUEST_BYTES
        );
        assert_eq!(
            limit("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            REFLECTION_MAX_REQUEST_BYTES
        );
        // Paths no service has, and everything past the server-wide limit.
        let any = config.limits.max_recv_message_bytes;
        assert_eq!(limit("/billing.Invoices/Create"), any);
        assert_eq!(limits.largest, REFLECTION_MAX_REQUEST_BYTES);
        let mut small = config.clone();
        small.limits.max_recv_message_bytes = 8;
        let capped = message_limits(&small, &sets, &[]);
        assert_eq!(capped.table.lookup("/tally.v1.Tally/Add"), Some(&8));
        assert_eq!(capped.largest, 8);
    }
}
