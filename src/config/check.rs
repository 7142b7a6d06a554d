//! The checks types alone cannot express. Settings that must agree across sections, the limits
//! and the secure-by-default guard are checked here; a section's own checks live with the module
//! that owns it, behind [`Section`]. Each error names the key and the layer that set it.

use super::{AuthMode, ClientAuth, Config, ConfigError, load::Origins};
use crate::methods;

/// What is wrong with one key of a section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `web.allowed_origins`.
    pub key: &'static str,
    pub message: String,
}

/// A section whose owner checks what its types cannot express. The checks live with the code that
/// uses the section (`call::web` checks origins, `call::auth` the policy, `transport::tls` its
/// files, ...); [`Config::load`] runs them in its own order and names the layer that set the key.
pub trait Section {
    fn check(&self) -> Result<(), Problem>;
}

/// Runs a section's own checks, naming the layer that set the offending key.
fn check(section: &impl Section, origins: &Origins<'_>) -> Result<(), ConfigError> {
    section
        .check()
        .map_err(|problem| origins.error(problem.key, problem.message))
}

impl Config {
    /// Checks what types alone cannot: ranges, non-empty lists, and the secure-by-default guard.
    /// `added`: the descriptor sets of services served beside the built-in ones.
    pub(super) fn validate(
        &self,
        origins: &Origins<'_>,
        added: &[&'static [u8]],
    ) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| Err(origins.error(key, message));

        check(&self.greeter, origins)?;
        self.validate_limits(origins)?;
        check(&self.web, origins)?;
        check(&self.server, origins)?;
        check(&self.log, origins)?;
        check(&self.tls, origins)?;
        check(&self.tracing, origins)?;
        check(&self.quota, origins)?;
        check(&self.faults, origins)?;
        // Faults on a production-like server (TLS and auth) only from a config file, where the
        // configuration is reviewed and versioned: never from a variable set in passing.
        if self.faults.enabled
            && self.tls.enabled
            && self.auth.enabled
            && !origins.set_by_file("faults.enabled")
        {
            return fail(
                "faults.enabled",
                "fault injection on a server with TLS and auth is turned on in a config file \
                 only (faults.enabled = true in a --config file), not by the environment or the \
                 command line"
                    .into(),
            );
        }
        self.validate_quota_issuers(origins)?;
        self.validate_method_patterns(origins, added)?;
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

    /// Every per-method table names methods (or services) the server serves: a mistyped pattern
    /// would otherwise apply to nothing, silently. Well-formedness is each section's own check.
    fn validate_method_patterns(
        &self,
        origins: &Origins<'_>,
        added: &[&'static [u8]],
    ) -> Result<(), ConfigError> {
        let served = methods::served_methods(&methods::descriptor_sets(added));
        let tables: [(&str, Vec<&String>); 4] = [
            ("auth.policy", self.auth.policy.keys().collect()),
            ("deadline.methods", self.deadline.methods.keys().collect()),
            ("quota.methods", self.quota.methods.keys().collect()),
            ("faults.methods", self.faults.methods.keys().collect()),
        ];
        for (key, patterns) in tables {
            for pattern in patterns {
                if methods::check_pattern(pattern).is_err() {
                    continue;
                }
                if let Some(problem) = methods::unmatched(pattern, &served) {
                    return Err(origins.error(key, format!("{key}.\"{pattern}\" {problem}")));
                }
            }
        }
        Ok(())
    }

    /// A JWT identity's override names a trusted issuer: one that no token can come from would
    /// silently never apply.
    fn validate_quota_issuers(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
        let trusted = &self.auth.jwt.issuers;
        for (key, identity) in &self.quota.identities {
            if let Some(issuer) = &identity.issuer
                && !trusted.iter().any(|t| &t.issuer == issuer)
            {
                let listed: Vec<_> = trusted.iter().map(|t| t.issuer.as_str()).collect();
                return Err(origins.error(
                    "quota.identities",
                    format!(
                        "quota.identities.\"{key}\": issuer {issuer:?} is not one of \
                         auth.jwt.issuers ({listed:?})"
                    ),
                ));
            }
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
        check(&self.deadline, origins)?;
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
        check(auth, origins)?;
        Ok(())
    }
}
