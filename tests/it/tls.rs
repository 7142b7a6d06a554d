//! TLS and mTLS with real certificates on real files, real handshakes, and rotation while calls
//! are running.

use crate::common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{
    Pki, TestServer, config_with, generate_pki, metric, reloads, tls_channel, wait_for_metric,
    wait_for_reloads,
};
use greeter::{
    pb::{HelloRequest, greeter_client::GreeterClient},
    server::{Server, ServerError},
    transport::tls::TlsError,
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tonic::transport::Channel;

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

async fn greet(channel: Channel) -> Result<String, tonic::Status> {
    let reply = GreeterClient::new(channel).say_hello(hello("tls")).await?;
    Ok(reply.into_inner().message)
}

#[tokio::test]
async fn tls_calls_work_and_plaintext_is_refused() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;

    let channel = tls_channel(server.addr, pki.client_tls(false))
        .await
        .unwrap();
    assert_eq!(greet(channel).await.unwrap(), "Hello, tls!");

    // A plaintext HTTP/2 client is answered with a fatal TLS alert (decode_error) and EOF, and
    // the failed handshake is counted.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    const ALERT: u8 = 21;
    const FATAL: u8 = 2;
    const DECODE_ERROR: u8 = 50;
    assert_eq!(answer, [ALERT, 3, 3, 0, 2, FATAL, DECODE_ERROR]);
    let failures = common::scrape(server.metrics_addr.unwrap()).await;
    assert!(
        failures.contains("greeter_tls_handshake_failures_total{reason=\"error\"} 1\n"),
        "{failures}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_by_the_client() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;
    let other = generate_pki("someone");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&other.ca_cert))
        .domain_name("localhost");
    let err = tls_channel(server.addr, tls).await.unwrap_err();
    let chain = format!("{err:?}");
    assert!(chain.contains("InvalidCertificate"), "{chain}");
}

fn mtls_overrides(pki: &Pki, mode: &str) -> Vec<(String, String)> {
    let mut overrides = pki.tls_overrides();
    overrides.push(("tls.client_ca".into(), pki.path("ca.pem")));
    overrides.push(("tls.client_auth".into(), mode.into()));
    overrides
}

#[tokio::test]
async fn mtls_required_refuses_missing_and_foreign_client_certificates() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(mtls_overrides(&pki, "required"))).await;

    let channel = tls_channel(server.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(greet(channel).await.unwrap(), "Hello, tls!");

    assert_eq!(
        refusal(server.addr, pki.client_tls(false)).await,
        "received fatal alert: CertificateRequired"
    );

    // The stranger's CA has the same name as ours, so the server finds an issuer by name whose
    // signature does not verify.
    let stranger = generate_pki("stranger");
    let foreign = pki
        .client_tls(false)
        .identity(tonic::transport::Identity::from_pem(
            &stranger.client_cert,
            &stranger.client_key,
        ));
    assert_eq!(
        refusal(server.addr, foreign).await,
        "received fatal alert: DecryptError"
    );

    // The server refused the two handshakes and kept serving.
    let channel = tls_channel(server.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(greet(channel).await.unwrap(), "Hello, tls!");
}

/// How the server refuses a TLS client: the error at the bottom of the chain, from connecting or
/// (TLS 1.3 reports a refused client certificate after the handshake) from the first call.
async fn refusal(addr: SocketAddr, tls: tonic::transport::ClientTlsConfig) -> String {
    let error: Box<dyn std::error::Error> = match tls_channel(addr, tls).await {
        Ok(channel) => Box::new(greet(channel).await.unwrap_err()),
        Err(error) => Box::new(error),
    };
    let mut source: &dyn std::error::Error = error.as_ref();
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

#[tokio::test]
async fn mtls_optional_admits_clients_with_and_without_certificates() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(mtls_overrides(&pki, "optional"))).await;
    for with_cert in [true, false] {
        let channel = tls_channel(server.addr, pki.client_tls(with_cert))
            .await
            .unwrap();
        assert_eq!(
            greet(channel).await.unwrap(),
            "Hello, tls!",
            "with_cert={with_cert}"
        );
    }
}

