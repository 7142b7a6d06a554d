//! End to end: the fuzzer's input becomes a sequence of HTTP/2 frames (or HTTP/1.1 requests) sent
//! on a fresh connection to a real `greeter::server::Server` in this process, in the production
//! shape: auth on (a static token and a JWKS), quotas, Connect and grpc-web on, tracing on (its
//! exporter points at a closed loopback port, so spans are built and dropped).
//!
//! The input is structure-aware (`arbitrary`): frames with valid headers blocks (HPACK literals)
//! naming the served paths, content types, credentials and the headers greeter parses, bodies
//! that are gRPC frames of a real `HelloRequest`, JSON, or bytes, and raw frames of any type.
//!
//! Oracle: no panic in the server (a panicking task aborts the process under libFuzzer), every
//! input's connection is answered and closed within a bound, and every 64th input, once the
//! client has gone: the server's calls in flight and open connections return to zero, its RSS
//! stays under the configured worst case (`ops::memory::WorstCase`) over the idle baseline, and a
//! valid call on a fresh connection still gets its greeting.
#![no_main]

use std::{
    net::SocketAddr,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arbitrary::Arbitrary;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use greeter::{
    config::{Config, Sources},
    ops::memory::WorstCase,
    pb::{HelloRequest, greeter_client::GreeterClient},
    server::{Server, largest_request_bytes},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    runtime::Runtime,
};

const TOKEN: &str = "fuzz-static-token";
const CHECKER_TOKEN: &str = "fuzz-checker-token";
const ISS: &str = "https://issuer.example";
/// How long one input's connection may take, answers included, before it counts as a hang.
const BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    H2(Vec<Frame<'a>>),
    H1(Vec<H1<'a>>),
    Bytes(&'a [u8]),
}

#[derive(Debug, Arbitrary)]
enum Frame<'a> {
    Headers {
        stream: u8,
        end_stream: bool,
        call: Call<'a>,
    },
    Continued {
        stream: u8,
        call: Call<'a>,
        split: u8,
    },
    Data {
        stream: u8,
        end_stream: bool,
        body: Body<'a>,
    },
    Reset {
        stream: u8,
        code: u32,
    },
    Settings {
        ack: bool,
        values: Vec<(u16, u32)>,
    },
    WindowUpdate {
        stream: u8,
        increment: u32,
    },
    Ping {
        ack: bool,
        data: u64,
    },
    GoAway {
        last: u32,
        code: u32,
    },
    Raw {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &'a [u8],
    },
}

#[derive(Debug, Arbitrary)]
struct Call<'a> {
    method: Method<'a>,
    path: Path<'a>,
    content_type: ContentType<'a>,
    credentials: Credentials<'a>,
    extra: Vec<(Extra<'a>, &'a [u8])>,
}

#[derive(Debug, Arbitrary)]
enum Method<'a> {
    Post,
    Get,
    Options,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Path<'a> {
    SayHello,
    SayHelloAgain,
    Stream,
    Bidi,
    HealthCheck,
    HealthWatch,
    Reflection,
    Root,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum ContentType<'a> {
    Grpc,
    GrpcProto,
    GrpcWeb,
    GrpcWebText,
    Json,
    Proto,
    ConnectJson,
    ConnectProto,
    Absent,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Credentials<'a> {
    Absent,
    Token,
    Jwt,
    Bearer(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Extra<'a> {
    GrpcTimeout,
    ConnectTimeout,
    ConnectVersion,
    Traceparent,
    Tracestate,
    GrpcTraceBin,
    RequestId,
    GrpcEncoding,
    GrpcAcceptEncoding,
    ContentEncoding,
    ConnectContentEncoding,
    Te,
    Origin,
    PreflightMethod,
    Authority,
    Other(&'a str),
}

#[derive(Debug, Arbitrary)]
enum Body<'a> {
    Hello { name: &'a str, flags: u8 },
    Json(&'a str),
    Text { name: &'a str },
    Bytes(&'a [u8]),
}

#[derive(Debug, Arbitrary)]
struct H1<'a> {
    call: Call<'a>,
    body: Body<'a>,
    chunked: bool,
}

struct Target {
    runtime: Runtime,
    addr: SocketAddr,
    metrics: SocketAddr,
    jwt: String,
    worst_case: u64,
    idle_rss: u64,
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn config(dir: &std::path::Path) -> Config {
    let tokens = dir.join("tokens.toml");
    let entries = [(TOKEN, "fuzz"), (CHECKER_TOKEN, "checker")]
        .map(|(token, name)| {
            let entry = greeter::call::auth::entry_for(token, name, &["greeter".into()]);
            greeter::call::auth::entry_toml(&entry)
        })
        .concat();
    std::fs::write(&tokens, entries).unwrap();
    let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let jwks = dir.join("jwks.json");
    let jwk = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
                               "x": B64.encode(key.public_key().as_ref())}]});
    std::fs::write(&jwks, jwk.to_string()).unwrap();
    let set = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let mut config = Config::load(&Sources {
        overrides: vec![
            set("server.listen", "127.0.0.1:0"),
            set("metrics.listen", "127.0.0.1:0"),
            set("greeter.stream_interval", "1ms"),
            set("auth.enabled", "true"),
            set("auth.tokens_file", tokens.to_str().unwrap()),
            set("quota.enabled", "true"),
            set("quota.rate", "50"),
            set("quota.burst", "20"),
            set("quota.identities.checker.class", "token"),
            set("quota.identities.checker.rate", "1000"),
            set("quota.identities.checker.burst", "1000"),
            set("web.enabled", "true"),
            set("connect.enabled", "true"),
            set("tracing.enabled", "true"),
            set("tracing.endpoint", "http://127.0.0.1:9"),
        ],
        ..Sources::default()
    })
    .expect("the fuzz configuration is valid");
    config.auth.jwt.issuers.push(greeter::config::JwtIssuer {
        issuer: ISS.into(),
        jwks_file: jwks,
        audiences: vec!["greeter".into()],
        scopes_claim: None,
    });
    config.auth.jwt.rules.push(greeter::config::ClaimRule {
        claim: "sub".into(),
        pattern: "system:serviceaccount:shop:*".into(),
        scopes: vec!["greeter".into()],
        issuer: None,
    });
    config
}

fn jwt() -> String {
    let key = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = B64.encode(json!({"alg": "EdDSA", "kid": "ed"}).to_string());
    let claims = json!({"iss": ISS, "aud": "greeter", "sub": "system:serviceaccount:shop:fuzz",
                        "exp": now + 86_400});
    let message = format!("{header}.{}", B64.encode(claims.to_string()));
    format!("{message}.{}", B64.encode(key.sign(message.as_bytes())))
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap().keep();
        let config = config(&dir);
        let worst_case = WorstCase::of(&config, largest_request_bytes(&config)).total();
        let server = runtime
            .block_on(Server::bind(config))
            .expect("the server binds");
        let (addr, metrics) = (server.local_addr(), server.metrics_addr().unwrap());
        runtime.spawn(server.serve(std::future::pending()));
        let target = Target {
            runtime,
            addr,
            metrics,
            jwt: jwt(),
            worst_case,
            idle_rss: 0,
        };
        target.runtime.block_on(target.greeting());
        Target {
            idle_rss: rss(),
            ..target
        }
    })
}

