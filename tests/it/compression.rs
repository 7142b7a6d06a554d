//! Message compression against a real server: which encodings requests may use, and which replies
//! go out compressed. A reply's compression shows in the first byte of its gRPC frame (the
//! compressed flag), so these calls are made with the h2 crate and read the frames as sent;
//! `grpc-encoding` alone says only what the server *would* use.

use crate::common::{TestServer, config_with};
use bytes::{BufMut as _, Bytes, BytesMut};
use greeter::{
    config::Encoding,
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use prost::Message as _;
use tonic::{Code, codec::CompressionEncoding};

/// One gRPC frame holding `HelloRequest { name }`, uncompressed.
fn request_frame(name: &str) -> Bytes {
    let message = HelloRequest { name: name.into() }.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    frame.freeze()
}

/// How the first reply of `method` for `name` arrives at a client sending `grpc-accept-encoding:
/// accept`: the `grpc-encoding` header and whether the message is compressed.
async fn first_reply(
    server: &TestServer,
    method: &str,
    name: &str,
    accept: Option<&str>,
) -> (Option<String>, bool) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(format!(
        "http://{}/helloworld.Greeter/{method}",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(accept) = accept {
        request = request.header("grpc-accept-encoding", accept);
    }
    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    // The bidi call stays open: its reply comes before the request stream ends.
    body.send_data(request_frame(name), method != "SayHelloBidiStream")
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let encoding = response
        .headers()
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut replies = response.into_body();
    let first = replies.data().await.expect("a reply").unwrap();
    (encoding, first[0] == 1)
}

/// Whether the first reply arrives compressed.
async fn compressed(server: &TestServer, method: &str, name: &str, accept: &str) -> bool {
    first_reply(server, method, name, Some(accept)).await.1
}

#[tokio::test]
async fn unary_replies_are_compressed_for_clients_that_accept_it_when_large_enough() {
    // The default: send gzip, for unary replies from 512 bytes on.
    let server = TestServer::start_with(config_with(vec![])).await;
    let long = "x".repeat(600);

    let (encoding, was_compressed) = first_reply(&server, "SayHello", &long, Some("gzip")).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert!(was_compressed, "a 600-byte reply is compressed");
    assert!(compressed(&server, "SayHelloAgain", &long, "identity,gzip").await);

    // From exactly 512 bytes on: "Hello, " + 501 bytes + "!" is 509 bytes of text, which a
    // HelloReply encodes in 512 (a tag byte, two of length).
    assert!(compressed(&server, "SayHello", &"x".repeat(501), "gzip").await);
    assert!(!compressed(&server, "SayHello", &"x".repeat(500), "gzip").await);

    // Greetings are too small to gain: plain even to a client that accepts gzip.
    assert!(!compressed(&server, "SayHello", "you", "gzip").await);
    // Streams carry greetings too, and tonic fixes a stream's compression before the handler
    // sees the name: plain.
    assert!(!compressed(&server, "SayHelloStreamReply", &long, "gzip").await);
    assert!(!compressed(&server, "SayHelloBidiStream", &long, "gzip").await);

    // Not asked, or asked only for what the server does not send (zstd costs more, see
    // BENCHMARKS.md): plain.
    assert_eq!(
        first_reply(&server, "SayHello", &long, None).await,
        (None, false)
    );
    assert!(!compressed(&server, "SayHello", &long, "zstd").await);
}

#[tokio::test]
async fn with_no_threshold_every_reply_is_compressed_in_the_configured_encodings() {
    let mut config = config_with(vec![("compression.min_reply_bytes".into(), "0".into())]);
    config.compression.send = vec![Encoding::Zstd];
    let server = TestServer::start_with(config).await;

    let (encoding, was_compressed) =
        first_reply(&server, "SayHello", "you", Some("gzip,zstd")).await;
    assert_eq!(
        encoding.as_deref(),
        Some("zstd"),
        "the one the server sends"
    );
    assert!(was_compressed);
    assert!(compressed(&server, "SayHelloStreamReply", "you", "zstd").await);
    assert!(compressed(&server, "SayHelloBidiStream", "you", "zstd").await);
    assert!(!compressed(&server, "SayHello", "you", "gzip").await);
}

#[tokio::test]
async fn compressed_requests_are_accepted_in_either_encoding() {
    let server = TestServer::start().await;
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut client = GreeterClient::new(server.channel().await)
            .send_compressed(encoding)
            .accept_compressed(CompressionEncoding::Gzip);
        let name = "x".repeat(800);
        let reply = client
            .say_hello(HelloRequest { name: name.clone() })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().message, format!("Hello, {name}!"));
    }
}

#[tokio::test]
async fn an_encoding_not_accepted_is_unimplemented() {
    let mut config = config_with(vec![]);
    config.compression.accept = vec![Encoding::Gzip];
    let server = TestServer::start_with(config).await;
    let mut client =
        GreeterClient::new(server.channel().await).send_compressed(CompressionEncoding::Zstd);
    let status = client
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}
