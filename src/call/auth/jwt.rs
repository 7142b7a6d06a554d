//! JWT bearer tokens: Kubernetes projected service-account tokens and OIDC ID tokens, verified
//! offline against each trusted issuer's JWKS.
//!
//! A token is accepted when its issuer is configured, its `kid` is in that issuer's key set, its
//! `alg` is the key's (RS256, ES256 or EdDSA: see [`super::crypto`]), the signature verifies, one
//! of its audiences is configured, and `exp`, `nbf` and `iat` hold within the leeway. Its identity
//! is `sub` (with the issuer); its scopes come from `[[auth.jwt.rules]]` and the issuer's
//! `scopes_claim`. Refusals say why, never echoing the token or its claims.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, Validation, dangerous::insecure_decode_claims, decode, decode_header,
    errors::ErrorKind,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    budget::SignatureBudget,
    cache::{FailureCache, TokenCache, Verified},
    crypto,
    jwks::{JwksError, Key, Keys},
    rules,
};
use crate::{
    config::{ClaimRule, JwtConfig, JwtIssuer},
    transport::listener::PeerPrefix,
};

/// Why a JWT is refused; the message is what UNAUTHENTICATED says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed JWT")]
    Malformed,
    #[error("JWT algorithm not accepted (RS256, ES256 or EdDSA)")]
    Algorithm,
    #[error("JWT issuer is not trusted")]
    Issuer,
    #[error("JWT has no kid")]
    NoKid,
    #[error("JWT kid is not in the issuer's key set")]
    UnknownKid,
    #[error("JWT algorithm does not match its key")]
    KeyMismatch,
    #[error("JWT signature does not verify")]
    Signature,
    #[error("JWT has expired")]
    Expired,
    #[error("JWT is not valid yet (nbf)")]
    NotYetValid,
    #[error("JWT was issued in the future (iat)")]
    IssuedInFuture,
    #[error("JWT audience is not accepted")]
    Audience,
    #[error("JWT lacks the {0} claim, or it has the wrong type")]
    Claim(&'static str),
    /// The peer's budget of failed signature checks is spent ([`SignatureBudget`]); the token
    /// was not parsed.
    #[error(
        "JWT not verified: too many failed JWTs from this address; retry in {:.1}s",
        .0.as_secs_f64()
    )]
    PeerBudget(Duration),
}

impl JwtError {
    /// The refusal's kind, for the access line: a handful of words, never the token or a claim.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Malformed | Self::Claim(_) => "malformed",
            Self::Algorithm | Self::KeyMismatch => "algorithm",
            Self::Issuer => "issuer",
            Self::NoKid | Self::UnknownKid => "unknown_key",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid | Self::IssuedInFuture => "not_yet_valid",
            Self::Audience => "audience",
            Self::PeerBudget(_) => "peer_budget",
        }
    }
}

impl JwtError {
    /// Whether the refusal holds for as long as the keys do, so the token may be refused from
    /// the [`FailureCache`]: not a token that becomes valid later (`nbf`, `iat`), not a refusal
    /// for a spent budget, which says nothing about the token.
    fn lasts(&self) -> bool {
        !matches!(
            self,
            Self::NotYetValid | Self::IssuedInFuture | Self::PeerBudget(_)
        )
    }
}

/// Whether a bearer is shaped like a JWT: three base64url parts, the signature possibly empty (an
/// unsigned `alg: none` token is then refused for its algorithm). Static tokens never are (`grt_`
/// and base64url, no dots).
pub fn looks_like_jwt(token: &str) -> bool {
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => {
            !header.is_empty()
                && !payload.is_empty()
                && base64url(header)
                && base64url(payload)
                && base64url(signature)
        }
        _ => false,
    }
}

/// One trusted issuer with the keys of its JWKS file.
#[derive(Debug)]
struct Issuer {
    config: JwtIssuer,
    keys: Keys,
}

/// Numbers every [`Jwt`] made, so a verdict remembered outside one ([`super::recent`]) can tell
/// which keys gave it.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// One generation of the trusted issuers' keys, with its caches of verified and refused tokens.
/// Replaced as a whole when a JWKS file changes.
#[derive(Debug)]
pub struct Jwt {
    issuers: Vec<Issuer>,
    rules: Vec<ClaimRule>,
    leeway: u64,
    cache: TokenCache,
    refused: FailureCache,
    /// Tells this generation's verdicts from another's ([`super::recent`]).
    generation: u64,
}

