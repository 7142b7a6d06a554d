//! The Greeter's four RPCs, validation, and transport-level bad input, against a real server on a
//! loopback port through a real tonic client.

use crate::common;

use crate::common::{TestServer, test_config};
use greeter::pb::{HelloReply, HelloRequest, greeter_client::GreeterClient};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, codegen::http::uri::PathAndQuery};

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

/// Every greeting SayHelloStreamReply sends for `name`, in order.
async fn stream_replies(server: &TestServer, name: &str) -> Vec<String> {
    GreeterClient::new(server.channel().await)
        .say_hello_stream_reply(hello(name))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().message)
        .collect()
        .await
}

#[tokio::test]
async fn unary_greetings_match_the_quick_start() {
    let server = TestServer::start().await;
    let mut client = GreeterClient::new(server.channel().await);

    let reply = client.say_hello(hello("you")).await.unwrap().into_inner();
    assert_eq!(reply.message, "Hello, you!");
    let reply = client
        .say_hello_again(hello("you"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "Hello again, you!");
    let reply = client.say_hello(hello("")).await.unwrap().into_inner();
    assert_eq!(reply.message, "Hello, world!");
}

#[tokio::test]
async fn stream_reply_sends_every_configured_greeting_in_order() {
    let config = test_config(&[]);
    let expected: Vec<String> = config
        .greeter
        .stream_greetings
        .iter()
        .map(|g| format!("{g}, you!"))
        .collect();
    assert!(expected.len() > 1);
    let server = TestServer::start_with(config).await;
    assert_eq!(stream_replies(&server, "you").await, expected);
}

#[tokio::test]
async fn stream_reply_count_follows_config() {
    let config = greeter::config::Config::load(&greeter::config::Sources {
        env: vec![(
            "GREETER__GREETER__STREAM_GREETINGS".into(),
            "Hi,Salut,Hej".into(),
        )],
        overrides: vec![
            ("server.listen".into(), "127.0.0.1:0".into()),
            ("greeter.stream_interval".into(), "0s".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let server = TestServer::start_with(config).await;
    assert_eq!(
        stream_replies(&server, "Ana").await,
        ["Hi, Ana!", "Salut, Ana!", "Hej, Ana!"]
    );
}

#[tokio::test]
async fn bidi_replies_to_each_name_as_it_arrives() {
    let server = TestServer::start().await;
    let mut client = GreeterClient::new(server.channel().await);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .say_hello_bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    // Each reply must arrive before the next name is sent: replies are not batched at the end.
    for name in ["Ana", "Bo", "Chen"] {
        tx.send(hello(name)).await.unwrap();
        let reply = replies.message().await.unwrap().expect("a reply per name");
        assert_eq!(reply.message, format!("Hello, {name}!"));
    }
    drop(tx);
    assert!(
        replies.message().await.unwrap().is_none(),
        "stream ends after the last name"
    );
}

#[tokio::test]
async fn names_over_the_limit_or_with_control_characters_are_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = GreeterClient::new(server.channel().await);

    let max = "x".repeat(1024);
    assert!(
        client.say_hello(hello(&max)).await.is_ok(),
        "exactly the limit is fine"
    );

    let status = client
        .say_hello(hello(&"x".repeat(1025)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "name is 1025 bytes long; the maximum is 1024 bytes"
    );

    let status = client
        .say_hello_again(hello("a\u{1b}[31m"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("U+001B"), "{}", status.message());

    let status = client
        .say_hello_stream_reply(hello("bad\nname"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The server keeps serving after refusing.
    assert!(client.say_hello(hello("ok")).await.is_ok());
}

#[tokio::test]
async fn bidi_invalid_name_ends_the_stream_after_earlier_replies() {
    let server = TestServer::start().await;
    let mut client = GreeterClient::new(server.channel().await);
    let names = tokio_stream::iter([hello("a"), hello("b\u{0}"), hello("c")]);
    let mut replies = client
        .say_hello_bidi_stream(names)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        replies.message().await.unwrap().unwrap().message,
        "Hello, a!"
    );
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    use tonic_types::StatusExt as _;
    assert!(
        status.get_details_bad_request().is_some(),
        "details in stream trailers"
    );
}

/// HelloRequest as the wire sees it, so a test can send bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawHelloRequest {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn raw_unary(
    server: &TestServer,
    path: &'static str,
    name: Vec<u8>,
) -> Result<HelloReply, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawHelloRequest, HelloReply>::default();
    grpc.unary(
        Request::new(RawHelloRequest { name }),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn non_utf8_name_is_refused_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let status = raw_unary(&server, "/helloworld.Greeter/SayHello", vec![0xff, 0xfe])
        .await
        .unwrap_err();
    // Every gRPC stack answers an undecodable request with INTERNAL; the message says why.
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());

    let ok = raw_unary(&server, "/helloworld.Greeter/SayHello", b"you".to_vec())
        .await
        .unwrap();
    assert_eq!(ok.message, "Hello, you!");
}

#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented() {
    let server = TestServer::start().await;
    for path in [
        "/helloworld.Greeter/SayGoodbye",
        "/helloworld.Nope/SayHello",
    ] {
        let status = raw_unary(&server, path, b"x".to_vec()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
    }
}

#[tokio::test]
async fn stream_reply_starts_at_once_and_ends_as_soon_as_the_last_greeting_is_sent() {
    let mut config = common::config_with(vec![("greeter.stream_interval".into(), "2s".into())]);
    config.greeter.stream_greetings = vec!["Hi".into(), "Yo".into()];
    let server = TestServer::start_with(config).await;
    let mut client = GreeterClient::new(server.channel().await);
    let start = std::time::Instant::now();
    let mut replies = client
        .say_hello_stream_reply(hello("you"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        replies.message().await.unwrap().unwrap().message,
        "Hi, you!"
    );
    // No interval before the first greeting either.
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        replies.message().await.unwrap().unwrap().message,
        "Yo, you!"
    );
    let last = std::time::Instant::now();
    assert!(replies.message().await.unwrap().is_none());
    // Not another interval (2s) of idling before the end: generous against a loaded machine.
    assert!(
        last.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        last.elapsed()
    );
}
