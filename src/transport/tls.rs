//! TLS material: loading PEM files into a rustls `ServerConfig`, and swapping it on rotation.
//!
//! tonic's `ServerTlsConfig` takes PEM bytes once and cannot change them, so greeter builds its own
//! `rustls::ServerConfig` and accepts with tokio-rustls. Rotation swaps the whole config (cert, key
//! and client CA together) behind an `ArcSwap`: each new connection reads the current one. Open
//! connections keep the server certificate they shook hands with; a change of what is trusted in
//! client certificates reaches them through [`super::client_trust`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime, pem::PemObject as _,
};
use tokio::sync::watch;
use x509_parser::{
    prelude::{FromDer as _, GeneralName, X509Certificate},
    revocation_list::CertificateRevocationList,
};

use crate::{
    config::{ClientAuth, Problem, Section, TlsConfig},
    ops::{
        metrics::{ReloadOutcomes, TlsExpiry},
        reload::{Reloaded, Triggers, Watched},
    },
    transport::client_trust::{self, ClientTrust, TrustDigest, TrustWatch},
};

/// What is wrong with the TLS material, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}{}", crate::config::paths::relative_note(.path))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} found: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: not a valid X.509 certificate: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("{path}: certificate expired at {not_after} (subject {subject})")]
    Expired {
        path: PathBuf,
        not_after: String,
        subject: String,
    },
    #[error("{path}: certificate is not valid before {not_before} (subject {subject})")]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        subject: String,
    },
    #[error("{key}: private key does not match the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{path}: cannot use as client CA: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("{path}: not a certificate revocation list (tls.client_crl_files): {reason}")]
    Crl { path: PathBuf, reason: String },
}

impl Section for TlsConfig {
    /// The files TLS needs are named, and client certificates come with the CA to verify them.
    fn check(&self) -> Result<(), Problem> {
        if self.enabled {
            for (key, path) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
                if path.as_os_str().is_empty() {
                    return Err(Problem {
                        key,
                        message: "required when tls.enabled = true".into(),
                    });
                }
            }
        }
        if self
            .client_crl_files
            .iter()
            .any(|p| p.as_os_str().is_empty())
        {
            return Err(Problem {
                key: "tls.client_crl_files",
                message: "an entry is empty: give the path of a PEM CRL file".into(),
            });
        }
        if !self.client_crl_files.is_empty() && self.client_auth == ClientAuth::None {
            return Err(Problem {
                key: "tls.client_crl_files",
                message: "revocation lists apply to client certificates: set tls.client_auth \
                          (and tls.client_ca), or remove client_crl_files"
                    .into(),
            });
        }
        let has_ca = !self.client_ca.as_os_str().is_empty();
        match (self.client_auth, has_ca) {
            (ClientAuth::None, true) => Err(Problem {
                key: "tls.client_ca",
                message: "is set but tls.client_auth = \"none\": set client_auth to \"optional\" \
                          or \"required\", or remove client_ca"
                    .into(),
            }),
            (ClientAuth::Optional | ClientAuth::Required, false) => Err(Problem {
                key: "tls.client_auth",
                message: "client certificates need tls.client_ca (the CA bundle to verify them)"
                    .into(),
            }),
            _ => Ok(()),
        }
    }
}

/// The crypto provider, chosen once: ring needs no cmake or clang to build.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A loaded, validated server configuration plus what operators want to know about it.
#[derive(Debug)]
pub struct Material {
    pub config: Arc<ServerConfig>,
    pub leaf: CertSummary,
    /// What `config` trusts in client certificates, when it asks for them.
    pub trust: Option<ClientTrust>,
}

impl Material {
    /// What serves (swappable by reloads) and what is reported (the leaf).
    pub fn into_reloadable(self) -> (Reloadable, CertSummary) {
        (Reloadable::new(self.config, self.trust), self.leaf)
    }
}

/// The parts of a certificate worth logging and testing against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// RFC 4514 subject, e.g. `CN=greeter`.
    pub subject: String,
    /// Serial number, lowercase hex: tells which certificate a connection got.
    pub serial: String,
    /// Expiry as Unix seconds.
    pub not_after_unix: i64,
}

