//! Authentication and per-method authorization, as a tower layer over the HTTP request.
//!
//! tonic interceptors are synchronous and do not see which method is called; a layer sees the
//! path (`/package.Service/Method`), the headers and the connection's TLS identity, and answers
//! with a gRPC status before any handler or decoder runs.

mod budget;
mod cache;
mod check;
mod crypto;
mod jwks;
mod jwt;
mod recent;
mod reload;
mod rules;
mod tokens;

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwap;
use futures_util::future::{Either, Ready, ready};
use pin_project_lite::pin_project;
use prometheus_client::registry::Registry;
use tonic::{Status, codegen::http};
use tower::{Layer, Service};

pub use budget::SignatureBudget;
pub use jwks::JwksError;
pub use jwt::Jwt;
use jwt::JwtError;
use recent::RecentToken;
pub use reload::{spawn_jwks_reloaders, spawn_token_reloader, watched_jwks, watched_tokens};
pub use tokens::{
    Holder, TOKEN_PREFIX, TokenEntry, TokenStore, TokensError, entry_for, entry_toml, generate,
    sha256,
};

use crate::{
    call::resolve::Resolved,
    config::{AuthConfig, AuthMode, CertRule, JwtConfig, Problem, Section},
    methods::{self, MethodTable, Rule},
    ops::metrics::{self, CounterFnSet, CounterSet},
    transport::listener::{PeerInfo, PeerPrefix},
};

/// Why calls are refused, as `greeter_auth_failures_total{reason}` counts them.
pub const REFUSAL_REASONS: &[&str] = &[
    NO_POLICY,
    MISSING_CREDENTIALS,
    MALFORMED_HEADER,
    INVALID_TOKEN,
    INVALID_JWT,
    JWT_BUDGET,
    MISSING_SCOPE,
];
/// No `auth.policy` pattern covers the method (PERMISSION_DENIED).
const NO_POLICY: &str = "no_policy";
/// The method needs credentials the call does not carry (UNAUTHENTICATED).
const MISSING_CREDENTIALS: &str = "missing_credentials";
/// An `authorization` header that is not `Bearer <token>` (UNAUTHENTICATED).
const MALFORMED_HEADER: &str = "malformed_header";
/// A bearer token no entry of the tokens file matches (UNAUTHENTICATED).
const INVALID_TOKEN: &str = "invalid_token";
/// A bearer shaped like a JWT that `[auth.jwt]` does not accept (UNAUTHENTICATED).
const INVALID_JWT: &str = "invalid_jwt";
/// A JWT not verified because its peer's budget of failed signature checks is spent
/// (RESOURCE_EXHAUSTED).
const JWT_BUDGET: &str = "jwt_budget";
/// Authenticated, but without the scope the method requires (PERMISSION_DENIED).
const MISSING_SCOPE: &str = "missing_scope";

/// A refused call: the status to answer with, the reason to count, and who the caller was when
/// the credentials were valid (for the access log).
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    /// What the access line says of it: the reason, or a JWT's finer kind (`expired`, ...).
    kind: &'static str,
    status: Status,
    caller: Option<Caller>,
}

impl Refusal {
    fn new(reason: &'static str, status: Status) -> Self {
        Self {
            reason,
            kind: reason,
            status,
            caller: None,
        }
    }
}

/// Why the auth layer refused a call, in the response's extensions for the access line
/// (`"refused":"expired"`): a refused call's line otherwise says only `"auth":"none"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRefused(pub &'static str);

/// Who made a call, as established by the auth layer; in the request extensions for handlers and
/// logs, except `Anonymous`, which a call without one is. Never holds the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An open method, or auth disabled.
    Anonymous,
    /// A bearer token, by its holder's name.
    Token(Arc<str>),
    /// A verified JWT, by its subject and issuer.
    Jwt { subject: Arc<str>, issuer: Arc<str> },
    /// A verified client certificate, by its first URI SAN (a SPIFFE ID) or else its subject.
    ClientCert(String),
}