/// Runs `openssl s_client` limited to one protocol version; true when the handshake succeeded.
fn openssl_handshake(addr: SocketAddr, version_flag: &str, ca: &str) -> bool {
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), version_flag])
        // Let the client offer old protocols at all, so a refusal is the server's.
        .args([
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-CAfile",
            ca,
            "-alpn",
            "h2",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (scripts/install-tools installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    output.status.success() && text.contains("Verify return code: 0 (ok)")
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_spoken() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;
    let (addr, ca) = (server.addr, pki.path("ca.pem"));
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1_3", "-tls1_2", "-tls1_1", "-tls1"]
            .map(|flag| (flag, openssl_handshake(addr, flag, &ca)))
    })
    .await
    .unwrap();
    assert_eq!(
        results,
        [
            ("-tls1_3", true),
            ("-tls1_2", true),
            ("-tls1_1", false),
            ("-tls1", false)
        ]
    );
}

#[tokio::test]
async fn startup_errors_name_the_file_and_the_problem() {
    let pki = Pki::new();
    let other = generate_pki("x");
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("garbage.pem"), "not a certificate").unwrap();
    std::fs::write(path("other.key"), &other.server_key).unwrap();
    let expired = greeter::certs::DevPki::generate(&greeter::certs::PkiOptions {
        hosts: vec!["localhost".into()],
        client_name: "c".into(),
        not_before: std::time::SystemTime::now() - Duration::from_secs(10 * 86_400),
        not_after: std::time::SystemTime::now() - Duration::from_secs(86_400),
    })
    .unwrap();
    std::fs::write(path("expired.pem"), &expired.server_cert).unwrap();
    std::fs::write(path("expired.key"), &expired.server_key).unwrap();

    type Case = (String, String, fn(&TlsError) -> bool);
    let cases: [Case; 4] = [
        (path("missing.pem"), pki.path("server.key"), |e| {
            matches!(e, TlsError::Read { .. })
        }),
        (path("garbage.pem"), pki.path("server.key"), |e| {
            matches!(e, TlsError::Pem { .. })
        }),
        (pki.path("server.pem"), path("other.key"), |e| {
            matches!(e, TlsError::KeyMismatch { .. })
        }),
        (path("expired.pem"), path("expired.key"), |e| {
            matches!(e, TlsError::Expired { .. })
        }),
    ];
    for (cert, key, expected) in cases {
        let mut overrides = pki.tls_overrides();
        overrides.retain(|(k, _)| k != "tls.cert" && k != "tls.key");
        overrides.push(("tls.cert".into(), cert.clone()));
        overrides.push(("tls.key".into(), key.clone()));
        let Err(ServerError::Tls(error)) = Server::bind(config_with(overrides)).await else {
            panic!("{cert} + {key} must be refused");
        };
        assert!(expected(&error), "{cert} + {key}: {error}");
        let message = error.to_string();
        assert!(
            message.contains(&cert) || message.contains(&key),
            "names the file: {message}"
        );
    }
}

/// The serial of the certificate a fresh TLS connection to `addr` is given.
async fn served_serial(addr: SocketAddr, ca_pem: &str) -> String {
    let leaf = CertificateDer::from(served_leaf(addr, ca_pem).await);
    greeter::transport::tls::summarize("served".as_ref(), &leaf, std::time::SystemTime::now())
        .unwrap()
        .serial
}

