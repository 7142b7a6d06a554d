//! Fault injection (`[faults]`) against real servers: a method's share of failed calls, the
//! `greeter-fault` metadata only for callers with the `faults` scope, delays the deadline still
//! bounds, the probe port spared, the counters, the access line's mark, and the refusals at load.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use greeter::{
    call::auth,
    config::{Config, Sources},
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{BinaryServer, TestServer, greeter_bin, scrape};

/// A tokens file: `rehearsal` holds `greeter` and `faults`, `app` only `greeter`.
fn tokens(dir: &Path) -> String {
    let path = dir.join("tokens.toml");
    let text: String = [
        ("rehearsal-token", "rehearsal", &["greeter", "faults"][..]),
        ("app-token", "app", &["greeter"][..]),
    ]
    .iter()
    .map(|(token, name, scopes)| {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        auth::entry_toml(&auth::entry_for(token, name, &scopes)) + "\n"
    })
    .collect();
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The embedded default, a config file `text` (method patterns need a file) and `overrides`.
fn config(dir: &Path, text: &str, overrides: &[(&str, &str)]) -> Result<Config, String> {
    let file = dir.join("faults.toml");
    std::fs::write(&file, text).unwrap();
    let mut all = vec![
        ("server.listen", "127.0.0.1:0"),
        ("metrics.listen", "127.0.0.1:0"),
        ("probe.listen", "127.0.0.1:0"),
    ];
    all.extend_from_slice(overrides);
    Config::load(&Sources {
        files: vec![file],
        overrides: all
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Sources::default()
    })
    .map_err(|e| e.to_string())
}

async fn hello(
    channel: &Channel,
    token: Option<&str>,
    fault: Option<&str>,
) -> Result<String, Status> {
    let mut request = Request::new(HelloRequest { name: "f".into() });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    if let Some(fault) = fault {
        request
            .metadata_mut()
            .insert("greeter-fault", fault.parse().unwrap());
    }
    let reply = GreeterClient::new(channel.clone())
        .say_hello(request)
        .await?;
    Ok(reply.into_inner().message)
}

fn injected(text: &str, kind: &str, method: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("greeter_faults_injected_total{"))
        .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
        .filter(|l| l.contains(&format!("grpc_method=\"{method}\"")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn a_method_fault_fails_its_calls_counts_them_and_spares_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        "[faults]\nenabled = true\n\
         [faults.methods.\"/helloworld.Greeter/SayHello\"]\npercent = 100\ncode = \"UNAVAILABLE\"\n\
         [faults.methods.\"/grpc.health.v1.Health/*\"]\npercent = 100\ncode = \"INTERNAL\"\n",
        &[],
    )
    .unwrap();
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    for _ in 0..3 {
        let status = hello(&channel, None, None).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "injected fault ([faults]): code=UNAVAILABLE"
        );
    }
    // Another method is untouched.
    let again = GreeterClient::new(channel.clone())
        .say_hello_again(HelloRequest { name: "f".into() })
        .await
        .unwrap();
    assert_eq!(again.into_inner().message, "Hello again, f!");
    // Health is faulted on the main port (the pattern says so) but never on the probe port.
    let main_health = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(main_health.code(), Code::Internal);
    let probe = Channel::from_shared(format!("http://{}", server.probe_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(probe)
        .check(HealthCheckRequest::default())
        .await
        .expect("the probe port is never faulted");

    let text = scrape(server.metrics_addr.unwrap()).await;
    assert_eq!(injected(&text, "error", "SayHello"), 3.0, "{text}");
    assert_eq!(injected(&text, "delay", "SayHello"), 0.0);
    assert_eq!(injected(&text, "error", "SayHelloAgain"), 0.0);
    assert_eq!(injected(&text, "error", "Check"), 1.0);
    // The injected failures are real failures to the go-grpc-prometheus series (what SLOs read).
    assert!(
        text.contains(
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"helloworld.Greeter\",\
             grpc_method=\"SayHello\",grpc_code=\"Unavailable\"} 3"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn metadata_faults_are_for_callers_with_the_faults_scope() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens(dir.path());
    let config = config(
        dir.path(),
        "[faults]\nenabled = true\n",
        &[
            ("auth.enabled", "true"),
            ("auth.tokens_file", &tokens),
            // The server's deadline for every Greeter call: it ends a long delay, not the client.
            ("deadline.default", "1s"),
            ("deadline.max", "1s"),
        ],
    )
    .unwrap();
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let rehearsal = Some("rehearsal-token");

    let status = hello(&channel, rehearsal, Some("code=DATA_LOSS"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("injected fault"), "{status:?}");

    // Without the scope: refused, never honoured.
    let status = hello(&channel, Some("app-token"), Some("code=DATA_LOSS"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("scope \"faults\""), "{status:?}");
    // An open method's anonymous caller (auth admits it without credentials).
    let mut check = Request::new(HealthCheckRequest::default());
    check
        .metadata_mut()
        .insert("greeter-fault", "code=DATA_LOSS".parse().unwrap());
    let status = HealthClient::new(channel.clone())
        .check(check)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The same callers without the metadata are served.
    assert_eq!(
        hello(&channel, Some("app-token"), None).await.unwrap(),
        "Hello, f!"
    );

    // Metadata that is not a fault says what is.
    let status = hello(&channel, rehearsal, Some("code=BROKEN"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("one of CANCELLED, UNKNOWN"),
        "{status:?}"
    );

    // A delay alone: the call is served, late.
    let started = Instant::now();
    assert_eq!(
        hello(&channel, rehearsal, Some("delay=300ms"))
            .await
            .unwrap(),
        "Hello, f!"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // A delay past the deadline ends as any slow call does.
    let status = hello(&channel, rehearsal, Some("delay=30s"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let text = scrape(server.metrics_addr.unwrap()).await;
    assert_eq!(injected(&text, "error", "SayHello"), 1.0, "{text}");
    assert_eq!(injected(&text, "delay", "SayHello"), 2.0, "{text}");
}

#[tokio::test]
async fn the_access_line_marks_injected_faults() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens(dir.path());
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        format!(
            "[log]\nformat = \"json\"\n[auth]\nenabled = true\ntokens_file = {tokens:?}\n\
             [faults]\nenabled = true\n"
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&file, &[]);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let faulted = Some("code=UNAVAILABLE,delay=10ms");
    hello(&channel, Some("rehearsal-token"), faulted)
        .await
        .unwrap_err();
    hello(&channel, Some("app-token"), None).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let logs = server.logs.lock().unwrap().clone();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["target"] == "greeter::access")
            .collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "two access lines:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines[0]["code"], "Unavailable", "{}", lines[0]);
    assert_eq!(lines[0]["fault"], "code=UNAVAILABLE,delay=10ms");
    assert_eq!(lines[0]["identity"], "rehearsal");
    assert_eq!(lines[1]["code"], "OK");
    assert!(lines[1].get("fault").is_none(), "{}", lines[1]);
    let logs = server.logs.lock().unwrap().clone();
    assert!(
        logs.contains("fault injection is on"),
        "warned at start:\n{logs}"
    );
}

#[test]
fn method_faults_are_refused_while_fault_injection_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let entry =
        "[faults.methods.\"/helloworld.Greeter/SayHello\"]\npercent = 5\ncode = \"INTERNAL\"\n";
    // Layered over production's explicit `enabled = false`, as a stray rehearsal file would be.
    let file = dir.path().join("rehearsal.toml");
    std::fs::write(&file, entry).unwrap();
    let out = greeter_bin()
        .args(["config", "check", "-c", "config/production.toml", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("faults.methods") && stderr.contains("rehearsal.toml"),
        "names the key and the file: {stderr}"
    );
    assert!(stderr.contains("faults.enabled = true"), "{stderr}");

    // An unknown code names the valid ones.
    let error = config(
        dir.path(),
        "[faults]\nenabled = true\n[faults.methods.\"/helloworld.Greeter/SayHello\"]\n\
         percent = 5\ncode = \"FLAKY\"\n",
        &[],
    )
    .unwrap_err();
    assert!(error.contains("faults.toml"), "{error}");
    assert!(error.contains("UNAVAILABLE, DATA_LOSS"), "{error}");
}

#[test]
fn a_production_like_server_takes_faults_from_a_config_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens(dir.path());
    let pki = crate::common::Pki::new();
    let secure = format!(
        "[tls]\nenabled = true\ncert = {:?}\nkey = {:?}\n[auth]\nenabled = true\ntokens_file = {tokens:?}\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let load = |text: &str, env: &[(&str, &str)]| {
        let file = dir.path().join("server.toml");
        std::fs::write(&file, text).unwrap();
        Config::load(&Sources {
            files: vec![file],
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        })
        .map_err(|e| e.to_string())
    };
    let variable = [("GREETER__FAULTS__ENABLED", "true")];
    let error = load(&secure, &variable).unwrap_err();
    assert!(
        error.contains("GREETER__FAULTS__ENABLED") && error.contains("config file only"),
        "{error}"
    );
    let config = load(&format!("{secure}[faults]\nenabled = true\n"), &[]).unwrap();
    assert!(config.faults.enabled);
    // Without TLS and auth (a laptop, a test), the variable is enough.
    assert!(load("", &variable).unwrap().faults.enabled);
}
