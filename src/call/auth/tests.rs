//! The authenticator's verdicts, without a server: policy lookups, the token and JWT paths.

use tonic::Code;

use super::*;
use crate::{transport::listener::PeerAddr, transport::tls::ClientIdentity};

fn config(mode: AuthMode) -> AuthConfig {
    let mut config = crate::config::Config::embedded().auth;
    config.mode = mode;
    config.client_cert_scopes = vec!["greeter".into()];
    config
}

fn store(token: &str, scopes: &[&str]) -> TokenStore {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    TokenStore::parse(&entry_toml(&entry_for(token, "ci", &scopes)), "t").unwrap()
}

fn headers(value: Option<&str>) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Some(value) = value {
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
    }
    headers
}

fn peer(with_cert: bool) -> PeerInfo {
    PeerInfo::new(
        PeerAddr::Tcp("127.0.0.1:1".parse().unwrap()),
        with_cert.then(|| {
            Arc::new(ClientIdentity {
                subject: "CN=client".into(),
                sans: vec![],
            })
        }),
    )
}

impl Authenticator {
    /// The verdict for one call, its rule looked up as the resolver does.
    fn authorize(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, Status> {
        self.check(self.policy.lookup(path), path, headers, peer, None)
            .map_err(|r| r.status)
    }
}

const HELLO: &str = "/helloworld.Greeter/SayHello";
const REFLECT: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

#[test]
fn token_mode_codes() {
    let auth = Authenticator::new(&config(AuthMode::Token), store("secret", &["greeter"]));
    let code = |path, header| {
        auth.authorize(path, &headers(header), Some(&peer(false)))
            .map_err(|s| s.code())
    };
    assert_eq!(
        code(HELLO, Some("Bearer secret")),
        Ok(Caller::Token("ci".into()))
    );
    assert_eq!(
        code(HELLO, Some("bearer secret")),
        Ok(Caller::Token("ci".into()))
    );
    assert_eq!(code(HELLO, None), Err(Code::Unauthenticated));
    assert_eq!(
        code(HELLO, Some("Basic secret")),
        Err(Code::Unauthenticated)
    );
    assert_eq!(code(HELLO, Some("Bearer ")), Err(Code::Unauthenticated));
    assert_eq!(
        code(HELLO, Some("Bearer wrong")),
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        code(REFLECT, Some("Bearer secret")),
        Err(Code::PermissionDenied)
    );
    assert_eq!(code(HEALTH, None), Ok(Caller::Anonymous));
    assert_eq!(
        code("/other.Service/Call", Some("Bearer secret")),
        Err(Code::PermissionDenied)
    );
}

#[test]
fn messages_never_echo_the_token() {
    let auth = Authenticator::new(&config(AuthMode::Token), store("secret", &["greeter"]));
    for header in ["Bearer hunter2", "Basic hunter2", "hunter2"] {
        let status = auth
            .authorize(HELLO, &headers(Some(header)), None)
            .unwrap_err();
        assert!(
            !status.message().contains("hunter2"),
            "{}",
            status.message()
        );
    }
}

#[test]
fn certificate_modes() {
    let tokens = || store("secret", &["greeter", "reflection"]);
    let either = Authenticator::new(&config(AuthMode::Either), tokens());
    assert_eq!(
        either
            .authorize(HELLO, &headers(None), Some(&peer(true)))
            .unwrap(),
        Caller::ClientCert("CN=client".into())
    );
    // A token, when present, decides: a bad one is refused even with a certificate.
    assert_eq!(
        either
            .authorize(HELLO, &headers(Some("Bearer bad")), Some(&peer(true)))
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // Certificate scopes come from auth.client_cert_scopes.
    assert_eq!(
        either
            .authorize(REFLECT, &headers(None), Some(&peer(true)))
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let both = Authenticator::new(&config(AuthMode::Both), tokens());
    let ok = both.authorize(REFLECT, &headers(Some("Bearer secret")), Some(&peer(true)));
    assert_eq!(ok.unwrap(), Caller::Token("ci".into()));
    for (header, with_cert) in [(Some("Bearer secret"), false), (None, true)] {
        let status = both
            .authorize(HELLO, &headers(header), Some(&peer(with_cert)))
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    let cert_only = Authenticator::new(&config(AuthMode::ClientCert), tokens());
    let status = cert_only
        .authorize(HELLO, &headers(Some("Bearer secret")), Some(&peer(false)))
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[test]
fn refusals_name_their_reason() {
    let auth = Authenticator::new(&config(AuthMode::Token), store("secret", &["greeter"]));
    let reason = |path, header| {
        auth.check(
            auth.policy.lookup(path),
            path,
            &headers(header),
            Some(&peer(false)),
            None,
        )
        .unwrap_err()
        .reason
    };
    assert_eq!(reason(HELLO, None), MISSING_CREDENTIALS);
    assert_eq!(reason(HELLO, Some("Basic x")), MALFORMED_HEADER);
    assert_eq!(reason(HELLO, Some("Bearer wrong")), INVALID_TOKEN);
    assert_eq!(reason(REFLECT, Some("Bearer secret")), MISSING_SCOPE);
    assert_eq!(reason("/other.Service/Call", None), NO_POLICY);
    for reason in REFUSAL_REASONS {
        assert!(reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
}

#[test]
fn most_specific_pattern_wins() {
    let mut rules = BTreeMap::new();
    rules.insert("*".to_owned(), "admin".to_owned());
    rules.insert("/helloworld.Greeter/*".to_owned(), "greeter".to_owned());
    rules.insert(HELLO.to_owned(), "open".to_owned());
    let table = policy(&rules);
    assert_eq!(table.lookup(HELLO), Some(&Rule::Open));
    assert_eq!(
        table.lookup("/helloworld.Greeter/SayHelloAgain"),
        Some(&Rule::Scope("greeter".into()))
    );
    assert_eq!(table.lookup("/x.Y/Z"), Some(&Rule::Scope("admin".into())));
    rules.remove("*");
    assert_eq!(policy(&rules).lookup("/x.Y/Z"), None);
}
