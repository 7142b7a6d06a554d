//! The Connect protocol against a real server, byte for byte: hyper's client over HTTP/1.1 and
//! HTTP/2 posting JSON and protobuf, the error JSON and the HTTP status of each code, envelopes and
//! the end-of-stream message, `connect-timeout-ms`, gzip both ways, auth, metrics with the
//! method's `grpc_type`, TLS ALPN, and that `connect.enabled = false` turns all of it off. Real
//! Connect clients (buf curl, connect-es) and curl run in tests/interop/test_connect.py.

use std::{io::Read as _, time::Duration};

use base64::Engine as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message as _;
use serde_json::{Value, json};

use crate::common::{
    Pki, TestServer, config_with, greeter_token_auth, http_request, http_request_with, scrape,
    test_config, wait_for_calls_in_flight,
};
use greeter::pb::{HelloReply, HelloRequest};

/// A Connect response as a test sees it.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The envelopes of a streaming answer: (flags, payload).
    fn envelopes(&self) -> Vec<(u8, Bytes)> {
        let mut body = self.body.clone();
        let mut out = Vec::new();
        while !body.is_empty() {
            let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
            out.push((body[0], body.slice(5..5 + len)));
            body = body.slice(5 + len..);
        }
        out
    }
}

/// A server that wants the token `grt_connect-token` (named "connect") for Greeter calls; the
/// directory holds its tokens file.
async fn token_server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config_with(greeter_token_auth(
        dir.path(),
        "grt_connect-token",
        "connect",
    )))
    .await;
    (dir, server)
}

/// POSTs `body` to `path` with `headers`, over HTTP/2 (prior knowledge) or HTTP/1.1.
async fn post(
    server: &TestServer,
    http2: bool,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::post(format!("{}{path}", server.uri()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let response = client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    })
    .await
    .expect("answered within 10s");
    Answer {
        status: response.0.status.as_u16(),
        headers: response.0.headers,
        body: response.1,
    }
}

