//! JWT verification up to and past the signature: header, claims and the scope rules, through the
//! same `Jwt` the auth layer holds (loaded from a JWKS file, one trusted issuer, one rule).
//!
//! The fuzzer writes the header and the claims (as raw bytes or as fields with values of any JSON
//! type); the harness signs them with the issuer's Ed25519 key, or not, so the checks behind the
//! signature are reached. Oracle: a token is accepted only when the harness signed it and its
//! header names EdDSA and the key, `iss` is the issuer, `aud` names `greeter`, `exp` and `iat`
//! (whole seconds, greeter's rule) and `nbf` (any number, as RFC 7519 allows) hold within the
//! leeway, and `sub` is a non-empty string that becomes the identity; its scopes are exactly what the rule and the `scope` claim grant. A token whose every
//! field is right (decided here, independently) is accepted.
#![no_main]

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arbitrary::Arbitrary;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use greeter::{
    call::auth::{Jwt, SignatureBudget},
    config::{ClaimRule, JwtConfig, JwtIssuer},
    transport::listener::PeerPrefix,
};
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};

const ISS: &str = "https://issuer.example";
const SUB: &str = "system:serviceaccount:shop:fuzz";
const LEEWAY: u64 = 5;

#[derive(Debug, Arbitrary)]
enum Part<'a> {
    Raw(&'a [u8]),
    Fields(Vec<(Name<'a>, Val<'a>)>),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Name<'a> {
    Alg,
    Kid,
    Typ,
    Iss,
    Aud,
    Sub,
    Exp,
    Nbf,
    Iat,
    Scope,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Val<'a> {
    /// The value a valid token has there.
    Right,
    Str(&'a str),
    /// Seconds from now.
    Secs(i32),
    Float(f64),
    Bool(bool),
    Null,
    List(Vec<&'a str>),
}

#[derive(Debug, Arbitrary)]
enum Signature<'a> {
    Ours,
    Raw(&'a str),
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    header: Part<'a>,
    claims: Part<'a>,
    signature: Signature<'a>,
}

struct Issuer {
    key: Ed25519KeyPair,
    jwt: Jwt,
    /// Too large to spend: the oracle judges tokens, not the per-peer budget of failed checks.
    budget: SignatureBudget,
}

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("a 32-byte seed");
        let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
                                     "x": B64.encode(key.public_key().as_ref())}]});
        let dir = tempfile::tempdir().expect("a temporary directory").keep();
        let jwks_file = dir.join("jwks.json");
        std::fs::write(&jwks_file, jwks.to_string()).expect("the JWKS is written");
        let config = JwtConfig {
            issuers: vec![JwtIssuer {
                issuer: ISS.into(),
                jwks_file,
                audiences: vec!["greeter".into()],
                scopes_claim: Some("scope".into()),
            }],
            rules: vec![ClaimRule {
                claim: "sub".into(),
                pattern: "system:serviceaccount:shop:*".into(),
                scopes: vec!["greeter".into()],
                issuer: None,
            }],
            leeway: Duration::from_secs(LEEWAY),
            // Each input is judged alone, never from an earlier one's cache entry.
            cache_size: 0,
            failure_cache_size: 0,
            ..JwtConfig::default()
        };
        let jwt = Jwt::load(&config).expect("the JWKS loads");
        Issuer {
            key,
            jwt,
            budget: SignatureBudget::new(1e9, 1_000_000),
        }
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn value(name: Name, val: &Val, now: i64) -> Value {
    match val {
        Val::Right => match name {
            Name::Alg => "EdDSA".into(),
            Name::Kid => "ed".into(),
            Name::Typ => "JWT".into(),
            Name::Iss => ISS.into(),
            Name::Aud => json!(["greeter"]),
            Name::Sub => SUB.into(),
            Name::Exp => (now + 3600).into(),
            Name::Nbf | Name::Iat => (now - 60).into(),
            Name::Scope => "greeter extra".into(),
            Name::Other(_) => "x".into(),
        },
        Val::Str(s) => (*s).into(),
        Val::Secs(n) => (now + i64::from(*n)).into(),
        Val::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Val::Bool(b) => (*b).into(),
        Val::Null => Value::Null,
        Val::List(items) => items.iter().map(|s| Value::from(*s)).collect(),
    }
}

fn key<'a>(name: Name<'a>) -> &'a str {
    match name {
        Name::Alg => "alg",
        Name::Kid => "kid",
        Name::Typ => "typ",
        Name::Iss => "iss",
        Name::Aud => "aud",
        Name::Sub => "sub",
        Name::Exp => "exp",
        Name::Nbf => "nbf",
        Name::Iat => "iat",
        Name::Scope => "scope",
        Name::Other(other) => other,
    }
}