impl Caller {
    /// How the caller authenticated, a bounded label for metrics and logs: `none`, `token`,
    /// `jwt` or `client_cert`.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Anonymous => "none",
            Self::Token(_) => "token",
            Self::Jwt { .. } => "jwt",
            Self::ClientCert(_) => "client_cert",
        }
    }

    /// As whom, for the access line: the token's holder, the JWT's subject, the certificate's
    /// identity; `None` when anonymous. Unbounded: never a metric label.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Self::Anonymous => None,
            Self::Token(name) => Some(name),
            Self::Jwt { subject, .. } => Some(subject),
            Self::ClientCert(identity) => Some(identity),
        }
    }
}

/// Method pattern -> rule, from `auth.policy`; a path no pattern covers is refused.
fn policy(config: &BTreeMap<String, String>) -> MethodTable<Rule> {
    MethodTable::new(config.iter().map(|(pattern, rule)| {
        let rule = match rule.as_str() {
            "open" => Rule::Open,
            scope => Rule::Scope(scope.to_owned()),
        };
        (pattern.clone(), rule)
    }))
}

impl Section for AuthConfig {
    /// Every `auth.policy` entry: a pattern `MethodTable` understands, and a rule; then the JWT
    /// issuers and rules, and the certificate rules.
    fn check(&self) -> Result<(), Problem> {
        for (pattern, rule) in &self.policy {
            let key = format!("auth.policy.\"{pattern}\"");
            if let Err(problem) = methods::check_pattern(pattern) {
                return Err(Problem {
                    key: "auth.policy",
                    message: format!("{key}: {problem}"),
                });
            }
            if rule.trim().is_empty() {
                return Err(Problem {
                    key: "auth.policy",
                    message: format!("{key}: give \"open\" or a scope name"),
                });
            }
        }
        check::jwt(&self.jwt)?;
        check::cert_rules(&self.cert_rules)
    }
}

