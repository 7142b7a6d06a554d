//! Observability against real servers on loopback: `/metrics` scraped over plain HTTP after known
//! calls (exact counts, go-grpc-prometheus names and labels), request ids in response metadata,
//! and one JSON access line per call from the real binary.

use crate::common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::common::{
    BinaryServer, Pki, TestServer, config_with, http_request, scrape, tls_channel,
};
use greeter::{
    call::auth,
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use tonic::{Code, Request, transport::Channel};

const TOKEN: &str = "observability-test-token";

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

fn overrides(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A tokens file granting [`TOKEN`] (holder `ci`) the `greeter` scope.
fn tokens_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("tokens.toml");
    let entry = auth::entry_toml(&auth::entry_for(TOKEN, "ci", &["greeter".to_owned()]));
    std::fs::write(&path, entry).unwrap();
    path.to_str().unwrap().to_owned()
}

fn with_token<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// A scrape in the Prometheus text format, as `series -> value`, where a series is written
/// `name{k="v",...}` with its labels sorted (so assertions do not depend on label order).
struct Scrape {
    series: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn of(metrics_addr: SocketAddr) -> Self {
        let text = scrape(metrics_addr).await;
        let series = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("`series value`");
                (normalize(series), value.parse().expect("a number"))
            })
            .collect();
        Self { series, text }
    }

    /// The value of `name{labels}`; panics when the series is not exposed at all.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(name, labels);
        *self
            .series
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is not exposed; scrape:\n{}", self.text))
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

fn normalize(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return format!("{series}{{}}");
    };
    let labels = labels.strip_suffix('}').expect("closing brace");
    let pairs: Vec<(&str, &str)> = labels
        .split("\",")
        .map(|pair| {
            let (k, v) = pair.split_once('=').expect("k=v");
            (k, v.trim_matches('"'))
        })
        .collect();
    self::series(name, &pairs)
}

/// The go-grpc-prometheus method labels.
fn method<'a>(kind: &'a str, service: &'a str, name: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grpc_type", kind),
        ("grpc_service", service),
        ("grpc_method", name),
    ]
}

fn greeter_method<'a>(kind: &'a str, name: &'a str) -> Vec<(&'a str, &'a str)> {
    method(kind, "helloworld.Greeter", name)
}

fn with_code<'a>(labels: &[(&'a str, &'a str)], code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = labels.to_vec();
    labels.push(("grpc_code", code));
    labels
}