/// The part's JSON text, and its object when it was built from fields (one value per name).
fn encode(part: &Part, now: i64) -> (Vec<u8>, Option<BTreeMap<String, Value>>) {
    match part {
        Part::Raw(bytes) => (bytes.to_vec(), None),
        Part::Fields(fields) => {
            let object: BTreeMap<String, Value> = fields
                .iter()
                .map(|(name, val)| (key(*name).to_owned(), value(*name, val, now)))
                .collect();
            (serde_json::to_vec(&object).unwrap(), Some(object))
        }
    }
}

fn secs(claims: &serde_json::Map<String, Value>, name: &str) -> Option<Option<i64>> {
    match claims.get(name) {
        None => Some(None),
        Some(v) => v.as_u64().map(|n| Some(n as i64)),
    }
}

/// Whether every field a verifier looks at is right, with a margin over the leeway for the clock.
fn all_right(header: &BTreeMap<String, Value>, claims: &BTreeMap<String, Value>, now: i64) -> bool {
    let header_ok = header.get("alg") == Some(&json!("EdDSA"))
        && header.get("kid") == Some(&json!("ed"))
        && header.get("typ").is_none_or(|typ| typ == "JWT")
        && header
            .keys()
            .all(|k| ["alg", "kid", "typ"].contains(&k.as_str()));
    let number = |name: &str| claims.get(name).and_then(Value::as_i64);
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == "greeter",
        Some(Value::Array(list)) => {
            list.iter().all(Value::is_string) && list.contains(&json!("greeter"))
        }
        _ => false,
    };
    header_ok
        && claims.get("iss") == Some(&json!(ISS))
        && aud_ok
        && number("exp").is_some_and(|exp| exp > now + 60)
        && claims
            .get("nbf")
            .is_none_or(|_| number("nbf").is_some_and(|t| (0..now - 60).contains(&t)))
        && claims
            .get("iat")
            .is_none_or(|_| number("iat").is_some_and(|t| (0..now - 60).contains(&t)))
        && claims
            .get("sub")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        && claims
            .get("scope")
            .is_none_or(|s| s.is_string() || s.is_array())
}

fuzz_target!(|input: Input| {
    let issuer = issuer();
    let now = now();
    let (header, header_fields) = encode(&input.header, now);
    let (claims, claims_fields) = encode(&input.claims, now);
    let message = format!("{}.{}", B64.encode(&header), B64.encode(&claims));
    let token = match input.signature {
        Signature::Ours => format!(
            "{message}.{}",
            B64.encode(issuer.key.sign(message.as_bytes()))
        ),
        Signature::Raw(raw) => format!("{message}.{raw}"),
    };
    let signed = matches!(input.signature, Signature::Ours);
    match issuer
        .jwt
        .verify(&token, PeerPrefix::Uid(0), &issuer.budget)
    {
        Ok(verified) => {
            assert!(signed, "accepted a signature the harness did not make");
            let header: Value =
                serde_json::from_slice(&header).expect("an accepted header is JSON");
            assert_eq!(header["alg"], "EdDSA");
            assert_eq!(header["kid"], "ed");
            let claims: serde_json::Map<String, Value> =
                serde_json::from_slice(&claims).expect("accepted claims are a JSON object");
            assert_eq!(claims["iss"], ISS);
            assert!(
                matches!(&claims["aud"], Value::String(a) if a == "greeter")
                    || claims["aud"]
                        .as_array()
                        .is_some_and(|l| l.contains(&json!("greeter")))
            );
            let exp = secs(&claims, "exp")
                .flatten()
                .expect("exp is a number of seconds");
            assert!(exp + LEEWAY as i64 + 1 >= now);
            // RFC 7519 allows fractional NumericDates; jsonwebtoken judges `nbf` by its value.
            if let Some(nbf) = claims.get("nbf") {
                let nbf = nbf.as_f64().expect("nbf is a number when present");
                assert!(nbf <= (now + LEEWAY as i64 + 1) as f64);
            }
            if let Some(iat) = secs(&claims, "iat").expect("iat is a number when present") {
                assert!(iat <= now + LEEWAY as i64 + 1);
            }
            assert_eq!(Some(&*verified.subject), claims["sub"].as_str());
            assert_eq!(&*verified.issuer, ISS);
            let mut granted: Vec<String> = Vec::new();
            if verified.subject.starts_with("system:serviceaccount:shop:") {
                granted.push("greeter".into());
            }
            match claims.get("scope") {
                Some(Value::String(list)) => {
                    granted.extend(list.split_whitespace().map(Into::into))
                }
                Some(Value::Array(list)) => {
                    granted.extend(list.iter().filter_map(Value::as_str).map(Into::into));
                }
                _ => {}
            }
            let mut scopes = verified.scopes.clone();
            scopes.sort();
            granted.sort();
            granted.dedup();
            assert_eq!(scopes, granted);
        }
        Err(err) => {
            if let (true, Some(header), Some(claims)) = (signed, header_fields, claims_fields) {
                assert!(
                    !all_right(&header, &claims, now),
                    "refused a valid token: {err}"
                );
            }
        }
    }
});