/// Decides whether a request may proceed. Cheap to clone; the token set reloads underneath.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: AuthMode,
    tokens: Arc<ArcSwap<TokenStore>>,
    /// The JWT issuers' keys, when `[auth.jwt]` names any; swapped on a JWKS reload.
    jwt: Option<Arc<ArcSwap<Jwt>>>,
    /// The peers' budgets of failed signature checks: kept across JWKS reloads.
    signatures: Arc<SignatureBudget>,
    cert_scopes: Arc<[String]>,
    cert_rules: Arc<[CertRule]>,
    policy: Arc<MethodTable<Rule>>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, tokens: TokenStore) -> Self {
        Self {
            mode: config.mode,
            tokens: Arc::new(ArcSwap::from_pointee(tokens)),
            jwt: None,
            signatures: Arc::new(SignatureBudget::new(
                config.jwt.peer_failure_rate,
                config.jwt.peer_failure_burst,
            )),
            cert_scopes: config.client_cert_scopes.clone().into(),
            cert_rules: config.cert_rules.clone().into(),
            policy: Arc::new(policy(&config.policy)),
        }
    }

    /// Accepts JWTs from `jwt`'s issuers beside the static tokens.
    pub fn with_jwt(mut self, jwt: Jwt) -> Self {
        self.jwt = Some(Arc::new(ArcSwap::from_pointee(jwt)));
        self
    }

    /// Installs issuer `index`'s new keys (after a reload of its JWKS file) beside the other
    /// issuers' current ones, as a new generation with empty caches. Each issuer's file reloads on
    /// its own, possibly at the same moment as another's: `rcu` keeps both replacements.
    fn replace_issuer_keys(&self, config: &JwtConfig, index: usize, keys: &jwks::Keys) {
        if let Some(current) = &self.jwt {
            current.rcu(|jwt| jwt.with_keys(config, index, keys.clone()));
        }
    }

    /// Counts the JWT signature checks made, when JWTs are accepted, read at each scrape.
    pub fn register_signature_checks(&self, registry: &mut Registry) {
        if self.jwt.is_none() {
            return;
        }
        let (valid, invalid) = (Arc::clone(&self.signatures), Arc::clone(&self.signatures));
        metrics::register_jwt_signature_checks(
            registry,
            CounterFnSet::new("outcome")
                .with("valid", move || valid.valid())
                .with("invalid", move || invalid.invalid()),
        );
    }

    /// Installs a new token set (after a reload); calls in flight finish with the old one.
    pub fn replace_tokens(&self, tokens: TokenStore) {
        self.tokens.store(Arc::new(tokens));
    }

    /// The `auth.policy` rules, which [`crate::call::resolve`] looks up once per method.
    pub fn policy(&self) -> &MethodTable<Rule> {
        &self.policy
    }

    /// Whether the call's credentials grant `scope`, whatever its method requires: for a layer
    /// further in that offers more to some callers (fault injection's metadata and its `faults`
    /// scope). Verifies the credentials again, so ask only for the calls that need it.
    pub fn grants(
        &self,
        scope: &str,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> bool {
        let rule = Rule::Scope(scope.to_owned());
        self.check(Some(&rule), path, headers, peer, None).is_ok()
    }

    /// The verdict for one call to `path`, whose method requires `rule`; `recent`, the bearer
    /// token its connection presented last.
    fn check(
        &self,
        rule: Option<&Rule>,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
        recent: Option<&RecentToken>,
    ) -> Result<Caller, Refusal> {
        let required = match rule {
            Some(Rule::Open) => return Ok(Caller::Anonymous),
            Some(Rule::Scope(scope)) => scope,
            None => {
                return Err(Refusal::new(
                    NO_POLICY,
                    Status::permission_denied(format!(
                        "{path} is not allowed by the server's auth policy"
                    )),
                ));
            }
        };
        let cert = peer.and_then(|p| p.client_cert.as_deref());
        let token = bearer_token(headers).map_err(|s| Refusal::new(MALFORMED_HEADER, s))?;
        let tokens = self.tokens.load();
        let jwt = self.jwt.as_ref().map(|jwt| jwt.load());
        let verified;
        let cert_scopes;
        let (caller, scopes): (Caller, &[String]) = match (self.mode, token, cert) {
            (AuthMode::Token | AuthMode::Either, Some(token), _)
            | (AuthMode::Both, Some(token), Some(_)) => match &jwt {
                Some(jwt) if jwt::looks_like_jwt(token) => {
                    let peer = PeerPrefix::of(peer);
                    verified = match recent {
                        Some(recent) => recent.verify(jwt, token, peer, &self.signatures),
                        None => jwt.verify(token, peer, &self.signatures),
                    }
                    .map_err(jwt_refusal)?;
                    let caller = Caller::Jwt {
                        subject: Arc::clone(&verified.subject),
                        issuer: Arc::clone(&verified.issuer),
                    };
                    (caller, &verified.scopes)
                }
                _ => {
                    let holder = match recent {
                        Some(recent) => recent.authenticate(&tokens, token),
                        None => tokens.authenticate(token),
                    };
                    let holder = holder.ok_or_else(|| {
                        Refusal::new(
                            INVALID_TOKEN,
                            Status::unauthenticated("invalid bearer token"),
                        )
                    })?;
                    (Caller::Token(Arc::clone(&holder.name)), &holder.scopes)
                }
            },
            (AuthMode::ClientCert | AuthMode::Either, _, Some(cert)) => {
                cert_scopes = rules::cert_scopes(&self.cert_rules, cert, &self.cert_scopes);
                (
                    Caller::ClientCert(rules::cert_identity(cert)),
                    &cert_scopes[..],
                )
            }
            (AuthMode::Token, None, _) => return Err(missing("authorization: Bearer <token>")),
            (AuthMode::ClientCert, _, None) => return Err(missing("a client certificate")),
            (AuthMode::Either, None, None) => {
                return Err(missing("a bearer token or a client certificate"));
            }
            (AuthMode::Both, None, _) => {
                return Err(missing(
                    "authorization: Bearer <token> (and a client certificate)",
                ));
            }
            (AuthMode::Both, Some(_), None) => {
                return Err(missing("a client certificate (and a bearer token)"));
            }
        };
        if scopes.iter().any(|s| s == required) {
            Ok(caller)
        } else {
            let who = match &caller {
                Caller::Token(name) => format!("token {name:?}"),
                Caller::Jwt { subject, .. } => format!("JWT subject {subject:?}"),
                Caller::ClientCert(subject) => format!("client certificate {subject:?}"),
                Caller::Anonymous => "caller".to_owned(),
            };
            Err(Refusal {
                caller: Some(caller),
                ..Refusal::new(
                    MISSING_SCOPE,
                    Status::permission_denied(format!(
                        "{who} lacks scope {required:?}, required by {path}"
                    )),
                )
            })
        }
    }
}