async fn wait_for_serial(addr: SocketAddr, ca: &str, serial: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_serial(addr, ca).await != serial {
        assert!(
            Instant::now() < deadline,
            "new certificate not served within 10s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn certificates_rotate_without_failing_a_call_and_garbage_is_refused() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;
    let ca = pki.pki.ca_cert.clone();
    let first_serial = served_serial(server.addr, &ca).await;

    // Load during the swap: a bidi stream and a loop of unary calls on one connection each.
    let channel = tls_channel(server.addr, pki.client_tls(false))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let unary = {
        let (channel, stop, ok, failed) =
            (channel.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut client = GreeterClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                match client.say_hello(hello("rotating")).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut bidi = GreeterClient::new(channel.clone())
        .say_hello_bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(hello("before")).await.unwrap();
    assert_eq!(
        bidi.message().await.unwrap().unwrap().message,
        "Hello, before!"
    );

    // Rotate to a certificate from a new CA, the harder case: open connections keep the material
    // they shook hands with, new connections (trusting both CAs) get the new serial.
    let renewed = greeter::certs::DevPki::generate(&greeter::certs::PkiOptions::valid_for_days(
        vec!["localhost".into()],
        "c".into(),
        30,
    ))
    .unwrap();
    std::fs::write(pki.path("server.key"), &renewed.server_key).unwrap();
    std::fs::write(pki.path("server.pem"), &renewed.server_cert).unwrap();
    let both_cas = format!("{ca}{}", renewed.ca_cert);
    wait_for_serial(
        server.addr,
        &both_cas,
        &served_serial_of(&renewed.server_cert),
    )
    .await;
    assert_ne!(first_serial, served_serial_of(&renewed.server_cert));

    // The open stream and connection kept working through the swap.
    tx.send(hello("after")).await.unwrap();
    assert_eq!(
        bidi.message().await.unwrap().unwrap().message,
        "Hello, after!"
    );

    // Garbage: refused (counted as a failed reload), the renewed certificate keeps serving.
    let metrics = server.metrics_addr.unwrap();
    // (Writing key and certificate one after the other may already have failed a reload.)
    let failures = reloads(metrics, "tls", "failure").await;
    std::fs::write(
        pki.path("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .unwrap();
    wait_for_reloads(metrics, "tls", "failure", failures + 1.0).await;
    assert_eq!(
        served_serial(server.addr, &both_cas).await,
        served_serial_of(&renewed.server_cert)
    );

    stop.store(true, Ordering::Relaxed);
    unary.await.unwrap();
    drop(tx);
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed during rotation"
    );
}

fn served_serial_of(cert_pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    greeter::transport::tls::summarize("renewed".as_ref(), &der, std::time::SystemTime::now())
        .unwrap()
        .serial
}

/// The leaf certificate (DER) a fresh TLS connection to `addr` is given, trusting `ca_pem`.
async fn served_leaf(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(greeter::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(cert_pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn say_hello_with(channel: &Channel, token: &str) -> Result<String, tonic::Code> {
    let mut request = tonic::Request::new(hello("hup"));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    GreeterClient::new(channel.clone())
        .say_hello(request)
        .await
        .map(|reply| reply.into_inner().message)
        .map_err(|status| status.code())
}

#[tokio::test]
async fn sighup_reloads_certificates_and_tokens_at_once() {
    let pki = Pki::new();
    let tokens = pki.dir.path().join("tokens.toml");
    let entry = |token: &str| {
        greeter::call::auth::entry_toml(&greeter::call::auth::entry_for(
            token,
            token,
            &["greeter".into()],
        ))
    };
    std::fs::write(&tokens, entry("first")).unwrap();
    let config = pki.dir.path().join("server.toml");
    // Reload intervals of an hour: within this test only SIGHUP can explain a reload.
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\n\
             [tls]\nenabled = true\ncert = {:?}\nkey = {:?}\nreload_interval = \"1h\"\n\
             [auth]\nenabled = true\ntokens_file = {:?}\nreload_interval = \"1h\"\n",
            pki.path("server.pem"),
            pki.path("server.key"),
            tokens.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = common::BinaryServer::start(&config, &[]);
    let metrics = server.metrics_addr.unwrap();
    let channel = tls_channel(server.addr, pki.client_tls(false))
        .await
        .unwrap();
    assert_eq!(
        say_hello_with(&channel, "first").await,
        Ok("Hello, hup!".into())
    );

    // New files: a certificate from a new CA and a token set with "second" only.
    let renewed = generate_pki("renewed");
    std::fs::write(pki.path("server.key"), &renewed.server_key).unwrap();
    std::fs::write(pki.path("server.pem"), &renewed.server_cert).unwrap();
    std::fs::write(&tokens, entry("second")).unwrap();
    let both_cas = format!("{}{}", pki.pki.ca_cert, renewed.ca_cert);
    // Without the signal nothing changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served_leaf(server.addr, &both_cas).await,
        der_of(&pki.pki.server_cert)
    );
    assert_eq!(
        say_hello_with(&channel, "second").await,
        Err(tonic::Code::Unauthenticated)
    );

    let hup = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for_reloads(metrics, "tls", "success", 1.0).await;
    wait_for_reloads(metrics, "tokens", "success", 1.0).await;
    assert_eq!(
        served_leaf(server.addr, &both_cas).await,
        der_of(&renewed.server_cert)
    );
    // The open connection keeps its certificate and sees the new tokens.
    assert_eq!(
        say_hello_with(&channel, "second").await,
        Ok("Hello, hup!".into())
    );
    assert_eq!(
        say_hello_with(&channel, "first").await,
        Err(tonic::Code::Unauthenticated)
    );
}

#[tokio::test]
async fn reload_refuses_a_mismatched_key_and_an_expired_certificate() {
    let pki = Pki::new();
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;
    let metrics = server.metrics_addr.unwrap();
    let original = der_of(&pki.pki.server_cert);
    let expired = greeter::certs::DevPki::generate(&greeter::certs::PkiOptions {
        hosts: vec!["localhost".into()],
        client_name: "c".into(),
        not_before: std::time::SystemTime::now() - Duration::from_secs(10 * 86_400),
        not_after: std::time::SystemTime::now() - Duration::from_secs(86_400),
    })
    .unwrap();
    let all_cas = format!("{}{}", pki.pki.ca_cert, expired.ca_cert);
    // Served: the reloader has taken its first look at the files (it does when serving starts).
    assert_eq!(served_leaf(server.addr, &all_cas).await, original);

    // One file at a time, each change refused before the next: the certificate in force with
    // another key, then the expired certificate with its own key (a matching, expired pair).
    std::fs::write(pki.path("server.key"), &expired.server_key).unwrap();
    wait_for_reloads(metrics, "tls", "failure", 1.0).await;
    assert_eq!(served_leaf(server.addr, &all_cas).await, original);
    std::fs::write(pki.path("server.pem"), &expired.server_cert).unwrap();
    wait_for_reloads(metrics, "tls", "failure", 2.0).await;
    assert_eq!(served_leaf(server.addr, &all_cas).await, original);
    assert_eq!(reloads(metrics, "tls", "success").await, 0.0);

    // A valid pair is taken: the refusals were about the material, not the reloader.
    let renewed = generate_pki("renewed");
    std::fs::write(pki.path("server.key"), &renewed.server_key).unwrap();
    std::fs::write(pki.path("server.pem"), &renewed.server_cert).unwrap();
    wait_for_reloads(metrics, "tls", "success", 1.0).await;
    let all_cas = format!("{all_cas}{}", renewed.ca_cert);
    assert_eq!(
        served_leaf(server.addr, &all_cas).await,
        der_of(&renewed.server_cert)
    );
}

/// Writes `pki`'s server pair as a Kubernetes Secret volume revision: a timestamped directory
/// that `..data` is then pointed at, atomically (rename of a new symlink over the old one).
fn secret_revision(volume: &std::path::Path, revision: &str, pki: &greeter::certs::DevPki) {
    let dir = volume.join(revision);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), &pki.server_cert).unwrap();
    std::fs::write(dir.join("tls.key"), &pki.server_key).unwrap();
    let staged = volume.join("..data_tmp");
    std::os::unix::fs::symlink(revision, &staged).unwrap();
    std::fs::rename(&staged, volume.join("..data")).unwrap();
}

#[tokio::test]
async fn a_kubernetes_secret_swapped_by_its_data_symlink_is_reloaded() {
    let volume = tempfile::tempdir().unwrap();
    let first = generate_pki("first");
    secret_revision(volume.path(), "..2026_01_01_00_00_00.1", &first);
    for file in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), volume.path().join(file)).unwrap();
    }
    let path = |file: &str| volume.path().join(file).to_str().unwrap().to_owned();
    let server = TestServer::start_with(config_with(vec![
        ("tls.enabled".into(), "true".into()),
        ("tls.cert".into(), path("tls.crt")),
        ("tls.key".into(), path("tls.key")),
        ("tls.reload_interval".into(), "50ms".into()),
    ]))
    .await;
    let second = generate_pki("second");
    let both_cas = format!("{}{}", first.ca_cert, second.ca_cert);
    assert_eq!(
        served_leaf(server.addr, &both_cas).await,
        der_of(&first.server_cert)
    );

    // The kubelet's update: the files the config names are the same symlinks throughout.
    secret_revision(volume.path(), "..2026_01_02_00_00_00.2", &second);
    wait_for_reloads(server.metrics_addr.unwrap(), "tls", "success", 1.0).await;
    assert_eq!(
        served_leaf(server.addr, &both_cas).await,
        der_of(&second.server_cert)
    );
    assert_eq!(
        reloads(server.metrics_addr.unwrap(), "tls", "failure").await,
        0.0
    );
}

/// A call over a new TLS connection: the greeting, or the error as text (TLS 1.3 clients learn
/// of a refused certificate with their first call, not from the handshake).
async fn greet_over_tls(
    addr: SocketAddr,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<String, String> {
    let channel = tls_channel(addr, tls).await.map_err(|e| format!("{e:?}"))?;
    greet(channel).await.map_err(|status| format!("{status:?}"))
}

/// While the client CA is deleted no certificate is trusted, but `client_auth` still decides
/// whether a client without one may connect: "required" refuses its handshake, "optional"
/// serves it (its call is then up to `auth`, off here).
#[tokio::test]
async fn a_deleted_client_ca_keeps_client_auth_required_or_optional() {
    for mode in ["required", "optional"] {
        let pki = Pki::new();
        let mut overrides = pki.tls_overrides();
        overrides.push(("tls.client_ca".into(), pki.path("ca.pem")));
        overrides.push(("tls.client_auth".into(), mode.into()));
        let server = TestServer::start_with(config_with(overrides)).await;
        std::fs::remove_file(pki.path("ca.pem")).unwrap();
        wait_for_reloads(server.metrics_addr.unwrap(), "tls", "revoked", 1.0).await;

        let certified = greet_over_tls(server.addr, pki.client_tls(true)).await;
        let certified = certified.expect_err("no certificate verifies without the CA");
        assert!(
            certified.contains("received fatal alert: HandshakeFailure"),
            "{mode}: {certified}"
        );
        let anonymous = greet_over_tls(server.addr, pki.client_tls(false)).await;
        if mode == "required" {
            let refused = anonymous.expect_err("a certificate is still required");
            assert!(
                refused.contains("received fatal alert: CertificateRequired"),
                "{mode}: {refused}"
            );
        } else {
            assert_eq!(anonymous.as_deref(), Ok("Hello, tls!"), "{mode}");
        }
    }
}

#[tokio::test]
async fn deleting_the_client_ca_closes_its_connections_and_refuses_certificates_until_it_is_back() {
    let pki = Pki::new();
    let mut overrides = pki.tls_overrides();
    overrides.push(("tls.client_ca".into(), pki.path("ca.pem")));
    overrides.push(("tls.client_auth".into(), "required".into()));
    let server = TestServer::start_with(config_with(overrides)).await;
    let metrics = server.metrics_addr.unwrap();
    let open = tls_channel(server.addr, pki.client_tls(true))
        .await
        .expect("a client certificate from the CA is accepted");

    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    std::fs::remove_file(pki.path("ca.pem")).unwrap();
    wait_for_reloads(metrics, "tls", "revoked", 1.0).await;
    // TLS 1.3: the client's handshake completes before the server checks its certificate, so
    // the refusal (the server's alert) arrives with the first call.
    let refused = match tls_channel(server.addr, pki.client_tls(true)).await {
        Err(e) => format!("{e:?}"),
        Ok(channel) => format!(
            "{:?}",
            GreeterClient::new(channel)
                .say_hello(hello("refused"))
                .await
                .expect_err("no client certificate verifies without the CA file")
        ),
    };
    eprintln!("client CA deleted: {refused}");
    assert!(
        refused.contains("received fatal alert: HandshakeFailure"),
        "{refused}"
    );
    assert_eq!(reloads(metrics, "tls", "failure").await, 0.0);
    // The connection made before is closed too (GOAWAY; no call in flight), and its client's
    // next call, on a new handshake, is refused.
    wait_for_metric(metrics, "greeter_tls_connections_revoked_total", 1.0).await;
    wait_for_metric(metrics, "greeter_connections_open", 0.0).await;
    let closed = GreeterClient::new(open)
        .say_hello(hello("kept"))
        .await
        .expect_err("the CA that verified the connection is gone");
    assert!(
        format!("{closed:?}").contains("received fatal alert: HandshakeFailure"),
        "{closed:?}"
    );

    std::fs::write(pki.path("ca.pem"), ca).unwrap();
    wait_for_reloads(metrics, "tls", "success", 1.0).await;
    let back = tls_channel(server.addr, pki.client_tls(true))
        .await
        .unwrap();
    GreeterClient::new(back)
        .say_hello(hello("back"))
        .await
        .expect("the CA is back: certificates are accepted again");
    assert_eq!(
        metric(metrics, "greeter_tls_connections_revoked_total").await,
        1.0
    );
}
