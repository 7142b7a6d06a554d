//! Certificate revocation lists for the client CA (`tls.client_crl_files`): a client certificate
//! a CRL revokes is refused at the handshake, next to one that is not; a CRL rewritten while the
//! server runs takes effect, a garbage one keeps the previous lists, a deleted one refuses every
//! client certificate. A CRL or client CA reloaded while clients are connected closes the
//! connections whose certificate it no longer trusts, and no other. The CA, certificates and CRLs
//! are made here with rcgen, signed by the CA's own key as a real CA's are.

use std::{net::SocketAddr, path::Path};

use greeter::{
    config::Config,
    pb::{HelloReply, HelloRequest, greeter_client::GreeterClient},
    server::Server,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SerialNumber, date_time_ymd,
};
use tokio::sync::mpsc;
use tonic::{
    Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::common::{
    TestServer, config_with, metric, reloads, tls_channel, wait_for_metric, wait_for_reloads,
};

const GOOD: u64 = 1001;
const REVOKED: u64 = 1002;

struct Ca {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    clients: Vec<(u64, String, String)>,
}

impl Ca {
    fn new() -> Self {
        Self::named("crl test CA")
    }

    fn named(cn: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut ca = Self {
            dir,
            issuer,
            clients: Vec::new(),
        };
        let (server_cert, server_key) =
            ca.leaf(1, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        ca.write("server.pem", &server_cert);
        ca.write("server.key", &server_key);
        ca.write("ca.pem", &ca.issuer.pem());
        for serial in [GOOD, REVOKED] {
            let (cert, key) = ca.leaf(
                serial,
                &format!("client-{serial}"),
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            ca.clients.push((serial, cert, key));
        }
        ca
    }

    fn leaf(&self, serial: u64, cn: &str, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![cn.to_owned()]).unwrap();
        params.distinguished_name = name(cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_owned()
    }

    /// Writes `file` atomically (rename), as deploy tools and Kubernetes do.
    fn write(&self, file: &str, text: &str) {
        let tmp = self.dir.path().join(format!("{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.dir.path().join(file)).unwrap();
    }

    /// A CRL of this CA revoking `serials`, written to `ca.crl`.
    fn publish_crl(&self, number: u64, serials: &[u64]) {
        self.write("ca.crl", &Self::crl(&self.issuer, number, serials));
    }

    /// A CRL revoking `serials`, signed by `issuer`.
    fn crl(issuer: &CertifiedIssuer<'static, KeyPair>, number: u64, serials: &[u64]) -> String {
        let crl = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: date_time_ymd(2024, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .unwrap();
        crl.pem().unwrap()
    }

    /// A config serving TLS with this CA's server certificate, requiring client certificates
    /// of this CA and checking them against `ca.crl`.
    fn config(&self) -> Config {
        let mut config = config_with(self.overrides());
        config.tls.client_crl_files = vec![self.path("ca.crl").into()];
        config
    }

    fn overrides(&self) -> Vec<(String, String)> {
        vec![
            ("tls.enabled".into(), "true".into()),
            ("tls.cert".into(), self.path("server.pem")),
            ("tls.key".into(), self.path("server.key")),
            ("tls.client_ca".into(), self.path("ca.pem")),
            ("tls.client_auth".into(), "required".into()),
            ("tls.reload_interval".into(), "50ms".into()),
        ]
    }

    fn client(&self, serial: u64) -> ClientTlsConfig {
        self.client_of(serial, self)
    }

    /// This CA's client certificate `serial`, for a server whose certificate `server`'s CA signed.
    fn client_of(&self, serial: u64, server: &Ca) -> ClientTlsConfig {
        let (_, cert, key) = self.clients.iter().find(|(s, ..)| *s == serial).unwrap();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(server.issuer.pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key))
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

/// A SayHello with the client certificate `serial`: the greeting, or the error at the bottom of
/// the chain (TLS 1.3 reports a refused client certificate with the first call, as the server's
/// alert).
async fn hello_as(addr: SocketAddr, ca: &Ca, serial: u64) -> Result<String, String> {
    hello_as_of(addr, ca, ca, serial).await
}

/// [`hello_as`] with `ca`'s client certificate `serial`, to a server whose certificate `server`'s
/// CA signed.
async fn hello_as_of(
    addr: SocketAddr,
    ca: &Ca,
    server: &Ca,
    serial: u64,
) -> Result<String, String> {
    let error: Box<dyn std::error::Error> =
        match tls_channel(addr, ca.client_of(serial, server)).await {
            Ok(channel) => match GreeterClient::new(channel)
                .say_hello(HelloRequest { name: "crl".into() })
                .await
            {
                Ok(reply) => return Ok(reply.into_inner().message),
                Err(status) => Box::new(status),
            },
            Err(error) => Box::new(error),
        };
    let mut source: &dyn std::error::Error = error.as_ref();
    while let Some(next) = source.source() {
        source = next;
    }
    Err(source.to_string())
}

const REVOKED_ALERT: &str = "received fatal alert: CertificateRevoked";

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_at_the_handshake() {
    let ca = Ca::new();
    ca.publish_crl(1, &[REVOKED]);
    let server = TestServer::start_with(ca.config()).await;
    assert_eq!(
        hello_as(server.addr, &ca, GOOD).await.as_deref(),
        Ok("Hello, crl!")
    );
    assert_eq!(
        hello_as(server.addr, &ca, REVOKED).await,
        Err(REVOKED_ALERT.to_owned())
    );
    // Refused, and the server serves on.
    assert!(hello_as(server.addr, &ca, GOOD).await.is_ok());
}

#[tokio::test]
async fn a_certificate_of_a_client_ca_without_a_crl_is_refused() {
    // Two client CAs, a CRL for one: the other's certificates have no known revocation status.
    // (Names apart, so the CRL cannot be taken for the other CA's.)
    let (listed, unlisted) = (Ca::new(), Ca::named("crl test CA without a CRL"));
    listed.write(
        "ca.pem",
        &format!("{}{}", listed.issuer.pem(), unlisted.issuer.pem()),
    );
    listed.publish_crl(1, &[]);
    let server = TestServer::start_with(listed.config()).await;
    assert_eq!(
        hello_as(server.addr, &listed, GOOD).await.as_deref(),
        Ok("Hello, crl!")
    );
    // rustls reports an unknown status as it does an unknown issuer ...
    assert_eq!(
        hello_as_of(server.addr, &unlisted, &listed, GOOD).await,
        Err("received fatal alert: UnknownCA".to_owned())
    );
    // ... but the issuer is trusted: without revocation lists the certificate is served.
    let without_crls = TestServer::start_with(config_with(listed.overrides())).await;
    assert_eq!(
        hello_as_of(without_crls.addr, &unlisted, &listed, GOOD)
            .await
            .as_deref(),
        Ok("Hello, crl!")
    );
}

#[tokio::test]
async fn a_crl_not_signed_by_its_ca_is_refused() {
    // The impostor has the CA's name but a key of its own: its CRL (revoking nothing) is not the
    // CA's, so no certificate of the CA has a known status.
    let (ca, impostor) = (Ca::new(), Ca::new());
    ca.write("ca.crl", &Ca::crl(&impostor.issuer, 1, &[]));
    let server = TestServer::start_with(ca.config()).await;
    let refused = hello_as(server.addr, &ca, GOOD).await;
    assert_eq!(
        refused,
        Err("received fatal alert: HandshakeFailure".to_owned())
    );
    // The CA's own CRL, and the same certificate is served.
    ca.publish_crl(2, &[]);
    wait_for_reloads(server.metrics_addr.unwrap(), "tls", "success", 1.0).await;
    assert!(hello_as(server.addr, &ca, GOOD).await.is_ok());
}

#[tokio::test]
async fn crls_reload_while_serving_and_a_deleted_one_refuses_every_certificate() {
    let ca = Ca::new();
    ca.publish_crl(1, &[]);
    let server = TestServer::start_with(ca.config()).await;
    let metrics = server.metrics_addr.unwrap();
    assert!(hello_as(server.addr, &ca, REVOKED).await.is_ok());

    ca.publish_crl(2, &[REVOKED]);
    wait_for_reloads(metrics, "tls", "success", 1.0).await;
    assert_eq!(
        hello_as(server.addr, &ca, REVOKED).await,
        Err(REVOKED_ALERT.to_owned())
    );

    // A file that does not load keeps the lists in force.
    ca.write(
        "ca.crl",
        "-----BEGIN X509 CRL-----\nZ2FyYmFnZQ==\n-----END X509 CRL-----\n",
    );
    wait_for_reloads(metrics, "tls", "failure", 1.0).await;
    assert_eq!(
        hello_as(server.addr, &ca, REVOKED).await,
        Err(REVOKED_ALERT.to_owned())
    );
    assert!(hello_as(server.addr, &ca, GOOD).await.is_ok());

    // A file that is gone must not un-revoke: no client certificate is accepted until it is back.
    std::fs::remove_file(ca.path("ca.crl")).unwrap();
    wait_for_reloads(metrics, "tls", "revoked", 1.0).await;
    assert_eq!(
        hello_as(server.addr, &ca, GOOD).await,
        Err("received fatal alert: HandshakeFailure".to_owned())
    );
    ca.publish_crl(3, &[REVOKED]);
    wait_for_reloads(metrics, "tls", "success", 2.0).await;
    assert!(hello_as(server.addr, &ca, GOOD).await.is_ok());
    assert_eq!(reloads(metrics, "tls", "revoked").await, 1.0);
}

#[tokio::test]
async fn a_missing_or_bad_crl_stops_startup_naming_the_file() {
    let ca = Ca::new();
    let error = Server::bind(ca.config()).await.err().unwrap();
    let message = error.to_string();
    assert!(message.contains(&ca.path("ca.crl")), "{message}");
    assert!(message.contains("cannot read"), "{message}");

    ca.write("ca.crl", &ca.issuer.pem());
    let error = Server::bind(ca.config()).await.err().unwrap();
    let message = error.to_string();
    assert!(
        message.contains("not a certificate revocation list (tls.client_crl_files)"),
        "{message}"
    );
    assert!(message.contains("no X509 CRL block"), "{message}");
    assert!(Path::new(&ca.path("ca.crl")).exists());
}

const REVOKED_TOTAL: &str = "greeter_tls_connections_revoked_total";
const OPEN: &str = "greeter_connections_open";
const ACCEPTED: &str = "greeter_connections_accepted_total";

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

/// A bidi stream held open on a channel's connection: one greeting per name sent.
struct OpenStream {
    names: mpsc::Sender<HelloRequest>,
    replies: Streaming<HelloReply>,
}

impl OpenStream {
    async fn open(channel: Channel) -> Self {
        let (names, rx) = mpsc::channel(1);
        let replies = GreeterClient::new(channel)
            .say_hello_bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the stream opens")
            .into_inner();
        Self { names, replies }
    }

    /// The greeting, or what ended the stream instead.
    async fn greet(&mut self, name: &str) -> Result<String, String> {
        // A stream already cut short takes no more names: the read below says how it ended.
        let _ = self.names.send(hello(name)).await;
        match self.replies.message().await {
            Ok(Some(reply)) => Ok(reply.message),
            Ok(None) => Err("the stream ended without a reply".into()),
            Err(status) => Err(format!("{status:?}")),
        }
    }

    /// Ends the stream from the client's side; the server's end must be a clean OK.
    async fn finish(mut self) {
        drop(self.names);
        let end = self.replies.message().await;
        assert!(matches!(end, Ok(None)), "{end:?}");
    }
}

#[tokio::test]
async fn a_crl_reloaded_while_connected_closes_the_revoked_connection_and_no_other() {
    let ca = Ca::new();
    ca.publish_crl(1, &[]);
    let server = TestServer::start_with(ca.config()).await;
    let metrics = server.metrics_addr.unwrap();
    let good = tls_channel(server.addr, ca.client(GOOD)).await.unwrap();
    let revoked = tls_channel(server.addr, ca.client(REVOKED)).await.unwrap();
    let mut good_stream = OpenStream::open(good.clone()).await;
    let mut revoked_stream = OpenStream::open(revoked.clone()).await;
    for stream in [&mut good_stream, &mut revoked_stream] {
        assert_eq!(
            stream.greet("before").await.as_deref(),
            Ok("Hello, before!")
        );
    }
    assert_eq!(metric(metrics, OPEN).await, 2.0);

    ca.publish_crl(2, &[REVOKED]);
    wait_for_metric(metrics, REVOKED_TOTAL, 1.0).await;
    // GOAWAY: the call in flight finishes, then the connection is closed...
    assert_eq!(
        revoked_stream.greet("in flight").await.as_deref(),
        Ok("Hello, in flight!")
    );
    revoked_stream.finish().await;
    wait_for_metric(metrics, OPEN, 1.0).await;
    // ... and the client's next call needs a new handshake, which the CRL refuses.
    let refused = GreeterClient::new(revoked)
        .say_hello(hello("after"))
        .await
        .expect_err("a revoked certificate is not served again");
    assert!(
        format!("{refused:?}").contains(REVOKED_ALERT),
        "{refused:?}"
    );

    // The sibling keeps its connection and its stream.
    assert_eq!(
        good_stream.greet("after").await.as_deref(),
        Ok("Hello, after!")
    );
    let reply = GreeterClient::new(good).say_hello(hello("after")).await;
    assert_eq!(reply.unwrap().into_inner().message, "Hello, after!");
    good_stream.finish().await;
    assert_eq!(
        metric(metrics, ACCEPTED).await,
        2.0,
        "no connection was made again"
    );
    assert_eq!(metric(metrics, REVOKED_TOTAL).await, 1.0);
}

#[tokio::test]
async fn a_revoked_connection_whose_call_does_not_finish_is_closed_after_the_grace() {
    let ca = Ca::new();
    ca.publish_crl(1, &[]);
    let mut config = ca.config();
    config.connection.max_age_grace = std::time::Duration::from_millis(300);
    let server = TestServer::start_with(config).await;
    let metrics = server.metrics_addr.unwrap();
    let revoked = tls_channel(server.addr, ca.client(REVOKED)).await.unwrap();
    let mut stream = OpenStream::open(revoked).await;
    assert_eq!(
        stream.greet("before").await.as_deref(),
        Ok("Hello, before!")
    );

    ca.publish_crl(2, &[REVOKED]);
    // The client never ends its stream: the grace does, with the connection.
    wait_for_metric(metrics, REVOKED_TOTAL, 1.0).await;
    wait_for_metric(metrics, OPEN, 0.0).await;
    let cut = stream.greet("late").await;
    assert!(cut.is_err(), "{cut:?}");
}

#[tokio::test]
async fn a_client_ca_replaced_while_connected_closes_the_connections_it_no_longer_verifies() {
    let (kept, dropped) = (Ca::new(), Ca::new());
    kept.write(
        "ca.pem",
        &format!("{}{}", kept.issuer.pem(), dropped.issuer.pem()),
    );
    let server = TestServer::start_with(config_with(kept.overrides())).await;
    let metrics = server.metrics_addr.unwrap();
    let stays = tls_channel(server.addr, kept.client(GOOD)).await.unwrap();
    let goes = tls_channel(server.addr, dropped.client_of(GOOD, &kept))
        .await
        .unwrap();
    for channel in [&stays, &goes] {
        let reply = GreeterClient::new(channel.clone())
            .say_hello(hello("before"))
            .await;
        assert_eq!(reply.unwrap().into_inner().message, "Hello, before!");
    }

    kept.write("ca.pem", &kept.issuer.pem());
    wait_for_metric(metrics, REVOKED_TOTAL, 1.0).await;
    // No call in flight: closed at once.
    wait_for_metric(metrics, OPEN, 1.0).await;
    let refused = GreeterClient::new(goes)
        .say_hello(hello("after"))
        .await
        .expect_err("a certificate of a CA no longer trusted is not served again");
    assert!(
        format!("{refused:?}").contains("received fatal alert"),
        "{refused:?}"
    );
    let reply = GreeterClient::new(stays).say_hello(hello("after")).await;
    assert_eq!(reply.unwrap().into_inner().message, "Hello, after!");
    assert_eq!(
        metric(metrics, ACCEPTED).await,
        2.0,
        "no connection was made again"
    );
}
