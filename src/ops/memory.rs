//! The most memory a configuration lets clients make the server hold, so an operator can set a
//! container's memory limit the limits can never exceed (`greeter config check` prints it, and
//! the deploy test holds every Deployment's limit to it).
//!
//! Every term is a limit the server enforces times what one unit of it can hold:
//! - connections (main listener and Unix socket share `max_connections`; the probe port has its
//!   own 64): the state of an open TLS + HTTP/2 connection, plus the request bytes HTTP/2 flow
//!   control lets a client send before the server reads them (the connection window), and with
//!   bearer tokens accepted, the last one the connection presented ([`RECENT_TOKEN_BYTES`]);
//! - calls (`max_concurrent_calls`, the anonymous budget when auth is on, the probe's 32): the
//!   call's own state, its headers (up to `max_header_list_bytes`), and the reply bytes queued for
//!   a client that does not read (up to the stream window);
//! - request messages still arriving, server-wide (`max_buffered_request_bytes`);
//! - with `[connect]` on, per call, what the Connect translation reads before the call's gRPC
//!   message exists: the body, the body inflated, and the message decoded from it, each up to
//!   twice the largest request message a served method accepts (JSON runs longer than protobuf);
//! - with `[tracing]` on, ended spans waiting for export (`tracing.max_queue_size`);
//! - with `[quota]`, the callers its bucket tables track (`max_callers` callers with credentials
//!   and `anonymous_max_callers` peers per table: the default one and one per `quota.methods`
//!   entry);
//! - the process itself, with the caches of verified and refused JWTs when `[auth.jwt]` has
//!   issuers (`auth.jwt.cache_size` entries of at most [`JWT_CACHE_ENTRY_BYTES`],
//!   `auth.jwt.failure_cache_size` of [`JWT_FAILURE_ENTRY_BYTES`]) and the table of peers'
//!   failed signature checks ([`JWT_PEERS_TRACKED`] of [`JWT_PEER_BYTES`]).
//!
//! The per-unit figures are measured upper bounds with room to spare (BENCHMARKS.md): an idle TLS
//! connection measured ~28 KiB, the process at rest ~8 MiB.

use std::fmt;

use crate::config::{AuthMode, Config, ProbeConfig};

/// The process at rest: code, runtime, metric registry, descriptor sets.
const BASE_BYTES: u64 = 16 << 20;
/// One open connection's state: socket, TLS session and buffers, HTTP/2 codec and HPACK tables.
const CONNECTION_BYTES: u64 = 32 << 10;
/// One call's state beyond its headers and queued replies: stream, task, codec buffers.
const CALL_BYTES: u64 = 16 << 10;
/// One ended span waiting for export: about a dozen attributes, a name, an event or two, about
/// 1 KiB, and its share of the encoded export request.
const SPAN_BYTES: u64 = 2 << 10;
/// The identity one cached JWT may hold (subject, issuer, scopes); a token with more is verified
/// on every call instead of cached, so the cache's bound does not depend on what issuers sign.
pub const JWT_CACHE_IDENTITY_BYTES: usize = 1 << 10;
/// One cached JWT: its hash, the map's slot, the entry and the identity's allocations.
pub const JWT_CACHE_ENTRY_BYTES: u64 = JWT_CACHE_IDENTITY_BYTES as u64 + 512;
/// The largest bearer token a connection remembers as the last one it presented
/// ([`crate::call::auth`]'s per-connection memo): a projected service-account token is ~1 KiB,
/// a static one 43 bytes; a larger one is hashed on every call instead.
pub const RECENT_TOKEN_BYTES: usize = 2 << 10;
/// One refused JWT remembered: its 32-byte hash and why it was refused (24 bytes) in a hash map,
/// with its control bytes, load factor and room to grow.
pub const JWT_FAILURE_ENTRY_BYTES: u64 = 128;
/// Peer addresses whose failed JWT signature checks are counted each on its own; beyond it,
/// newcomers share one budget. Enough for every node and pod address of a large cluster.
pub const JWT_PEERS_TRACKED: usize = 16384;
/// One tracked peer: a 16-byte address prefix and a 16-byte time in a hash map, with room.
pub const JWT_PEER_BYTES: u64 = 96;
/// One tracked caller of a quota table: a 24-byte entry (16-byte key, GCRA state) in a
/// sharded hash map, with its control bytes, load factor and room to grow.
const QUOTA_CALLER_BYTES: u64 = 128;
/// Copies of a Connect request one call may hold at once: body, inflated body, decoded message.
const CONNECT_COPIES: u64 = 3;

