//! Client trust that reaches open connections. rustls verifies a client's certificate chain once,
//! at the handshake; a reload that changes the client CA or the CRLs would otherwise apply to new
//! handshakes only, and a revoked client could stay connected for as long as it likes. So each
//! loaded config's verifier is published on a `watch`, and every connection whose client
//! presented a chain re-verifies it when (and only when) the published trust changes: nothing is
//! done per call.

use std::sync::Arc;

use ring::digest::{Context, Digest, SHA256};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// What a loaded config trusts in client certificates: its verifier, and a digest of what the
/// verifier was built from (the client CA's certificates and the CRLs, or the missing file that
/// makes it refuse all), so that a reload leaving them as they were re-checks no connection.
#[derive(Debug, Clone)]
pub struct ClientTrust {
    verifier: Arc<dyn ClientCertVerifier>,
    digest: Digest,
}

impl ClientTrust {
    pub(super) fn new(verifier: Arc<dyn ClientCertVerifier>, digest: Digest) -> Self {
        Self { verifier, digest }
    }

    pub(super) fn verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.verifier
    }
}

/// Builds the digest of a [`ClientTrust`] from the DER items it was made of.
pub(super) struct TrustDigest(Context);

impl TrustDigest {
    pub(super) fn new() -> Self {
        Self(Context::new(&SHA256))
    }

    /// Adds one item; `kind` and the length keep a CA certificate and a CRL, or two adjacent
    /// items and one longer one, from ever digesting alike.
    pub(super) fn add(&mut self, kind: u8, der: &[u8]) {
        self.0.update(&[kind]);
        self.0.update(&(der.len() as u64).to_be_bytes());
        self.0.update(der);
    }

    pub(super) fn finish(self) -> Digest {
        self.0.finish()
    }
}

/// The client trust of the current config, seen by the connections that follow it.
pub type TrustWatch = watch::Receiver<ClientTrust>;

/// Makes `trust` current for the connections following `current`: they are told only when it
/// differs from the trust in force, so rotating the server's own certificate re-checks nothing.
pub(super) fn publish(current: &watch::Sender<ClientTrust>, trust: ClientTrust) {
    current.send_if_modified(|in_force| {
        let changed = in_force.digest.as_ref() != trust.digest.as_ref();
        if changed {
            *in_force = trust;
        }
        changed
    });
}

/// The certificate chain a client presented at its handshake, kept to verify it again when the
/// client trust changes.
#[derive(Debug)]
pub struct PresentedChain {
    /// The end-entity certificate first, then the intermediates; never empty.
    certs: Vec<CertificateDer<'static>>,
    trust: TrustWatch,
}

impl PresentedChain {
    /// `None` when the client presented no certificate.
    pub fn new(certs: &[CertificateDer<'_>], trust: TrustWatch) -> Option<Self> {
        (!certs.is_empty()).then(|| Self {
            certs: certs.iter().map(|c| c.clone().into_owned()).collect(),
            trust,
        })
    }

    /// Waits for a change of client trust under which the chain no longer verifies (now: a
    /// certificate that expired since the handshake fails too), and returns the verifier's
    /// reason. Pending for as long as every change still verifies it, and for ever once no
    /// change can come.
    pub async fn distrusted(&mut self) -> rustls::Error {
        loop {
            if self.trust.changed().await.is_err() {
                return std::future::pending().await;
            }
            // Not verified under the borrow: it would hold up the next reload's publication.
            let verifier = Arc::clone(self.trust.borrow_and_update().verifier());
            let (end_entity, intermediates) = self.certs.split_first().expect("never empty");
            if let Err(reason) =
                verifier.verify_client_cert(end_entity, intermediates, UnixTime::now())
            {
                return reason;
            }
        }
    }

    /// The end-entity certificate's subject (RFC 4514), for the log.
    pub fn subject(&self) -> String {
        X509Certificate::from_der(&self.certs[0])
            .map_or_else(|_| "?".to_owned(), |(_, cert)| cert.subject().to_string())
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::{RootCertStore, server::WebPkiClientVerifier};

    use super::*;

    /// A trust whose digest is made of `items`, with a verifier of some CA: only the digest tells
    /// trusts apart.
    fn trust(items: &[&[u8]]) -> ClientTrust {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::transport::tls::provider(),
        )
        .build()
        .unwrap();
        let mut digest = TrustDigest::new();
        for item in items {
            digest.add(1, item);
        }
        ClientTrust::new(verifier, digest.finish())
    }

    #[test]
    fn open_connections_hear_of_a_trust_only_when_it_differs() {
        let (current, mut seen) = watch::channel(trust(&[b"ca", b"crl"]));
        publish(&current, trust(&[b"ca", b"crl"]));
        assert!(!seen.has_changed().unwrap(), "the same files again");
        publish(&current, trust(&[b"cac", b"rl"]));
        assert!(seen.has_changed().unwrap(), "other files");
        seen.borrow_and_update();
        publish(&current, trust(&[b"cac", b"rl"]));
        assert!(!seen.has_changed().unwrap());
    }
}
