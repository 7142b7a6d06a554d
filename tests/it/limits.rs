//! Deadlines on every call kind, limits, overload shedding and HTTP/2 connection management,
//! against a real server on loopback. Time bounds asserted here are generous upper bounds (the
//! machine is shared): they prove "ends on time, not never", not speed.

use crate::common;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::common::{TestServer, config_with};
use bytes::Bytes;
use greeter::call::limit::ShedBy;
use greeter::pb::{HelloRequest, greeter_client::GreeterClient};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

fn overrides(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within 5s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn slow_stream_server(extra: &[(&str, &str)]) -> TestServer {
    let mut pairs = vec![("greeter.stream_interval", "1s")];
    pairs.extend_from_slice(extra);
    TestServer::start_with(config_with(overrides(&pairs))).await
}

/// How far past its deadline a call may end: generous for a shared machine, and far shorter than
/// the 5s between two streamed greetings, so a server that only looks at the deadline between
/// messages misses it.
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// Reads a response to its end (within 10s): the number of gRPC messages, the final grpc-status,
/// and when it arrived.
async fn messages_and_status(response: h2::client::ResponseFuture) -> (usize, String, Instant) {
    tokio::time::timeout(Duration::from_secs(10), read_to_status(response))
        .await
        .expect("the call ends within 10s")
}

async fn read_to_status(response: h2::client::ResponseFuture) -> (usize, String, Instant) {
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    if let Some(status) = response.headers().get("grpc-status") {
        return (0, status.to_str().unwrap().to_owned(), Instant::now());
    }
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        bytes.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    let at = Instant::now();
    let mut messages = 0;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        rest = &rest[5 + len..];
        messages += 1;
    }
    (
        messages,
        trailers["grpc-status"].to_str().unwrap().to_owned(),
        at,
    )
}

/// Asserts a call ended at its deadline: not before `sent + deadline` (the server starts its
/// clock when the request arrives, after `sent`), and within [`DEADLINE_SLACK`] after it.
fn ended_at_deadline(sent: Instant, deadline: Duration, ended: Instant) {
    let took = ended - sent;
    assert!(
        took >= deadline && took < deadline + DEADLINE_SLACK,
        "ended {took:?} after the call, deadline {deadline:?}"
    );
}

#[tokio::test]
async fn server_stream_past_its_deadline_ends_with_deadline_exceeded() {
    // The raw HTTP/2 client enforces no deadline: only the server can end the call.
    let server = slow_stream_server(&[("greeter.stream_interval", "5s")]).await;
    let mut client = h2_client(&server).await;
    let sent = Instant::now();
    let (response, mut body) = client
        .send_request(
            grpc_request("/helloworld.Greeter/SayHelloStreamReply", Some("300m")),
            false,
        )
        .unwrap();
    body.send_data(common::grpc_message("you"), true).unwrap();
    let (messages, status, ended) = messages_and_status(response).await;
    assert_eq!(messages, 1, "the first greeting came before the deadline");
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    ended_at_deadline(sent, Duration::from_millis(300), ended);
    assert_eq!(server.stats.calls.deadline_exceeded(), 1);
}

#[tokio::test]
async fn bidi_stream_past_its_deadline_ends_with_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = h2_client(&server).await;
    let sent = Instant::now();
    let (response, mut body) = client
        .send_request(
            grpc_request("/helloworld.Greeter/SayHelloBidiStream", Some("300m")),
            false,
        )
        .unwrap();
    // One request, then the request stream stays open and idle: only the deadline can end it.
    body.send_data(common::grpc_message("a"), false).unwrap();
    let (messages, status, ended) = messages_and_status(response).await;
    assert_eq!(messages, 1, "the reply to the one request");
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    ended_at_deadline(sent, Duration::from_millis(300), ended);
    drop(body);
}

/// A raw HTTP/2 client: sends headers and then nothing, the case of a slow or stuck uploader.
async fn h2_client(server: &TestServer) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn grpc_request(path: &str, timeout: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        request = request.header("grpc-timeout", t);
    }
    request.body(()).unwrap()
}

