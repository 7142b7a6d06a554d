//! grpc-web against a real server: tonic-web's client over HTTP/1.1 (as a browser without HTTP/2
//! would call), CORS preflights as browsers send them, the page, TLS ALPN, and that all of it is
//! gone when `web.enabled = false`. The page itself is driven by a real browser in
//! tests/interop/test_browser.py.

use std::{sync::Arc, time::Duration};

use crate::common::{
    Pki, TestServer, config_with, greeter_token_auth, http_request, http_request_with,
};
use greeter::{
    config::{Config, Sources},
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, body::Body};
use tonic_web::{GrpcWebCall, GrpcWebClientLayer, GrpcWebClientService};

type WebClient = GreeterClient<GrpcWebClientService<Client<HttpConnector, GrpcWebCall<Body>>>>;

/// A grpc-web Greeter client speaking HTTP/1.1 only, as tonic's grpc-web example does.
fn web_client(server: &TestServer) -> WebClient {
    let http = Client::builder(TokioExecutor::new()).build_http();
    let service = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http);
    GreeterClient::with_origin(service, server.uri().parse().unwrap())
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

#[tokio::test]
async fn grpc_web_over_http1_serves_unary_and_server_streaming_calls() {
    let server = TestServer::start().await;
    let mut client = web_client(&server);

    let reply = client.say_hello(hello("web")).await.unwrap().into_inner();
    assert_eq!(reply.message, "Hello, web!");
    let reply = client.say_hello_again(hello("web")).await.unwrap();
    assert_eq!(reply.get_ref().message, "Hello again, web!");
    assert!(
        reply.metadata().get("x-request-id").is_some(),
        "grpc-web answers carry the request id too"
    );

    let greetings: Vec<String> = client
        .say_hello_stream_reply(hello("web"))
        .await
        .unwrap()
        .into_inner()
        .map(|reply| reply.unwrap().message)
        .collect()
        .await;
    assert_eq!(greetings.len(), 10);
    assert_eq!(greetings[0], "Hello, web!");
    assert_eq!(greetings[9], "안녕하세요, web!");

    // Errors travel in the grpc-web trailer frame, details included.
    let status = client
        .say_hello(hello(&"x".repeat(2000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(!status.details().is_empty(), "BadRequest details arrive");

    let web_reply = client.say_hello(hello("web")).await.unwrap();
    assert!(
        web_reply
            .metadata()
            .contains_key("access-control-expose-headers")
    );

    // Native gRPC over HTTP/2 on the same listener goes straight to the call stack: no CORS.
    let mut native = GreeterClient::new(server.channel().await);
    let reply = native.say_hello(hello("h2")).await.unwrap();
    assert_eq!(reply.get_ref().message, "Hello, h2!");
    assert!(
        !reply
            .metadata()
            .contains_key("access-control-expose-headers")
    );
    assert!(!reply.metadata().contains_key("vary"));
}

#[tokio::test]
async fn grpc_web_calls_pass_auth_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let auth = greeter_token_auth(dir.path(), "grt_browser-token", "browser");
    let server = TestServer::start_with(config_with(auth)).await;
    let mut client = web_client(&server);

    let status = client.say_hello(hello("anon")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut request = Request::new(hello("browser"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer grt_browser-token".parse().unwrap());
    let reply = client.say_hello(request).await.unwrap().into_inner();
    assert_eq!(reply.message, "Hello, browser!");
}

#[tokio::test]
async fn grpc_web_calls_draw_from_the_callers_quota() {
    // One bucket per peer address, of one call: a grpc-web call takes it, and the next call from
    // the same address, grpc-web or gRPC, is refused.
    let server = TestServer::start_with(config_with(
        [
            ("quota.enabled", "true"),
            ("quota.rate", "0.01"),
            ("quota.burst", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    ))
    .await;
    let mut client = web_client(&server);
    assert!(client.say_hello(hello("web")).await.is_ok());
    let status = client.say_hello(hello("web")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("over quota"), "{status:?}");
    let status = GreeterClient::new(server.channel().await)
        .say_hello(hello("grpc"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn cors_preflights_allow_the_configured_origins_only() {
    let mut config = config_with(vec![]);
    config.web = Config::load(&Sources {
        env: vec![(
            "GREETER__WEB__ALLOWED_ORIGINS".into(),
            "https://app.example".into(),
        )],
        ..Sources::default()
    })
    .unwrap()
    .web;
    let server = TestServer::start_with(config).await;
    let addr = server.addr;
    let preflight = |origin: &'static str| async move {
        http_request_with(
            addr,
            "OPTIONS",
            "/helloworld.Greeter/SayHello",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type,x-grpc-web,authorization",
                ),
            ],
        )
        .await
    };

    let allowed = preflight("https://app.example").await;
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let headers = allowed.header("access-control-allow-headers").unwrap();
    for needed in [
        "content-type",
        "x-grpc-web",
        "authorization",
        "grpc-timeout",
    ] {
        assert!(headers.contains(needed), "{needed} in {headers}");
    }
    assert_eq!(allowed.header("access-control-max-age"), Some("600"));

    let refused = preflight("https://evil.example").await;
    assert_eq!(
        refused.header("access-control-allow-origin"),
        None,
        "a browser refuses the call without this header"
    );

    // The call itself: the allowed origin may read the answer, and these headers of it.
    let mut client = web_client(&server);
    let call_from = |origin: &'static str| {
        let mut request = Request::new(hello("cors"));
        request
            .metadata_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };
    let answer = client
        .say_hello(call_from("https://app.example"))
        .await
        .unwrap();
    let headers = answer.metadata();
    assert_eq!(
        headers.get("access-control-allow-origin").unwrap(),
        "https://app.example"
    );
    let exposed = headers
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap();
    for header in ["grpc-status", "grpc-message", "x-request-id"] {
        assert!(exposed.contains(header), "{header} in {exposed}");
    }
    let answer = client
        .say_hello(call_from("https://evil.example"))
        .await
        .unwrap();
    assert!(
        answer
            .metadata()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn allowed_origins_star_allows_any_origin() {
    let mut config = config_with(vec![]);
    config.web = Config::load(&Sources {
        env: vec![("GREETER__WEB__ALLOWED_ORIGINS".into(), "*".into())],
        ..Sources::default()
    })
    .unwrap()
    .web;
    let server = TestServer::start_with(config).await;
    for origin in ["https://app.example", "http://localhost:8080"] {
        let preflight = http_request_with(
            server.addr,
            "OPTIONS",
            "/helloworld.Greeter/SayHello",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type,x-grpc-web"),
            ],
        )
        .await;
        assert_eq!(preflight.status, 200, "{origin}");
        assert_eq!(
            preflight.header("access-control-allow-origin"),
            Some("*"),
            "{origin}"
        );
        // No credentials with "*": tokens travel in the authorization header, not cookies.
        assert_eq!(preflight.header("access-control-allow-credentials"), None);

        let mut request = Request::new(hello("anyone"));
        request
            .metadata_mut()
            .insert("origin", origin.parse().unwrap());
        let answer = web_client(&server).say_hello(request).await.unwrap();
        assert_eq!(
            answer
                .metadata()
                .get("access-control-allow-origin")
                .unwrap(),
            "*"
        );
        assert_eq!(answer.into_inner().message, "Hello, anyone!");
    }
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_content_security_policy() {
    let server = TestServer::start().await;

    let page = http_request(server.addr, "GET", "/", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(page.body.contains("app.js"), "the page loads its script");

    let script = http_request(server.addr, "GET", "/app.js", None).await;
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(script.body.contains("application/grpc-web"));
    let style = http_request(server.addr, "GET", "/style.css", None).await;
    assert_eq!(style.status, 200);

    let head = http_request(server.addr, "HEAD", "/", None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        http_request(server.addr, "GET", "/favicon.ico", None)
            .await
            .status,
        404
    );
    // A POST in no content type the port speaks is refused, naming those it does.
    let refused = http_request(server.addr, "POST", "/helloworld.Greeter/SayHello", None).await;
    assert_eq!(refused.status, 415);
    assert!(
        refused.body.starts_with("this port speaks gRPC"),
        "{}",
        refused.body
    );
    assert!(
        refused
            .header("accept-post")
            .unwrap()
            .contains("application/grpc-web"),
        "{:?}",
        refused.header("accept-post")
    );
}

/// Whether `addr` answers an HTTP/1.1 request with HTTP/1.1.
async fn answers_http1(addr: std::net::SocketAddr) -> bool {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("the server answers or closes the connection")
        .ok();
    raw.starts_with(b"HTTP/1.1")
}

#[tokio::test]
async fn without_web_the_listener_speaks_http2_only() {
    // Connect also serves HTTP/1.1 (tests/it/connect.rs): off too, for a gRPC-only listener.
    let server = TestServer::start_with(config_with(vec![
        ("web.enabled".into(), "false".into()),
        ("connect.enabled".into(), "false".into()),
    ]))
    .await;
    assert!(!answers_http1(server.addr).await);

    // gRPC itself is served as ever.
    let mut native = GreeterClient::new(server.channel().await);
    assert!(native.say_hello(hello("h2")).await.is_ok());
}

#[tokio::test]
async fn the_probe_port_never_speaks_grpc_web() {
    let server = TestServer::start_with(config_with(vec![(
        "probe.listen".into(),
        "127.0.0.1:0".into(),
    )]))
    .await;
    assert!(answers_http1(server.addr).await, "the main listener does");
    assert!(!answers_http1(server.probe_addr.unwrap()).await);
}

/// The ALPN protocol a TLS client offering only `offer` ends up with, or the handshake error.
pub async fn negotiate(server: &TestServer, pki: &Pki, offer: &[u8]) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![offer.to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.alpn_protocol().unwrap_or_default().to_vec())
}

#[tokio::test]
async fn tls_offers_http1_only_when_web_is_on() {
    let pki = Pki::new();
    let web = TestServer::start_with(config_with(pki.tls_overrides())).await;
    assert_eq!(negotiate(&web, &pki, b"h2").await.unwrap(), b"h2");
    assert_eq!(
        negotiate(&web, &pki, b"http/1.1").await.unwrap(),
        b"http/1.1"
    );

    let mut overrides = pki.tls_overrides();
    overrides.push(("web.enabled".into(), "false".into()));
    overrides.push(("connect.enabled".into(), "false".into()));
    let grpc_only = TestServer::start_with(config_with(overrides)).await;
    assert_eq!(negotiate(&grpc_only, &pki, b"h2").await.unwrap(), b"h2");
    let refused = negotiate(&grpc_only, &pki, b"http/1.1").await.unwrap_err();
    assert!(refused.contains("NoApplicationProtocol"), "{refused}");
}

#[tokio::test]
async fn grpc_web_over_http2_carries_the_trailers_in_the_body() {
    use bytes::{BufMut as _, BytesMut};
    use prost::Message as _;

    let server = TestServer::start().await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{}/helloworld.Greeter/SayHello",
        server.addr
    ))
    .header("content-type", "application/grpc-web+proto")
    .header("x-grpc-web", "1")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    let message = hello("h2 web").encode_to_vec();
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    body.send_data(frame.freeze(), true).unwrap();

    let response = response.await.unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/grpc-web+proto"
    );
    let mut bytes = Vec::new();
    let mut answer = response.into_body();
    while let Some(chunk) = answer.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes[0], 0, "a message frame first");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    let reply = greeter::pb::HelloReply::decode(&bytes[5..5 + len]).unwrap();
    assert_eq!(reply.message, "Hello, h2 web!");
    let trailers = &bytes[5 + len..];
    assert_eq!(trailers[0], 0x80, "then the trailer frame");
    assert!(String::from_utf8_lossy(&trailers[5..]).contains("grpc-status:0"));
}

#[tokio::test]
async fn on_loopback_plaintext_browsers_must_call_the_server_by_a_loopback_name() {
    let server = TestServer::start().await;
    let page = http_request_with(server.addr, "GET", "/", &[("Host", "evil.example:50051")]).await;
    assert_eq!(page.status, 421, "DNS rebinding is refused: {}", page.body);
    let call = http_request_with(
        server.addr,
        "POST",
        "/helloworld.Greeter/SayHello",
        &[
            ("Host", "evil.example"),
            ("Content-Type", "application/grpc-web+proto"),
        ],
    )
    .await;
    assert_eq!(call.status, 421);
    for host in ["localhost:50051", "127.0.0.1:50051", "[::1]:50051"] {
        let page = http_request_with(server.addr, "GET", "/", &[("Host", host)]).await;
        assert_eq!(page.status, 200, "{host}");
    }
    // gRPC clients are not browsers: any authority.
    let channel = tonic::transport::Channel::from_shared(server.uri())
        .unwrap()
        .origin("http://greeter.internal:50051".parse().unwrap())
        .connect()
        .await
        .unwrap();
    assert!(
        GreeterClient::new(channel)
            .say_hello(hello("h2"))
            .await
            .is_ok()
    );

    // A server meant for the network is called by its own names: no such check.
    let exposed = TestServer::start_with(config_with(vec![
        ("server.listen".into(), "0.0.0.0:0".into()),
        ("server.allow_insecure".into(), "true".into()),
    ]))
    .await;
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], exposed.addr.port()));
    let page = http_request_with(local, "GET", "/", &[("Host", "greeter.example")]).await;
    assert_eq!(page.status, 200);
}