/// HPACK integer with an `n`-bit prefix.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    integer(out, 0, 7, name.len());
    out.extend_from_slice(name);
    integer(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

impl Call<'_> {
    fn fields(&self, target: &Target) -> Vec<(Vec<u8>, Vec<u8>)> {
        let method: &[u8] = match self.method {
            Method::Post => b"POST",
            Method::Get => b"GET",
            Method::Options => b"OPTIONS",
            Method::Other(other) => other.as_bytes(),
        };
        let path: &[u8] = match self.path {
            Path::SayHello => b"/helloworld.Greeter/SayHello",
            Path::SayHelloAgain => b"/helloworld.Greeter/SayHelloAgain",
            Path::Stream => b"/helloworld.Greeter/SayHelloStreamReply",
            Path::Bidi => b"/helloworld.Greeter/SayHelloBidiStream",
            Path::HealthCheck => b"/grpc.health.v1.Health/Check",
            Path::HealthWatch => b"/grpc.health.v1.Health/Watch",
            Path::Reflection => b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            Path::Root => b"/",
            Path::Other(other) => other.as_bytes(),
        };
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b":method".to_vec(), method.to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), path.to_vec()),
            (b":authority".to_vec(), b"localhost".to_vec()),
        ];
        let content_type: Option<&[u8]> = match self.content_type {
            ContentType::Grpc => Some(b"application/grpc"),
            ContentType::GrpcProto => Some(b"application/grpc+proto"),
            ContentType::GrpcWeb => Some(b"application/grpc-web+proto"),
            ContentType::GrpcWebText => Some(b"application/grpc-web-text"),
            ContentType::Json => Some(b"application/json"),
            ContentType::Proto => Some(b"application/proto"),
            ContentType::ConnectJson => Some(b"application/connect+json"),
            ContentType::ConnectProto => Some(b"application/connect+proto"),
            ContentType::Absent => None,
            ContentType::Other(other) => Some(other.as_bytes()),
        };
        if let Some(content_type) = content_type {
            fields.push((b"content-type".to_vec(), content_type.to_vec()));
        }
        let bearer = match self.credentials {
            Credentials::Absent => None,
            Credentials::Token => Some(format!("Bearer {TOKEN}")),
            Credentials::Jwt => Some(format!("Bearer {}", target.jwt)),
            Credentials::Bearer(other) => Some(other.to_owned()),
        };
        if let Some(bearer) = bearer {
            fields.push((b"authorization".to_vec(), bearer.into_bytes()));
        }
        for (name, value) in &self.extra {
            let name: &[u8] = match name {
                Extra::GrpcTimeout => b"grpc-timeout",
                Extra::ConnectTimeout => b"connect-timeout-ms",
                Extra::ConnectVersion => b"connect-protocol-version",
                Extra::Traceparent => b"traceparent",
                Extra::Tracestate => b"tracestate",
                Extra::GrpcTraceBin => b"grpc-trace-bin",
                Extra::RequestId => b"x-request-id",
                Extra::GrpcEncoding => b"grpc-encoding",
                Extra::GrpcAcceptEncoding => b"grpc-accept-encoding",
                Extra::ContentEncoding => b"content-encoding",
                Extra::ConnectContentEncoding => b"connect-content-encoding",
                Extra::Te => b"te",
                Extra::Origin => b"origin",
                Extra::PreflightMethod => b"access-control-request-method",
                Extra::Authority => b":authority",
                Extra::Other(other) => other.as_bytes(),
            };
            fields.push((name.to_vec(), value.to_vec()));
        }
        fields
    }

    fn block(&self, target: &Target) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in self.fields(target) {
            literal(&mut block, &name, &value);
        }
        block
    }
}

