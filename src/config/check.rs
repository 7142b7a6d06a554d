//! The checks types alone cannot express: ranges, non-empty lists, settings that must agree, and
//! the secure-by-default guard. Each error names the key and the layer that set it.

use super::{AuthMode, ClientAuth, Config, ConfigError, load::Origins};
use crate::methods;

impl Config {
    /// Checks what types alone cannot: ranges, non-empty lists, and the secure-by-default guard.
    pub(super) fn validate(&self, origins: &Origins<'_>) -> Result<(), ConfigError> {
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
