//! A service of one's own served through the whole stack: `tally.v1.Tally` from
//! `examples/own_service` (the same code), registered with one `OwnService`, and nothing else
//! naming it but the config. Each layer applies to it as to the Greeter: auth policy, its message
//! limit derived from its request type, a deadline and a quota from the per-method tables, its
//! metrics series, its trace span, Connect JSON, reflection, health, and the config's check of
//! patterns naming it.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use greeter::{
    call::auth,
    config::{Config, Sources},
    server::OwnService,
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::{TestServer, scrape};

#[path = "../../examples/own_service/tally.rs"]
mod tally;

use tally::pb::tally::v1::{AddRequest, Total, WatchRequest, tally_client::TallyClient};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// What the server is given of the service: the generated server and its descriptor set.
fn own() -> Vec<OwnService> {
    vec![OwnService::new(
        tally::TallyServer::new(tally::Tally::default()),
        tally::FILE_DESCRIPTOR_SET,
    )]
}

/// A config file naming the Tally's methods in every per-method table; loaded as a program
/// serving it loads its config ([`Config::load_serving`]).
fn config(dir: &Path, collector: SocketAddr) -> Result<Config, greeter::config::ConfigError> {
    let tokens: String = [
        ("alice-token", "alice", &["tally", "reflection"][..]),
        ("bob-token", "bob", &["greeter"]),
    ]
    .iter()
    .map(|(token, name, scopes)| {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        auth::entry_toml(&auth::entry_for(token, name, &scopes)) + "\n"
    })
    .collect();
    let tokens_file = dir.join("tokens.toml");
    std::fs::write(&tokens_file, tokens).unwrap();
    let file = dir.join("greeter.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [auth]\nenabled = true\ntokens_file = {tokens_file:?}\n\
             [auth.policy]\n\"/tally.v1.Tally/*\" = \"tally\"\n\
             [deadline.methods.\"/tally.v1.Tally/Watch\"]\ndefault = \"300ms\"\nmax = \"1s\"\n\
             [quota]\nenabled = true\n\
             [quota.methods.\"/tally.v1.Tally/Watch\"]\nrate = 0.01\nburst = 1\n\
             [tracing]\nenabled = true\nprotocol = \"http/protobuf\"\n\
             endpoint = \"http://{collector}\"\nscheduled_delay = \"100ms\"\n\
             response_header = true\n"
        ),
    )
    .unwrap();
    let sets: Vec<_> = own().iter().map(OwnService::descriptor_set).collect();
    Config::load_serving(
        &Sources {
            files: vec![file],
            ..Sources::default()
        },
        &sets,
    )
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn add(channel: &Channel, token: &str, amount: i64) -> Result<i64, Status> {
    let request = with_token(AddRequest { amount }, token);
    let reply = TallyClient::new(channel.clone()).add(request).await?;
    Ok(reply.into_inner().total)
}

/// An AddRequest carrying `padding` bytes of a field this server's proto does not have, as a
/// client built from a newer version of it might send.
#[derive(Clone, PartialEq, prost::Message)]
struct NewerAddRequest {
    #[prost(sint64, tag = "1")]
    amount: i64,
    #[prost(bytes = "vec", tag = "15")]
    padding: Vec<u8>,
}

async fn add_padded(channel: &Channel, padding: usize) -> Result<Total, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let message = NewerAddRequest {
        amount: 1,
        padding: vec![b'x'; padding],
    };
    let codec = tonic_prost::ProstCodec::<NewerAddRequest, Total>::default();
    let path = http::uri::PathAndQuery::from_static("/tally.v1.Tally/Add");
    let reply = grpc
        .unary(with_token(message, "alice-token"), path, codec)
        .await?;
    Ok(reply.into_inner())
}

/// The sum of the series of `name` whose labels include every one of `labels`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .map(|line| line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

/// An OTLP/HTTP collector on loopback: the bodies of the exports it was sent.
async fn collector() -> (SocketAddr, Arc<Mutex<Vec<Bytes>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let exports = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::clone(&exports);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let received = Arc::clone(&received);
            let answer = hyper::service::service_fn(move |request: http::Request<_>| {
                let received = Arc::clone(&received);
                async move {
                    let body: hyper::body::Incoming = request.into_body();
                    let export = body.collect().await?.to_bytes();
                    received.lock().unwrap().push(export);
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), answer),
            );
        }
    });
    (addr, exports)
}