impl Body<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Hello { name, flags } => {
                let message = HelloRequest {
                    name: (*name).to_owned(),
                }
                .encode_to_vec();
                let mut frame = vec![*flags];
                frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                frame.extend_from_slice(&message);
                frame
            }
            Body::Json(text) => text.as_bytes().to_vec(),
            Body::Text { name } => {
                let message = HelloRequest {
                    name: (*name).to_owned(),
                }
                .encode_to_vec();
                let mut frame = vec![0];
                frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                frame.extend_from_slice(&message);
                base64::engine::general_purpose::STANDARD
                    .encode(frame)
                    .into_bytes()
            }
            Body::Bytes(bytes) => bytes.to_vec(),
        }
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len().min(0xff_ffff);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&payload[..len]);
}

fn stream_id(stream: u8) -> u32 {
    u32::from(stream % 8) * 2 + 1
}

fn h2_bytes(frames: &[Frame], target: &Target) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    for f in frames {
        match f {
            Frame::Headers {
                stream,
                end_stream,
                call,
            } => {
                let flags = 0x4 | u8::from(*end_stream);
                frame(
                    &mut out,
                    0x1,
                    flags,
                    stream_id(*stream),
                    &call.block(target),
                );
            }
            Frame::Continued {
                stream,
                call,
                split,
            } => {
                let block = call.block(target);
                let at = usize::from(*split).min(block.len());
                frame(&mut out, 0x1, 0, stream_id(*stream), &block[..at]);
                frame(&mut out, 0x9, 0x4, stream_id(*stream), &block[at..]);
            }
            Frame::Data {
                stream,
                end_stream,
                body,
            } => {
                frame(
                    &mut out,
                    0x0,
                    u8::from(*end_stream),
                    stream_id(*stream),
                    &body.bytes(),
                );
            }
            Frame::Reset { stream, code } => {
                frame(&mut out, 0x3, 0, stream_id(*stream), &code.to_be_bytes());
            }
            Frame::Settings { ack, values } => {
                let payload: Vec<u8> = values
                    .iter()
                    .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
                    .collect();
                frame(&mut out, 0x4, u8::from(*ack), 0, &payload);
            }
            Frame::WindowUpdate { stream, increment } => {
                let id = if *stream == 0 { 0 } else { stream_id(*stream) };
                frame(&mut out, 0x8, 0, id, &increment.to_be_bytes());
            }
            Frame::Ping { ack, data } => {
                frame(&mut out, 0x6, u8::from(*ack), 0, &data.to_be_bytes())
            }
            Frame::GoAway { last, code } => {
                let payload: Vec<u8> = last
                    .to_be_bytes()
                    .into_iter()
                    .chain(code.to_be_bytes())
                    .collect();
                frame(&mut out, 0x7, 0, 0, &payload);
            }
            Frame::Raw {
                kind,
                flags,
                stream,
                payload,
            } => frame(&mut out, *kind, *flags, *stream, payload),
        }
    }
    out
}

