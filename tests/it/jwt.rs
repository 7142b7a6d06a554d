//! JWT bearer tokens against a real server: issuers' JWKS files rewritten while it runs, tokens
//! signed here (ring, not the server's code).

use std::path::Path;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use tonic::Code;

use crate::{
    auth::{eventually, say_hello},
    common::{TestServer, config_with, reloads, wait_for_reloads},
};

/// The issuer of this cluster's service-account tokens.
pub const K8S: &str = "https://kubernetes.default.svc.cluster.local";
/// Another cluster's issuer.
const OTHER: &str = "https://other-cluster.example";

/// An Ed25519 signing key of issuer `iss`, named `kid` in its JWKS.
pub struct Signer {
    iss: &'static str,
    kid: &'static str,
    key: Ed25519KeyPair,
}

impl Signer {
    pub fn new(iss: &'static str, kid: &'static str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Self {
            iss,
            kid,
            key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let x = B64.encode(self.key.public_key());
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "alg": "EdDSA", "x": x})
    }

    /// A token for `sub`, valid for ten minutes.
    pub fn token(&self, sub: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"alg": "EdDSA", "kid": self.kid, "typ": "JWT"});
        let claims = serde_json::json!({"iss": self.iss, "aud": ["greeter"], "sub": sub,
                                        "iat": now, "nbf": now, "exp": now + 600});
        let message = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = B64.encode(self.key.sign(message.as_bytes()));
        format!("{message}.{signature}")
    }
}

/// Writes the JWKS of `signers` to `path` at once (a rename), as a ConfigMap update does.
pub fn write_jwks(path: &Path, signers: &[&Signer]) {
    let keys: Vec<_> = signers.iter().map(|s| s.jwk()).collect();
    write_raw(path, &serde_json::json!({ "keys": keys }).to_string());
}