/// Waits (up to 10s) for an export holding every one of `needles`.
async fn wait_for_export(exports: &Mutex<Vec<Bytes>>, needles: &[&[u8]]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = exports.lock().unwrap().iter().any(|export| {
            needles
                .iter()
                .all(|needle| export.windows(needle.len()).any(|w| w == *needle))
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "no export holds the span in 10s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Multi-threaded: the span exporter's task must keep running while a failed assertion drops the
/// server mid-call, or the tracer's shutdown waits for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_layer_applies_to_a_service_of_ones_own() {
    let dir = tempfile::tempdir().unwrap();
    let (collector, exports) = collector().await;
    let server = TestServer::start_serving(config(dir.path(), collector).unwrap(), own()).await;
    let channel = server.channel().await;
    let metrics_addr = server.metrics_addr.unwrap();

    // Auth policy: "/tally.v1.Tally/*" wants the tally scope.
    assert_eq!(add(&channel, "alice-token", 2).await.unwrap(), 2);
    let refused = add(&channel, "bob-token", 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let anonymous = TallyClient::new(channel.clone())
        .add(AddRequest { amount: 1 })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");

    // The message limit, derived from AddRequest (one sint64: 11 bytes at most), leaves room for
    // a newer client's fields, not for megabytes.
    assert_eq!(add_padded(&channel, 512).await.unwrap().total, 3);
    let large = add_padded(&channel, 4096).await.unwrap_err();
    assert_eq!(large.code(), Code::ResourceExhausted, "{large:?}");

    // [deadline.methods]: a Watch without a deadline of its own gets 300ms.
    let started = Instant::now();
    let request = with_token(
        WatchRequest {
            count: 1000,
            interval_ms: 20,
        },
        "alice-token",
    );
    let mut totals = TallyClient::new(channel.clone())
        .watch(request)
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match totals.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without its deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // [quota.methods]: one Watch per caller, then RESOURCE_EXHAUSTED.
    let request = with_token(
        WatchRequest {
            count: 1,
            interval_ms: 1,
        },
        "alice-token",
    );
    let over = TallyClient::new(channel.clone())
        .watch(request)
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");

    // Connect JSON, from the same descriptors, through the same auth.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("{}/tally.v1.Tally/Add", server.uri()))
        .header("content-type", "application/json")
        .header("authorization", "Bearer alice-token")
        .body(Full::new(Bytes::from_static(br#"{"amount":"10"}"#)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // 2, 1 (padded), then 10.
    assert_eq!(json, serde_json::json!({"total": "13"}));

    // A trace span, the child of the caller's, named after the method.
    let mut request = with_token(AddRequest { amount: 0 }, "alice-token");
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let reply = TallyClient::new(channel.clone())
        .add(request)
        .await
        .unwrap();
    assert_eq!(
        reply.metadata().get("greeter-trace-id").unwrap(),
        TRACE_ID,
        "the call was traced"
    );
    let trace_id = hex::decode(TRACE_ID).unwrap();
    wait_for_export(&exports, &[&trace_id, b"tally.v1.Tally/Add"]).await;

    // Reflection lists and describes it; health knows it.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let list = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let mut answers = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(with_token(list, "alice-token"))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(listed)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services")
    };
    let names: Vec<_> = listed.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tally.v1.Tally"), "{names:?}");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "tally.v1.Tally".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // Its metrics series, by method, kind and code, as the Greeter's.
    let text = scrape(metrics_addr).await;
    let handled = |method, kind, code| {
        let labels = [
            ("grpc_service", "tally.v1.Tally"),
            ("grpc_method", method),
            ("grpc_type", kind),
            ("grpc_code", code),
        ];
        series(&text, "grpc_server_handled_total", &labels)
    };
    assert_eq!(handled("Add", "unary", "OK"), 4.0, "{text}");
    assert_eq!(handled("Add", "unary", "PermissionDenied"), 1.0);
    assert_eq!(handled("Add", "unary", "Unauthenticated"), 1.0);
    assert_eq!(handled("Add", "unary", "ResourceExhausted"), 1.0);
    let watch = "server_stream";
    assert_eq!(handled("Watch", watch, "DeadlineExceeded"), 1.0);
    assert_eq!(handled("Watch", watch, "ResourceExhausted"), 1.0);
    let refused = [("grpc_service", "tally.v1.Tally"), ("grpc_method", "Watch")];
    assert_eq!(series(&text, "greeter_quota_refused_total", &refused), 1.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn patterns_naming_it_are_checked_like_the_built_in_ones() {
    let dir = tempfile::tempdir().unwrap();
    let collector = "127.0.0.1:4318".parse().unwrap();
    config(dir.path(), collector).expect("the Tally's methods are served");

    // A typo names the closest of its methods.
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[quota.methods.\"/tally.v1.Tally/Ad\"]\nrate = 1.0\nburst = 1\n",
    )
    .unwrap();
    let sources = Sources {
        files: vec![typo],
        ..Sources::default()
    };
    let error = Config::load_serving(&sources, &[tally::FILE_DESCRIPTOR_SET]).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("quota.methods"), "{error}");
    assert!(
        error
            .message
            .ends_with("did you mean \"/tally.v1.Tally/Add\"?"),
        "{error}"
    );

    // The built-in server does not serve it: the same config is refused without it.
    let error = Config::load(&Sources {
        files: vec![dir.path().join("greeter.toml")],
        ..Sources::default()
    })
    .unwrap_err();
    assert!(error.message.contains("names no served"), "{error}");
}
