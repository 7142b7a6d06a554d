//! Re-reading the tokens file and the JWT issuers' JWKS files while the server runs.
//!
//! Each JWKS file has a reloader of its own: issuers are independent parties (two clusters, a CI
//! system), so one issuer's broken file must not hold back another's rotation or revocation, and
//! each file's outcome is counted under its issuer.

use std::io::ErrorKind;

use super::{Authenticator, TokenStore, TokensError, jwks::Keys};
use crate::{
    config::AuthConfig,
    ops::{
        metrics::{ReloadOutcomes, Reloads},
        reload::{self, Reloaded, Triggers, Watched},
    },
};

/// The file [`spawn_token_reloader`] watches.
pub fn watched_tokens(config: &AuthConfig) -> Watched {
    Watched::now(vec![config.tokens_file.clone()])
}

/// The files [`spawn_jwks_reloaders`] watch: each issuer's JWKS, in the order of
/// `auth.jwt.issuers`.
pub fn watched_jwks(config: &AuthConfig) -> Vec<Watched> {
    config
        .jwt
        .issuers
        .iter()
        .map(|i| Watched::now(vec![i.jwks_file.clone()]))
        .collect()
}

/// Re-reads `auth.tokens_file` when it changes or SIGHUP arrives. Deleting the file is how an
/// operator revokes everything: that is honoured. A file that is there but does not load
/// (half-written, malformed) keeps the previous tokens.
pub fn spawn_token_reloader(
    auth: Authenticator,
    config: &AuthConfig,
    files: Watched,
    triggers: Triggers,
    outcomes: ReloadOutcomes,
) {
    let path = config.tokens_file.clone();
    reload::spawn(
        "tokens",
        files,
        config.reload_interval,
        triggers,
        outcomes,
        move || match TokenStore::load(&path) {
            Ok(tokens) => {
                let count = tokens.len();
                auth.replace_tokens(tokens);
                Ok(Reloaded::Loaded(format!("{count} tokens")))
            }
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

/// One reloader per `[[auth.jwt.issuers]]` entry, re-reading its JWKS file when it changes or
/// SIGHUP arrives; `files` are [`watched_jwks`]. A file that does not load keeps its issuer's
/// previous keys; a deleted file revokes its issuer's keys; the other issuers are untouched
/// either way. Every reload starts empty caches (verified and refused tokens), so a key removed
/// from a set stops verifying at once and a key added verifies tokens refused a moment ago.
/// Outcomes are counted in `greeter_reloads_total{kind="jwks", issuer}`.
pub fn spawn_jwks_reloaders(
    auth: &Authenticator,
    config: &AuthConfig,
    files: Vec<Watched>,
    triggers: &Triggers,
    reloads: &Reloads,
) {
    if auth.jwt.is_none() {
        return;
    }
    for ((index, issuer), files) in config.jwt.issuers.iter().enumerate().zip(files) {
        let auth = auth.clone();
        let jwt = config.jwt.clone();
        let path = issuer.jwks_file.clone();
        let name = issuer.issuer.clone();
        reload::spawn(
            "jwks",
            files,
            config.reload_interval,
            triggers.clone(),
            reloads.jwks_issuer(&issuer.issuer),
            move || {
                let (keys, reloaded) = match Keys::load(&path) {
                    Ok(keys) => {
                        let summary = format!("{} JWT keys of issuer {name}", keys.len());
                        (keys, Reloaded::Loaded(summary))
                    }
                    Err(e) if e.is_missing() => (
                        Keys::default(),
                        Reloaded::Revoked(format!(
                            "auth.jwt jwks_file {} is missing: the tokens of issuer {name} are \
                             refused until it is back",
                            path.display()
                        )),
                    ),
                    Err(e) => return Err(e),
                };
                auth.replace_issuer_keys(&jwt, index, &keys);
                Ok(reloaded)
            },
        );
    }
}