/// A token past the cheap checks, about to have its signature checked.
struct Signed<'a> {
    issuer: &'a Issuer,
    iss: String,
    key: &'a Key,
    algorithm: Algorithm,
}

/// The unverified claim that picks the issuer, hence the key set.
#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

impl Jwt {
    /// Reads every issuer's JWKS file.
    pub fn load(config: &JwtConfig) -> Result<Self, JwksError> {
        let keys = config
            .issuers
            .iter()
            .map(|issuer| Keys::load(&issuer.jwks_file))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(config, keys))
    }

    /// The issuers of `config`, with `keys` in the same order.
    pub fn new(config: &JwtConfig, keys: Vec<Keys>) -> Self {
        crypto::install();
        Self {
            issuers: config
                .issuers
                .iter()
                .cloned()
                .zip(keys)
                .map(|(config, keys)| Issuer { config, keys })
                .collect(),
            rules: config.rules.clone(),
            leeway: config.leeway.as_secs(),
            cache: TokenCache::new(config.cache_size),
            refused: FailureCache::new(config.failure_cache_size),
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Unique to this generation of the keys in the process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next generation after issuer `index`'s JWKS file reloaded: its new `keys`, the other
    /// issuers' keys as they are, empty caches.
    pub fn with_keys(&self, config: &JwtConfig, index: usize, keys: Keys) -> Self {
        let mut all: Vec<Keys> = self.issuers.iter().map(|i| i.keys.clone()).collect();
        all[index] = keys;
        Self::new(config, all)
    }

    /// Verifies `token`, or answers from the caches when it was verified or refused before. A
    /// signature check is made only when `peer`'s `budget` of failed ones allows it.
    pub fn verify(
        &self,
        token: &str,
        peer: PeerPrefix,
        budget: &SignatureBudget,
    ) -> Result<Arc<Verified>, JwtError> {
        let now = now();
        let hash: [u8; 32] = super::sha256(token);
        if let Some(verified) = self.cache.get(&hash, now) {
            return Ok(verified);
        }
        if let Some(refused) = self.refused.get(&hash) {
            return Err(refused);
        }
        if let Some(wait) = budget.spent(peer) {
            return Err(JwtError::PeerBudget(wait));
        }
        let verdict = self.signed(token).and_then(|signed| {
            budget.take(peer).map_err(JwtError::PeerBudget)?;
            let verdict = self.check(token, signed, now);
            budget.settle(peer, verdict.is_ok());
            verdict
        });
        match verdict {
            Ok(verified) => {
                let verified = Arc::new(verified);
                self.cache.insert(hash, Arc::clone(&verified), now);
                Ok(verified)
            }
            Err(refused) => {
                if refused.lasts() {
                    self.refused.insert(hash, refused.clone());
                }
                Err(refused)
            }
        }
    }

    /// The checks that cost no signature check: an accepted algorithm, a trusted issuer, a
    /// `kid` in its key set, of the token's algorithm.
    fn signed(&self, token: &str) -> Result<Signed<'_>, JwtError> {
        // `alg: none` and unknown algorithms fail here: the header type has no such variant.
        let header = decode_header(token).map_err(|_| JwtError::Algorithm)?;
        if !crypto::ACCEPTED.contains(&header.alg) {
            return Err(JwtError::Algorithm);
        }
        let iss = insecure_decode_claims::<Unverified>(token)
            .map_err(|_| JwtError::Malformed)?
            .iss
            .ok_or(JwtError::Claim("iss"))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or(JwtError::Issuer)?;
        let kid = header.kid.ok_or(JwtError::NoKid)?;
        let key = issuer.keys.get(&kid).ok_or(JwtError::UnknownKid)?;
        if key.algorithm != header.alg {
            return Err(JwtError::KeyMismatch);
        }
        Ok(Signed {
            issuer,
            iss,
            key,
            algorithm: header.alg,
        })
    }

    /// The signature, then the claims.
    fn check(&self, token: &str, signed: Signed<'_>, now: u64) -> Result<Verified, JwtError> {
        let Signed {
            issuer,
            iss,
            key,
            algorithm,
        } = signed;
        let validation = self.validation(algorithm, issuer);
        let claims = decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| refusal(e.kind()))?
            .claims;
        let number = |name: &'static str| match claims.get(name) {
            None => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or(JwtError::Claim(name)),
        };
        if number("iat")?.is_some_and(|iat| iat > now + self.leeway) {
            return Err(JwtError::IssuedInFuture);
        }
        let exp = number("exp")?.ok_or(JwtError::Claim("exp"))?;
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.as_str(),
            _ => return Err(JwtError::Claim("sub")),
        };
        let mut scopes = Vec::new();
        rules::claim_scopes(&self.rules, &iss, &claims, &mut scopes);
        if let Some(claim) = &issuer.config.scopes_claim {
            rules::listed_scopes(claims.get(claim), &mut scopes);
        }
        Ok(Verified {
            subject: subject.into(),
            issuer: iss.into(),
            scopes,
            valid_until: exp.saturating_add(self.leeway),
        })
    }

    /// The checks `jsonwebtoken` makes: this algorithm only, the issuer, one of its audiences,
    /// `exp` required and `nbf` when present, with the leeway.
    fn validation(&self, algorithm: Algorithm, issuer: &Issuer) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&issuer.config.issuer]);
        validation.set_audience(&issuer.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        validation
    }
}

