//! Development certificates: a CA, a server certificate and a client certificate, made with
//! rcgen so that trying TLS and mTLS needs no openssl. Production certificates come from the
//! platform's PKI (cert-manager, Vault, ...), never from here.

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to overwrite")]
    Exists { path: PathBuf },
}

/// What to put in the certificates.
#[derive(Debug, Clone)]
pub struct PkiOptions {
    /// DNS names and IP addresses the server certificate is valid for.
    pub hosts: Vec<String>,
    /// Common name of the client certificate (what logs show as the mTLS identity).
    pub client_name: String,
    /// Validity of the server and client certificates; the CA's covers it with a margin.
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl PkiOptions {
    /// Valid from an hour ago (clock skew) for `days` days.
    pub fn valid_for_days(hosts: Vec<String>, client_name: String, days: u64) -> Self {
        let now = SystemTime::now();
        Self {
            hosts,
            client_name,
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }
}

/// A generated CA with one server and one client certificate, as PEM.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// File names `write` uses, relative to the output folder.
pub const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

impl DevPki {
    pub fn generate(options: &PkiOptions) -> Result<Self, CertsError> {
        Self::generate_with_client_uris(options, &[])
    }

    /// As [`DevPki::generate`], with `client_uris` as URI SANs of the client certificate: SPIFFE
    /// IDs (`spiffe://cluster.local/ns/shop/sa/checkout`) for trying `[[auth.cert_rules]]`.
    pub fn generate_with_client_uris(
        options: &PkiOptions,
        client_uris: &[String],
    ) -> Result<Self, CertsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name("greeter development CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = (options.not_before - Duration::from_secs(86_400)).into();
        ca.not_after = (options.not_after + Duration::from_secs(86_400)).into();
        let ca = CertifiedIssuer::self_signed(ca, ca_key)?;

        let leaf = |sans: Vec<String>, uris: &[String], cn: &str, usage| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            for uri in uris {
                params
                    .subject_alt_names
                    .push(SanType::URI(uri.as_str().try_into()?));
            }
            params.distinguished_name = name(cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            params.not_before = options.not_before.into();
            params.not_after = options.not_after.into();
            let cert = params.signed_by(&key, &ca)?;
            Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
        };
        let server_cn = options.hosts.first().map_or("greeter", String::as_str);
        let (server_cert, server_key) = leaf(
            options.hosts.clone(),
            &[],
            server_cn,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            vec![options.client_name.clone()],
            client_uris,
            &options.client_name,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Self {
            ca_cert: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// Writes the five PEM files into `dir` (created if missing); keys are readable by the owner
    /// only. Refuses to overwrite unless `force`.
    pub fn write(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>, CertsError> {
        std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let contents = [
            &self.ca_cert,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ];
        let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
        if !force && let Some(existing) = paths.iter().find(|p| p.exists()) {
            return Err(CertsError::Exists {
                path: existing.clone(),
            });
        }
        for (path, text) in paths.iter().zip(contents) {
            let private = path.extension().is_some_and(|e| e == "key");
            write_file(path, text, private).map_err(|source| CertsError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(paths)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn write_file(path: &Path, text: &str, private: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)?;
    file.write_all(text.as_bytes())
}
