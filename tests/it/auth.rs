//! Token authentication and per-method policy against a real server, with a real tokens file that
//! is rewritten while the server runs.

use crate::{
    common,
    jwt::{self, K8S, Signer, write_jwks},
};

use std::time::{Duration, Instant};

use crate::common::{Pki, TestServer, config_with, reloads, tls_channel, wait_for_reloads};
use greeter::{
    call::auth,
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Tokens {
    dir: tempfile::TempDir,
}

impl Tokens {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> String {
        self.dir
            .path()
            .join("tokens.toml")
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// Rewrites the file with one entry per `(token, name, scopes)`, atomically (rename), as
    /// deploy tools and Kubernetes do.
    fn write(&self, entries: &[(&str, &str, &[&str])]) {
        let text: String = entries
            .iter()
            .map(|(token, name, scopes)| {
                let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
                auth::entry_toml(&auth::entry_for(token, name, &scopes)) + "\n"
            })
            .collect();
        self.write_raw(&text);
    }

    fn write_raw(&self, text: &str) {
        let tmp = self.dir.path().join("tokens.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.path()).unwrap();
    }

    fn overrides(&self) -> Vec<(String, String)> {
        vec![
            ("auth.enabled".into(), "true".into()),
            ("auth.tokens_file".into(), self.path()),
            ("auth.reload_interval".into(), "50ms".into()),
        ]
    }
}

pub async fn say_hello(channel: &Channel, authorization: Option<&str>) -> Result<String, Code> {
    let mut request = Request::new(HelloRequest { name: "you".into() });
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    GreeterClient::new(channel.clone())
        .say_hello(request)
        .await
        .map(|r| r.into_inner().message)
        .map_err(|s| s.code())
}

async fn list_services(channel: &Channel, authorization: Option<&str>) -> Result<(), Code> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let message = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut request = Request::new(tokio_stream::iter([message]));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(request)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    responses.message().await.map(|_| ()).map_err(|s| s.code())
}

#[tokio::test]
async fn every_refusal_has_its_exact_status_code() {
    let tokens = Tokens::new();
    tokens.write(&[
        ("grt_greeter", "app", &["greeter"]),
        ("grt_ops", "ops", &["reflection"]),
    ]);
    let server = TestServer::start_with(config_with(tokens.overrides())).await;
    let channel = server.channel().await;

    assert_eq!(
        say_hello(&channel, Some("Bearer grt_greeter")).await,
        Ok("Hello, you!".into())
    );
    assert_eq!(say_hello(&channel, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        say_hello(&channel, Some("Basic grt_greeter")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        say_hello(&channel, Some("grt_greeter")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_unknown")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_ops")).await,
        Err(Code::PermissionDenied)
    );

    assert_eq!(
        list_services(&channel, Some("Bearer grt_ops")).await,
        Ok(())
    );
    assert_eq!(
        list_services(&channel, None).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        list_services(&channel, Some("Bearer grt_greeter")).await,
        Err(Code::PermissionDenied)
    );

    // Health stays open: probes carry no credentials.
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
}

#[tokio::test]
async fn refusal_messages_never_echo_the_token() {
    let tokens = Tokens::new();
    tokens.write(&[("grt_greeter", "app", &["reflection"])]);
    let server = TestServer::start_with(config_with(tokens.overrides())).await;
    let mut client = GreeterClient::new(server.channel().await);
    for header in [
        "Bearer grt_secret_value",
        "Bearer grt_greeter",
        "Token grt_secret_value",
    ] {
        let mut request = Request::new(HelloRequest { name: "x".into() });
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let status = client.say_hello(request).await.unwrap_err();
        assert!(!status.message().contains("grt_"), "{}", status.message());
    }
}

pub async fn eventually(channel: &Channel, token: &str, expected: Result<String, Code>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let header = format!("Bearer {token}");
    loop {
        let got = say_hello(channel, Some(&header)).await;
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{token}: still {got:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn tokens_file_reloads_add_and_revoke_and_a_bad_file_keeps_the_old_set() {
    let tokens = Tokens::new();
    tokens.write(&[("grt_first", "first", &["greeter"])]);
    let server = TestServer::start_with(config_with(tokens.overrides())).await;
    let channel = server.channel().await;
    let hello = Ok("Hello, you!".to_owned());

    assert_eq!(
        say_hello(&channel, Some("Bearer grt_second")).await,
        Err(Code::Unauthenticated)
    );
    tokens.write(&[
        ("grt_first", "first", &["greeter"]),
        ("grt_second", "second", &["greeter"]),
    ]);
    eventually(&channel, "grt_second", hello.clone()).await;

    // The connection's last token is the one revoked: it must not be answered from the
    // connection's memory of it (call/auth/recent.rs) once the file no longer holds it.
    assert_eq!(say_hello(&channel, Some("Bearer grt_first")).await, hello);
    tokens.write(&[("grt_second", "second", &["greeter"])]);
    eventually(&channel, "grt_first", Err(Code::Unauthenticated)).await;

    // A broken file is refused (counted as a failed reload); the tokens in force stay in force.
    let metrics = server.metrics_addr.unwrap();
    assert_eq!(reloads(metrics, "tokens", "failure").await, 0.0);
    tokens
        .write_raw("[[tokens]]\nname = \"broken\"\nsha256 = \"not hex\"\nscopes = [\"greeter\"]\n");
    wait_for_reloads(metrics, "tokens", "failure", 1.0).await;
    assert_eq!(say_hello(&channel, Some("Bearer grt_second")).await, hello);
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_first")).await,
        Err(Code::Unauthenticated)
    );

    // A path that exists but cannot be read as a file is a failure too, not a deletion: only a
    // missing file revokes.
    std::fs::remove_file(tokens.path()).unwrap();
    std::fs::create_dir(tokens.path()).unwrap();
    wait_for_reloads(metrics, "tokens", "failure", 2.0).await;
    assert_eq!(reloads(metrics, "tokens", "revoked").await, 0.0);
    assert_eq!(say_hello(&channel, Some("Bearer grt_second")).await, hello);
}

#[tokio::test]
async fn mtls_and_tokens_combine_as_configured() {
    let pki = Pki::new();
    let tokens = Tokens::new();
    tokens.write(&[("grt_app", "app", &["greeter"])]);
    let mut overrides = pki.tls_overrides();
    overrides.extend(tokens.overrides());
    overrides.push(("tls.client_ca".into(), pki.path("ca.pem")));
    overrides.push(("tls.client_auth".into(), "required".into()));
    overrides.push(("auth.mode".into(), "both".into()));
    let server = TestServer::start_with(config_with(overrides.clone())).await;
    let channel = tls_channel(server.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_app")).await,
        Ok("Hello, you!".into())
    );
    assert_eq!(say_hello(&channel, None).await, Err(Code::Unauthenticated));

    // client_cert mode: the certificate alone authenticates, with auth.client_cert_scopes.
    overrides.retain(|(k, _)| k != "auth.mode" && k != "tls.client_auth");
    overrides.push(("auth.mode".into(), "client_cert".into()));
    overrides.push(("tls.client_auth".into(), "optional".into()));
    let config = {
        let mut config = config_with(overrides);
        config.auth.client_cert_scopes = vec!["greeter".into()];
        config
    };
    let server = TestServer::start_with(config).await;
    let with_cert = tls_channel(server.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(say_hello(&with_cert, None).await, Ok("Hello, you!".into()));
    let without = tls_channel(server.addr, pki.client_tls(false))
        .await
        .unwrap();
    assert_eq!(
        say_hello(&without, Some("Bearer grt_app")).await,
        Err(Code::Unauthenticated)
    );
}

#[tokio::test]
async fn a_common_name_cannot_pass_for_a_subject_of_more_attributes() {
    // One CN whose value reads like two attributes: rendered unescaped, it was the subject
    // `CN=alice, O=Admins` (RFC 4514 escaping makes it `CN=alice\, O=Admins`).
    let dir = tempfile::tempdir().unwrap();
    let forged = common::generate_pki("alice, O=Admins");
    forged.write(dir.path(), false).unwrap();
    let pki = Pki { dir, pki: forged };
    let server_granting = |subject: &str| {
        let mut overrides = pki.tls_overrides();
        overrides.push(("tls.client_ca".into(), pki.path("ca.pem")));
        overrides.push(("tls.client_auth".into(), "required".into()));
        overrides.push(("auth.enabled".into(), "true".into()));
        overrides.push(("auth.mode".into(), "client_cert".into()));
        let mut config = config_with(overrides);
        config.auth.cert_rules = vec![greeter::config::CertRule {
            uri: None,
            dns: None,
            subject: Some(subject.into()),
            scopes: vec!["greeter".into()],
        }];
        TestServer::start_with(config)
    };
    let admins = server_granting("CN=alice, O=Admins").await;
    let channel = tls_channel(admins.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(
        say_hello(&channel, None).await,
        Err(Code::PermissionDenied),
        "the forged certificate is not CN=alice, O=Admins"
    );
    // The certificate is its escaped self: a rule naming that grants it.
    let itself = server_granting(r"CN=alice\, O=Admins").await;
    let channel = tls_channel(itself.addr, pki.client_tls(true))
        .await
        .unwrap();
    assert_eq!(say_hello(&channel, None).await, Ok("Hello, you!".into()));
}

#[tokio::test]
async fn either_mode_takes_a_certificate_or_a_token_and_logs_who() {
    let dir = tempfile::tempdir().unwrap();
    let pki = greeter::certs::DevPki::generate(&greeter::certs::PkiOptions::valid_for_days(
        vec!["localhost".into()],
        "either-client".into(),
        30,
    ))
    .unwrap();
    pki.write(dir.path(), false).unwrap();
    let path = |file: &str| dir.path().join(file).to_str().unwrap().to_owned();
    std::fs::write(
        path("tokens.toml"),
        auth::entry_toml(&auth::entry_for("grt_app", "app", &["greeter".into()])),
    )
    .unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\n\
             [tls]\nenabled = true\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
             client_auth = \"optional\"\n\
             [auth]\nenabled = true\nmode = \"either\"\ntokens_file = {:?}\n\
             client_cert_scopes = [\"greeter\"]\n",
            path("server.pem"),
            path("server.key"),
            path("ca.pem"),
            path("tokens.toml"),
        ),
    )
    .unwrap();
    let server = common::BinaryServer::start(&config, &[]);
    let tls = || {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_cert))
            .domain_name("localhost")
    };
    let with_cert = tls_channel(
        server.addr,
        tls().identity(tonic::transport::Identity::from_pem(
            &pki.client_cert,
            &pki.client_key,
        )),
    )
    .await
    .unwrap();
    let without = tls_channel(server.addr, tls()).await.unwrap();

    assert_eq!(say_hello(&with_cert, None).await, Ok("Hello, you!".into()));
    assert_eq!(
        say_hello(&without, Some("Bearer grt_app")).await,
        Ok("Hello, you!".into())
    );
    assert_eq!(say_hello(&without, None).await, Err(Code::Unauthenticated));

    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let logs = server.logs.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["target"] == "greeter::access")
            .collect();
        if lines.len() >= 3 {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "3 access lines within 5s:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (Each line is written as its call's response ends: in any order.)
    let mut who: Vec<(&str, Option<&str>, &str)> = lines
        .iter()
        .map(|line| {
            (
                line["auth"].as_str().unwrap(),
                line["identity"].as_str(),
                line["code"].as_str().unwrap(),
            )
        })
        .collect();
    who.sort();
    assert_eq!(
        who,
        [
            ("client_cert", Some("CN=either-client"), "OK"),
            ("none", None, "Unauthenticated"),
            ("token", Some("app"), "OK"),
        ]
    );
}

#[tokio::test]
async fn deleting_the_tokens_file_revokes_every_token_until_it_is_back() {
    let tokens = Tokens::new();
    tokens.write(&[("grt_kept", "kept", &["greeter"])]);
    let server = TestServer::start_with(config_with(tokens.overrides())).await;
    let channel = server.channel().await;
    let metrics = server.metrics_addr.unwrap();
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_kept")).await,
        Ok("Hello, you!".into())
    );

    // Deleting the file is how an operator revokes everything: fail closed, not "keep the old".
    std::fs::remove_file(tokens.path()).unwrap();
    wait_for_reloads(metrics, "tokens", "revoked", 1.0).await;
    assert_eq!(
        say_hello(&channel, Some("Bearer grt_kept")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(reloads(metrics, "tokens", "failure").await, 0.0);

    tokens.write(&[("grt_kept", "kept", &["greeter"])]);
    eventually(&channel, "grt_kept", Ok("Hello, you!".into())).await;
}

#[tokio::test]
async fn static_tokens_and_jwts_are_accepted_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Signer::new(K8S, "k1");
    let jwks_path = dir.path().join("jwks.json");
    write_jwks(&jwks_path, &[&issuer]);
    let mut config = jwt::config(dir.path(), &[(K8S, jwks_path.as_path())]);
    config.auth.jwt.rules[0].issuer = None;
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;

    let bearer = |token: &str| format!("Bearer {token}");
    // Each kind of bearer reaches its own verifier: a static token is no JWT, and a JWT is in no
    // tokens file.
    assert_eq!(
        say_hello(&channel, Some(&bearer("static-secret-token"))).await,
        Ok("Hello, you!".into())
    );
    let jwt = issuer.token("system:serviceaccount:shop:checkout");
    assert_eq!(
        say_hello(&channel, Some(&bearer(&jwt))).await,
        Ok("Hello, you!".into())
    );
    let other = issuer.token("system:serviceaccount:billing:api");
    assert_eq!(
        say_hello(&channel, Some(&bearer(&other))).await,
        Err(Code::PermissionDenied),
        "a verified JWT no rule gives the scope"
    );
    let (head, _) = jwt.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "A".repeat(86));
    assert_eq!(
        say_hello(&channel, Some(&bearer(&forged))).await,
        Err(Code::Unauthenticated)
    );

    // The issuer rotates its key (same kid): the new JWKS is installed, the old key's tokens,
    // cached as verified a moment ago, are refused with it.
    let rotated = Signer::new(K8S, "k1");
    write_jwks(&jwks_path, &[&rotated]);
    let tmp = dir.path().join("jwks.json.tmp");
    let fresh = rotated.token("system:serviceaccount:shop:checkout");
    eventually(&channel, &fresh, Ok("Hello, you!".into())).await;
    assert_eq!(
        say_hello(&channel, Some(&bearer(&jwt))).await,
        Err(Code::Unauthenticated)
    );

    // A JWKS that does not parse keeps the keys in force; a deleted one revokes them.
    let metrics = server.metrics_addr.unwrap();
    std::fs::write(&tmp, "{\"keys\": [{\"kty\": \"oct\"").unwrap();
    std::fs::rename(&tmp, &jwks_path).unwrap();
    wait_for_reloads(metrics, "jwks", "failure", 1.0).await;
    assert_eq!(reloads(metrics, "jwks", "revoked").await, 0.0);
    assert_eq!(
        say_hello(&channel, Some(&bearer(&fresh))).await,
        Ok("Hello, you!".into())
    );
    std::fs::remove_file(&jwks_path).unwrap();
    wait_for_reloads(metrics, "jwks", "revoked", 1.0).await;
    assert_eq!(reloads(metrics, "jwks", "failure").await, 1.0);
    assert_eq!(
        say_hello(&channel, Some(&bearer(&fresh))).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        say_hello(&channel, Some(&bearer("static-secret-token"))).await,
        Ok("Hello, you!".into()),
        "static tokens are not the JWKS's to revoke"
    );
}
