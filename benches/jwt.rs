//! What a JWT costs per call: [`Jwt::verify`] on a token seen for the first time (header and
//! claims parsed, signature verified by ring, claims checked, scopes mapped) and on a token
//! verified before (a SHA-256 of the token and a cache lookup), for each accepted algorithm.
//!
//! Tokens and the JWKS come from PyJWT (`.tools/venv`, scripts/install-tools), shaped like
//! Kubernetes projected service-account tokens: the same independent minting the interop tests
//! use. Run with `cargo bench --bench jwt` (a few seconds). It prints microseconds per call,
//! the median of five rounds; on a machine shared with other work, compare within one run.

use std::{path::PathBuf, process::Command, time::Instant};

use greeter::{
    call::auth::{Jwt, SignatureBudget},
    config::{ClaimRule, JwtConfig, JwtIssuer},
    transport::listener::PeerPrefix,
};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const MINT: &str = r#"
import json, sys, time
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
keys = {
    "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), RSAAlgorithm),
    "ES256": (ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "EdDSA": (ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm),
}
now = int(time.time())
claims = {"iss": sys.argv[1], "aud": ["greeter"], "sub": "system:serviceaccount:shop:checkout",
          "iat": now, "nbf": now, "exp": now + 3600,
          "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "checkout"}}}
jwks = {"keys": [{**cls.to_jwk(key.public_key(), as_dict=True), "kid": alg, "alg": alg}
                 for alg, (key, cls) in keys.items()]}
tokens = {alg: jwt.encode(claims, key, algorithm=alg, headers={"kid": alg})
          for alg, (key, _) in keys.items()}
print(json.dumps({"jwks": jwks, "tokens": tokens}))
"#;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".tools/venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", MINT, ISSUER])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/install-tools)", python.display()));
    assert!(
        out.status.success(),
        "PyJWT: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, minted["jwks"].to_string()).unwrap();

    let config = |cache_size| JwtConfig {
        issuers: vec![JwtIssuer {
            issuer: ISSUER.into(),
            jwks_file: jwks.clone(),
            audiences: vec!["greeter".into()],
            scopes_claim: None,
        }],
        rules: vec![ClaimRule {
            claim: "sub".into(),
            pattern: "system:serviceaccount:shop:*".into(),
            scopes: vec!["greeter".into()],
            issuer: None,
        }],
        cache_size,
        ..JwtConfig::default()
    };
    let uncached = Jwt::load(&config(0)).unwrap();
    let cached = Jwt::load(&config(4096)).unwrap();

    println!("JWT verification per call, median of 5 rounds (µs):");
    for alg in ["RS256", "ES256", "EdDSA"] {
        let token = minted["tokens"][alg].as_str().unwrap();
        let first = per_call_us(&uncached, token, 2_000);
        let again = per_call_us(&cached, token, 200_000);
        println!("  {alg:<6} first sight {first:>7.2}   cached {again:>6.3}");
    }
}

/// Microseconds per `verify` of `token`, the median of five rounds of `calls` calls. The token
/// is valid, so the peer's budget of failed checks is never spent.
fn per_call_us(jwt: &Jwt, token: &str, calls: u32) -> f64 {
    let budget = SignatureBudget::new(1.0, 10);
    let peer = PeerPrefix::V4(0x7f00_0001);
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..calls {
                let token = std::hint::black_box(token);
                std::hint::black_box(jwt.verify(token, peer, &budget).unwrap());
            }
            start.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}
