//! One issuer's signing keys: a JWKS file (`{"keys": [...]}`), as the Kubernetes API server serves
//! it at `/openid/v1/jwks` and OIDC providers at their `jwks_uri`.
//!
//! Every key is checked when the file loads, so a call never meets a key it cannot use: a `kid`,
//! a type greeter verifies (RSA, EC P-256, Ed25519), an `alg` (when given) that is the key type's.
//! A key's algorithm is fixed here, and a token must name that same one: the header cannot pick
//! another verification for the key (no algorithm confusion).

use std::{collections::HashMap, path::Path};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse},
};

/// What is wrong with a JWKS file, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{path}: cannot read: {source}{}", crate::config::paths::relative_note(.path))]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a JWKS ({{\"keys\": [...]}}): {reason}")]
    Parse { path: String, reason: String },
    #[error("{path}: key {kid:?}: {reason}")]
    Key {
        path: String,
        kid: String,
        reason: String,
    },
}

impl JwksError {
    /// The file is gone (not merely unreadable or malformed): its keys are revoked.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A verification key and the one algorithm it verifies.
#[derive(Debug, Clone)]
pub struct Key {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

/// The keys of one JWKS file, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_kid: HashMap<String, Key>,
}

impl Keys {
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, JwksError> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| JwksError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            let fail = |reason: String| JwksError::Key {
                path: path.to_owned(),
                kid: kid.clone(),
                reason,
            };
            if kid.is_empty() {
                return Err(fail(
                    "every key needs a \"kid\" (tokens name their key)".into(),
                ));
            }
            let key = key(jwk).map_err(fail)?;
            if by_kid.insert(kid.clone(), key).is_some() {
                return Err(fail("the kid appears twice".into()));
            }
        }
        Ok(Self { by_kid })
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.by_kid.get(kid)
    }

    pub fn len(&self) -> usize {
        self.by_kid.len()
    }
}

/// The algorithm the key's type verifies, checked against its `alg` and `use` when present.
fn key(jwk: &Jwk) -> Result<Key, String> {
    if let Some(PublicKeyUse::Encryption) = jwk.common.public_key_use {
        return Err("\"use\": \"enc\" is an encryption key, not a signing key".into());
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "symmetric (\"kty\": \"oct\") keys are refused: HMAC is not accepted".into(),
            );
        }
        _ => {
            return Err(
                "unsupported key type or curve: RSA, EC P-256 or OKP Ed25519 are accepted".into(),
            );
        }
    };
    if let Some(alg) = jwk.common.key_algorithm {
        let named = match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
        if named != Some(algorithm) {
            return Err(format!(
                "unsupported \"alg\" {alg:?} for this key: RS256 (RSA), ES256 (EC P-256) or \
                 EdDSA (Ed25519) are accepted"
            ));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("not a valid public key: {e}"))?;
    Ok(Key { algorithm, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA: &str = r#"{"kty":"RSA","kid":"r1","alg":"RS256","use":"sig","n":"sXch","e":"AQAB"}"#;
    const EC: &str = r#"{"kty":"EC","kid":"e1","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;

    fn set(keys: &[&str]) -> String {
        format!("{{\"keys\": [{}]}}", keys.join(","))
    }

    #[test]
    fn keys_get_the_algorithm_of_their_type() {
        let named = EC.replace("\"kid\":\"e1\"", "\"kid\":\"e2\",\"alg\":\"ES256\"");
        let keys = Keys::parse(&set(&[RSA, EC, &named]), "jwks.json").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.get("r1").unwrap().algorithm, Algorithm::RS256);
        assert_eq!(keys.get("e1").unwrap().algorithm, Algorithm::ES256);
        assert_eq!(keys.get("e2").unwrap().algorithm, Algorithm::ES256);
        assert!(keys.get("nope").is_none());
    }

    #[test]
    fn only_a_missing_file_counts_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        assert!(Keys::load(&path).unwrap_err().is_missing());
        std::fs::write(&path, "{").unwrap();
        assert!(!Keys::load(&path).unwrap_err().is_missing());
        assert!(!Keys::load(dir.path()).unwrap_err().is_missing());
        std::fs::write(&path, set(&[RSA])).unwrap();
        assert_eq!(Keys::load(&path).unwrap().len(), 1);
    }

    #[test]
    fn refusals_name_the_file_and_the_key() {
        let cases = [
            (RSA.replace("RS256", "RS384"), "unsupported \"alg\""),
            (RSA.replace("RS256", "ES256"), "unsupported \"alg\""),
            (RSA.replace("\"sig\"", "\"enc\""), "encryption key"),
            (RSA.replace(",\"kid\":\"r1\"", ""), "needs a \"kid\""),
            (EC.replace("P-256", "P-384"), "unsupported key type"),
            (
                r#"{"kty":"OKP","kid":"x","crv":"P-256","x":"hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}"#
                    .to_owned(),
                "unsupported key type",
            ),
            (
                r#"{"kty":"oct","kid":"h","k":"c2VjcmV0"}"#.to_owned(),
                "HMAC",
            ),
        ];
        for (key, expected) in cases {
            let error = Keys::parse(&set(&[&key]), "jwks.json")
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("jwks.json: key "), "{error}");
            assert!(error.contains(expected), "{key}: {error}");
        }
        let twice = Keys::parse(&set(&[RSA, RSA]), "j").unwrap_err().to_string();
        assert!(twice.contains("appears twice"), "{twice}");
        let junk = Keys::parse("{\"keys\": 3}", "j").unwrap_err().to_string();
        assert!(junk.starts_with("j: not a JWKS"), "{junk}");
    }
}