/// Loads `tls.cert`, `tls.key` and (when configured) `tls.client_ca` into a rustls config: TLS 1.3
/// and 1.2 only, ALPN `h2` (gRPC needs HTTP/2) and, with `http1`, `http/1.1` after it (grpc-web
/// from browsers that do not speak HTTP/2), and client certificate verification as
/// `tls.client_auth` says. Refuses an expired or not-yet-valid leaf, and a key that does not
/// belong to the certificate.
pub fn load(settings: &TlsConfig, http1: bool) -> Result<Material, TlsError> {
    build(settings, http1, MissingCa::Fail)
}

/// What a reload does when `tls.client_ca` or a `tls.client_crl_files` file is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MissingCa {
    /// Refuse to load (startup: a missing file is a mistake to report).
    Fail,
    /// Verify no client certificate until the file (named by its key) is back: deleting the CA
    /// revokes the identities it vouched for, rather than trusting them for ever; deleting a
    /// revocation list must not un-revoke what it listed.
    RefuseAll(&'static str),
}

/// Like [`load`], for a reload: a missing `tls.client_ca` or CRL file does not keep the old
/// verifier in force but installs one that accepts no client certificate (fail closed); the
/// key of the missing file says so.
pub fn reload(
    settings: &TlsConfig,
    http1: bool,
) -> Result<(Material, Option<&'static str>), TlsError> {
    let revoked = (settings.client_auth != ClientAuth::None)
        .then(|| {
            if !settings.client_ca.exists() {
                Some("tls.client_ca")
            } else if settings.client_crl_files.iter().any(|p| !p.exists()) {
                Some("tls.client_crl_files")
            } else {
                None
            }
        })
        .flatten();
    let missing = revoked.map_or(MissingCa::Fail, MissingCa::RefuseAll);
    build(settings, http1, missing).map(|material| (material, revoked))
}

fn build(settings: &TlsConfig, http1: bool, missing_ca: MissingCa) -> Result<Material, TlsError> {
    let chain = read_certs(&settings.cert)?;
    let leaf = summarize(&settings.cert, &chain[0], SystemTime::now())?;
    let key = read_key(&settings.key)?;

    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let trust = match missing_ca {
        MissingCa::RefuseAll(key) => Some(NoClientCa::trust(settings.client_auth, key, &provider)),
        MissingCa::Fail => client_verifier(settings, &provider)?,
    };
    let builder = match &trust {
        Some(trust) => builder.with_client_cert_verifier(Arc::clone(trust.verifier())),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::KeyMismatch {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    if http1 {
        config.alpn_protocols.push(b"http/1.1".to_vec());
    }
    Ok(Material {
        config: Arc::new(config),
        leaf,
        trust,
    })
}

/// Tags of the items a [`ClientTrust`] digest is made of.
const DIGEST_CA: u8 = 1;
const DIGEST_CRL: u8 = 2;
const DIGEST_MISSING: u8 = 3;

fn client_verifier(
    settings: &TlsConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<ClientTrust>, TlsError> {
    if settings.client_auth == ClientAuth::None {
        return Ok(None);
    }
    let path = &settings.client_ca;
    let mut digest = TrustDigest::new();
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        digest.add(DIGEST_CA, &cert);
        roots.add(cert).map_err(|e| TlsError::ClientCa {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = match settings.client_auth {
        ClientAuth::Optional => builder.allow_unauthenticated(),
        _ => builder,
    };
    let mut crls = Vec::new();
    for path in &settings.client_crl_files {
        crls.extend(read_crls(path)?);
    }
    for crl in &crls {
        digest.add(DIGEST_CRL, crl);
    }
    // rustls' defaults, kept: every certificate of the chain below the trust anchor must be
    // covered by a CRL of its issuer (unknown status is refused), nextUpdate is not enforced.
    let builder = if crls.is_empty() {
        builder
    } else {
        builder.with_crls(crls)
    };
    let verifier = builder.build().map_err(|e| TlsError::ClientCa {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(ClientTrust::new(verifier, digest.finish())))
}

/// Reads every CRL of a PEM file (at least one), each parsed here so that a bad one is reported
/// with its file rather than as the verifier's error.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Crl {
        path: path.to_owned(),
        reason,
    };
    let bytes = read(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if crls.is_empty() {
        return Err(bad("the file holds no X509 CRL block".into()));
    }
    for crl in &crls {
        CertificateRevocationList::from_der(crl).map_err(|e| bad(e.to_string()))?;
    }
    Ok(crls)
}

/// Stands in for the client CA while its file (or a revocation list) is missing: every client
/// certificate is refused, and with `client_auth = "required"` so is every handshake.
#[derive(Debug)]
struct NoClientCa {
    mandatory: bool,
    /// The key of the missing file.
    missing: &'static str,
    schemes: Vec<SignatureScheme>,
}

impl NoClientCa {
    fn trust(
        client_auth: ClientAuth,
        missing: &'static str,
        provider: &CryptoProvider,
    ) -> ClientTrust {
        let verifier = Arc::new(Self {
            mandatory: client_auth == ClientAuth::Required,
            missing,
            schemes: provider
                .signature_verification_algorithms
                .supported_schemes(),
        });
        let mut digest = TrustDigest::new();
        digest.add(DIGEST_MISSING, missing.as_bytes());
        ClientTrust::new(verifier, digest.finish())
    }

    fn refused(&self) -> rustls::Error {
        rustls::Error::General(format!(
            "a file of {} is missing: no client certificate is trusted",
            self.missing
        ))
    }
}

impl ClientCertVerifier for NoClientCa {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(self.refused())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(self.refused())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(self.refused())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// Reads every certificate of a PEM file; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            reason: "the file holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        reason: key_pem_problem(&e),
    })
}

/// What is wrong with a key file, in words that quote none of it: the PEM parser's own messages
/// show the line it choked on, which in a key file may be key material.
fn key_pem_problem(error: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::NoItemsFound => {
            "the file holds no PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1)".into()
        }
        Error::MissingSectionEnd { .. } => "a PEM block has no END line".into(),
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        Error::Base64Decode(_) => "a PEM block is not valid base64".into(),
        Error::Io(e) => e.to_string(),
        _ => "not a PEM private key".into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses `der` and checks it is valid at `now`.
pub fn summarize(
    path: &Path,
    der: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<CertSummary, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let subject = super::dn::render(cert.subject());
    let validity = cert.validity();
    let now_unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if validity.not_after.timestamp() < now_unix {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
            subject,
        });
    }
    if validity.not_before.timestamp() > now_unix {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
            subject,
        });
    }
    Ok(CertSummary {
        subject,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after_unix: validity.not_after.timestamp(),
    })
}

