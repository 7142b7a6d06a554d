//! The OTLP exporter: gRPC (tonic, the server's own stack) or HTTP/protobuf (hyper with rustls on
//! ring, the same TLS stack), the collector's headers, and TLS to it.

use std::{collections::HashMap, path::Path};

use hyper_rustls::HttpsConnectorBuilder;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::{
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Certificate, ClientTlsConfig, Identity},
};

use super::TelemetryError;
use crate::config::{OtlpProtocol, TracingConfig};

/// The path OTLP/HTTP serves traces at, appended to `tracing.endpoint`.
const HTTP_TRACES_PATH: &str = "/v1/traces";

/// What the exporter reads from files, loaded before the server starts (and by `config check`),
/// so a missing or malformed file stops the start with the key and the path.
#[derive(Debug, Clone)]
pub struct ExportMaterial {
    headers: Vec<(String, String)>,
    /// PEM bytes, checked to hold at least one certificate.
    ca: Option<Vec<u8>>,
    /// PEM certificate chain and key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ExportMaterial {
    pub fn load(config: &TracingConfig) -> Result<Self, TelemetryError> {
        let headers = if config.headers_file.as_os_str().is_empty() {
            Vec::new()
        } else {
            headers(&config.headers_file)?
        };
        let ca = set(&config.ca_file)
            .map(|path| {
                let pem = read("tracing.ca_file", path)?;
                certificates("tracing.ca_file", path, &pem)?;
                Ok::<_, TelemetryError>(pem)
            })
            .transpose()?;
        let identity = match (set(&config.cert_file), set(&config.key_file)) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read("tracing.cert_file", cert_path)?;
                certificates("tracing.cert_file", cert_path, &cert)?;
                let key = read("tracing.key_file", key_path)?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| TelemetryError::File {
                    key: "tracing.key_file",
                    path: key_path.display().to_string(),
                    message: format!("no PEM private key: {e}"),
                })?;
                Some((cert, key))
            }
            _ => None,
        };
        Ok(Self {
            headers,
            ca,
            identity,
        })
    }

    /// The exporter for `config.endpoint`; call within the Tokio runtime (the gRPC channel and the
    /// HTTP client spawn their connection tasks on it).
    pub fn exporter(&self, config: &TracingConfig) -> Result<SpanExporter, TelemetryError> {
        let https = config.endpoint.starts_with("https://");
        let built = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut metadata = MetadataMap::new();
                for (name, value) in &self.headers {
                    // Checked when the file was read.
                    if let (Ok(name), Ok(value)) = (
                        MetadataKey::from_bytes(name.as_bytes()),
                        MetadataValue::try_from(value.as_str()),
                    ) {
                        metadata.insert(name, value);
                    }
                }
                let mut builder = SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&config.endpoint)
                    .with_timeout(config.export_timeout)
                    .with_metadata(metadata);
                if https {
                    builder = builder.with_tls_config(self.tonic_tls());
                }
                builder.build()
            }
            OtlpProtocol::HttpProtobuf => {
                let client_config = self.rustls_config()?;
                let connector = HttpsConnectorBuilder::new()
                    .with_tls_config(client_config)
                    .https_or_http()
                    .enable_http1()
                    .build();
                let endpoint = format!(
                    "{}{HTTP_TRACES_PATH}",
                    config.endpoint.trim_end_matches('/')
                );
                SpanExporter::builder()
                    .with_http()
                    .with_endpoint(endpoint)
                    .with_timeout(config.export_timeout)
                    .with_headers(self.headers.iter().cloned().collect::<HashMap<_, _>>())
                    .with_http_client(HyperClient::new(connector, config.export_timeout, None))
                    .build()
            }
        };
        built.map_err(|e| TelemetryError::Exporter(e.to_string()))
    }

    fn tonic_tls(&self) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, TelemetryError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                // Parsed when the file was read; what webpki refuses is named here.
                for cert in CertificateDer::pem_slice_iter(ca).flatten() {
                    roots
                        .add(cert)
                        .map_err(|e| TelemetryError::Exporter(format!("tracing.ca_file: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?
        .with_root_certificates(roots);
        match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert).flatten().collect();
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TelemetryError::Exporter(e.to_string()))
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

fn set(path: &Path) -> Option<&Path> {
    (!path.as_os_str().is_empty()).then_some(path)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TelemetryError> {
    std::fs::read(path).map_err(|e| TelemetryError::File {
        key,
        path: path.display().to_string(),
        message: format!("{e}{}", crate::config::paths::relative_note(path)),
    })
}

fn certificates(key: &'static str, path: &Path, pem: &[u8]) -> Result<(), TelemetryError> {
    let file = |message: String| TelemetryError::File {
        key,
        path: path.display().to_string(),
        message,
    };
    let count = CertificateDer::pem_slice_iter(pem)
        .try_fold(0, |n, cert| cert.map(|_| n + 1))
        .map_err(|e| file(format!("bad PEM: {e}")))?;
    if count == 0 {
        return Err(file("no PEM certificate in the file".into()));
    }
    Ok(())
}

/// `name = "value"` lines: each name a valid lowercase header name, each value a valid header
/// value, so neither transport can refuse them later.
fn headers(path: &Path) -> Result<Vec<(String, String)>, TelemetryError> {
    let key = "tracing.headers_file";
    let file = |message: String| TelemetryError::File {
        key,
        path: path.display().to_string(),
        message,
    };
    let text = String::from_utf8(read(key, path)?).map_err(|e| file(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file(crate::config::secret::toml_error(&text, &e)))?;
    table
        .into_iter()
        .map(|(name, value)| {
            let toml::Value::String(value) = value else {
                return Err(file(format!("header {name:?}: the value must be a string")));
            };
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || name.bytes().any(|b| b.is_ascii_uppercase())
            {
                return Err(file(format!(
                    "{name:?} is not a lowercase HTTP header name"
                )));
            }
            if http::HeaderValue::from_str(&value).is_err() {
                return Err(file(format!("header {name:?}: not a valid header value")));
            }
            Ok((name, value))
        })
        .collect()
}