/// The refusal for what `jsonwebtoken` found.
fn refusal(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidAudience => JwtError::Audience,
        ErrorKind::InvalidIssuer => JwtError::Issuer,
        ErrorKind::InvalidSignature => JwtError::Signature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidKeyFormat => JwtError::KeyMismatch,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            JwtError::Claim(match claim.as_str() {
                "exp" => "exp",
                "nbf" => "nbf",
                "aud" => "aud",
                "iss" => "iss",
                "sub" => "sub",
                _ => "a registered",
            })
        }
        _ => JwtError::Malformed,
    }
}

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    use ring::{
        rand::SystemRandom,
        signature::{
            ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
            RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents,
        },
    };
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";

    /// An RS256, an ES256 and an EdDSA key, their JWKS, and tokens they sign. ring makes the EC
    /// and Ed25519 keys; it cannot make RSA keys, so that one is a fixture (made by `openssl
    /// genpkey -algorithm RSA` and `openssl pkcs8 -topk8 -nocrypt -outform DER`, for these tests
    /// only).
    struct Signers {
        rsa: RsaKeyPair,
        ec: EcdsaKeyPair,
        ed: Ed25519KeyPair,
    }

    impl Signers {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
            let ec = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            Self {
                rsa: RsaKeyPair::from_pkcs8(include_bytes!("testdata/rs256-test-key.pk8")).unwrap(),
                ec: EcdsaKeyPair::from_pkcs8(alg, ec.as_ref(), &rng).unwrap(),
                ed: Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap(),
            }
        }

        fn jwks(&self) -> String {
            let point = self.ec.public_key().as_ref();
            let rsa: RsaPublicKeyComponents<Vec<u8>> = self.rsa.public().into();
            json!({"keys": [
                {"kty": "RSA", "kid": "rsa", "alg": "RS256",
                 "n": B64.encode(rsa.n), "e": B64.encode(rsa.e)},
                {"kty": "EC", "crv": "P-256", "kid": "ec", "x": B64.encode(&point[1..33]),
                 "y": B64.encode(&point[33..])},
                {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
                 "x": B64.encode(self.ed.public_key().as_ref())},
            ]})
            .to_string()
        }

        fn token(&self, alg: &str, kid: &str, claims: &Value) -> String {
            let header = B64.encode(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string());
            let message = format!("{header}.{}", B64.encode(claims.to_string()));
            let signature = match alg {
                "RS256" => {
                    let mut signature = vec![0; self.rsa.public().modulus_len()];
                    self.rsa
                        .sign(
                            &RSA_PKCS1_SHA256,
                            &SystemRandom::new(),
                            message.as_bytes(),
                            &mut signature,
                        )
                        .unwrap();
                    signature
                }
                "ES256" => self
                    .ec
                    .sign(&SystemRandom::new(), message.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                _ => self.ed.sign(message.as_bytes()).as_ref().to_vec(),
            };
            format!("{message}.{}", B64.encode(signature))
        }
    }

    fn claims(sub: &str, exp_in: i64) -> Value {
        let now = now() as i64;
        json!({"iss": ISS, "aud": ["greeter"], "sub": sub, "iat": now, "nbf": now,
               "exp": now + exp_in, "kubernetes.io": {"namespace": "shop"},
               "scope": "reflection extra"})
    }

    fn verifier(keys: &Signers, cache_size: usize) -> Jwt {
        let config = JwtConfig {
            issuers: vec![JwtIssuer {
                issuer: ISS.into(),
                jwks_file: "jwks.json".into(),
                audiences: vec!["greeter".into()],
                scopes_claim: Some("scope".into()),
            }],
            rules: vec![ClaimRule {
                claim: "sub".into(),
                pattern: "system:serviceaccount:shop:*".into(),
                scopes: vec!["greeter".into()],
                issuer: None,
            }],
            leeway: Duration::from_secs(5),
            cache_size,
            failure_cache_size: cache_size,
            ..JwtConfig::default()
        };
        Jwt::new(
            &config,
            vec![Keys::parse(&keys.jwks(), "jwks.json").unwrap()],
        )
    }

    impl Jwt {
        /// [`Jwt::verify`] for a peer of its own, with a budget that is never spent.
        fn verify_anywhere(&self, token: &str) -> Result<Arc<Verified>, JwtError> {
            self.verify(token, PeerPrefix::Uid(0), &SignatureBudget::new(1.0, 1000))
        }
    }

    #[test]
    fn verifies_identity_and_scopes_then_answers_from_the_cache() {
        let keys = Signers::new();
        let jwt = verifier(&keys, 16);
        for (alg, kid) in [("RS256", "rsa"), ("ES256", "ec"), ("EdDSA", "ed")] {
            let token = keys.token(
                alg,
                kid,
                &claims("system:serviceaccount:shop:checkout", 600),
            );
            let first = jwt.verify_anywhere(&token).unwrap();
            assert_eq!(&*first.subject, "system:serviceaccount:shop:checkout");
            assert_eq!(&*first.issuer, ISS);
            assert_eq!(first.scopes, ["greeter", "reflection", "extra"]);
            assert!(Arc::ptr_eq(&first, &jwt.verify_anywhere(&token).unwrap()));
        }
        // Without a cache, every call verifies anew.
        let uncached = verifier(&keys, 0);
        let token = keys.token("EdDSA", "ed", &claims("system:serviceaccount:x:y", 600));
        let first = uncached.verify_anywhere(&token).unwrap();
        assert!(!Arc::ptr_eq(
            &first,
            &uncached.verify_anywhere(&token).unwrap()
        ));
        assert_eq!(first.scopes, ["reflection", "extra"]);
    }

    #[test]
    fn refusals() {
        let keys = Signers::new();
        let jwt = verifier(&keys, 16);
        let sub = "system:serviceaccount:shop:checkout";
        let good = claims(sub, 600);
        let with = |key: &str, value: Value| {
            let mut claims = good.clone();
            claims[key] = value;
            claims
        };
        let without = |claims: &Value, key: &str| {
            let mut claims = claims.clone();
            claims.as_object_mut().unwrap().remove(key);
            claims
        };
        let now = now() as i64;
        let cases = [
            (
                keys.token("ES256", "ec", &claims(sub, -60)),
                JwtError::Expired,
            ),
            (
                keys.token("ES256", "ec", &with("nbf", json!(now + 60))),
                JwtError::NotYetValid,
            ),
            (
                keys.token("ES256", "ec", &with("nbf", json!("never"))),
                JwtError::Claim("nbf"),
            ),
            (
                keys.token("ES256", "ec", &with("exp", json!("never"))),
                JwtError::Claim("exp"),
            ),
            (
                keys.token("ES256", "ec", &with("iat", json!(now + 60))),
                JwtError::IssuedInFuture,
            ),
            (
                keys.token("ES256", "ec", &with("aud", json!("vault"))),
                JwtError::Audience,
            ),
            (
                keys.token("ES256", "ec", &without(&good, "aud")),
                JwtError::Claim("aud"),
            ),
            (
                keys.token("ES256", "ec", &without(&good, "sub")),
                JwtError::Claim("sub"),
            ),
            (
                keys.token("ES256", "ec", &without(&good, "iss")),
                JwtError::Claim("iss"),
            ),
            (
                keys.token("ES256", "ec", &with("iss", json!("https://x"))),
                JwtError::Issuer,
            ),
            (
                keys.token("ES256", "ec", &with("sub", json!(""))),
                JwtError::Claim("sub"),
            ),
            (keys.token("ES256", "nope", &good), JwtError::UnknownKid),
            (keys.token("EdDSA", "ec", &good), JwtError::KeyMismatch),
            (keys.token("RS256", "ed", &good), JwtError::KeyMismatch),
            (keys.token("ES256", "rsa", &good), JwtError::KeyMismatch),
            (keys.token("HS256", "ec", &good), JwtError::Algorithm),
            (keys.token("none", "ec", &good), JwtError::Algorithm),
        ];
        for (token, expected) in cases {
            assert_eq!(jwt.verify_anywhere(&token).unwrap_err(), expected);
        }
        // Issued at the leeway's edge: still accepted.
        let edge = keys.token("ES256", "ec", &with("iat", json!(now + 5)));
        assert!(jwt.verify_anywhere(&edge).is_ok());
        // Expired, but within the leeway (5 s): accepted; just past it: refused.
        let lenient = keys.token("ES256", "ec", &claims(sub, -3));
        assert!(jwt.verify_anywhere(&lenient).is_ok());
        let late = keys.token("ES256", "ec", &claims(sub, -8));
        assert_eq!(jwt.verify_anywhere(&late).unwrap_err(), JwtError::Expired);
        let token = keys.token("ES256", "ec", &good);
        let (head, rest) = token.split_once('.').unwrap();
        let sig = rest.split_once('.').unwrap().1;
        let forged = format!(
            "{head}.{}.{sig}",
            B64.encode(with("sub", json!("x")).to_string())
        );
        assert_eq!(
            jwt.verify_anywhere(&forged).unwrap_err(),
            JwtError::Signature
        );
    }

    #[test]
    fn refusals_are_remembered_and_signature_checks_budgeted_per_peer() {
        let keys = Signers::new();
        let jwt = verifier(&keys, 16);
        let budget = SignatureBudget::new(0.001, 2);
        let (a, b) = (PeerPrefix::V4(1), PeerPrefix::V4(2));
        let good = claims("system:serviceaccount:shop:checkout", 600);
        let valid = keys.token("ES256", "ec", &good);
        assert!(jwt.verify(&valid, a, &budget).is_ok());
        let forged = |n: u32| {
            let (head, _) = valid.rsplit_once('.').unwrap();
            format!("{head}.{}", B64.encode([n.to_be_bytes(); 16].concat()))
        };

        // The same forged token, again and again: one signature check.
        for _ in 0..3 {
            let refused = jwt.verify(&forged(0), a, &budget).unwrap_err();
            assert_eq!(refused, JwtError::Signature);
        }
        assert_eq!((budget.valid(), budget.invalid()), (1, 1));
        // Distinct ones spend a's budget; then they are refused without a check.
        assert_eq!(
            jwt.verify(&forged(1), a, &budget).unwrap_err(),
            JwtError::Signature
        );
        let spent = jwt.verify(&forged(2), a, &budget).unwrap_err();
        assert!(matches!(spent, JwtError::PeerBudget(_)), "{spent}");
        assert!(spent.to_string().contains("; retry in "), "{spent}");
        assert_eq!(budget.invalid(), 2);
        // Not remembered as refused: the budget says nothing about the token.
        assert!(matches!(
            jwt.verify(&forged(2), b, &budget),
            Err(JwtError::Signature)
        ));
        // A token verified before still works from a, and b's new valid token is verified.
        assert!(jwt.verify(&valid, a, &budget).is_ok());
        let fresh = keys.token("EdDSA", "ed", &good);
        assert!(jwt.verify(&fresh, b, &budget).is_ok());
        assert_eq!((budget.valid(), budget.invalid()), (2, 3));

        // A token not valid yet is checked again next time: it may be valid then.
        let soon = keys.token("ES256", "ec", &{
            let mut claims = good.clone();
            claims["nbf"] = json!(now() + 60);
            claims
        });
        for _ in 0..2 {
            let c = PeerPrefix::V4(3);
            assert_eq!(
                jwt.verify(&soon, c, &budget).unwrap_err(),
                JwtError::NotYetValid
            );
        }
        assert_eq!(budget.invalid(), 5);
    }

    /// From `fuzz/fuzz_targets/jwt.rs`, whose oracle wanted whole seconds: a fractional `nbf`
    /// (RFC 7519's NumericDate allows one) is judged by its value, like a whole one.
    #[test]
    fn a_fractional_nbf_is_judged_by_its_value() {
        let keys = Signers::new();
        let jwt = verifier(&keys, 0);
        let mut claims = claims("system:serviceaccount:shop:a", 600);
        claims["nbf"] = json!(5e-324);
        assert!(
            jwt.verify_anywhere(&keys.token("ES256", "ec", &claims))
                .is_ok()
        );
        claims["nbf"] = json!(now() as f64 + 3600.5);
        let token = keys.token("ES256", "ec", &claims);
        assert_eq!(
            jwt.verify_anywhere(&token).unwrap_err(),
            JwtError::NotYetValid
        );
    }

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("a-_.b.c"));
        assert!(!looks_like_jwt("grt_abcdef"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(looks_like_jwt("a.b."));
        assert!(!looks_like_jwt("a..c"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a.b.c="));
        assert!(!looks_like_jwt("a.b+.c"));
    }
}