/// Who a verified client certificate names: the subject and its DNS, URI and email SANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub subject: String,
    pub sans: Vec<String>,
}

impl ClientIdentity {
    /// Reads the identity of a client's leaf certificate. rustls has verified it already.
    pub fn from_der(der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::DNSName(n) => Some(format!("dns:{n}")),
                        GeneralName::URI(u) => Some(format!("uri:{u}")),
                        GeneralName::RFC822Name(e) => Some(format!("email:{e}")),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            subject: super::dn::render(cert.subject()),
            sans,
        })
    }
}

/// The dates of the client-side material, as Unix seconds: when the first certificate of
/// `tls.client_ca` expires, and the earliest `nextUpdate` of the `tls.client_crl_files` (`None`
/// where there is no such file, it does not read, or no list has a `nextUpdate`). Read apart from
/// [`load`], which has checked the files, so the verifier's code stays as it is.
pub fn client_dates(settings: &TlsConfig) -> (Option<i64>, Option<i64>) {
    let ca = (settings.client_auth != ClientAuth::None)
        .then(|| read_certs(&settings.client_ca).ok())
        .flatten()
        .and_then(|certs| {
            certs
                .iter()
                .filter_map(|der| X509Certificate::from_der(der).ok())
                .map(|(_, cert)| cert.validity().not_after.timestamp())
                .min()
        });
    let crl = settings
        .client_crl_files
        .iter()
        .filter_map(|path| read_crls(path).ok())
        .flatten()
        .filter_map(|der| {
            let (_, crl) = CertificateRevocationList::from_der(&der).ok()?;
            crl.next_update().map(|t| t.timestamp())
        })
        .min();
    (ca, crl)
}

/// The current server config, swappable while serving, and (with client certificates) its
/// client trust for open connections to follow.
#[derive(Debug, Clone)]
pub struct Reloadable {
    current: Arc<ArcSwap<ServerConfig>>,
    trust: Option<watch::Sender<ClientTrust>>,
}

impl Reloadable {
    fn new(config: Arc<ServerConfig>, trust: Option<ClientTrust>) -> Self {
        Self {
            current: Arc::new(ArcSwap::new(config)),
            trust: trust.map(|trust| watch::channel(trust).0),
        }
    }