/// The final grpc-status of a response: from its headers (trailers-only) or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> String {
    let response = response.await.unwrap();
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    trailers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn unary_call_whose_request_never_completes_gets_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = h2_client(&server).await;
    let sent = Instant::now();
    let (response, _body_never_sent) = client
        .send_request(
            grpc_request("/helloworld.Greeter/SayHello", Some("300m")),
            false,
        )
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), grpc_status(response))
        .await
        .expect("answered within 5s");
    assert_eq!(status, "4", "DEADLINE_EXCEEDED, not CANCELLED (1)");
    ended_at_deadline(sent, Duration::from_millis(300), Instant::now());
}

#[tokio::test]
async fn default_deadline_applies_when_the_client_sends_none_and_max_caps_it() {
    let server = TestServer::start_with(config_with(overrides(&[
        ("deadline.default", "300ms"),
        ("deadline.max", "600ms"),
    ])))
    .await;
    let mut client = h2_client(&server).await;
    for (timeout, deadline) in [(None, 300), (Some("1H"), 600)] {
        let sent = Instant::now();
        let (response, _open) = client
            .send_request(grpc_request("/helloworld.Greeter/SayHello", timeout), false)
            .unwrap();
        assert_eq!(grpc_status(response).await, "4", "{timeout:?}");
        ended_at_deadline(sent, Duration::from_millis(deadline), Instant::now());
    }
}

#[tokio::test]
async fn per_method_deadline_overrides_apply_to_streams() {
    let mut config = config_with(vec![]);
    let limits = greeter::config::DeadlineLimits {
        default: Duration::from_millis(300),
        max: Duration::from_millis(300),
    };
    config
        .deadline
        .methods
        .insert("/helloworld.Greeter/SayHelloBidiStream".into(), limits);
    let server = TestServer::start_with(config).await;
    let mut client = h2_client(&server).await;
    let sent = Instant::now();
    let (response, _open) = client
        .send_request(
            grpc_request("/helloworld.Greeter/SayHelloBidiStream", None),
            false,
        )
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), grpc_status(response))
        .await
        .expect("the override ended the stream");
    assert_eq!(status, "4");
    ended_at_deadline(sent, Duration::from_millis(300), Instant::now());
}