/// UNAUTHENTICATED for a JWT found invalid. RESOURCE_EXHAUSTED for one not verified because
/// its address spent its budget of failed checks: the token may well be valid (a caller sharing
/// the address with a flood), so the answer must not tell the caller to get new credentials, but
/// when to come back. The message says when; no `google.rpc.RetryInfo` as the quotas send: it
/// carries the message a second time (base64, in `grpc-status-details-bin`), and this answer must
/// cost what refusing garbage costs (with it, 1.5 µs more server CPU per call: BENCHMARKS.md).
fn jwt_refusal(error: JwtError) -> Refusal {
    let refusal = match error {
        JwtError::PeerBudget(_) => {
            Refusal::new(JWT_BUDGET, Status::resource_exhausted(error.to_string()))
        }
        ref error => Refusal::new(INVALID_JWT, Status::unauthenticated(error.to_string())),
    };
    Refusal {
        kind: error.class(),
        ..refusal
    }
}

fn missing(what: &str) -> Refusal {
    Refusal::new(
        MISSING_CREDENTIALS,
        Status::unauthenticated(format!("missing credentials: this method requires {what}")),
    )
}

/// The token of an `authorization: Bearer <token>` header; `None` when there is no header.
/// Never puts the header's value in an error.
fn bearer_token(headers: &http::HeaderMap) -> Result<Option<&str>, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        || Status::unauthenticated("malformed authorization header: expected \"Bearer <token>\"");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(Some(token))
}

/// The tower layer: `None` (auth disabled) passes every call through as `Caller::Anonymous`.
/// A caller with credentials goes in the request extensions (for handlers) and in the response
/// extensions (for the access log, which wraps this layer and never sees the request again).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    /// Behind one `Arc`: hyper clones the connection's stack for every call, and the
    /// authenticator's own seven would cost that clone (and its drop) seven counts each.
    auth: Option<Arc<Authenticator>>,
    failures: CounterSet,
}

impl AuthLayer {
    /// `failures` counts refusals by reason ([`REFUSAL_REASONS`]).
    pub fn new(auth: Option<Authenticator>, failures: CounterSet) -> Self {
        Self {
            auth: auth.map(Arc::new),
            failures,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            failures: self.failures.clone(),
            recent: (self.auth.as_ref())
                .is_some_and(|auth| auth.mode != AuthMode::ClientCert)
                .then(Arc::default),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
    failures: CounterSet,
    /// The stack is built per connection, and hyper clones it per call: shared by the
    /// connection's calls only. `None` where no bearer token is accepted, so no call pays for it.
    recent: Option<Arc<RecentToken>>,
}

impl<S, B, ResBody> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, WithCaller<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let verdict = match &self.auth {
            None => Ok(Caller::Anonymous),
            Some(auth) => auth.check(
                Resolved::of(&request).rule.as_ref(),
                request.uri().path(),
                request.headers(),
                request.extensions().get::<PeerInfo>(),
                self.recent.as_deref(),
            ),
        };
        match verdict {
            Ok(caller) => {
                // Anonymous is what the layers further in and the access log assume without a
                // caller: spare the extension (a fourth would make the request's map grow and
                // rehash, ~330 instructions a call).
                let identified = (caller != Caller::Anonymous).then_some(caller);
                if let Some(caller) = &identified {
                    request.extensions_mut().insert(caller.clone());
                }
                Either::Right(WithCaller {
                    inner: self.inner.call(request),
                    caller: identified,
                })
            }
            Err(Refusal {
                reason,
                kind,
                status,
                caller,
            }) => {
                self.failures.inc(reason);
                tracing::debug!(path = request.uri().path(), code = ?status.code(), reason, "call refused: {}", status.message());
                let mut response = status.into_http();
                response.extensions_mut().insert(AuthRefused(kind));
                // Identified but not allowed: the access line names who was refused.
                if let Some(caller) = caller {
                    response.extensions_mut().insert(caller);
                }
                Either::Left(ready(Ok(response)))
            }
        }
    }
}

pin_project! {
    /// The inner service's response, with the admitted caller in its extensions.
    pub struct WithCaller<F> {
        #[pin]
        inner: F,
        caller: Option<Caller>,
    }
}

impl<F, B, E> Future for WithCaller<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(caller) = this.caller.take() {
            response.extensions_mut().insert(caller);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests;