const JSON: (&str, &str) = ("content-type", "application/json");
const PROTO: (&str, &str) = ("content-type", "application/proto");
const STREAM_JSON: (&str, &str) = ("content-type", "application/connect+json");
const STREAM_PROTO: (&str, &str) = ("content-type", "application/connect+proto");

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(flags);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.freeze()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn unary_calls_in_json_and_protobuf_over_both_http_versions() {
    let server = TestServer::start().await;
    for http2 in [false, true] {
        let answer = post(
            &server,
            http2,
            "/helloworld.Greeter/SayHello",
            &[JSON],
            r#"{"name":"you"}"#,
        )
        .await;
        assert_eq!(answer.status, 200, "http2 {http2}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(&answer.body[..], br#"{"message":"Hello, you!"}"#);
        assert_eq!(answer.header("x-request-id").map(str::len), Some(32));

        let request = HelloRequest { name: "pb".into() }.encode_to_vec();
        let answer = post(
            &server,
            http2,
            "/helloworld.Greeter/SayHelloAgain",
            &[PROTO, ("connect-protocol-version", "1")],
            request,
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-type"), Some("application/proto"));
        let reply = HelloReply::decode(answer.body).unwrap();
        assert_eq!(reply.message, "Hello again, pb!");
    }
    // Health's messages come from its descriptors too: canonical JSON, enum as its name.
    let answer = post(&server, false, "/grpc.health.v1.Health/Check", &[JSON], "").await;
    assert_eq!(answer.json(), json!({"status": "SERVING"}));
}

#[tokio::test]
async fn errors_are_connect_json_with_the_status_their_code_maps_to() {
    let server = TestServer::start().await;
    let call = |path: &'static str, headers: Vec<(&'static str, &'static str)>, body: String| {
        let server = &server;
        async move { post(server, false, path, &headers, body).await }
    };

    // An invalid name: 400, invalid_argument, the BadRequest as bytes and as JSON.
    let answer = call(
        "/helloworld.Greeter/SayHello",
        vec![JSON],
        json!({"name": "x".repeat(2000)}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let error = answer.json();
    assert_eq!(error["code"], "invalid_argument");
    assert_eq!(
        error["message"],
        "name is 2000 bytes long; the maximum is 1024 bytes"
    );
    let detail = &error["details"][0];
    assert_eq!(detail["type"], "google.rpc.BadRequest");
    assert_eq!(detail["debug"]["fieldViolations"][0]["field"], "name");
    let value = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(detail["value"].as_str().unwrap())
        .unwrap();
    let bad_request = tonic_types::pb::BadRequest::decode(&value[..]).unwrap();
    assert_eq!(bad_request.field_violations[0].field, "name");

    // JSON that is not the method's message.
    let answer = call(
        "/helloworld.Greeter/SayHello",
        vec![JSON],
        r#"{"nom":"x"}"#.into(),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["code"], "invalid_argument");

    // No such method.
    let answer = call("/helloworld.Greeter/Nope", vec![JSON], "{}".into()).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["code"], "unimplemented");

    // A unary content type for a streaming method, and the other way round.
    let answer = call(
        "/helloworld.Greeter/SayHelloStreamReply",
        vec![JSON],
        "{}".into(),
    )
    .await;
    assert_eq!(answer.status, 415);
    assert_eq!(
        answer.header("accept-post"),
        Some("application/connect+json, application/connect+proto")
    );
    let answer = call(
        "/helloworld.Greeter/SayHello",
        vec![STREAM_JSON],
        "{}".into(),
    )
    .await;
    assert_eq!(answer.status, 415);

    // Headers Connect defines, with values it does not.
    for (header, value) in [
        ("connect-timeout-ms", "soon"),
        ("connect-protocol-version", "2"),
    ] {
        let answer = call(
            "/helloworld.Greeter/SayHello",
            vec![JSON, (header, value)],
            "{}".into(),
        )
        .await;
        assert_eq!(answer.status, 400, "{header}: {value}");
        assert_eq!(answer.json()["code"], "invalid_argument");
    }
    let answer = call(
        "/helloworld.Greeter/SayHello",
        vec![JSON, ("content-encoding", "br")],
        "{}".into(),
    )
    .await;
    assert_eq!(answer.status, 501);
    assert_eq!(answer.header("accept-encoding"), Some("gzip, identity"));

    // Past the method's message limit (twice it, for JSON): resource_exhausted, 429.
    let answer = call(
        "/helloworld.Greeter/SayHello",
        vec![JSON],
        json!({"name": "x".repeat(5000)}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.json()["code"], "resource_exhausted");
}

#[tokio::test]
async fn server_streams_are_envelopes_ending_in_the_end_of_stream_message() {
    let server = TestServer::start().await;
    for http2 in [false, true] {
        let answer = post(
            &server,
            http2,
            "/helloworld.Greeter/SayHelloStreamReply",
            &[STREAM_JSON],
            envelope(0, br#"{"name":"s"}"#),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("content-type"),
            Some("application/connect+json")
        );
        let mut envelopes = answer.envelopes();
        let (end_flags, end) = envelopes.pop().unwrap();
        assert_eq!(end_flags, 2, "end-of-stream flag");
        assert_eq!(serde_json::from_slice::<Value>(&end).unwrap(), json!({}));
        assert_eq!(envelopes.len(), 10);
        assert_eq!(envelopes[0], (0, Bytes::from(r#"{"message":"Hello, s!"}"#)));
    }

    // An error ends the stream in the end-of-stream message, the HTTP status 200.
    let request = HelloRequest {
        name: "x".repeat(2000),
    };
    let answer = post(
        &server,
        true,
        "/helloworld.Greeter/SayHelloStreamReply",
        &[STREAM_PROTO],
        envelope(0, &request.encode_to_vec()),
    )
    .await;
    assert_eq!(answer.status, 200);
    let envelopes = answer.envelopes();
    assert_eq!(envelopes.len(), 1);
    let end: Value = serde_json::from_slice(&envelopes[0].1).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument");
    assert_eq!(end["error"]["details"][0]["type"], "google.rpc.BadRequest");
}

#[tokio::test]
async fn bidi_streams_over_http2() {
    let server = TestServer::start().await;
    let mut body = BytesMut::new();
    for name in ["a", "b"] {
        body.put(envelope(0, json!({"name": name}).to_string().as_bytes()));
    }
    let answer = post(
        &server,
        true,
        "/helloworld.Greeter/SayHelloBidiStream",
        &[STREAM_JSON],
        body.freeze(),
    )
    .await;
    let messages: Vec<_> = answer
        .envelopes()
        .into_iter()
        .map(|(flags, payload)| (flags, serde_json::from_slice::<Value>(&payload).unwrap()))
        .collect();
    assert_eq!(
        messages,
        [
            (0, json!({"message": "Hello, a!"})),
            (0, json!({"message": "Hello, b!"})),
            (2, json!({})),
        ]
    );
}

#[tokio::test]
async fn connect_timeout_ms_is_the_calls_deadline() {
    let server = TestServer::start_with(test_config(&[("greeter.stream_interval", "100ms")])).await;
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHelloStreamReply",
        &[STREAM_JSON, ("connect-timeout-ms", "250")],
        envelope(0, br#"{"name":"late"}"#),
    )
    .await;
    assert_eq!(answer.status, 200);
    let mut envelopes = answer.envelopes();
    let (_, end) = envelopes.pop().unwrap();
    let end: Value = serde_json::from_slice(&end).unwrap();
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    // Greetings go out 100 ms apart from when the call started, and the deadline counts from
    // before that: at most 250 / 100 + 1 of the 10 before it, however slow the machine.
    assert!(envelopes.len() <= 250 / 100 + 1, "{}", envelopes.len());
}

#[tokio::test]
async fn gzip_requests_and_replies() {
    let server = TestServer::start_with(test_config(&[("compression.min_reply_bytes", "0")])).await;
    let name = "z".repeat(600);
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[
            JSON,
            ("content-encoding", "gzip"),
            ("accept-encoding", "gzip"),
        ],
        gzip(json!({"name": name}).to_string().as_bytes()),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-encoding"), Some("gzip"));
    let reply: Value = serde_json::from_slice(&gunzip(&answer.body)).unwrap();
    assert_eq!(reply["message"], format!("Hello, {name}!"));

    // Streams: compressed envelopes both ways, announced in connect-content-encoding.
    let answer = post(
        &server,
        true,
        "/helloworld.Greeter/SayHelloStreamReply",
        &[
            STREAM_JSON,
            ("connect-content-encoding", "gzip"),
            ("connect-accept-encoding", "gzip"),
        ],
        envelope(1, &gzip(br#"{"name":"gz"}"#)),
    )
    .await;
    assert_eq!(answer.header("connect-content-encoding"), Some("gzip"));
    let envelopes = answer.envelopes();
    assert_eq!(envelopes.len(), 11);
    assert_eq!(envelopes[0].0, 1, "compressed flag");
    assert_eq!(gunzip(&envelopes[0].1), br#"{"message":"Hello, gz!"}"#);
    // ... and plain to a client that does not accept gzip, however small min_reply_bytes.
    let answer = post(
        &server,
        true,
        "/helloworld.Greeter/SayHelloStreamReply",
        &[STREAM_JSON],
        envelope(0, br#"{"name":"plain"}"#),
    )
    .await;
    assert_eq!(answer.header("connect-content-encoding"), None);
    assert_eq!(
        answer.envelopes()[0],
        (0, Bytes::from(r#"{"message":"Hello, plain!"}"#))
    );

    // A gzip bomb inflates no further than the method's limit.
    let bomb = gzip(json!({"name": "b".repeat(1 << 20)}).to_string().as_bytes());
    assert!(bomb.len() < 2048, "{}", bomb.len());
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON, ("content-encoding", "gzip")],
        bomb,
    )
    .await;
    assert_eq!(answer.status, 429);
}

#[tokio::test]
async fn gzip_requests_are_refused_where_compression_accept_lacks_it() {
    let mut config = test_config(&[]);
    config.compression.accept = vec![greeter::config::Encoding::Zstd];
    let server = TestServer::start_with(config).await;
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON, ("content-encoding", "gzip")],
        gzip(br#"{"name":"gz"}"#),
    )
    .await;
    assert_eq!(answer.status, 501);
    assert_eq!(answer.json()["code"], "unimplemented");
    assert_eq!(answer.header("accept-encoding"), Some("identity"));
}

#[tokio::test]
async fn only_replies_from_compression_min_reply_bytes_are_gzipped() {
    // compression.min_reply_bytes is 512 by default: a greeting of a short name stays plain
    // even for a client that accepts gzip; one of a 600-byte name is gzipped, if the client
    // accepts gzip.
    let server = TestServer::start().await;
    for (name, accepts, gzipped) in [
        ("s".to_owned(), true, false),
        ("z".repeat(600), true, true),
        ("z".repeat(600), false, false),
    ] {
        let accept = ("accept-encoding", if accepts { "gzip" } else { "identity" });
        let answer = post(
            &server,
            false,
            "/helloworld.Greeter/SayHello",
            &[JSON, accept],
            json!({"name": name}).to_string(),
        )
        .await;
        assert_eq!(answer.status, 200);
        let body = if gzipped {
            assert_eq!(answer.header("content-encoding"), Some("gzip"));
            gunzip(&answer.body)
        } else {
            assert_eq!(answer.header("content-encoding"), None);
            answer.body.to_vec()
        };
        let reply: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["message"], format!("Hello, {name}!"));
    }
}

#[tokio::test]
async fn grpc_headers_a_connect_client_sends_are_not_passed_on() {
    // A grpc-timeout of 1 ns would end the call at once if it reached the call stack; a
    // grpc-encoding would make it read the plain message as compressed.
    let server = TestServer::start().await;
    for http2 in [false, true] {
        let answer = post(
            &server,
            http2,
            "/helloworld.Greeter/SayHello",
            &[JSON, ("grpc-timeout", "1n"), ("grpc-encoding", "gzip")],
            json!({"name": "s"}).to_string(),
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.json()["message"], "Hello, s!");
    }
}

#[tokio::test]
async fn a_token_without_the_scope_gets_403_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = greeter_token_auth(dir.path(), "grt_connect-token", "connect");
    let entry = greeter::call::auth::entry_for("grt_other-token", "other", &["reflection".into()]);
    let tokens = dir.path().join("tokens.toml");
    let mut text = std::fs::read_to_string(&tokens).unwrap();
    text.push('\n');
    text.push_str(&greeter::call::auth::entry_toml(&entry));
    std::fs::write(&tokens, text).unwrap();
    let server = TestServer::start_with(config_with(overrides)).await;
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON, ("authorization", "Bearer grt_other-token")],
        json!({"name": "s"}).to_string(),
    )
    .await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json()["code"], "permission_denied");
}

#[tokio::test]
async fn connect_calls_draw_from_the_callers_quota() {
    // One bucket per peer address, of one call: a Connect call takes it; the next, Connect or
    // gRPC, is refused (429 for Connect).
    let server = TestServer::start_with(test_config(&[
        ("quota.enabled", "true"),
        ("quota.rate", "0.01"),
        ("quota.burst", "1"),
    ]))
    .await;
    let call = async || {
        post(
            &server,
            false,
            "/helloworld.Greeter/SayHello",
            &[JSON],
            json!({"name": "q"}).to_string(),
        )
        .await
    };
    assert_eq!(call().await.status, 200);
    let refused = call().await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["code"], "resource_exhausted");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("over quota"),
        "{:?}",
        refused.body
    );
    let status = greeter::pb::greeter_client::GreeterClient::new(server.channel().await)
        .say_hello(HelloRequest { name: "q".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn connect_calls_pass_auth_and_count_in_metrics_like_grpc_calls() {
    let (_dir, server) = token_server().await;
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON],
        r#"{"name":"anon"}"#,
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["code"], "unauthenticated");

    let token = ("authorization", "Bearer grt_connect-token");
    let answer = post(
        &server,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON, token],
        r#"{"name":"known"}"#,
    )
    .await;
    assert_eq!(answer.json(), json!({"message": "Hello, known!"}));
    let answer = post(
        &server,
        true,
        "/helloworld.Greeter/SayHelloStreamReply",
        &[STREAM_JSON, token],
        envelope(0, br#"{"name":"known"}"#),
    )
    .await;
    assert_eq!(answer.envelopes().len(), 11);

    wait_for_calls_in_flight(server.metrics_addr.unwrap(), 0.0).await;
    let text = scrape(server.metrics_addr.unwrap()).await;
    let handled = |kind: &str, method: &str, code: &str| {
        let wanted = [
            format!("grpc_type=\"{kind}\""),
            format!("grpc_method=\"{method}\""),
            format!("grpc_code=\"{code}\""),
        ];
        text.lines()
            .filter(|l| l.starts_with("grpc_server_handled_total{"))
            .find(|l| wanted.iter().all(|w| l.contains(w.as_str())))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.to_owned())
    };
    assert_eq!(
        handled("unary", "SayHello", "Unauthenticated").as_deref(),
        Some("1")
    );
    assert_eq!(handled("unary", "SayHello", "OK").as_deref(), Some("1"));
    assert_eq!(
        handled("server_stream", "SayHelloStreamReply", "OK").as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn without_connect_json_posts_are_not_served() {
    // grpc-web alone: HTTP/1.1 is on, a JSON POST is not a call: 415, saying what turns it on.
    let web_only = TestServer::start_with(config_with(vec![(
        "connect.enabled".into(),
        "false".into(),
    )]))
    .await;
    let answer = post(
        &web_only,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON],
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(answer.status, 415);
    let text = String::from_utf8_lossy(&answer.body);
    assert!(text.contains("[connect] enabled = true"), "{text}");
    assert!(
        !answer
            .header("accept-post")
            .unwrap()
            .contains("application/json"),
        "{:?}",
        answer.header("accept-post")
    );

    // Connect alone: served over HTTP/1.1, without the CORS headers [web] adds.
    let connect_only =
        TestServer::start_with(config_with(vec![("web.enabled".into(), "false".into())])).await;
    let answer = post(
        &connect_only,
        false,
        "/helloworld.Greeter/SayHello",
        &[JSON],
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(answer.json(), json!({"message": "Hello, x!"}));
    assert_eq!(answer.header("access-control-expose-headers"), None);
    // Other HTTP/1.1 requests are refused before the gRPC stack, which speaks HTTP/2 only.
    let answer = post(
        &connect_only,
        false,
        "/helloworld.Greeter/SayHello",
        &[("content-type", "text/plain")],
        "x",
    )
    .await;
    assert_eq!(answer.status, 415);
    assert!(
        answer
            .header("accept-post")
            .unwrap()
            .contains("application/json")
    );
    // gRPC passes the gate in any HTTP version: over HTTP/2 it is served, over HTTP/1.1 the
    // Connect layer refuses it.
    let reply = greeter::pb::greeter_client::GreeterClient::new(connect_only.channel().await)
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "Hello, x!");
    let answer = post(
        &connect_only,
        false,
        "/helloworld.Greeter/SayHello",
        &[("content-type", "application/grpc")],
        envelope(0, &HelloRequest { name: "x".into() }.encode_to_vec()),
    )
    .await;
    assert_eq!(answer.status, 415);
    assert!(
        String::from_utf8_lossy(&answer.body)
            .starts_with("over HTTP/1.1 this server speaks Connect"),
        "{:?}",
        answer.body
    );
    assert_eq!(
        answer.header("accept-post"),
        Some(
            "application/json, application/proto, application/connect+json, \
             application/connect+proto"
        )
    );
    assert_eq!(
        http_request(connect_only.addr, "GET", "/", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn connect_alone_on_plaintext_loopback_answers_loopback_hosts_only() {
    // DNS rebinding: a page at attacker.example whose name now resolves to 127.0.0.1 calls the
    // quick-start server as if same-origin. [web] is off: the check must not depend on it.
    let connect_only =
        TestServer::start_with(config_with(vec![("web.enabled".into(), "false".into())])).await;
    // Browsers reach a plaintext server over HTTP/1.1 only; over HTTP/2 a Connect call is named
    // by its :authority, which this client sets to the loopback address it dials.
    for (http2, host, status) in [
        (false, "attacker.example:50051", 421),
        (false, "localhost.attacker.example", 421),
        (false, "localhost:50051", 200),
        (false, "[::1]:50051", 200),
        (true, "ignored", 200),
    ] {
        let answer = post(
            &connect_only,
            http2,
            "/helloworld.Greeter/SayHello",
            &[JSON, ("host", host)],
            r#"{"name":"x"}"#,
        )
        .await;
        assert_eq!(answer.status, status, "{host}, HTTP/2: {http2}");
    }
}

#[tokio::test]
async fn production_answers_json_posts_415_saying_how_to_turn_connect_on() {
    // The production shape: gRPC over HTTP/2 only. curl's JSON used to be read as a gRPC frame
    // header ("a message of 577659245 bytes").
    let grpc_only = TestServer::start_with(config_with(vec![
        ("web.enabled".into(), "false".into()),
        ("connect.enabled".into(), "false".into()),
    ]))
    .await;
    for content_type in [
        "application/json",
        "text/plain",
        "application/grpc-web+proto",
    ] {
        let answer = post(
            &grpc_only,
            true,
            "/helloworld.Greeter/SayHello",
            &[("content-type", content_type)],
            r#"{"name":"x"}"#,
        )
        .await;
        assert_eq!(answer.status, 415, "{content_type}");
        let text = String::from_utf8_lossy(&answer.body);
        assert_eq!(
            text,
            "this port speaks gRPC (application/grpc); for JSON or protobuf over plain HTTP \
             (curl), turn on the Connect protocol: [connect] enabled = true\n"
        );
        assert_eq!(
            answer.header("accept-post"),
            Some("application/grpc, application/grpc+proto")
        );
    }
}

#[tokio::test]
async fn tls_offers_http1_when_connect_is_on() {
    let pki = Pki::new();
    let mut overrides = pki.tls_overrides();
    overrides.push(("web.enabled".into(), "false".into()));
    let connect = TestServer::start_with(config_with(overrides.clone())).await;
    assert_eq!(
        crate::web::negotiate(&connect, &pki, b"http/1.1")
            .await
            .unwrap(),
        b"http/1.1"
    );
    overrides.push(("connect.enabled".into(), "false".into()));
    let grpc_only = TestServer::start_with(config_with(overrides)).await;
    let refused = crate::web::negotiate(&grpc_only, &pki, b"http/1.1")
        .await
        .unwrap_err();
    assert!(refused.contains("NoApplicationProtocol"), "{refused}");
}

#[tokio::test]
async fn web_cors_applies_to_connect_calls() {
    let mut config = config_with(vec![]);
    config.web.allowed_origins = vec!["https://app.example".into()];
    let server = TestServer::start_with(config).await;
    let preflight = http_request_with(
        server.addr,
        "OPTIONS",
        "/helloworld.Greeter/SayHello",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type,connect-protocol-version,connect-timeout-ms",
            ),
        ],
    )
    .await;
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let allowed = preflight.header("access-control-allow-headers").unwrap();
    let names: Vec<&str> = allowed.split(',').map(str::trim).collect();
    for needed in ["connect-protocol-version", "connect-timeout-ms"] {
        assert!(names.contains(&needed), "{needed} in {allowed}");
    }

    for (origin, allowed) in [
        ("https://app.example", Some("https://app.example")),
        ("https://evil.example", None),
    ] {
        let answer = post(
            &server,
            false,
            "/helloworld.Greeter/SayHello",
            &[JSON, ("origin", origin)],
            r#"{"name":"cors"}"#,
        )
        .await;
        assert_eq!(
            answer.header("access-control-allow-origin"),
            allowed,
            "{origin}"
        );
    }
}

/// An HTTP/2 connection (h2's client) to `server`, and its PING sender: a PING's answer comes
/// after every frame the server queued before reading it.
async fn h2_with_ping(server: &TestServer) -> (h2::client::SendRequest<Bytes>, h2::PingPong) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (h2, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let ping_pong = connection.ping_pong().expect("the first PingPong");
    tokio::spawn(connection);
    (h2, ping_pong)
}

/// The reason the server reset `upload`'s stream with, among the frames received so far.
fn was_reset(upload: &mut h2::SendStream<Bytes>) -> Option<h2::Reason> {
    match std::future::poll_fn(|cx| upload.poll_reset(cx)).now_or_never()? {
        Ok(reason) => Some(reason),
        Err(e) => panic!("the connection failed: {e}"),
    }
}

/// Over HTTP/1.1, a call refused before its body was read still gets its answer: the server reads
/// and drops the body first. Otherwise it closes the connection while the client is still
/// writing, and the client sees a reset instead of the answer.
#[tokio::test]
async fn http1_refusals_arrive_while_the_client_is_still_sending() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let (_dir, server) = token_server().await;
    // Refused by auth (in the call stack), and by a bad header (before it).
    for extra in ["", "connect-timeout-ms: soon\r\n"] {
        let body = json!({"name": "x".repeat(3000)}).to_string();
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /helloworld.Greeter/SayHello HTTP/1.1\r\nHost: {}\r\n\
             connection: close\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
            server.addr,
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        for chunk in body.as_bytes().chunks(512) {
            tcp.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
            .await
            .expect("answered within 10s")
            .expect("the answer, not a reset");
        let raw = String::from_utf8(raw).unwrap();
        let wanted = if extra.is_empty() { "401" } else { "400" };
        assert!(raw.starts_with(&format!("HTTP/1.1 {wanted}")), "{raw}");
    }
}

/// Over HTTP/2, a call refused before its body was read is answered at once, and its stream is
/// not reset under a client still sending: the server reads and drops the rest of the body
/// instead. A reset (`RST_STREAM(NO_ERROR)`, which RFC 9113 allows) is what curl 7.x reports as
/// "Stream error in the HTTP/2 framing layer" instead of the answer it already has.
#[tokio::test]
async fn http2_refusals_answer_first_and_leave_the_upload_unharmed() {
    let (_dir, server) = token_server().await;
    let (mut h2, mut ping_pong) = h2_with_ping(&server).await;
    // Refused by auth (in the call stack), and by a bad header (before it).
    for (extra, wanted) in [(None, 401), (Some("soon"), 400)] {
        let mut request = http::Request::post(format!(
            "http://{}/helloworld.Greeter/SayHello",
            server.addr
        ))
        .header("content-type", "application/json");
        if let Some(timeout) = extra {
            request = request.header("connect-timeout-ms", timeout);
        }
        let (response, mut upload) = h2.send_request(request.body(()).unwrap(), false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered before the body was sent")
            .unwrap();
        assert_eq!(response.status(), wanted);
        let mut answer = response.into_body();
        while let Some(chunk) = answer.data().await {
            chunk.unwrap();
        }
        // A reset would be queued when the answer ends, so before the answer to a PING sent
        // after it.
        ping_pong.ping(h2::Ping::opaque()).await.unwrap();
        assert_eq!(was_reset(&mut upload), None);
        let body = json!({"name": "you"}).to_string();
        upload
            .send_data(Bytes::from(body), true)
            .expect("the stream is still open for the upload");
    }
}

/// The drain of a refused call's body stops at its byte cap (64 KiB for a request refused before
/// translation): a stream that uploads more is reset (NO_ERROR) as soon as it passes the cap,
/// while one under the cap, opened first, is still being drained (until the drain's 5 s).
#[tokio::test]
async fn the_drain_of_a_refused_body_stops_at_its_byte_cap() {
    let server = TestServer::start().await;
    let (mut h2, mut ping_pong) = h2_with_ping(&server).await;
    let mut refused_upload = async |bytes: usize| {
        let request = http::Request::post(format!(
            "http://{}/helloworld.Greeter/SayHello",
            server.addr
        ))
        .header("content-type", "application/json")
        .header("connect-timeout-ms", "soon")
        .body(())
        .unwrap();
        h2 = h2.clone().ready().await.unwrap();
        let (response, mut upload) = h2.send_request(request, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered before the body was sent")
            .unwrap();
        assert_eq!(response.status(), 400);
        upload
            .send_data(Bytes::from(vec![b' '; bytes]), false)
            .unwrap();
        upload
    };
    let mut under = refused_upload(32 << 10).await;
    let mut over = refused_upload(128 << 10).await;
    let reason = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| over.poll_reset(cx)),
    )
    .await
    .expect("the stream over the cap is reset")
    .unwrap();
    assert_eq!(reason, h2::Reason::NO_ERROR);
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    assert_eq!(
        was_reset(&mut under),
        None,
        "the drain under the cap goes on"
    );
}

/// Hostile: a client that opens Connect streams without credentials and never sends their bodies
/// holds each stream's slot only while its body drains (at most 5 s), so one connection holds at
/// most `max_concurrent_streams` of them; other callers are served meanwhile, and a slot frees
/// as soon as its upload ends, or when the drain gives up on it.
#[tokio::test]
async fn refused_streams_left_uploading_are_bounded_by_the_stream_limit() {
    const STREAMS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut overrides = greeter_token_auth(dir.path(), "grt_connect-token", "connect");
    overrides.push(("limits.max_concurrent_streams".into(), STREAMS.to_string()));
    // This connection's calls are all refused: keep first_call_timeout's GOAWAY out of the way.
    overrides.push(("connection.first_call_timeout".into(), "60s".into()));
    let server = TestServer::start_with(config_with(overrides)).await;
    let (mut h2, mut ping_pong) = h2_with_ping(&server).await;
    let request = || {
        http::Request::post(format!(
            "http://{}/helloworld.Greeter/SayHello",
            server.addr
        ))
        .header("content-type", "application/json")
        .body(())
        .unwrap()
    };
    let mut uploads = Vec::new();
    for _ in 0..STREAMS {
        let (response, upload) = h2.send_request(request(), false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered before the body was sent")
            .unwrap();
        assert_eq!(response.status(), 401);
        uploads.push(upload);
    }

    // Every slot is held: one more stream waits (the client keeps to the server's limit). The
    // server could only give a slot back by resetting its stream, and a reset would come before
    // the answer to a PING sent after the refusals.
    h2 = h2.ready().await.unwrap();
    let (queued, _upload) = h2.send_request(request(), true).unwrap();
    let mut queued = Box::pin(queued);
    ping_pong.ping(h2::Ping::opaque()).await.unwrap();
    for upload in &mut uploads {
        assert_eq!(
            was_reset(upload),
            None,
            "a refused stream's slot was released while its body was still coming"
        );
    }
    assert!(futures_util::poll!(&mut queued).is_pending());
    // Another caller is served meanwhile.
    let served = post(
        &server,
        true,
        "/helloworld.Greeter/SayHello",
        &[JSON, ("authorization", "Bearer grt_connect-token")],
        json!({"name": "you"}).to_string(),
    )
    .await;
    assert_eq!(served.status, 200);

    // One upload ends: its slot frees, and the waiting stream is answered.
    uploads[0]
        .send_data(Bytes::from(json!({"name": "you"}).to_string()), true)
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("the freed slot taken")
        .unwrap();
    assert_eq!(answered.status(), 401);

    // The other uploads never end: their slots free when the drain gives up on them (5 s). Two
    // more streams that never upload either: the first takes the free slot, the second waits
    // for one of those.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        h2 = h2.ready().await.unwrap();
        let (response, upload) = h2.send_request(request(), false).unwrap();
        uploads.push(upload);
        waiting.push(response);
    }
    for response in waiting {
        let response = tokio::time::timeout(Duration::from_secs(15), response)
            .await
            .expect("slots held by unfinished uploads are given back")
            .unwrap();
        assert_eq!(response.status(), 401);
    }
}
