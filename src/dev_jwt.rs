//! Development JWTs (`greeter jwt keygen`, `greeter jwt mint`): a signing key with its JWKS file,
//! and tokens shaped like a Kubernetes projected service-account token, so that `[auth.jwt]` can
//! be tried without a cluster or an OIDC provider. Real tokens come from the platform; this key
//! signs nothing but what a developer asks for, and the server never signs (call::auth::crypto).
//!
//! EdDSA (Ed25519) and ES256 (P-256): the algorithms ring generates keys for, and two of the three
//! the server accepts. The token is JWS compact serialization, built here because the server's
//! `jsonwebtoken` provider deliberately has no signer.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject as _};
use serde_json::{Value, json};

/// Why a key or a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevJwtError {
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to overwrite")]
    Exists { path: PathBuf },
    #[error(
        "{path}: not a PKCS#8 Ed25519 or P-256 private key (make one with `greeter jwt keygen`)"
    )]
    Key { path: PathBuf },
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// `greeter jwt keygen --alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Alg {
    /// Ed25519: small keys, fast signatures
    #[value(name = "EdDSA")]
    EdDsa,
    /// ECDSA on P-256 with SHA-256
    #[value(name = "ES256")]
    Es256,
}

/// Writes a new private key (PKCS#8 PEM, mode 0600) to `key_path` and the JWKS holding its
/// public half, as `kid`, to `jwks_path`: the file `[[auth.jwt.issuers]] jwks_file` names.
pub fn keygen(
    alg: Alg,
    kid: &str,
    key_path: &Path,
    jwks_path: &Path,
    force: bool,
) -> Result<(), DevJwtError> {
    for path in [key_path, jwks_path] {
        if !force && path.exists() {
            return Err(DevJwtError::Exists {
                path: path.to_owned(),
            });
        }
    }
    let rng = SystemRandom::new();
    let generate = |e: ring::error::Unspecified| DevJwtError::Generate(e.to_string());
    let (pkcs8, jwk) = match alg {
        Alg::EdDsa => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(generate)?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|e| DevJwtError::Generate(e.to_string()))?;
            let jwk = json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            });
            (pkcs8, jwk)
        }
        Alg::Es256 => {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(generate)?;
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .map_err(|e| DevJwtError::Generate(e.to_string()))?;
            // An uncompressed point: 0x04, then x and y, 32 bytes each.
            let point = pair.public_key().as_ref();
            let jwk = json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            });
            (pkcs8, jwk)
        }
    };
    let pem = rcgen::KeyPair::try_from(pkcs8.as_ref())
        .map_err(|e| DevJwtError::Generate(e.to_string()))?
        .serialize_pem();
    write(key_path, &pem, true)?;
    let jwks = serde_json::to_string_pretty(&json!({ "keys": [jwk] })).expect("JSON values encode");
    write(jwks_path, &(jwks + "\n"), false)
}

/// The claims of a minted token.
#[derive(Debug, Clone)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    pub ttl: Duration,
}

/// A token signed with the key at `key_path` (its algorithm read from the key), valid from now
/// for `claims.ttl`: `iss`, `sub`, `aud`, `iat`, `nbf` and `exp`, as a projected service-account
/// token carries them.
pub fn mint(key_path: &Path, kid: &str, claims: &Claims) -> Result<String, DevJwtError> {
    let bad_key = || DevJwtError::Key {
        path: key_path.to_owned(),
    };
    let pem = std::fs::read(key_path).map_err(|source| DevJwtError::Io {
        path: key_path.to_owned(),
        source,
    })?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|_| bad_key())?;
    let rng = SystemRandom::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let audience: Value = match claims.audiences.as_slice() {
        [one] => one.clone().into(),
        many => many.into(),
    };
    let body = json!({
        "iss": claims.issuer,
        "sub": claims.subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + claims.ttl.as_secs(),
    });
    let signer =
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()) {
            Signer::Ed25519(pair)
        } else {
            EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                der.secret_pkcs8_der(),
                &rng,
            )
            .map(Signer::P256)
            .map_err(|_| bad_key())?
        };
    let header = json!({ "alg": signer.alg(), "typ": "JWT", "kid": kid });
    let part = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let message = format!("{}.{}", part(&header), part(&body));
    let signature = signer.sign(&rng, message.as_bytes())?;
    Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

enum Signer {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Self::Ed25519(_) => "EdDSA",
            Self::P256(_) => "ES256",
        }
    }

    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Result<Vec<u8>, DevJwtError> {
        match self {
            Self::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Self::P256(pair) => pair
                .sign(rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| DevJwtError::Sign(e.to_string())),
        }
    }
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), DevJwtError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let io = |source| DevJwtError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}
