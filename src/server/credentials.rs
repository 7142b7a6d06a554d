//! What the server loads before it binds (TLS material, tokens, JWKS, the trace exporter's files)
//! and the reloaders that keep it current: `greeter config check` runs the same load.

use tokio_util::sync::CancellationToken;

use prometheus_client::registry::Registry;

use super::ServerError;
use crate::{
    call::auth::{self, Authenticator, Jwt, TokenStore},
    config::{AuthMode, Config},
    ops::metrics::{Reloads, TlsExpiry},
    ops::reload::{self, Triggers, Watched},
    ops::telemetry::ExportMaterial,
    transport::tls::{self, CertSummary, Reloadable},
};

/// TLS and token material, loaded and checked: what `config check` verifies beyond the config
/// file itself, and what `bind` needs before it opens a socket.
pub struct Credentials {
    pub tls: Option<(Reloadable, CertSummary)>,
    pub auth: Option<Authenticator>,
    /// The trace exporter's headers and TLS files, with `tracing.enabled`.
    pub tracing: Option<ExportMaterial>,
    /// The reloaded files as they were just before this load: the reloaders start from it.
    seen: Seen,
}

/// Each reloader's files, as they were just before the load (none for a reloader that does not
/// run: nothing is read for it).
#[derive(Default)]
struct Seen {
    tls: Watched,
    tokens: Watched,
    /// One per JWT issuer, in the order of `auth.jwt.issuers`.
    jwks: Vec<Watched>,
}

impl Credentials {
    pub fn load(config: &Config) -> Result<Self, ServerError> {
        let mut seen = Seen::default();
        let tls = if config.tls.enabled {
            seen.tls = tls::watched(&config.tls);
            Some(tls::load(&config.tls, config.serves_http1())?.into_reloadable())
        } else {
            None
        };
        let auth = if config.auth.enabled {
            let tokens = if uses_tokens(config) {
                seen.tokens = auth::watched_tokens(&config.auth);
                TokenStore::load(&config.auth.tokens_file)?
            } else {
                TokenStore::default()
            };
            let auth = Authenticator::new(&config.auth, tokens);
            Some(if config.auth.jwt.issuers.is_empty() {
                auth
            } else {
                seen.jwks = auth::watched_jwks(&config.auth);
                auth.with_jwt(Jwt::load(&config.auth.jwt)?)
            })
        } else {
            None
        };
        let tracing = config
            .tracing
            .enabled
            .then(|| ExportMaterial::load(&config.tracing))
            .transpose()?;
        Ok(Self {
            tls,
            auth,
            tracing,
            seen,
        })
    }
}

pub(super) fn uses_tokens(config: &Config) -> bool {
    config.auth.mode != AuthMode::ClientCert
}

/// Re-reads TLS material and tokens when their files change or SIGHUP arrives, counting the
/// outcomes and keeping the certificate expiry gauge current.
pub(super) fn spawn_reloaders(
    config: &Config,
    credentials: &Credentials,
    stop: &CancellationToken,
    registry: &mut Registry,
) {
    let triggers = Triggers {
        hangups: reload::hangups(),
        stop: stop.clone(),
    };
    let reloads = Reloads::register(registry);
    let seen = &credentials.seen;
    if let Some((material, leaf)) = &credentials.tls {
        let (expiry, (ca, crl)) = (
            TlsExpiry::register(registry, &config.tls),
            tls::client_dates(&config.tls),
        );
        expiry.set(leaf.not_after_unix, ca, crl);
        tls::spawn_reloader(
            &config.tls,
            config.serves_http1(),
            seen.tls.clone(),
            material.clone(),
            expiry,
            triggers.clone(),
            reloads.kind("tls"),
        );
    }
    if let Some(auth) = &credentials.auth
        && uses_tokens(config)
    {
        auth::spawn_token_reloader(
            auth.clone(),
            &config.auth,
            seen.tokens.clone(),
            triggers.clone(),
            reloads.kind("tokens"),
        );
    }
    if let Some(auth) = &credentials.auth {
        auth::spawn_jwks_reloaders(auth, &config.auth, seen.jwks.clone(), &triggers, &reloads);
    }
}
