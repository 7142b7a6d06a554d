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