/// Scrapes until no call is in flight (a call is counted as handled when the server drops its
/// response body, just after the client has the status), then returns that scrape.
async fn settled(metrics_addr: SocketAddr) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = Scrape::of(metrics_addr).await;
        if scrape.get("greeter_calls_in_flight", &[]) == 0.0 {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "calls still in flight after 5s:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn grpc_metrics_count_every_call_by_method_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(&dir);
    let server = TestServer::start_with(config_with(overrides(&[
        ("auth.enabled", "true"),
        ("auth.tokens_file", &tokens),
    ])))
    .await;
    let metrics_addr = server.metrics_addr.expect("metrics listener");
    let channel = server.channel().await;
    let mut client = GreeterClient::new(channel.clone());

    for _ in 0..2 {
        client.say_hello(with_token(hello("ok"))).await.unwrap();
    }
    let invalid = client
        .say_hello(with_token(hello("bell\u{7}")))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let unauthenticated = client.say_hello(hello("no token")).await.unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let mut replies = client
        .say_hello_stream_reply(with_token(hello("stream")))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = 0;
    while replies.message().await.unwrap().is_some() {
        streamed += 1;
    }
    let greetings = greeter::config::Config::embedded()
        .greeter
        .stream_greetings
        .len();
    assert_eq!(streamed, greetings);

    const BIDI_MESSAGES: usize = 3;
    let names = (0..BIDI_MESSAGES).map(|i| hello(&format!("n{i}")));
    let mut chat = client
        .say_hello_bidi_stream(with_token(tokio_stream::iter(names)))
        .await
        .unwrap()
        .into_inner();
    let mut chatted = 0;
    while chat.message().await.unwrap().is_some() {
        chatted += 1;
    }
    assert_eq!(chatted, BIDI_MESSAGES);

    let stranger = unknown_method(channel).await;
    assert_eq!(
        stranger.code(),
        Code::PermissionDenied,
        "no auth policy for it"
    );

    let scrape = settled(metrics_addr).await;
    let hello_labels = greeter_method("unary", "SayHello");
    let started = |labels: &[(&str, &str)]| scrape.get("grpc_server_started_total", labels);
    let handled = |labels: &[(&str, &str)], code| {
        scrape.get("grpc_server_handled_total", &with_code(labels, code))
    };
    let received = |labels: &[(&str, &str)]| scrape.get("grpc_server_msg_received_total", labels);
    let sent = |labels: &[(&str, &str)]| scrape.get("grpc_server_msg_sent_total", labels);

    assert_eq!(started(&hello_labels), 4.0);
    assert_eq!(handled(&hello_labels, "OK"), 2.0);
    assert_eq!(handled(&hello_labels, "InvalidArgument"), 1.0);
    assert_eq!(handled(&hello_labels, "Unauthenticated"), 1.0);
    assert_eq!(handled(&hello_labels, "Internal"), 0.0);
    // The refused call's message was never read: the auth layer answered first.
    assert_eq!(received(&hello_labels), 3.0);
    assert_eq!(sent(&hello_labels), 2.0);
    assert_eq!(
        scrape.get("grpc_server_handling_seconds_count", &hello_labels),
        4.0
    );
    let mut inf_bucket = hello_labels.clone();
    inf_bucket.push(("le", "+Inf"));
    assert_eq!(
        scrape.get("grpc_server_handling_seconds_bucket", &inf_bucket),
        4.0
    );

    let stream_labels = greeter_method("server_stream", "SayHelloStreamReply");
    assert_eq!(started(&stream_labels), 1.0);
    assert_eq!(handled(&stream_labels, "OK"), 1.0);
    assert_eq!(received(&stream_labels), 1.0);
    assert_eq!(sent(&stream_labels), greetings as f64);

    let bidi_labels = greeter_method("bidi_stream", "SayHelloBidiStream");
    assert_eq!(started(&bidi_labels), 1.0);
    assert_eq!(handled(&bidi_labels, "OK"), 1.0);
    assert_eq!(received(&bidi_labels), BIDI_MESSAGES as f64);
    assert_eq!(sent(&bidi_labels), BIDI_MESSAGES as f64);

    let unknown = method("unknown", "unknown", "unknown");
    assert_eq!(started(&unknown), 1.0);
    assert_eq!(handled(&unknown, "PermissionDenied"), 1.0);
    assert!(
        !scrape.text.contains("evil"),
        "no label from the client's path"
    );

    // Methods never called are exposed too, at zero, as go-grpc-prometheus pre-registers them.
    let again = greeter_method("unary", "SayHelloAgain");
    assert_eq!(started(&again), 0.0);
    assert_eq!(handled(&again, "Unauthenticated"), 0.0);

    for (reason, count) in [
        ("missing_credentials", 1.0),
        ("no_policy", 1.0),
        ("invalid_token", 0.0),
        ("malformed_header", 0.0),
        ("missing_scope", 0.0),
    ] {
        assert_eq!(
            scrape.get("greeter_auth_failures_total", &[("reason", reason)]),
            count,
            "{reason}"
        );
    }
    assert_eq!(
        scrape.get("greeter_calls_cancelled_total", &[]),
        0.0,
        "an error answer is no cancellation"
    );
    assert_eq!(scrape.get("greeter_connections_open", &[]), 1.0);
    assert_eq!(scrape.get("greeter_connections_accepted_total", &[]), 1.0);
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(scrape.get(name, &[]) > 0.0, "{name}");
    }
}