/// The worst case, by term, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    pub connections: u64,
    pub bytes_per_connection: u64,
    pub calls: u64,
    pub bytes_per_call: u64,
    pub buffered_requests: u64,
    /// Spans the trace exporter may hold (0 with tracing off).
    pub queued_spans: u64,
    pub bytes_per_span: u64,
    /// Bytes of every quota table full (`[quota]` on), 0 otherwise.
    pub quota_callers: u64,
    pub base: u64,
}

impl WorstCase {
    /// `largest_request_bytes`: the largest request message any served method accepts (the
    /// server knows its methods' limits; this module only adds up).
    pub fn of(config: &Config, largest_request_bytes: usize) -> Self {
        let limits = &config.limits;
        let anonymous = if config.auth.enabled {
            limits.max_anonymous_calls
        } else {
            0
        };
        let probe = config.probe.listen.is_some();
        let connections = limits.max_connections
            + if probe {
                ProbeConfig::MAX_CONNECTIONS
            } else {
                0
            };
        let calls = limits.max_concurrent_calls
            + anonymous
            + if probe { ProbeConfig::MAX_CALLS } else { 0 };
        let connect = if config.connect.enabled {
            CONNECT_COPIES * 2 * largest_request_bytes as u64
        } else {
            0
        };
        Self {
            connections: connections as u64,
            bytes_per_connection: CONNECTION_BYTES
                + u64::from(limits.initial_connection_window_bytes)
                + if accepts_bearer_tokens(config) {
                    RECENT_TOKEN_BYTES as u64
                } else {
                    0
                },
            calls: calls as u64,
            bytes_per_call: CALL_BYTES
                + u64::from(limits.max_header_list_bytes)
                + u64::from(limits.initial_stream_window_bytes)
                + connect,
            buffered_requests: limits.max_buffered_request_bytes as u64,
            queued_spans: if config.tracing.enabled {
                config.tracing.max_queue_size as u64
            } else {
                0
            },
            bytes_per_span: SPAN_BYTES,
            quota_callers: if config.quota.enabled {
                (1 + config.quota.methods.len() as u64)
                    * (config.quota.max_callers as u64 + config.quota.anonymous_max_callers as u64)
                    * QUOTA_CALLER_BYTES
            } else {
                0
            },
            base: BASE_BYTES + jwt_cache_bytes(config),
        }
    }

    /// The sum of the terms.
    pub fn total(&self) -> u64 {
        self.connections * self.bytes_per_connection
            + self.calls * self.bytes_per_call
            + self.buffered_requests
            + self.queued_spans * self.bytes_per_span
            + self.quota_callers
            + self.base
    }
}

fn accepts_bearer_tokens(config: &Config) -> bool {
    config.auth.enabled && config.auth.mode != AuthMode::ClientCert
}

fn accepts_jwts(config: &Config) -> bool {
    config.auth.enabled && !config.auth.jwt.issuers.is_empty()
}

/// The bound of the JWT caches and the peers' failure budgets, when JWTs are accepted at all.
fn jwt_cache_bytes(config: &Config) -> u64 {
    let auth = &config.auth;
    if accepts_jwts(config) {
        auth.jwt.cache_size as u64 * JWT_CACHE_ENTRY_BYTES
            + auth.jwt.failure_cache_size as u64 * JWT_FAILURE_ENTRY_BYTES
            + JWT_PEERS_TRACKED as u64 * JWT_PEER_BYTES
    } else {
        0
    }
}