fn write_raw(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Token auth on with a static token, `auth.reload_interval` 50ms, and `issuers` (issuer, JWKS
/// file), each with its rule: `system:serviceaccount:shop:*` of that issuer gets `greeter`.
pub fn config(dir: &Path, issuers: &[(&str, &Path)]) -> greeter::config::Config {
    let mut overrides = crate::common::greeter_token_auth(dir, "static-secret-token", "ci");
    overrides.push(("auth.reload_interval".into(), "50ms".into()));
    let mut config = config_with(overrides);
    for (issuer, jwks) in issuers {
        config.auth.jwt.issuers.push(greeter::config::JwtIssuer {
            issuer: (*issuer).into(),
            jwks_file: jwks.to_path_buf(),
            audiences: vec!["greeter".into()],
            scopes_claim: None,
        });
        config.auth.jwt.rules.push(greeter::config::ClaimRule {
            claim: "sub".into(),
            pattern: "system:serviceaccount:shop:*".into(),
            scopes: vec!["greeter".into()],
            issuer: Some((*issuer).into()),
        });
    }
    config
}

const SUBJECT: &str = "system:serviceaccount:shop:checkout";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Issuer B's file is broken while issuer A rotates a key out: A's rotation applies at once and
/// B keeps the keys it had; each file's outcome is counted under its own issuer.
#[tokio::test]
async fn each_issuers_jwks_file_reloads_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (a_file, b_file) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let (a_old, a_new) = (Signer::new(K8S, "a1"), Signer::new(K8S, "a2"));
    let b = Signer::new(OTHER, "b1");
    write_jwks(&a_file, &[&a_old, &a_new]);
    write_jwks(&b_file, &[&b]);
    let server = TestServer::start_with(config(
        dir.path(),
        &[(K8S, a_file.as_path()), (OTHER, b_file.as_path())],
    ))
    .await;
    let channel = server.channel().await;
    let metrics = server.metrics_addr.unwrap();
    let hello = Ok("Hello, you!".to_owned());
    let (a_old_token, b_token) = (a_old.token(SUBJECT), b.token(SUBJECT));
    assert_eq!(
        say_hello(&channel, Some(&bearer(&a_old_token))).await,
        hello
    );
    assert_eq!(say_hello(&channel, Some(&bearer(&b_token))).await, hello);

    write_raw(&b_file, "{\"keys\": [");
    wait_for_reloads(metrics, "jwks", "failure", 1.0).await;
    write_jwks(&a_file, &[&a_new]);
    eventually(&channel, &a_old_token, Err(Code::Unauthenticated)).await;
    assert_eq!(
        say_hello(&channel, Some(&bearer(&a_new.token(SUBJECT)))).await,
        hello
    );
    assert_eq!(
        say_hello(&channel, Some(&bearer(&b_token))).await,
        hello,
        "B's broken file keeps B's keys"
    );

    let text = crate::common::scrape(metrics).await;
    let count = |issuer: &str, outcome: &str| {
        let series = format!(
            "greeter_reloads_total{{kind=\"jwks\",issuer=\"{issuer}\",outcome=\"{outcome}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("{series} in {text}"))
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(count(K8S, "success"), 1.0, "{text}");
    assert_eq!(count(K8S, "failure"), 0.0, "{text}");
    assert_eq!(count(OTHER, "failure"), 1.0, "{text}");
    assert_eq!(count(OTHER, "success"), 0.0, "{text}");

    // Deleting B's file revokes B's keys only.
    std::fs::remove_file(&b_file).unwrap();
    wait_for_reloads(metrics, "jwks", "revoked", 1.0).await;
    assert_eq!(
        say_hello(&channel, Some(&bearer(&b_token))).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        say_hello(&channel, Some(&bearer(&a_new.token(SUBJECT)))).await,
        hello
    );
    assert_eq!(reloads(metrics, "jwks", "revoked").await, 1.0);
}

/// SayHello with `token` as the bearer: the status when refused.
async fn hello(channel: &tonic::transport::Channel, token: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(greeter::pb::HelloRequest { name: "you".into() });
    request
        .metadata_mut()
        .insert("authorization", bearer(token).parse().unwrap());
    greeter::pb::greeter_client::GreeterClient::new(channel.clone())
        .say_hello(request)
        .await
        .map(drop)
}

/// `greeter_jwt_signature_checks_total{outcome}`.
async fn signature_checks(metrics: std::net::SocketAddr, outcome: &str) -> f64 {
    let series = format!("greeter_jwt_signature_checks_total{{outcome=\"{outcome}\"}} ");
    let text = crate::common::scrape(metrics).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("{series} in {text}"))
        .parse()
        .unwrap()
}

/// `token` with its signature replaced by `n`, repeated to the length of a real one: what
/// anyone who has seen a token (or knows `iss` and `kid`) can send.
fn forged(token: &str, n: u8) -> String {
    let (head, signature) = token.rsplit_once('.').unwrap();
    format!(
        "{head}.{}",
        B64.encode(vec![n; B64.decode(signature).unwrap().len()])
    )
}

/// One issuer whose JWKS holds `signers`; `extra` config overrides.
async fn server_with(
    dir: &Path,
    signers: &[&Signer],
    extra: impl FnOnce(&mut greeter::config::JwtConfig),
) -> TestServer {
    let jwks = dir.join("jwks.json");
    write_jwks(&jwks, signers);
    let mut config = config(dir, &[(K8S, jwks.as_path())]);
    extra(&mut config.auth.jwt);
    TestServer::start_with(config).await
}

#[tokio::test]
async fn a_repeated_forged_token_is_checked_once() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new(K8S, "k1");
    let server = server_with(dir.path(), &[&signer], |_| {}).await;
    let channel = server.channel().await;
    let metrics = server.metrics_addr.unwrap();
    let forged = forged(&signer.token(SUBJECT), 7);
    for _ in 0..5 {
        let refused = hello(&channel, &forged).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert_eq!(refused.message(), "JWT signature does not verify");
    }
    assert_eq!(signature_checks(metrics, "invalid").await, 1.0);
}

/// 127.0.0.1 floods distinct forged tokens: past its budget of 3 failed checks they are refused
/// unchecked, while its token verified before still works and 127.0.0.2's new token verifies.
#[tokio::test]
async fn a_peer_past_its_budget_is_refused_unchecked_while_other_peers_verify() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new(K8S, "k1");
    let server = server_with(dir.path(), &[&signer], |jwt| {
        jwt.peer_failure_burst = 3;
        // One failure back every 1000s: none during the test.
        jwt.peer_failure_rate = 0.001;
    })
    .await;
    let metrics = server.metrics_addr.unwrap();
    let flooder = server.channel().await;
    let known = signer.token(SUBJECT);
    assert_eq!(hello(&flooder, &known).await.map_err(|s| s.code()), Ok(()));

    for n in 0..3 {
        let refused = hello(&flooder, &forged(&known, n)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    for n in 3..6 {
        let refused = hello(&flooder, &forged(&known, n)).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let message = refused.message();
        assert!(
            message
                .starts_with("JWT not verified: too many failed JWTs from this address; retry in "),
            "{refused:?}"
        );
    }
    assert_eq!(signature_checks(metrics, "invalid").await, 3.0);
    assert_eq!(
        hello(&flooder, &known).await.map_err(|s| s.code()),
        Ok(()),
        "verified before: answered from the cache"
    );

    let other = crate::common::channel_from([127, 0, 0, 2].into(), server.addr).await;
    let fresh = signer.token("system:serviceaccount:shop:cart");
    assert_eq!(hello(&other, &fresh).await.map_err(|s| s.code()), Ok(()));
    assert_eq!(signature_checks(metrics, "valid").await, 2.0);
    let refused = hello(&other, &forged(&known, 9)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "its own budget");
}

/// A token refused for a `kid` the set lacks is remembered as refused, until the reload that
/// brings the key: then it verifies.
#[tokio::test]
async fn a_jwks_reload_empties_the_cache_of_refused_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Signer::new(K8S, "k1"), Signer::new(K8S, "k2"));
    let server = server_with(dir.path(), &[&old], |_| {}).await;
    let channel = server.channel().await;
    let token = new.token(SUBJECT);
    for _ in 0..2 {
        let refused = hello(&channel, &token).await.unwrap_err();
        assert_eq!(refused.message(), "JWT kid is not in the issuer's key set");
    }
    write_jwks(&dir.path().join("jwks.json"), &[&old, &new]);
    eventually(&channel, &token, Ok("Hello, you!".into())).await;
}