/// A call to a method no service has, through tonic's generic client.
async fn unknown_method(channel: Channel) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<HelloRequest, greeter::pb::HelloReply>::default();
    grpc.unary(
        with_token(hello("x")),
        http::uri::PathAndQuery::from_static("/evil.Scanner/Probe"),
        codec,
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn calls_cut_short_are_counted_with_their_code() {
    let server = TestServer::start_with(config_with(overrides(&[
        ("greeter.stream_interval", "1s"),
        ("limits.max_concurrent_calls", "1"),
    ])))
    .await;
    let metrics_addr = server.metrics_addr.unwrap();
    let mut client = GreeterClient::new(server.channel().await);

    // Holds the only call slot: the next call is shed.
    let mut held = client
        .say_hello_stream_reply(hello("held"))
        .await
        .unwrap()
        .into_inner();
    held.message().await.unwrap().unwrap();
    let shed = client.say_hello(hello("shed")).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    drop(held); // the client cancels the stream

    let stream = greeter_method("server_stream", "SayHelloStreamReply");
    let scrape = settled(metrics_addr).await;
    let hello_labels = greeter_method("unary", "SayHello");
    assert_eq!(
        scrape.get(
            "grpc_server_handled_total",
            &with_code(&hello_labels, "ResourceExhausted")
        ),
        1.0
    );
    assert_eq!(
        scrape.get("grpc_server_handled_total", &with_code(&stream, "Canceled")),
        1.0
    );
    assert_eq!(
        scrape.get("greeter_calls_shed_total", &[("limit", "server")]),
        1.0
    );
    assert_eq!(
        scrape.get("greeter_calls_shed_total", &[("limit", "connection")]),
        0.0
    );
    assert_eq!(scrape.get("greeter_calls_cancelled_total", &[]), 1.0);
    assert_eq!(
        scrape.get("greeter_calls_deadline_exceeded_total", &[]),
        0.0
    );

    let mut request = Request::new(hello("late"));
    request.set_timeout(Duration::from_millis(200));
    let mut late = client
        .say_hello_stream_reply(request)
        .await
        .unwrap()
        .into_inner();
    late.message().await.unwrap().unwrap();
    assert_eq!(
        late.message().await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    let scrape = settled(metrics_addr).await;
    assert_eq!(
        scrape.get(
            "grpc_server_handled_total",
            &with_code(&stream, "DeadlineExceeded")
        ),
        1.0
    );
    assert_eq!(
        scrape.get("greeter_calls_deadline_exceeded_total", &[]),
        1.0
    );
    assert_eq!(
        scrape.get("grpc_server_msg_sent_total", &stream),
        2.0,
        "one greeting each before the cancel and the deadline"
    );
}

#[tokio::test]
async fn request_ids_round_trip_in_response_metadata() {
    let server = TestServer::start().await;
    let mut client = GreeterClient::new(server.channel().await);
    let id_of = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get("x-request-id")
            .expect("x-request-id in the response metadata")
            .to_str()
            .unwrap()
            .to_owned()
    };

    let mut given = Request::new(hello("id"));
    given
        .metadata_mut()
        .insert("x-request-id", "client-chosen-42".parse().unwrap());
    let reply = client.say_hello(given).await.unwrap();
    assert_eq!(id_of(reply.metadata()), "client-chosen-42");

    // A trailers-only error response carries it too.
    let mut given = Request::new(hello("bad\u{7}"));
    given
        .metadata_mut()
        .insert("x-request-id", "client-chosen-43".parse().unwrap());
    let status = client.say_hello(given).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(id_of(status.metadata()), "client-chosen-43");

    let mut spaced = Request::new(hello("c"));
    spaced
        .metadata_mut()
        .insert("x-request-id", "has a space".parse().unwrap());
    let mut generated = Vec::new();
    for request in [Request::new(hello("a")), Request::new(hello("b")), spaced] {
        let reply = client.say_hello(request).await.unwrap();
        generated.push(id_of(reply.metadata()));
    }
    for id in &generated {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(generated[0], generated[1]);
    assert_ne!(generated[1], generated[2]);
}

#[tokio::test]
async fn the_metrics_listener_serves_get_metrics_and_nothing_else() {
    let server = TestServer::start().await;
    let addr = server.metrics_addr.unwrap();

    let classic = http_request(addr, "GET", "/metrics", None).await;
    assert_eq!(classic.status, 200);
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        classic
            .body
            .contains("# TYPE grpc_server_started_total counter\n")
    );
    assert!(!classic.body.contains("# EOF"));

    // What Prometheus asks for.
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2";
    let openmetrics = http_request(addr, "GET", "/metrics", Some(accept)).await;
    assert_eq!(openmetrics.status, 200);
    assert_eq!(
        openmetrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(openmetrics.body.ends_with("# EOF\n"));
    assert!(
        openmetrics
            .body
            .contains("\ngrpc_server_started_total{grpc_type=\"unary\"")
    );

    for path in ["/", "/metrics/", "/health", "/metricsx"] {
        assert_eq!(
            http_request(addr, "GET", path, None).await.status,
            404,
            "{path}"
        );
    }
    let post = http_request(addr, "POST", "/metrics", None).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // It stops with the server.
    server.stop().await.unwrap();
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "metrics listener still open after stop");
}

#[tokio::test]
async fn metrics_listen_empty_means_no_listener_and_calls_still_get_request_ids() {
    let server = TestServer::start_with(config_with(overrides(&[("metrics.listen", "")]))).await;
    assert_eq!(server.metrics_addr, None);
    let reply = GreeterClient::new(server.channel().await)
        .say_hello(hello("quiet"))
        .await
        .unwrap();
    assert!(reply.metadata().get("x-request-id").is_some());
}

#[tokio::test]
async fn tls_metrics_show_expiry_handshake_failures_and_reloads() {
    use tokio::io::AsyncWriteExt as _;

    // A server certificate whose expiry the test knows: 2040-01-01T00:00:00Z.
    const NOT_AFTER_UNIX: u64 = 2_208_988_800;
    let dir = tempfile::tempdir().unwrap();
    let generated = greeter::certs::DevPki::generate(&greeter::certs::PkiOptions {
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        client_name: "client".into(),
        not_before: std::time::SystemTime::now() - Duration::from_secs(3600),
        not_after: std::time::UNIX_EPOCH + Duration::from_secs(NOT_AFTER_UNIX),
    })
    .unwrap();
    generated.write(dir.path(), false).unwrap();
    let pki = Pki {
        dir,
        pki: generated,
    };
    let server = TestServer::start_with(config_with(pki.tls_overrides())).await;
    let metrics_addr = server.metrics_addr.unwrap();
    let cert_path = std::path::PathBuf::from(pki.path("server.pem"));

    // Not TLS at all: the handshake fails.
    let mut garbage = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // A good client still gets in.
    let channel = tls_channel(server.addr, pki.client_tls(false))
        .await
        .unwrap();
    GreeterClient::new(channel)
        .say_hello(hello("tls"))
        .await
        .unwrap();

    // A broken certificate file is refused (failure), the original again is loaded (success).
    let original = std::fs::read(&cert_path).unwrap();
    std::fs::write(&cert_path, b"not a certificate").unwrap();
    let reloads = |scrape: &Scrape, outcome| {
        scrape.get(
            "greeter_reloads_total",
            &[("kind", "tls"), ("outcome", outcome)],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut scrape = Scrape::of(metrics_addr).await;
    while reloads(&scrape, "failure") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failed reload:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        scrape = Scrape::of(metrics_addr).await;
    }
    std::fs::write(&cert_path, original).unwrap();
    while reloads(&scrape, "success") < 1.0 {
        assert!(Instant::now() < deadline, "no reload:\n{}", scrape.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
        scrape = Scrape::of(metrics_addr).await;
    }

    assert_eq!(reloads(&scrape, "failure"), 1.0);
    assert_eq!(
        scrape.get("greeter_tls_certificate_expiry_timestamp_seconds", &[]),
        NOT_AFTER_UNIX as f64
    );
    assert_eq!(
        scrape.get(
            "greeter_tls_handshake_failures_total",
            &[("reason", "error")]
        ),
        1.0
    );
    assert_eq!(
        scrape.get(
            "greeter_tls_handshake_failures_total",
            &[("reason", "timeout")]
        ),
        0.0
    );
    assert!(
        !scrape.text.contains("kind=\"tokens\""),
        "tokens are not in use: no series"
    );
}

/// The access log lines of a server's stderr (JSON), in order.
fn access_lines(logs: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["target"] == "greeter::access")
        .collect()
}

#[tokio::test]
async fn the_binary_logs_one_json_access_line_per_call_with_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(&dir);
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\nfilter = \"info,greeter::call=debug,greeter::request=debug\"\n\
             [auth]\nenabled = true\ntokens_file = {tokens:?}\n\
             [greeter]\nstream_interval = \"1s\"\n"
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&config, &[]);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = GreeterClient::new(channel.clone());

    let mut ok = with_token(hello("log"));
    ok.metadata_mut()
        .insert("x-request-id", "access-log-1".parse().unwrap());
    let called = Instant::now();
    client.say_hello(ok).await.unwrap();
    let ok_took = called.elapsed();
    let refused = client.say_hello(hello("no token")).await.unwrap_err();
    let refused_id = refused
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut late = with_token(hello("late"));
    late.set_timeout(Duration::from_millis(300));
    let replies = client.say_hello_stream_reply(late).await.unwrap();
    let late_id = replies
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut replies = replies.into_inner();
    replies.message().await.unwrap().unwrap();
    assert_eq!(
        replies.message().await.unwrap_err().code(),
        Code::DeadlineExceeded
    );
    // Health checks are logged at DEBUG only: not with this filter. A Greeter call after the
    // health check is logged after it, so once that call's line is in, a health line would be too.
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let mut last = with_token(hello("after health"));
    last.metadata_mut()
        .insert("x-request-id", "after-health".parse().unwrap());
    client.say_hello(last).await.unwrap();

    let lines = common::wait_for_log_line(
        &server,
        Duration::from_secs(5),
        "no access line for the last call within 5s",
        |logs| {
            let lines = access_lines(logs);
            lines
                .iter()
                .any(|line| line["request_id"] == "after-health")
                .then_some(lines)
        },
    )
    .await;
    let logs = server.logs.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .all(|line| !line["method"].as_str().unwrap().starts_with("/grpc.health")),
        "no access line for the health check:\n{logs}"
    );
    assert_eq!(lines.len(), 4, "one line per call:\n{logs}");
    let by_id: HashMap<&str, &serde_json::Value> = lines
        .iter()
        .map(|line| (line["request_id"].as_str().unwrap(), line))
        .collect();

    let ok = by_id["access-log-1"];
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["message"], "call finished");
    assert_eq!(ok["method"], "/helloworld.Greeter/SayHello");
    assert_eq!(ok["code"], "OK");
    assert_eq!(ok["auth"], "token");
    assert_eq!(ok["identity"], "ci");
    let peer: SocketAddr = ok["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback());
    // The server's measure of the call lies within the client's.
    let duration = ok["duration_ms"].as_f64().unwrap();
    assert!(
        duration > 0.0 && duration <= ok_took.as_secs_f64() * 1000.0,
        "{ok} within {ok_took:?}"
    );

    let refused = by_id[refused_id.as_str()];
    assert_eq!(refused["code"], "Unauthenticated");
    assert_eq!(refused["auth"], "none");
    assert_eq!(refused["refused"], "missing_credentials", "{refused}");
    assert!(refused.get("identity").is_none(), "{refused}");
    assert!(ok.get("refused").is_none(), "{ok}");

    let late = by_id[late_id.as_str()];
    assert_eq!(late["method"], "/helloworld.Greeter/SayHelloStreamReply");
    assert_eq!(late["code"], "DeadlineExceeded");
    assert!(late["duration_ms"].as_f64().unwrap() >= 250.0, "{late}");

    // Lines logged while the call ran carry its request id in their span.
    let during: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["target"] == "greeter::call")
        .collect();
    assert!(
        !during.is_empty(),
        "a deadline line from greeter::call:\n{logs}"
    );
    for event in &during {
        assert_eq!(event["span"]["request_id"], late_id.as_str(), "{event}");
        assert_eq!(event["span"]["name"], "grpc", "{event}");
    }
}