    /// An acceptor for one new connection, with whatever material is current, and a watch on the
    /// client trust. The watch is taken first and [`Reloadable::install`] publishes last, so a
    /// reload landing in between is seen as a change, never missed: a handshake made with the
    /// previous trust is checked against the new one.
    pub fn acceptor(&self) -> (tokio_rustls::TlsAcceptor, Option<TrustWatch>) {
        let trust = self.trust.as_ref().map(watch::Sender::subscribe);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        (acceptor, trust)
    }

    /// New connections get `config`; open ones re-check their client's certificate chain if
    /// `trust` differs from the trust in force.
    pub fn install(&self, config: Arc<ServerConfig>, trust: Option<ClientTrust>) {
        self.current.store(config);
        if let (Some(current), Some(trust)) = (&self.trust, trust) {
            client_trust::publish(current, trust);
        }
    }
}

/// The files [`spawn_reloader`] watches: `tls.cert`, `tls.key`, `tls.client_ca` (if set) and
/// `tls.client_crl_files`.
pub fn watched(settings: &TlsConfig) -> Watched {
    let mut paths = vec![settings.cert.clone(), settings.key.clone()];
    if !settings.client_ca.as_os_str().is_empty() {
        paths.push(settings.client_ca.clone());
    }
    paths.extend(settings.client_crl_files.iter().cloned());
    Watched::now(paths)
}

/// Re-reads `tls.cert`, `tls.key`, `tls.client_ca` and `tls.client_crl_files` when they change
/// or SIGHUP arrives, swaps them into `material` and keeps `expiry` current. A missing client CA
/// or CRL file revokes every client certificate until it is back; material that does not load
/// keeps the previous one. A change of client CA or CRLs reaches open connections too.
pub fn spawn_reloader(
    settings: &TlsConfig,
    http1: bool,
    files: Watched,
    material: Reloadable,
    expiry: TlsExpiry,
    triggers: Triggers,
    outcomes: ReloadOutcomes,
) {
    let settings = settings.clone();
    crate::ops::reload::spawn(
        "tls",
        files,
        settings.reload_interval,
        triggers,
        outcomes,
        move || {
            reload(&settings, http1).map(|(loaded, revoked)| {
                material.install(loaded.config, loaded.trust);
                let (ca, crl) = client_dates(&settings);
                expiry.set(loaded.leaf.not_after_unix, ca, crl);
                let summary = format!(
                    "certificate serial {} ({})",
                    loaded.leaf.serial, loaded.leaf.subject
                );
                if let Some(key) = revoked {
                    Reloaded::Revoked(format!(
                        "{summary}; a file of {key} is missing: no client certificate is \
                         accepted until it is back"
                    ))
                } else {
                    Reloaded::Loaded(summary)
                }
            })
        },
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn certificate(params: CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_is_valid_from_its_first_second_to_its_last() {
        const NOT_BEFORE: u64 = 1_800_000_000;
        const NOT_AFTER: u64 = 1_900_000_000;
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = at(NOT_BEFORE).into();
        params.not_after = at(NOT_AFTER).into();
        let der = certificate(params);
        let path = Path::new("tls.crt");

        let first = summarize(path, &der, at(NOT_BEFORE)).unwrap();
        assert_eq!(first.not_after_unix, NOT_AFTER as i64);
        summarize(path, &der, at(NOT_AFTER)).unwrap();
        let early = summarize(path, &der, at(NOT_BEFORE - 1)).unwrap_err();
        assert!(matches!(early, TlsError::NotYetValid { .. }), "{early}");
        let late = summarize(path, &der, at(NOT_AFTER + 1)).unwrap_err();
        assert!(matches!(late, TlsError::Expired { .. }), "{late}");
    }

    #[test]
    fn a_client_identity_is_its_subject_and_its_dns_uri_and_email_names() {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "checkout");
        params.subject_alt_names = vec![
            SanType::DnsName("checkout.shop.svc".try_into().unwrap()),
            SanType::URI(
                "spiffe://cluster.local/ns/shop/sa/checkout"
                    .try_into()
                    .unwrap(),
            ),
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ];
        let identity = ClientIdentity::from_der(&certificate(params)).unwrap();
        assert_eq!(identity.subject, "CN=checkout");
        assert_eq!(
            identity.sans,
            [
                "dns:checkout.shop.svc",
                "uri:spiffe://cluster.local/ns/shop/sa/checkout",
                "email:ops@example.com",
            ]
        );
    }
}
