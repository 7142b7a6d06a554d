//! The signature checks of `jsonwebtoken`, done by ring.
//!
//! Why this file: `jsonwebtoken` 12 takes its cryptography from a `CryptoProvider`, built in for
//! aws-lc-rs (a C/CMake build for the musl image, and a second TLS-grade crypto library beside
//! ring) or RustCrypto (six more crates and their dependencies, among them `rsa`, whose
//! RUSTSEC-2023-0071 would need an ignore in deny.toml). The process already links ring for
//! rustls and rcgen, and verification needs three of its functions, so the provider here is
//! ring's, for exactly the algorithms greeter accepts: RS256, ES256 (P-256) and EdDSA (Ed25519).
//! Every other algorithm, HMAC above all, has no verifier: a token that names one cannot verify
//! (no algorithm confusion), and signing is never offered. With no backend feature, the crate adds
//! only `signature` (and `zeroize_derive`) to a Linux build. Older `jsonwebtoken` (9.x,
//! ring-based) was not an option: a malformed `exp`/`nbf` skips validation there
//! (GHSA-h395-gr6q-cpjc, fixed in 10.3).

use std::sync::Once;

use jsonwebtoken::signature;
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey,
    crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils},
    errors::{ErrorKind, Result},
};
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    UnparsedPublicKey,
};

/// The algorithms a token may be signed with.
pub const ACCEPTED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Installs the ring provider for the process (once; later calls are no-ops).
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Nothing else in the process installs one; if something did, ours is not used and every
        // token would be verified by that one, so say so loudly.
        if PROVIDER.install_default().is_err() {
            tracing::error!("another jsonwebtoken CryptoProvider is installed; JWTs use it");
        }
    });
}

/// The server only verifies.
fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    Err(ErrorKind::UnsupportedAlgorithm.into())
}

/// A verifier for `algorithm` with `key`, when the key's type is the algorithm's.
fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    if !ACCEPTED.contains(algorithm) {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        key: key.clone(),
    }))
}

struct RingVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], sig: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        use jsonwebtoken::DecodingKeyKind::{RsaModulusExponent, SecretOrDer};
        // An RSA key from a JWKS is always its modulus and exponent (`DecodingKey::from_jwk`).
        let verified = match (self.algorithm, self.key.kind()) {
            (Algorithm::RS256, RsaModulusExponent { n, e }) => {
                RsaPublicKeyComponents { n, e }.verify(&RSA_PKCS1_2048_8192_SHA256, message, sig)
            }
            (Algorithm::ES256, SecretOrDer(point)) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(message, sig)
            }
            (Algorithm::EdDSA, SecretOrDer(public)) => {
                UnparsedPublicKey::new(&ED25519, public).verify(message, sig)
            }
            _ => return Err(signature::Error::new()),
        };
        verified.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}