#[tokio::test]
async fn a_refusal_for_a_missing_scope_logs_who_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(&dir);
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\nfilter = \"info\"\n\
             [auth]\nenabled = true\ntokens_file = {tokens:?}\n\
             [auth.policy]\n\"/helloworld.Greeter/SayHelloAgain\" = \"admin\"\n"
        ),
    )
    .unwrap();
    let server = BinaryServer::start(&config, &[]);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut denied = with_token(hello("denied"));
    denied
        .metadata_mut()
        .insert("x-request-id", "access-log-denied".parse().unwrap());
    let status = GreeterClient::new(channel)
        .say_hello_again(denied)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let line =
        common::wait_for_log_line(&server, Duration::from_secs(5), "no access line", |logs| {
            access_lines(logs)
                .into_iter()
                .find(|line| line["request_id"] == "access-log-denied")
        })
        .await;
    // The token was verified; only its scope was missing: the line names its holder.
    assert_eq!(line["code"], "PermissionDenied", "{line}");
    assert_eq!(line["auth"], "token", "{line}");
    assert_eq!(line["identity"], "ci", "{line}");
}

/// Runs `greeter serve ARGS` with `env` (RUST_LOG removed unless given) until it announces it
/// serves, then stops it with SIGTERM: all its stderr lines, startup to exit.
fn serve_and_stop(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    use std::io::BufRead as _;

    let mut child = common::greeter_bin()
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .env("GREETER__METRICS__LISTEN", "")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (serving_tx, serving_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("greeter serving") {
                let _ = serving_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    let serving = serving_rx.recv_timeout(Duration::from_secs(15));
    let pid = child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let exited = (0..1000).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let lines = reader.join().unwrap();
    assert!(serving.is_ok() && exited, "{lines:?}");
    lines
}

#[test]
fn allow_insecure_is_warned_about_at_start() {
    let warning = "serving plaintext or unauthenticated calls beyond loopback \
                   (server.allow_insecure = true)";
    let json = [("GREETER__LOG__FORMAT", "json")];
    let exposed = serve_and_stop(
        &["--listen", "0.0.0.0:0"],
        &[json[0], ("GREETER__SERVER__ALLOW_INSECURE", "true")],
    );
    let warned: Vec<serde_json::Value> = exposed
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|event| event["message"] == warning)
        .collect();
    assert_eq!(warned.len(), 1, "{exposed:?}");
    assert_eq!(warned[0]["level"], "WARN");
    // On loopback there is nothing to warn about.
    let loopback = serve_and_stop(&["--listen", "127.0.0.1:0"], &json);
    assert!(
        loopback.iter().all(|line| !line.contains(warning)),
        "{loopback:?}"
    );
}

#[test]
fn log_format_auto_is_json_when_stderr_is_not_a_terminal() {
    let auto = serve_and_stop(
        &["--listen", "127.0.0.1:0"],
        &[("GREETER__LOG__FORMAT", "auto")],
    );
    for line in &auto {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(event["level"].is_string(), "{line}");
    }
    let text = serve_and_stop(
        &["--listen", "127.0.0.1:0"],
        &[("GREETER__LOG__FORMAT", "text")],
    );
    assert!(
        text.iter()
            .all(|line| serde_json::from_str::<serde_json::Value>(line).is_err()),
        "{text:?}"
    );
}

/// `log.format = "auto"` on a real terminal: util-linux's `script` runs the server on a
/// pseudo-terminal, so stderr is a tty as in an operator's shell. Text with colours, not JSON.
#[test]
fn log_format_auto_is_coloured_text_on_a_terminal() {
    use std::io::BufRead as _;

    // The shell prints its pid, then becomes the server: that pid is the server's.
    let command = format!(
        "echo pid=$$; exec {} serve --listen 127.0.0.1:0",
        common::greeter_bin().get_program().to_str().unwrap()
    );
    let mut script = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .env("GREETER__METRICS__LISTEN", "")
        .env("GREETER__LOG__FORMAT", "auto")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("util-linux `script` runs the server on a pseudo-terminal");
    let stdout = script.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("pid=") || line.contains("greeter serving") {
                let _ = line_tx.send(line);
            }
        }
    });
    let pid = line_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the shell's pid");
    let serving = line_rx.recv_timeout(Duration::from_secs(15));
    // SIGHUP reloads, so the terminal closing would not stop the server: SIGTERM does.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", pid.trim().trim_start_matches("pid=")])
        .status()
        .unwrap();
    assert!(stopped.success(), "{pid:?}");
    assert_eq!(script.wait().unwrap().code(), Some(0));
    let line = serving.expect("the server's start line on the terminal");
    assert!(
        serde_json::from_str::<serde_json::Value>(line.trim()).is_err(),
        "{line:?}"
    );
    assert!(line.contains("\u{1b}["), "coloured on a terminal: {line:?}");
    assert!(line.contains("INFO"), "{line:?}");
}