fn h1_bytes(requests: &[H1], target: &Target) -> Vec<u8> {
    let mut out = Vec::new();
    for request in requests {
        let fields = request.call.fields(target);
        let get = |name: &[u8]| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        out.extend_from_slice(&get(b":method"));
        out.push(b' ');
        out.extend_from_slice(&get(b":path"));
        out.extend_from_slice(b" HTTP/1.1\r\nhost: localhost\r\n");
        for (name, value) in fields.iter().filter(|(n, _)| !n.starts_with(b":")) {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let body = request.body.bytes();
        if request.chunked {
            out.extend_from_slice(
                format!("transfer-encoding: chunked\r\n\r\n{:x}\r\n", body.len()).as_bytes(),
            );
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
        }
    }
    out
}

impl Target {
    /// Writes `bytes` on a fresh connection and reads until the server closes it or stays quiet.
    async fn send(&self, bytes: &[u8]) {
        let started = Instant::now();
        let mut conn = TcpStream::connect(self.addr)
            .await
            .expect("the server accepts");
        // The server may close before reading everything: a refused write is an answer too.
        let _ = conn.write_all(bytes).await;
        let mut buf = vec![0; 64 << 10];
        loop {
            match tokio::time::timeout(Duration::from_millis(30), conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(_)) => assert!(
                    started.elapsed() < BOUND,
                    "the server kept answering past {BOUND:?}"
                ),
            }
        }
    }

    /// A valid call on a fresh connection, as a client of the service would make it.
    async fn greeting(&self) {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("a fresh connection is accepted");
        let mut request = tonic::Request::new(HelloRequest {
            name: "fuzz".into(),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {CHECKER_TOKEN}").parse().unwrap(),
        );
        request.set_timeout(BOUND);
        let reply = GreeterClient::new(channel)
            .say_hello(request)
            .await
            .expect("a valid call still gets its greeting");
        assert_eq!(reply.into_inner().message, "Hello, fuzz!");
    }

    async fn metric(&self, series: &str) -> f64 {
        let mut conn = TcpStream::connect(self.metrics).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} is exposed"))
            .parse()
            .unwrap()
    }

    /// Once the client has gone, what it held is released and the service still answers.
    async fn settled(&self) {
        let deadline = Instant::now() + BOUND;
        loop {
            let calls = self.metric("greeter_calls_in_flight").await;
            let connections = self.metric("greeter_connections_open").await;
            if calls == 0.0 && connections == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{calls} calls, {connections} connections held"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rss = rss();
        assert!(
            rss < self.idle_rss + self.worst_case,
            "RSS {rss} over idle {} + worst case {}",
            self.idle_rss,
            self.worst_case
        );
        self.greeting().await;
    }
}

fuzz_target!(|input: Input| {
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    let target = target();
    let bytes = match &input {
        Input::H2(frames) => h2_bytes(frames, target),
        Input::H1(requests) => h1_bytes(requests, target),
        Input::Bytes(bytes) => bytes.to_vec(),
    };
    target.runtime.block_on(async {
        target.send(&bytes).await;
        if INPUTS.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
            target.settled().await;
        }
    });
});