impl fmt::Display for WorstCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |bytes: u64| bytes.div_ceil(1 << 20);
        let kib = |bytes: u64| bytes.div_ceil(1 << 10);
        write!(
            f,
            "worst-case memory: {} MiB ({} connections x {} KiB, {} calls x {} KiB, {} MiB of \
             request messages arriving, {} MiB of quota tables, {} MiB for the process)",
            mib(self.total()),
            self.connections,
            kib(self.bytes_per_connection),
            self.calls,
            kib(self.bytes_per_call),
            mib(self.buffered_requests),
            mib(self.quota_callers),
            mib(self.base),
        )?;
        if self.queued_spans > 0 {
            write!(
                f,
                " + {} queued spans x {} KiB",
                self.queued_spans,
                kib(self.bytes_per_span)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    const LARGEST: usize = 16 << 10;

    fn config(overrides: &[(&str, &str)]) -> Config {
        Config::load(&Sources {
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        })
        .unwrap()
    }

    #[test]
    fn every_limit_counts_in_the_worst_case() {
        let base = WorstCase::of(&config(&[]), LARGEST).total();
        for (key, value) in [
            ("limits.max_connections", "2000"),
            ("limits.max_concurrent_calls", "4000"),
            ("limits.max_buffered_request_bytes", "67108864"),
            ("limits.initial_connection_window_bytes", "1048576"),
            ("limits.initial_stream_window_bytes", "1048576"),
            ("limits.max_header_list_bytes", "65536"),
            ("probe.listen", "127.0.0.1:0"),
            ("tracing.enabled", "true"),
            ("quota.enabled", "true"),
        ] {
            let more = WorstCase::of(&config(&[(key, value)]), LARGEST).total();
            assert!(more > base, "{key} = {value}: {more} <= {base}");
        }
    }

    #[test]
    fn connect_counts_its_copies_of_the_largest_request_per_call() {
        let on = WorstCase::of(&config(&[("connect.enabled", "true")]), LARGEST);
        let off = WorstCase::of(&config(&[("connect.enabled", "false")]), LARGEST);
        assert_eq!(on.calls, off.calls);
        assert_eq!(on.bytes_per_call - off.bytes_per_call, 3 * 2 * (16 << 10));
    }

    #[test]
    fn each_connections_last_token_counts_where_bearer_tokens_are_accepted() {
        let off = WorstCase::of(&config(&[]), LARGEST).bytes_per_connection;
        let mut on = config(&[("auth.enabled", "true")]);
        for (mode, counted) in [
            (AuthMode::Token, true),
            (AuthMode::Either, true),
            (AuthMode::Both, true),
            (AuthMode::ClientCert, false),
        ] {
            on.auth.mode = mode;
            let per_connection = WorstCase::of(&on, LARGEST).bytes_per_connection;
            let last_token = if counted {
                RECENT_TOKEN_BYTES as u64
            } else {
                0
            };
            assert_eq!(per_connection - off, last_token, "{mode:?}");
        }
    }

    #[test]
    fn the_jwt_caches_count_when_jwts_are_accepted() {
        let mut config = config(&[("auth.enabled", "true")]);
        let without = WorstCase::of(&config, LARGEST).total();
        config.auth.jwt.issuers.push(crate::config::JwtIssuer {
            issuer: "https://k8s".into(),
            jwks_file: "jwks.json".into(),
            audiences: vec!["greeter".into()],
            scopes_claim: None,
        });
        let with = WorstCase::of(&config, LARGEST).total();
        // The peers' failure budgets (each connection's last token counts with tokens alone).
        let fixed = JWT_PEERS_TRACKED as u64 * JWT_PEER_BYTES;
        assert_eq!(
            with - without,
            4096 * (JWT_CACHE_ENTRY_BYTES + JWT_FAILURE_ENTRY_BYTES) + fixed
        );
        config.auth.jwt.cache_size = 0;
        config.auth.jwt.failure_cache_size = 0;
        assert_eq!(WorstCase::of(&config, LARGEST).total(), without + fixed);
    }

    #[test]
    fn the_printed_line_names_the_total_in_mib() {
        let worst = WorstCase {
            connections: 10,
            bytes_per_connection: 100 << 10,
            calls: 20,
            bytes_per_call: 50 << 10,
            buffered_requests: 1 << 20,
            queued_spans: 0,
            bytes_per_span: 2 << 10,
            quota_callers: 0,
            base: 1 << 20,
        };
        assert_eq!(worst.total(), (1000 << 10) + (1000 << 10) + (2 << 20));
        let line = worst.to_string();
        assert!(line.starts_with("worst-case memory: 4 MiB ("), "{line}");
        assert!(line.contains("10 connections x 100 KiB"), "{line}");
    }
}