// Multi-threaded: the client's connection answers the GOAWAY while `terminate` blocks.
/// With no metrics listener (`metrics.listen = ""`) calls are not counted, but still logged.
#[tokio::test]
async fn calls_are_logged_without_a_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\nfilter = \"info\"\n").unwrap();
    let server = BinaryServer::start_with_env(&config, &[], &[("GREETER__METRICS__LISTEN", "")]);
    assert_eq!(server.metrics_addr, None);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut call = Request::new(hello("unmetered"));
    call.metadata_mut()
        .insert("x-request-id", "unmetered".parse().unwrap());
    GreeterClient::new(channel).say_hello(call).await.unwrap();
    let line = common::wait_for_log_line(
        &server,
        Duration::from_secs(5),
        "no access line within 5s",
        |logs| {
            access_lines(logs)
                .into_iter()
                .find(|line| line["request_id"] == "unmetered")
        },
    )
    .await;
    assert_eq!(line["method"], "/helloworld.Greeter/SayHello", "{line}");
    assert_eq!(line["code"], "OK", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_off_in_the_filter_and_rust_log_taking_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "[log]\nformat = \"json\"\nfilter = \"info,greeter::access=off\"\n",
    )
    .unwrap();
    for (env, access_lines_wanted) in [(vec![], 0), (vec![("RUST_LOG", "info")], 1)] {
        let mut server = BinaryServer::start_with_env(&config, &[], &env);
        let channel = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        GreeterClient::new(channel)
            .say_hello(hello("filtered"))
            .await
            .unwrap();
        // Everything the process logs is in once its last line is.
        let (code, _) = server.terminate();
        assert_eq!(code, Some(0));
        let logs =
            common::wait_for_log_line(&server, Duration::from_secs(5), "no last line", |logs| {
                logs.contains("all calls finished").then(|| logs.to_owned())
            })
            .await;
        assert_eq!(
            access_lines(&logs).len(),
            access_lines_wanted,
            "RUST_LOG {env:?}:\n{logs}"
        );
    }
}