#[tokio::test]
async fn a_client_that_cancels_stops_the_handler() {
    let server = slow_stream_server(&[]).await;
    let mut client = GreeterClient::new(server.channel().await);
    let mut replies = client
        .say_hello_stream_reply(hello("you"))
        .await
        .unwrap()
        .into_inner();
    assert!(replies.message().await.unwrap().is_some());
    assert_eq!(server.stats.calls.cancelled(), 0);
    drop(replies);
    let stats = Arc::clone(&server.stats);
    eventually("cancel observed server-side", || {
        stats.calls.cancelled() == 1
    })
    .await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_resource_exhausted() {
    let server = TestServer::start_with(config_with(overrides(&[
        ("limits.max_recv_message_bytes", "2048"),
        ("greeter.max_name_bytes", "100000"),
    ])))
    .await;
    let mut client = GreeterClient::new(server.channel().await);
    let status = client
        .say_hello(hello(&"x".repeat(4096)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(client.say_hello(hello(&"x".repeat(1000))).await.is_ok());
}

#[tokio::test]
async fn a_reply_over_the_send_limit_is_resource_exhausted() {
    let server = TestServer::start_with(config_with(overrides(&[
        ("limits.max_send_message_bytes", "100"),
        ("greeter.max_name_bytes", "100000"),
    ])))
    .await;
    let mut client = GreeterClient::new(server.channel().await);
    // "Hello, " + name + "!" encoded: 2 bytes of framing + 8 + the name.
    let fits = client.say_hello(hello(&"x".repeat(90))).await.unwrap();
    assert_eq!(fits.into_inner().message.len(), 98);
    let status = client.say_hello(hello(&"x".repeat(91))).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(client.say_hello(hello("after")).await.is_ok());
}

/// Opens a slow server stream on `channel` and waits for its first reply: one call in progress.
async fn hold_a_call(channel: Channel) -> tonic::Streaming<greeter::pb::HelloReply> {
    let mut replies = GreeterClient::new(channel)
        .say_hello_stream_reply(hello("held"))
        .await
        .unwrap()
        .into_inner();
    replies.message().await.unwrap().unwrap();
    replies
}

#[tokio::test]
async fn per_connection_call_limit_refuses_the_extra_call_and_the_connection_stays_healthy() {
    let server = slow_stream_server(&[("limits.max_concurrent_calls_per_connection", "2")]).await;
    let channel = server.channel().await;
    let held = [
        hold_a_call(channel.clone()).await,
        hold_a_call(channel.clone()).await,
    ];
    let mut client = GreeterClient::new(channel.clone());
    let status = client.say_hello(hello("third")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Another connection is not affected by this one's limit.
    let other = server.channel().await;
    assert!(
        GreeterClient::new(other)
            .say_hello(hello("x"))
            .await
            .is_ok()
    );
    drop(held);
    let stats = Arc::clone(&server.stats);
    eventually("held calls released", || stats.calls.cancelled() == 2).await;
    assert!(
        client.say_hello(hello("after")).await.is_ok(),
        "same connection recovers"
    );
}

#[tokio::test]
async fn http2_settings_advertise_the_stream_limit() {
    let server = TestServer::start_with(config_with(overrides(&[(
        "limits.max_concurrent_streams",
        "7",
    )])))
    .await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    // The client learns the server's SETTINGS once it has read them; a request round-trips them.
    let (response, _) = client
        .send_request(grpc_request("/grpc.health.v1.Health/Check", None), true)
        .unwrap();
    let _ = response.await;
    assert_eq!(client.current_max_send_streams(), 7);
}

#[tokio::test]
async fn global_overload_sheds_fast_with_resource_exhausted_and_recovers() {
    let server = slow_stream_server(&[("limits.max_concurrent_calls", "2")]).await;
    let held = [
        hold_a_call(server.channel().await).await,
        hold_a_call(server.channel().await).await,
    ];
    let mut client = GreeterClient::new(server.channel().await);
    let started = Instant::now();
    let status = client.say_hello(hello("shed")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "sheds at once, no queueing"
    );
    assert_eq!(server.stats.shed.by(ShedBy::Server), 1);
    assert_eq!(server.stats.shed.by(ShedBy::Connection), 0);
    drop(held);
    let stats = Arc::clone(&server.stats);
    eventually("held calls released", || stats.calls.cancelled() == 2).await;
    assert!(client.say_hello(hello("recovered")).await.is_ok());
}

/// HTTP/2 frames as bytes: the hostile client writes HEADERS + RST_STREAM pairs in bursts, which
/// is what the rapid-reset attack (CVE-2023-44487) does. The h2 crate's client will not do that:
/// it drops queued HEADERS when a stream is reset before they are flushed.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn rapid_reset_burst(first_stream: u32, pairs: u32) -> Vec<u8> {
    // HPACK, static table only: :method POST, :scheme http, :path /.
    const HEADER_BLOCK: [u8; 3] = [0x83, 0x86, 0x84];
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const END_HEADERS: u8 = 0x4;
    const CANCEL: u32 = 0x8;
    (0..pairs)
        .flat_map(|i| {
            let stream = first_stream + 2 * i;
            let mut pair = frame(HEADERS, END_HEADERS, stream, &HEADER_BLOCK);
            pair.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            pair
        })
        .collect()
}

/// What a raw HTTP/2 client reads back: the frames it cares about, in order.
#[derive(Debug, PartialEq)]
enum ServerFrame {
    GoAway { last_stream: u32, error: u32 },
    PingAck,
}

/// Reads frames until a GOAWAY or PING ACK (within 10s); after a GOAWAY, also until the server
/// closes the connection.
async fn read_until_goaway_or_ping_ack(
    tcp: &mut tokio::net::TcpStream,
) -> Result<ServerFrame, String> {
    use tokio::io::AsyncReadExt as _;

    let mut buffer = Vec::new();
    let read = async {
        loop {
            while buffer.len() >= 9 {
                let len = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                if buffer.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buffer[3], buffer[4]);
                let payload: Vec<u8> = buffer[9..9 + len].to_vec();
                buffer.drain(..9 + len);
                match (kind, flags & 0x1) {
                    (0x7, _) => {
                        let goaway = ServerFrame::GoAway {
                            last_stream: u32::from_be_bytes(payload[0..4].try_into().unwrap()),
                            error: u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                        };
                        let mut rest = Vec::new();
                        return match tcp.read_to_end(&mut rest).await {
                            Ok(_) => Ok(goaway),
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(goaway),
                            Err(e) => Err(format!("after {goaway:?}: {e}")),
                        };
                    }
                    (0x6, 0x1) => return Ok(ServerFrame::PingAck),
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) => return Err("EOF without GOAWAY".to_owned()),
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read error without GOAWAY: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10s")
}

/// Opens an HTTP/2 connection and writes `pairs` HEADERS + RST_STREAM pairs, then a PING.
async fn reset_streams(server: &TestServer, pairs: u32) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;

    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    bytes.extend(rapid_reset_burst(1, pairs));
    bytes.extend(frame(0x6, 0, 0, &[0; 8])); // PING
    tcp.write_all(&bytes).await.unwrap();
    tcp
}

#[tokio::test]
async fn rapid_reset_client_is_cut_off_at_the_configured_count_while_others_are_served() {
    // Not h2's default (20) nor the embedded default: the count proves the config is applied.
    const MAX_RESETS: u32 = 7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let server = TestServer::start_with(config_with(overrides(&[(
        "limits.max_pending_accept_reset_streams",
        &MAX_RESETS.to_string(),
    )])))
    .await;
    let mut good = GreeterClient::new(server.channel().await);

    // Up to the limit: the connection lives on and answers the PING.
    let mut tcp = reset_streams(&server, MAX_RESETS).await;
    assert_eq!(
        read_until_goaway_or_ping_ack(&mut tcp).await,
        Ok(ServerFrame::PingAck)
    );

    // One more reset: GOAWAY with ENHANCE_YOUR_CALM, naming the stream whose reset went over
    // (streams 1, 3, 5, ...: the 8th), and the connection is closed.
    let mut tcp = reset_streams(&server, MAX_RESETS + 1).await;
    assert_eq!(
        read_until_goaway_or_ping_ack(&mut tcp).await,
        Ok(ServerFrame::GoAway {
            last_stream: 2 * MAX_RESETS + 1,
            error: ENHANCE_YOUR_CALM
        })
    );

    let reply = good
        .say_hello(hello("still here"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "Hello, still here!");
}

#[tokio::test]
async fn max_connection_age_rotates_connections_and_calls_get_the_grace_to_finish() {
    let server = TestServer::start_with(config_with(overrides(&[
        ("connection.max_age", "300ms"),
        ("connection.max_age_grace", "5s"),
        ("greeter.stream_interval", "100ms"),
    ])))
    .await;
    let mut client = GreeterClient::new(server.channel().await);
    // Each stream (ten greetings, 0.9s) outlives its connection's age: the GOAWAY comes while it
    // runs, and the grace lets it finish; the next call goes to a new connection.
    for round in 0..3 {
        let replies: Vec<String> = client
            .say_hello_stream_reply(hello("aging"))
            .await
            .unwrap()
            .into_inner()
            .map(|reply| reply.unwrap().message)
            .collect()
            .await;
        assert_eq!(replies.len(), 10, "round {round}: {replies:?}");
    }
    let accepted = server.stats.connections_accepted.load(Ordering::Relaxed);
    assert!(
        accepted >= 3,
        "GOAWAY made the client reconnect: {accepted} connections"
    );
}

#[tokio::test]
async fn a_call_longer_than_max_age_grace_is_cut_when_the_grace_ends() {
    let mut config = config_with(overrides(&[
        ("connection.max_age", "300ms"),
        ("connection.max_age_grace", "500ms"),
        ("greeter.stream_interval", "100ms"),
    ]));
    // A 1.9s stream: it outlives age (300ms +-10%) + grace (500ms).
    config.greeter.stream_greetings = (0..20).map(|i| format!("g{i}")).collect();
    let server = TestServer::start_with(config).await;
    let before_connecting = Instant::now();
    let mut replies = GreeterClient::new(server.channel().await)
        .say_hello_stream_reply(hello("long"))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("the stream ends within 10s")
        {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream outlived its connection's age and grace"),
            Err(_) => break before_connecting.elapsed(),
        }
    };
    assert!(received > 0 && received < 20, "{received} greetings");
    // No earlier than the shortest age plus the grace, no later than the longest plus 1s slack.
    assert!(
        ended >= Duration::from_millis(270 + 500)
            && ended < Duration::from_millis(330 + 500 + 1000),
        "cut {ended:?} after connecting"
    );
}

/// Opens a raw HTTP/2 connection that makes one request and then idles; returns how long after
/// connecting the server's first GOAWAY arrived (within 10s).
async fn goaway_after(server: &TestServer) -> Duration {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let connecting = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    bytes.extend(frame(0x1, 0x4 | 0x1, 1, &[0x83, 0x86, 0x84])); // HEADERS, END_STREAM
    tcp.write_all(&bytes).await.unwrap();
    let read = async {
        let mut buffer = Vec::new();
        loop {
            while buffer.len() >= 9 {
                let len = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                if buffer.len() < 9 + len {
                    break;
                }
                if buffer[3] == 0x7 {
                    return connecting.elapsed();
                }
                buffer.drain(..9 + len);
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed without GOAWAY");
            buffer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a GOAWAY within 10s")
}

#[tokio::test]
async fn max_connection_age_is_jittered_so_connections_do_not_all_go_together() {
    let server =
        TestServer::start_with(config_with(overrides(&[("connection.max_age", "1s")]))).await;
    let server = Arc::new(server);
    let connections: Vec<_> = (0..12)
        .map(|_| {
            let server = Arc::clone(&server);
            tokio::spawn(async move { goaway_after(&server).await })
        })
        .collect();
    let mut ages = Vec::new();
    for connection in connections {
        ages.push(connection.await.unwrap());
    }
    ages.sort();
    // Each within 1s +-10% (plus slack for a busy machine), and spread over that range: twelve
    // draws from 200ms fall within 50ms of each other less than once in 100,000 runs.
    assert!(ages[0] >= Duration::from_millis(900), "{ages:?}");
    assert!(ages[11] < Duration::from_millis(1100 + 500), "{ages:?}");
    assert!(ages[11] - ages[0] >= Duration::from_millis(50), "{ages:?}");
}

/// `greeter_connections_open` on the server's metrics listener.
async fn connections_open(server: &TestServer) -> String {
    let text = common::scrape(server.metrics_addr.unwrap()).await;
    text.lines()
        .find_map(|line| line.strip_prefix("greeter_connections_open "))
        .expect("greeter_connections_open is exposed")
        .to_owned()
}

#[tokio::test]
async fn idle_connections_are_closed_and_clients_reconnect() {
    let server =
        TestServer::start_with(config_with(overrides(&[("connection.max_idle", "300ms")]))).await;
    let mut client = GreeterClient::new(server.channel().await);
    let called = Instant::now();
    assert!(client.say_hello(hello("first")).await.is_ok());
    // The server, not the client, ends the idle connection: none is left open.
    eventually_async("the idle connection closed", || async {
        connections_open(&server).await == "0"
    })
    .await;
    assert!(called.elapsed() >= Duration::from_millis(300));
    assert!(client.say_hello(hello("second")).await.is_ok());
    let accepted = server.stats.connections_accepted.load(Ordering::Relaxed);
    assert!(accepted >= 2, "a new connection was made: {accepted}");
}

#[tokio::test]
async fn probe_port_serves_health_and_nothing_else() {
    let server =
        TestServer::start_with(config_with(overrides(&[("probe.listen", "127.0.0.1:0")]))).await;
    let probe = Channel::from_shared(format!("http://{}", server.probe_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(probe.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "helloworld.Greeter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let greeter = GreeterClient::new(probe.clone())
        .say_hello(hello("x"))
        .await;
    assert_eq!(greeter.unwrap_err().code(), Code::Unimplemented);
    let reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(probe)
            .server_reflection_info(tokio_stream::empty())
            .await;
    assert_eq!(reflection.unwrap_err().code(), Code::Unimplemented);
}

#[tokio::test]
async fn keepalive_pings_close_a_peer_that_stopped_answering() {
    use tokio::io::AsyncWriteExt as _;

    let server = TestServer::start_with(config_with(overrides(&[
        ("connection.keepalive_interval", "200ms"),
        ("connection.keepalive_timeout", "200ms"),
    ])))
    .await;
    // A live client: the h2 crate answers pings; its call stays open.
    let mut live = h2_client(&server).await;
    let (response, mut body) = live
        .send_request(grpc_request("/helloworld.Greeter/SayHello", None), false)
        .unwrap();
    // A peer that made a request and then went silent: it reads nothing, answers no ping.
    let mut dead = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    bytes.extend(frame(0x1, 0x4 | 0x1, 1, &[0x83, 0x86, 0x84])); // HEADERS, END_STREAM
    dead.write_all(&bytes).await.unwrap();
    eventually_async("both connections open", || async {
        connections_open(&server).await == "2"
    })
    .await;

    eventually_async("the silent peer's connection closed", || async {
        connections_open(&server).await == "1"
    })
    .await;
    // The live one is still there, and its call finishes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(connections_open(&server).await, "1");
    body.send_data(common::grpc_message("alive"), true).unwrap();
    let (messages, status, _) = messages_and_status(response).await;
    assert_eq!((messages, status.as_str()), (1, "0"));
}

/// Waits (bounded) until the async `condition` holds.
async fn eventually_async<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within 5s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connections_over_max_connections_wait_to_be_accepted() {
    let server =
        TestServer::start_with(config_with(overrides(&[("limits.max_connections", "2")]))).await;
    // Two connections, each with a call in progress.
    let mut first = h2_client(&server).await;
    let (_first_response, first_body) = first
        .send_request(grpc_request("/helloworld.Greeter/SayHello", None), false)
        .unwrap();
    let mut second = h2_client(&server).await;
    let (second_response, mut second_body) = second
        .send_request(grpc_request("/helloworld.Greeter/SayHello", None), false)
        .unwrap();
    eventually_async("two connections open", || async {
        connections_open(&server).await == "2"
    })
    .await;

    // A third client connects (the kernel completes the TCP handshake) and calls: it waits.
    let channel = Channel::from_shared(server.uri()).unwrap().connect_lazy();
    let third = tokio::spawn(async move {
        GreeterClient::new(channel)
            .say_hello(hello("third"))
            .await
            .map(|reply| reply.into_inner().message)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the third call was answered");
    assert_eq!(server.stats.connections_accepted.load(Ordering::Relaxed), 2);

    // One connection ends: the waiting one is accepted and served.
    second_body
        .send_data(common::grpc_message("second"), true)
        .unwrap();
    let (messages, status, _) = messages_and_status(second_response).await;
    assert_eq!((messages, status.as_str()), (1, "0"));
    drop((second, second_body));
    let reply = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third call is served once a connection closes")
        .unwrap();
    assert_eq!(reply.unwrap(), "Hello, third!");
    drop((first, first_body));
}