#[tokio::test]
async fn the_last_lines_of_a_drain_are_written_before_the_process_exits() {
    // Lines go through a queue to a writer thread: the exit must wait until it has written them.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\nfilter = \"info\"\n").unwrap();
    let mut server = BinaryServer::start(&config, &[]);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    const CALLS: usize = 300;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut client = GreeterClient::new(channel.clone());
            tokio::spawn(async move { client.say_hello(hello(&format!("drain-{i}"))).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    drop(channel);
    // terminate() waits for the exit; off this runtime, whose connections must answer GOAWAY.
    let (server, (code, _)) = tokio::task::spawn_blocking(move || {
        let exit = server.terminate();
        (server, exit)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    // The process is gone; its stderr reader may still be copying what it wrote.
    let deadline = Instant::now() + Duration::from_secs(5);
    let logs = loop {
        let logs = server.logs.lock().unwrap().clone();
        if logs.contains("all calls finished") || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let greetings = access_lines(&logs)
        .into_iter()
        .filter(|line| line["method"] == "/helloworld.Greeter/SayHello")
        .count();
    assert_eq!(greetings, CALLS, "every call's access line is written");
    assert!(
        logs.contains("all calls finished"),
        "the drain's last line is written: {logs}"
    );
}

/// h2 refuses a stream whose `:authority` is not a valid authority before greeter sees it
/// (hyperium/h2#487), as grpcio's is for `unix:` targets: the server warns what the client must
/// change, once a minute at most however often the client retries.
#[tokio::test]
async fn a_malformed_authority_is_warned_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\nfilter = \"info\"\n").unwrap();
    let server = BinaryServer::start(&config, &[]);
    for _ in 0..2 {
        refused_for_its_authority(server.addr).await;
    }
    // The warnings are logged as h2 refuses, before this call's access line.
    let mut call = Request::new(hello("after"));
    call.metadata_mut()
        .insert("x-request-id", "after-refusals".parse().unwrap());
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    GreeterClient::new(channel).say_hello(call).await.unwrap();
    let logs =
        common::wait_for_log_line(&server, Duration::from_secs(5), "no access line", |logs| {
            logs.contains("after-refusals").then(|| logs.to_owned())
        })
        .await;
    let warnings: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"].as_str().unwrap_or("").contains("h2#487"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert_eq!(warnings[0]["level"], "WARN");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains("grpc.default_authority"),
        "{logs}"
    );
}

/// A call whose `:authority` is a socket path, in frames written by hand (no HTTP/2 client sends
/// one), on a connection of its own; returns once the server has refused it.
async fn refused_for_its_authority(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // HPACK: :method POST and :scheme http from the static table, then :path and :authority as
    // literals without indexing (their names from the static table, values not Huffman-coded).
    let mut block = vec![0x83, 0x86];
    for (name, value) in [
        (4, "/helloworld.Greeter/SayHello"),
        (1, "/run/greeter.sock"),
    ] {
        block.extend_from_slice(&[name, u8::try_from(value.len()).unwrap()]);
        block.extend_from_slice(value.as_bytes());
    }
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS (none), then HEADERS on stream 1 with END_STREAM and END_HEADERS.
    frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, u8::try_from(block.len()).unwrap(), 1, 5, 0, 0, 0, 1]);
    frames.extend_from_slice(&block);
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&frames).await.unwrap();
    // Frames until RST_STREAM (3) or GOAWAY (7): h2 has decoded the headers and refused them.
    let refused = async {
        loop {
            let mut header = [0; 9];
            tcp.read_exact(&mut header).await.unwrap();
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0; len];
            tcp.read_exact(&mut payload).await.unwrap();
            if header[3] == 3 || header[3] == 7 {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("the stream refused within 10 s");
}

/// A call the client cancels: the line logged as its handler's work is dropped carries the call's
/// request id, like every line logged while the call runs.
#[tokio::test]
async fn the_cancellation_line_carries_the_calls_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "[log]\nformat = \"json\"\nfilter = \"info,greeter::call=debug,greeter::request=debug\"\n\
         [greeter]\nstream_interval = \"10s\"\n",
    )
    .unwrap();
    let server = BinaryServer::start(&config, &[]);
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut call = Request::new(hello("cancelled"));
    call.metadata_mut()
        .insert("x-request-id", "cancelled-call".parse().unwrap());
    let mut replies = GreeterClient::new(channel)
        .say_hello_stream_reply(call)
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    drop(replies);
    let line = common::wait_for_log_line(
        &server,
        Duration::from_secs(5),
        "no cancellation line",
        |logs| {
            logs.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|event| {
                    event["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("call cancelled"))
                })
        },
    )
    .await;
    assert_eq!(line["span"]["request_id"], "cancelled-call", "{line}");
    assert_eq!(line["span"]["name"], "grpc", "{line}");
}
