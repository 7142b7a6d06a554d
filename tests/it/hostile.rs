//! Hostile clients against the production shape (issue 13, item 6): token auth on, a probe
//! listener, and clients that try to hold or exhaust what the open surface offers (Watch streams,
//! call slots, request buffers, connections, HTTP/2 state) or that never speak at all.
//!
//! Every case runs a real server on loopback (in process, or the built binary where its RSS is
//! measured), prints its figure, and asserts a generous bound: the machine is shared, so the
//! bounds prove "refused / closed / bounded", never speed. Each refusal is checked for its exact
//! gRPC code and a message fragment, next to a control client that is still served.
//!
//! Hostile peers connect from 127.0.0.1; the control client is a different peer (127.0.0.3), as a
//! well-behaved client is in production, so a per-peer cap aimed at the attacker does not hit it.
//! Raw HTTP/2 is written by hand only where the `h2` client cannot express the attack.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{
    self, BinaryServer, Pki, TestServer, channel_from, config_with, greeter_bin, tcp_from,
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use greeter::{
    pb::{HelloReply, HelloRequest, greeter_client::GreeterClient},
    transport::connection::PROBE_IDLE,
};
use prost::Message as _;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Notify,
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The one token of the suite, with the `greeter` and `reflection` scopes.
const TOKEN: &str = "hostile-suite-token-7f3c9a";
/// Where the control client connects from: not the attackers' 127.0.0.1.
const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Another honest peer, for the per-peer caps.
const OTHER_PEER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where hostile clients connect from, as `greeter health` (the exec probe) does too.
const ATTACKER_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";
const STREAM_REPLY: &str = "/helloworld.Greeter/SayHelloStreamReply";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// grpc-status values as they appear on the wire.
const OK: &str = "0";
const RESOURCE_EXHAUSTED: &str = "8";

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

fn with_token<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// A tokens file holding [`TOKEN`]'s hash.
fn tokens_file(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.toml");
    let scopes = ["greeter".to_owned(), "reflection".to_owned()];
    let entry = greeter::call::auth::entry_for(TOKEN, "control", &scopes);
    std::fs::write(&path, greeter::call::auth::entry_toml(&entry)).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// Servers in the production shape, and the control client
// ---------------------------------------------------------------------------------------------

/// An in-process server as production runs it: token auth, a probe listener, no grpc-web and no
/// Connect (plaintext on loopback unless started with TLS).
struct Production {
    server: TestServer,
    tls: Option<Pki>,
    _dir: tempfile::TempDir,
}

impl Production {
    async fn start(extra: &[(&str, &str)]) -> Self {
        Self::start_with(None, extra).await
    }

    async fn start_tls(extra: &[(&str, &str)]) -> Self {
        Self::start_with(Some(Pki::new()), extra).await
    }

    async fn start_with(tls: Option<Pki>, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens_file(dir.path());
        let mut overrides = vec![
            ("auth.enabled".to_owned(), "true".to_owned()),
            ("auth.tokens_file".into(), tokens.to_str().unwrap().into()),
            ("probe.listen".into(), "127.0.0.1:0".into()),
            ("web.enabled".into(), "false".into()),
            ("connect.enabled".into(), "false".into()),
        ];
        if let Some(pki) = &tls {
            overrides.extend(pki.tls_overrides());
        }
        overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let server = TestServer::start_with(config_with(overrides)).await;
        Self {
            server,
            tls,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn probe(&self) -> SocketAddr {
        self.server
            .probe_addr
            .expect("the probe listener is configured")
    }

    async fn control_call(&self) -> Duration {
        control_call(self.addr(), self.probe(), self.tls.as_ref()).await
    }
}

/// The built binary in the production shape, for the cases that measure its memory.
struct ProductionBinary {
    server: BinaryServer,
    probe: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ProductionBinary {
    /// `extra_toml` adds whole sections (not [auth], [probe], [web] or [log]).
    fn start(extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tokens = tokens_file(dir.path());
        let probe = free_loopback_port();
        let config = dir.path().join("greeter.toml");
        std::fs::write(
            &config,
            format!(
                "[auth]\nenabled = true\ntokens_file = \"{}\"\n\n[probe]\nlisten = \"{probe}\"\n\n\
                 [web]\nenabled = false\n\n[log]\nformat = \"json\"\nfilter = \"info\"\n\n{extra_toml}",
                tokens.display()
            ),
        )
        .unwrap();
        let server = BinaryServer::start(&config, &[]);
        Self {
            server,
            probe,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn rss_kib(&self) -> u64 {
        vm_rss_kib(self.server.child.id())
    }

    async fn control_call(&self) -> Duration {
        control_call(self.addr(), self.probe, None).await
    }
}

/// A loopback port nobody listens on (for the binary's probe listener, which its startup log
/// does not report in a parseable form).
fn free_loopback_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The resident set of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

async fn probe_check(channel: Channel) -> Result<ServingStatus, Status> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(reply.into_inner().status())
}

/// A well-behaved client, each part on a fresh connection from [`CONTROL_IP`]: a token holder's
/// SayHello on the main port (TLS when `tls`) and the probe port's Check, which must say SERVING.
/// Both must succeed within 10 s; returns how long they took.
async fn control_call(addr: SocketAddr, probe: SocketAddr, tls: Option<&Pki>) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), async {
        let main = match tls {
            None => channel_from(CONTROL_IP, addr).await,
            Some(pki) => common::tls_channel(addr, pki.client_tls(false))
                .await
                .expect("TLS control connection"),
        };
        let reply = GreeterClient::new(main)
            .say_hello(with_token(hello("control")))
            .await
            .expect("the token holder's SayHello succeeds");
        assert_eq!(reply.into_inner().message, "Hello, control!");
        let status = probe_check(channel_from(CONTROL_IP, probe).await).await;
        assert_eq!(status.expect("the probe's Check"), ServingStatus::Serving);
    })
    .await
    .expect("the control client is served within 10 s");
    started.elapsed()
}

/// Polls `what` until it returns true, for at most `limit`; returns how long it took.
async fn within(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Runs `round` (one hostile connection, from its first byte to the server's verdict) again and
/// again until `victim` is done, so the victim's calls run while the attack does, not after it:
/// the victim starts once the first round has written its first hostile bytes (the round calls
/// `attacking.notify_one()`), and the rounds go on until it has finished. Returns the victim's
/// result and every round's. The victim's own bounds (10 s for [`control_call`]) bound the attack.
async fn during_attack<R, V, F>(
    round: impl Fn(Arc<Notify>) -> F,
    victim: impl Future<Output = V>,
) -> (V, Vec<R>)
where
    F: Future<Output = R>,
{
    let attacking = Arc::new(Notify::new());
    let done = AtomicBool::new(false);
    let attack = async {
        let mut rounds = Vec::new();
        while !done.load(Ordering::Acquire) {
            rounds.push(round(Arc::clone(&attacking)).await);
        }
        rounds
    };
    let victim = async {
        tokio::time::timeout(Duration::from_secs(10), attacking.notified())
            .await
            .expect("the attack starts within 10 s");
        let result = victim.await;
        done.store(true, Ordering::Release);
        result
    };
    let (result, rounds) = tokio::join!(victim, attack);
    (result, rounds)
}

// ---------------------------------------------------------------------------------------------
// gRPC over the h2 client: announced messages, held calls, exact statuses
// ---------------------------------------------------------------------------------------------

/// An HTTP/2 connection from `source` through the `h2` client: no retries, no reconnects, so
/// what the server does to it stays visible.
async fn h2_from(source: Ipv4Addr, addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    h2_with(h2::client::Builder::new(), source, addr).await
}

async fn h2_with(
    builder: h2::client::Builder,
    source: Ipv4Addr,
    addr: SocketAddr,
) -> h2::client::SendRequest<Bytes> {
    let tcp = tcp_from(source, addr).await.unwrap();
    let (client, connection) = builder.handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.unwrap()
}

fn grpc_request(path: &str, token: bool) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if token {
        request = request.header("authorization", format!("Bearer {TOKEN}"));
    }
    request.body(()).unwrap()
}

/// A gRPC message frame: the 5-byte prefix announcing `announced` bytes, then `payload`.
fn grpc_frame(announced: usize, payload: &[u8]) -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(announced).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

fn encoded<M: prost::Message>(message: &M) -> Bytes {
    let bytes = message.encode_to_vec();
    grpc_frame(bytes.len(), &bytes)
}

/// How a call ended, as the wire said it.
#[derive(Debug)]
struct Outcome {
    /// grpc-status, or `reset: <reason>` when the stream was reset without one.
    status: String,
    /// grpc-message, percent-decoded.
    message: String,
}

impl Outcome {
    fn assert_refused(&self, status: &str, fragment: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.message
                .to_lowercase()
                .contains(&fragment.to_lowercase()),
            "message mentions {fragment:?}: {self:?}"
        );
    }
}

async fn outcome(response: h2::client::ResponseFuture) -> Outcome {
    outcome_of(response.await).await
}

fn reset(e: h2::Error) -> Outcome {
    Outcome {
        status: format!("reset: {e}"),
        message: String::new(),
    }
}

async fn outcome_of(response: Result<http::Response<h2::RecvStream>, h2::Error>) -> Outcome {
    let response = match response {
        Ok(response) => response,
        Err(e) => return reset(e),
    };
    let grpc = |headers: &http::HeaderMap| Outcome {
        status: header(headers, "grpc-status"),
        message: percent_decode(&header(headers, "grpc-message")),
    };
    if response.headers().contains_key("grpc-status") {
        return grpc(response.headers());
    }
    // The reply messages themselves do not matter here: drain them to reach the trailers.
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            Err(e) => return reset(e),
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => grpc(&trailers),
        Ok(None) => Outcome {
            status: "no trailers".into(),
            message: String::new(),
        },
        Err(e) => reset(e),
    }
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts a call whose request message announces `announced` bytes and sends only `sent` of
/// them, and returns its outcome if the server answers within `wait` (else the call is held
/// open, its halves returned so the caller decides how long to hold it).
async fn announce(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    token: bool,
    announced: usize,
    sent: usize,
    wait: Duration,
) -> Result<Outcome, (h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    *client = client.clone().ready().await.unwrap();
    let (mut response, mut body) = client
        .send_request(grpc_request(path, token), false)
        .unwrap();
    // Send errors mean the server already reset the stream: the outcome says why.
    let _ = body.send_data(grpc_frame(announced, &vec![0x61; sent]), false);
    match tokio::time::timeout(wait, &mut response).await {
        // A streaming method answers with headers first: its status must come within `wait` too.
        Ok(result) => Ok(tokio::time::timeout(wait, outcome_of(result))
            .await
            .unwrap_or_else(|_| Outcome {
                status: format!("open: response headers, no status within {wait:?}"),
                message: String::new(),
            })),
        Err(_) => Err((response, body)),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2 frames, for what the h2 client refuses to send
// ---------------------------------------------------------------------------------------------

/// Frame types and flags (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// Error codes (RFC 9113 §7).
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut bytes = vec![len[1], len[2], len[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A frame the server sent.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// The next frame, or None once the connection is closed (EOF or reset).
async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// What the server did to a connection, timed from when the client opened it.
#[derive(Debug, Default)]
struct Ending {
    frames: Vec<Frame>,
    /// The first GOAWAY: its error code, debug data, and when it came.
    goaway: Option<(u32, String, Duration)>,
    /// When the server closed the connection; None if still open at the limit.
    closed: Option<Duration>,
}

impl Ending {
    fn on_stream(&self, stream: u32) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(move |f| f.stream == stream)
    }
}

/// Reads (never answering, not even PINGs) until the server closes the connection or `limit`
/// after `since`.
async fn until_closed(
    io: &mut (impl AsyncRead + Unpin),
    since: Instant,
    limit: Duration,
) -> Ending {
    let mut ending = Ending::default();
    let deadline = tokio::time::Instant::from_std(since + limit);
    loop {
        match tokio::time::timeout_at(deadline, read_frame(io)).await {
            Err(_) => return ending,
            Ok(None) => {
                ending.closed = Some(since.elapsed());
                return ending;
            }
            Ok(Some(frame)) => {
                if frame.kind == GOAWAY && ending.goaway.is_none() {
                    let debug = String::from_utf8_lossy(&frame.payload[8..]).into_owned();
                    ending.goaway = Some((frame.code(), debug, since.elapsed()));
                }
                ending.frames.push(frame);
            }
        }
    }
}

/// A raw HTTP/2 connection from 127.0.0.1, opened as a well-formed client does: preface, empty
/// SETTINGS, the ACK of the server's SETTINGS; so only the attack under test is hostile. (h2
/// enforces the server's header-list limit even before that ACK: checked by hand.)
async fn raw_h2(addr: SocketAddr) -> TcpStream {
    let mut tcp = tcp_from(ATTACKER_IP, addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tcp))
            .await
            .expect("the server's SETTINGS within 5 s")
            .expect("the server's SETTINGS");
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            break;
        }
    }
    tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    tcp
}

/// Why a hostile writer had to stop.
#[derive(Debug, PartialEq)]
enum Pushback {
    /// No progress for 2 s: the server stopped reading.
    Stalled,
    /// The server closed or reset the connection.
    Closed,
}

/// Writes `bytes` unless the server stops reading or closes.
async fn write_all_or(
    tcp: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> Result<(), Pushback> {
    match tokio::time::timeout(Duration::from_secs(2), tcp.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Pushback::Closed),
        Err(_) => Err(Pushback::Stalled),
    }
}

/// Reads frames until `done` holds for one of them, for at most 5 s.
async fn frames_until(
    io: &mut (impl AsyncRead + Unpin),
    done: impl Fn(&Frame) -> bool,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, read_frame(io)).await {
        let finished = done(&frame);
        frames.push(frame);
        if finished {
            break;
        }
    }
    frames
}

/// HPACK (RFC 7541) integers and literals, without Huffman coding.
fn hpack_int(first: u8, prefix_bits: u32, value: usize) -> Vec<u8> {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        return vec![first | u8::try_from(value).unwrap()];
    }
    let mut out = vec![first | u8::try_from(max).unwrap()];
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | u8::try_from(rest % 128).unwrap());
        rest /= 128;
    }
    out.push(u8::try_from(rest).unwrap());
    out
}

fn hpack_string(value: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0, 7, value.len());
    out.extend_from_slice(value);
    out
}

/// A literal field whose name is static-table entry `name_index`, not indexed.
fn hpack_literal(name_index: usize, value: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0x00, 4, name_index);
    out.extend(hpack_string(value));
    out
}

/// A literal field with a new name; `indexed` adds it to the dynamic table (index 62 next).
fn hpack_new_literal(name: &str, value: &[u8], indexed: bool) -> Vec<u8> {
    let mut out = vec![if indexed { 0x40 } else { 0x00 }];
    out.extend(hpack_string(name.as_bytes()));
    out.extend(hpack_string(value));
    out
}

/// The header block of an anonymous gRPC call to `path`.
fn grpc_header_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(hpack_literal(4, path.as_bytes())); // :path
    block.extend(hpack_literal(1, b"localhost")); // :authority
    block.extend(hpack_literal(31, b"application/grpc")); // content-type
    block.extend(hpack_new_literal("te", b"trailers", false));
    block
}

/// An empty HealthCheckRequest, the whole request body of a Check.
fn check_body() -> Vec<u8> {
    grpc_frame(0, &[]).to_vec()
}

// ---------------------------------------------------------------------------------------------
// 1. Open methods: Watch streams and the anonymous call budget
// ---------------------------------------------------------------------------------------------

/// Opens a Watch on `channel` and waits for its first update: Ok(stream) once admitted.
async fn open_watch(
    channel: Channel,
    service: &str,
) -> Result<tonic::Streaming<tonic_health::pb::HealthCheckResponse>, Status> {
    let mut updates = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), updates.message())
        .await
        .expect("a Watch answers within 5 s")?
        .expect("an admitted Watch sends its first update");
    if service == "no.such.Service" {
        assert_eq!(first.status(), ServingStatus::ServiceUnknown);
    }
    Ok(updates)
}

#[tokio::test]
async fn watch_flood_is_capped_while_token_holders_and_probes_are_served() {
    const CAP: usize = 12;
    let cap = CAP.to_string();
    let prod = Production::start(&[("health.max_watch_streams", &cap)]).await;
    let started = Instant::now();
    let (mut held, mut refused) = (Vec::new(), 0);
    // 6 connections x 8 streams: within the anonymous budgets (100, 10 per connection), so the
    // Watch cap is what refuses.
    for _ in 0..6 {
        let channel = channel_from(ATTACKER_IP, prod.addr()).await;
        for _ in 0..8 {
            match open_watch(channel.clone(), "no.such.Service").await {
                Ok(stream) => held.push(stream),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.message().to_lowercase().contains("watch"),
                        "{status:?}"
                    );
                    refused += 1;
                }
            }
        }
    }
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "watch flood: {} streams admitted, {refused} refused in {:?}, token holder + probe OK in {ms} ms",
        held.len(),
        started.elapsed()
    );
    assert_eq!(held.len(), CAP, "exactly health.max_watch_streams admitted");
    assert_eq!(refused, 48 - CAP);
    // An anonymous Check on the main port still has room in the anonymous budget.
    let check = probe_check(channel_from(CONTROL_IP, prod.addr()).await).await;
    assert_eq!(check.unwrap(), ServingStatus::Serving);
    // A slot comes back when a Watch ends.
    drop(held.pop());
    let channel = channel_from(ATTACKER_IP, prod.addr()).await;
    within(
        Duration::from_secs(5),
        "a freed Watch slot is reused",
        async || {
            open_watch(channel.clone(), "")
                .await
                .map(|s| held.push(s))
                .is_ok()
        },
    )
    .await;
}

#[tokio::test]
async fn watch_streams_end_with_unavailable_at_watch_max_age() {
    let prod = Production::start(&[("health.watch_max_age", "1s")]).await;
    let started = Instant::now();
    let mut updates = open_watch(channel_from(ATTACKER_IP, prod.addr()).await, "")
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), updates.message())
        .await
        .expect("the Watch ends within 10 s");
    let took = started.elapsed();
    eprintln!("watch max age: stream of a 1 s max age ended after {took:?}: {end:?}");
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().to_lowercase().contains("watch"),
        "{status:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "not before its age: {took:?}"
    );
    prod.control_call().await;
}

#[tokio::test]
async fn anonymous_calls_draw_from_their_own_budget_and_never_starve_token_holders() {
    // The anonymous budget (6, 3 per connection) is larger than the whole call budget (2): the
    // token holder still gets in, so anonymous calls are not counted there.
    let prod = Production::start(&[
        ("limits.max_concurrent_calls", "2"),
        ("limits.max_anonymous_calls", "6"),
        ("limits.max_anonymous_calls_per_connection", "3"),
    ])
    .await;
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let channel = channel_from(ATTACKER_IP, prod.addr()).await;
        for _ in 0..4 {
            match open_watch(channel.clone(), "").await {
                Ok(stream) => held.push(stream),
                Err(status) => refused.push(status),
            }
        }
    }
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "anonymous budget: {} Watch streams held, {} refused, token holder + probe OK in {ms} ms",
        held.len(),
        refused.len()
    );
    assert_eq!(held.len(), 6, "limits.max_anonymous_calls");
    // Per connection: the 4th on the first two connections; then all 4 on the third.
    assert_eq!(refused.len(), 6);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("unauthenticated"), "{status:?}");
    }
    // The probe port has its own budget: a main port full of anonymous calls does not touch it.
    let probe = probe_check(channel_from(ATTACKER_IP, prod.probe()).await).await;
    assert_eq!(probe.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn without_auth_open_methods_share_the_common_call_budget() {
    // Anonymous budgets of 1 do not apply with auth off: max_concurrent_calls (3) decides.
    let server = TestServer::start_with(config_with(
        [
            ("probe.listen", "127.0.0.1:0"),
            ("web.enabled", "false"),
            ("limits.max_concurrent_calls", "3"),
            ("limits.max_anonymous_calls", "1"),
            ("limits.max_anonymous_calls_per_connection", "1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    ))
    .await;
    let channel = channel_from(ATTACKER_IP, server.addr).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            open_watch(channel.clone(), "")
                .await
                .expect("within max_concurrent_calls"),
        );
    }
    let status = open_watch(channel.clone(), "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too many"), "{status:?}");
    drop(held);
    let mut greeter = GreeterClient::new(channel_from(CONTROL_IP, server.addr).await);
    within(Duration::from_secs(5), "held calls released", async || {
        greeter.say_hello(hello("after")).await.is_ok()
    })
    .await;
    control_call(server.addr, server.probe_addr.unwrap(), None).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Announced messages: per-method receive limits, the request buffer budget, memory
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn announced_4_mib_health_messages_are_refused_at_once() {
    // Refused at the announcement, whatever arrives after it: the 256 KiB pushed with each
    // announcement is never buffered. (What partial messages may hold is bounded in
    // partly_sent_messages_are_bounded_by_max_buffered_request_bytes.)
    let prod = Production::start(&[]).await;
    let mut client = h2_from(ATTACKER_IP, prod.addr()).await;
    for _ in 0..40 {
        let outcome = announce(
            &mut client,
            HEALTH_CHECK,
            false,
            4 << 20,
            256 << 10,
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|_| panic!("a 4 MiB Check announcement: no answer within 5 s"));
        outcome.assert_refused(RESOURCE_EXHAUSTED, "exceeds");
    }
    prod.control_call().await;
}

#[tokio::test]
async fn each_method_refuses_announced_messages_over_its_own_limit() {
    // max_name_bytes 1024: Greeter methods take 2 x 1024 + 64 bytes (names up to twice the limit
    // still get INVALID_ARGUMENT with its details), health 1024, reflection 16384.
    let prod = Production::start(&[]).await;
    let mut client = h2_from(ATTACKER_IP, prod.addr()).await;
    let wait = Duration::from_secs(5);
    for (path, token, limit) in [
        (SAY_HELLO, true, 2 * 1024 + 64),
        (HEALTH_CHECK, false, 1024),
        (REFLECTION, true, 16384),
    ] {
        let started = Instant::now();
        let refused = announce(&mut client, path, token, limit + 1, 0, wait)
            .await
            .unwrap_or_else(|_| panic!("{path}: over-limit announcement: no answer within 5 s"));
        eprintln!(
            "{path}: {} bytes announced: {refused:?} in {:?}",
            limit + 1,
            started.elapsed()
        );
        refused.assert_refused(RESOURCE_EXHAUSTED, "exceeds");
    }
    // At the limits, calls are served: the longest valid name, and a plain Check.
    let longest = GreeterClient::new(channel_from(CONTROL_IP, prod.addr()).await)
        .say_hello(with_token(hello(&"n".repeat(1024))))
        .await
        .expect("a 1024-byte name fits the Greeter's limit");
    assert!(longest.into_inner().message.ends_with("n!"));
    prod.control_call().await;

    // limits.max_recv_message_bytes caps every method's limit.
    let capped = Production::start(&[("limits.max_recv_message_bytes", "512")]).await;
    let mut client = h2_from(ATTACKER_IP, capped.addr()).await;
    let refused = announce(&mut client, SAY_HELLO, true, 600, 0, wait)
        .await
        .unwrap_or_else(|_| panic!("600 bytes over a 512-byte cap: no answer within 5 s"));
    refused.assert_refused(RESOURCE_EXHAUSTED, "exceeds");
    capped.control_call().await;
}

#[tokio::test]
async fn partly_sent_messages_are_bounded_by_max_buffered_request_bytes() {
    const BUDGET: usize = 4096;
    let budget = BUDGET.to_string();
    let prod = Production::start(&[("limits.max_buffered_request_bytes", &budget)]).await;
    let mut client = h2_from(ATTACKER_IP, prod.addr()).await;
    // Each SayHello announces 1000 bytes (within the Greeter's 2112) and sends 600 of them, which
    // with the 5-byte prefix the budget holds BUDGET / 605 times. Each is held before the next
    // goes out (the server counts its bytes), so the one refused is the first over the budget.
    const HELD: usize = 605;
    let buffered = Arc::clone(&prod.server.stats.buffered);
    let mut held = Vec::new();
    for i in 1..=BUDGET / HELD {
        let open = announce(&mut client, SAY_HELLO, true, 1000, 600, Duration::ZERO)
            .await
            .expect_err("a call within the budget is held, not answered");
        held.push(open);
        within(
            Duration::from_secs(5),
            "the call's bytes are held",
            async || buffered.held() == i * HELD,
        )
        .await;
    }
    let refusal = announce(
        &mut client,
        SAY_HELLO,
        true,
        1000,
        600,
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|_| panic!("a call over max_buffered_request_bytes: no answer within 5 s"));
    eprintln!(
        "buffered request bytes: {} calls held with 600 bytes each, then {refusal:?}",
        held.len()
    );
    refusal.assert_refused(RESOURCE_EXHAUSTED, "buffer");
    assert_eq!(
        buffered.held(),
        held.len() * HELD,
        "the held calls still hold"
    );
    // Releasing the partial messages frees the budget.
    drop(held);
    let client = h2_from(ATTACKER_IP, prod.addr()).await;
    within(Duration::from_secs(5), "the budget is freed", async || {
        let Ok(mut client) = client.clone().ready().await else {
            return false;
        };
        let (response, mut body) = client
            .send_request(grpc_request(SAY_HELLO, true), false)
            .unwrap();
        body.send_data(encoded(&hello("after")), true).unwrap();
        outcome(response).await.status == OK
    })
    .await;
    prod.control_call().await;
}

// ---------------------------------------------------------------------------------------------
// 3, 11. Silent sockets: TCP, TLS, the probe port, the Unix socket
// ---------------------------------------------------------------------------------------------

/// 1 s for `connection.first_call_timeout`, `tls.handshake_timeout` and the GOAWAY grace.
const SHORT: &str = "1s";
/// What a 1 s timeout may take on a loaded 2-core machine before the test calls it a failure.
const SLACK: Duration = Duration::from_secs(5);

fn assert_closed_within(what: &str, ending: &Ending, bound: Duration) {
    eprintln!(
        "{what}: closed after {:?}, GOAWAY {:?}, frames {:?}",
        ending.closed,
        ending.goaway,
        ending.frames.iter().map(|f| f.kind).collect::<Vec<_>>()
    );
    let closed = ending
        .closed
        .unwrap_or_else(|| panic!("{what}: still open after {bound:?}"));
    assert!(closed <= bound, "{what}: closed after {closed:?}");
}

#[tokio::test]
async fn tcp_connection_that_never_sends_the_preface_is_closed() {
    let prod = Production::start(&[("connection.first_call_timeout", SHORT)]).await;
    let started = Instant::now();
    let mut tcp = tcp_from(ATTACKER_IP, prod.addr()).await.unwrap();
    let ending = until_closed(&mut tcp, started, Duration::from_secs(20)).await;
    assert_closed_within("no preface", &ending, Duration::from_secs(1) + SLACK);
    prod.control_call().await;
}

#[tokio::test]
async fn connection_with_no_call_gets_goaway_then_is_force_closed() {
    let prod = Production::start(&[
        ("connection.first_call_timeout", SHORT),
        ("connection.max_age_grace", SHORT),
    ])
    .await;
    let started = Instant::now();
    // Preface and SETTINGS, then silence: the client never answers the GOAWAY's PING either, so
    // only the force-close can end the connection.
    let mut tcp = raw_h2(prod.addr()).await;
    let ending = until_closed(&mut tcp, started, Duration::from_secs(20)).await;
    assert_closed_within("no call", &ending, Duration::from_secs(2) + SLACK);
    let (code, _, at) = ending.goaway.expect("GOAWAY before the close");
    assert_eq!(code, NO_ERROR);
    assert!(
        at >= Duration::from_millis(900),
        "not before first_call_timeout: {at:?}"
    );
    prod.control_call().await;
}

#[tokio::test]
async fn idle_goaway_is_followed_by_a_force_close_after_the_grace() {
    let prod = Production::start(&[
        ("connection.max_idle", "500ms"),
        ("connection.max_age_grace", SHORT),
    ])
    .await;
    let started = Instant::now();
    let mut tcp = raw_h2(prod.addr()).await;
    // One complete Check, then idle, never answering the server's PINGs.
    let mut request = frame(HEADERS, END_HEADERS, 1, &grpc_header_block(HEALTH_CHECK));
    request.extend(frame(DATA, END_STREAM, 1, &check_body()));
    tcp.write_all(&request).await.unwrap();
    let ending = until_closed(&mut tcp, started, Duration::from_secs(20)).await;
    assert!(
        ending
            .on_stream(1)
            .any(|f| f.kind == HEADERS && f.flags & END_STREAM != 0),
        "the Check was answered: {ending:?}"
    );
    assert_closed_within("idle", &ending, Duration::from_secs(2) + SLACK);
    assert_eq!(ending.goaway.expect("GOAWAY before the close").0, NO_ERROR);
    prod.control_call().await;
}

/// A TLS client trusting `pki`'s CA, offering h2.
fn tls_connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(pki.pki.ca_cert.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(greeter::transport::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_connection_that_never_starts_the_handshake_is_closed() {
    let prod = Production::start_tls(&[("tls.handshake_timeout", SHORT)]).await;
    let started = Instant::now();
    let mut tcp = tcp_from(ATTACKER_IP, prod.addr()).await.unwrap();
    let ending = until_closed(&mut tcp, started, Duration::from_secs(20)).await;
    assert_closed_within("no TLS handshake", &ending, Duration::from_secs(1) + SLACK);
    assert!(ending.frames.is_empty(), "no HTTP/2 before TLS");
    prod.control_call().await;
}

#[tokio::test]
async fn tls_connection_silent_after_the_handshake_is_closed() {
    let prod = Production::start_tls(&[
        ("tls.handshake_timeout", SHORT),
        ("connection.first_call_timeout", SHORT),
        ("connection.max_age_grace", SHORT),
    ])
    .await;
    let pki = prod.tls.as_ref().unwrap();
    let tcp = tcp_from(ATTACKER_IP, prod.addr()).await.unwrap();
    let mut tls = tls_connector(pki)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS handshake");
    // The first-call clock starts after the handshake.
    let started = Instant::now();
    let ending = until_closed(&mut tls, started, Duration::from_secs(20)).await;
    assert_closed_within("silent after TLS", &ending, Duration::from_secs(2) + SLACK);
    prod.control_call().await;
}

#[tokio::test]
async fn silent_unix_socket_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greeter.sock");
    let prod = Production::start(&[
        ("server.unix", path.to_str().unwrap()),
        ("connection.first_call_timeout", SHORT),
        ("connection.max_age_grace", SHORT),
    ])
    .await;
    let started = Instant::now();
    let mut unix = tokio::net::UnixStream::connect(&path).await.unwrap();
    let ending = until_closed(&mut unix, started, Duration::from_secs(20)).await;
    assert_closed_within(
        "silent Unix socket",
        &ending,
        Duration::from_secs(2) + SLACK,
    );
    prod.control_call().await;
}

/// Opens `count` TCP connections to `addr` from `source` that never send a byte; each task
/// returns when (after how long) the server closed its connection, or None after 20 s.
async fn silent_connections(
    source: Ipv4Addr,
    addr: SocketAddr,
    count: usize,
) -> Vec<tokio::task::JoinHandle<Option<Duration>>> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let started = Instant::now();
        let mut tcp = tcp_from(source, addr).await.unwrap();
        tasks.push(tokio::spawn(async move {
            until_closed(&mut tcp, started, Duration::from_secs(20))
                .await
                .closed
        }));
    }
    tasks
}

/// `greeter health --addr <addr>`, the binary as an exec probe would run it: Ok(stdout) on
/// exit 0.
async fn greeter_health(addr: SocketAddr) -> Result<String, String> {
    let output = tokio::task::spawn_blocking(move || {
        greeter_bin()
            .args(["health", "--timeout", "2s", "--addr", &addr.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[tokio::test]
async fn silent_connections_cannot_lock_the_probe_port() {
    let prod = Production::start(&[]).await;
    let probe = prod.probe();
    // 80 from another peer: the per-peer cap (8) keeps them from the 64 probe connections, so
    // the kubelet's probe (here from 127.0.0.1) is answered at once.
    let others = silent_connections(OTHER_PEER_IP, probe, 80).await;
    assert_eq!(greeter_health(probe).await.unwrap(), "SERVING\n");
    // 80 from 127.0.0.1 itself: the 8 it may hold are reclaimed after 5 s unused.
    let own = silent_connections(ATTACKER_IP, probe, 80).await;
    let took = within(
        Duration::from_secs(5) + Duration::from_secs(15),
        "probe SERVING",
        async || greeter_health(probe).await.is_ok(),
    )
    .await;
    let mut closed = Vec::new();
    for task in others.into_iter().chain(own) {
        closed.push(task.await.unwrap());
    }
    // The ones the per-peer cap turned away were closed before any could be reclaimed as unused
    // (PROBE_IDLE after it was accepted, so after it was opened): no timing involved.
    let at_once = closed.iter().flatten().filter(|d| **d < PROBE_IDLE).count();
    let latest = closed.iter().flatten().max().copied();
    eprintln!(
        "probe port: 160 silent connections, {at_once} closed before {PROBE_IDLE:?}, the last after \
         {latest:?}; `greeter health` SERVING after {took:?}"
    );
    assert!(
        closed.iter().all(Option::is_some),
        "every silent connection is closed"
    );
    assert!(
        at_once >= 160 - 2 * 8,
        "over the per-peer cap: closed at once"
    );
    prod.control_call().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Connections per peer
// ---------------------------------------------------------------------------------------------

/// A complete anonymous Check on `client`'s connection.
async fn anonymous_check(client: &h2::client::SendRequest<Bytes>) -> Outcome {
    let mut client = match client.clone().ready().await {
        Ok(client) => client,
        Err(e) => return reset(e),
    };
    let (response, mut body) = match client.send_request(grpc_request(HEALTH_CHECK, false), false) {
        Ok(call) => call,
        Err(e) => return reset(e),
    };
    let _ = body.send_data(Bytes::from(check_body()), true);
    outcome(response).await
}

#[tokio::test]
async fn per_peer_cap_closes_the_extra_connection_at_once_and_spares_other_peers() {
    let prod = Production::start(&[("limits.max_connections_per_peer", "3")]).await;
    let mut first = Vec::new();
    for _ in 0..3 {
        let client = h2_from(ATTACKER_IP, prod.addr()).await;
        assert_eq!(anonymous_check(&client).await.status, OK);
        first.push(client);
    }
    let started = Instant::now();
    let mut fourth = tcp_from(ATTACKER_IP, prod.addr()).await.unwrap();
    let ending = until_closed(&mut fourth, started, Duration::from_secs(10)).await;
    assert_closed_within("4th connection from 127.0.0.1", &ending, SLACK);
    assert!(ending.frames.is_empty(), "closed before HTTP/2: {ending:?}");
    for client in &first {
        assert_eq!(
            anonymous_check(client).await.status,
            OK,
            "the first 3 still work"
        );
    }
    let other = h2_from(OTHER_PEER_IP, prod.addr()).await;
    assert_eq!(
        anonymous_check(&other).await.status,
        OK,
        "127.0.0.2 connects"
    );
    // The cap counts open connections: closing one lets 127.0.0.1 in again.
    drop(first.pop());
    let took = within(
        Duration::from_secs(5),
        "a freed per-peer slot",
        async || {
            let Ok(tcp) = tcp_from(ATTACKER_IP, prod.addr()).await else {
                return false;
            };
            match h2::client::handshake(tcp).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    anonymous_check(&client).await.status == OK
                }
                Err(_) => false,
            }
        },
    )
    .await;
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "per-peer cap 3: 4th closed after {:?}; slot reused after {took:?}; control OK in {ms} ms",
        ending.closed
    );
}

// ---------------------------------------------------------------------------------------------
// 4b. Quotas: anonymous peers cannot crowd callers with credentials
// ---------------------------------------------------------------------------------------------

/// The refusals counted for `class` (the series must exist).
fn quota_refused(text: &str, class: &str) -> f64 {
    let series: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("greeter_quota_refused_total{"))
        .filter(|l| l.contains(&format!("class=\"{class}\"")))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(!series.is_empty(), "no refusal series for {class}:\n{text}");
    series.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_filling_the_quota_tables_never_reach_a_token_holder() {
    // The table sizes production runs with; buckets small and slow (3 calls, then one per 100 s)
    // so no peer is forgotten while the table fills and three calls empty an overflow bucket.
    let sizes = greeter::config::Config::embedded().quota;
    let prod = Production::start(&[
        ("quota.enabled", "true"),
        ("quota.rate", "0.01"),
        ("quota.burst", "3"),
        ("metrics.listen", "127.0.0.1:0"),
    ])
    .await;
    let addr = prod.addr();
    let peers = u32::try_from(sizes.anonymous_max_callers).unwrap();
    let peer = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i);
    // One Check from each of as many addresses as the anonymous table tracks (a /64 each, for
    // IPv6: cheap from one /48), on its own connection, 32 at a time.
    let started = Instant::now();
    let served = futures_util::stream::iter(0..peers)
        .map(|i| async move { anonymous_check(&h2_from(peer(i), addr).await).await })
        .buffer_unordered(32)
        .filter(|outcome| std::future::ready(outcome.status == OK))
        .count()
        .await;
    assert_eq!(served, peers as usize, "every new peer has a token");
    // Newcomers now share the anonymous overflow bucket: three are served, then it is empty.
    let mut newcomers = peers..peers + 16;
    let first_refused = loop {
        let i = newcomers.next().expect("the overflow bucket empties");
        let outcome = anonymous_check(&h2_from(peer(i), addr).await).await;
        if outcome.status != OK {
            outcome.assert_refused(RESOURCE_EXHAUSTED, "over quota");
            break i - peers;
        }
    };
    println!(
        "{peers} anonymous peers in {:?}; the overflow bucket refused newcomer {first_refused}",
        started.elapsed()
    );
    assert!(first_refused <= 3, "{first_refused}");
    // A token holder that never called is tracked in a table of its own: it gets its burst.
    let main = channel_from(CONTROL_IP, addr).await;
    for i in 0..3 {
        GreeterClient::new(main.clone())
            .say_hello(with_token(hello("control")))
            .await
            .unwrap_or_else(|e| panic!("the token holder's call {i}: {e:?}"));
    }
    let metrics = common::scrape(prod.server.metrics_addr.unwrap()).await;
    assert!(quota_refused(&metrics, "anonymous") >= 1.0, "{metrics}");
    assert_eq!(quota_refused(&metrics, "token"), 0.0, "{metrics}");
}

// ---------------------------------------------------------------------------------------------
// 5, 6, 7. Header blocks and control frames: CONTINUATION flood, HPACK bomb, SETTINGS/PING floods
// ---------------------------------------------------------------------------------------------

/// CONTINUATION frames one flood may send: 10 000 x 16 KiB, 160 MiB of header block that a
/// server without a header-list limit would hold.
const CONTINUATIONS: usize = 10_000;

/// One CONTINUATION flood: HEADERS starting an x-junk value of 256 MiB, never END_HEADERS, then
/// CONTINUATION frames of 16 KiB more of it until the server pushes back or [`CONTINUATIONS`]
/// went out. Returns how many went out, why it stopped, the server's RSS (KiB) at that moment
/// (the connection still open from this side) and what the server did.
async fn continuation_round(
    addr: SocketAddr,
    pid: u32,
    attacking: Arc<Notify>,
) -> (usize, Option<Pushback>, u64, Ending) {
    let started = Instant::now();
    let (mut reader, mut writer) = raw_h2(addr).await.into_split();
    let server_said =
        tokio::spawn(
            async move { until_closed(&mut reader, started, Duration::from_secs(20)).await },
        );
    let mut block = grpc_header_block(HEALTH_CHECK);
    block.push(0x00);
    block.extend(hpack_string(b"x-junk"));
    block.extend(hpack_int(0, 7, 256 << 20));
    let mut pushback = write_all_or(&mut writer, &frame(HEADERS, 0, 1, &block))
        .await
        .err();
    let continuation = frame(CONTINUATION, 0, 1, &[b'a'; 16384]);
    let mut sent = 0;
    while pushback.is_none() && sent < CONTINUATIONS {
        pushback = write_all_or(&mut writer, &continuation).await.err();
        sent += 1;
        attacking.notify_one();
        tokio::task::yield_now().await;
    }
    let rss_kib = vm_rss_kib(pid);
    (sent, pushback, rss_kib, server_said.await.unwrap())
}

#[tokio::test]
async fn continuation_flood_is_cut_off_with_goaway() {
    let prod = ProductionBinary::start("");
    let idle_kib = prod.rss_kib();
    let (addr, pid) = (prod.addr(), prod.server.child.id());
    let (control, rounds) = during_attack(
        |attacking| continuation_round(addr, pid, attacking),
        prod.control_call(),
    )
    .await;
    let peak_kib = rounds.iter().map(|(_, _, rss, _)| *rss).max().unwrap();
    eprintln!(
        "CONTINUATION flood: {} connections while the control client was served in {} ms; RSS {} \
         -> {} MiB at most; frames written, pushback, GOAWAY: {:?}",
        rounds.len(),
        control.as_millis(),
        idle_kib / 1024,
        peak_kib / 1024,
        rounds
            .iter()
            .map(|(sent, pushback, _, ending)| (sent, pushback, &ending.goaway))
            .collect::<Vec<_>>()
    );
    for (sent, _, _, ending) in &rounds {
        let (code, debug, _) = ending
            .goaway
            .clone()
            .unwrap_or_else(|| panic!("GOAWAY after {sent} frames: {:?}", ending.closed));
        assert_eq!(code, ENHANCE_YOUR_CALM);
        assert_eq!(debug, "too_many_continuations");
        assert!(ending.closed.is_some(), "the connection is closed");
        assert!(*sent < CONTINUATIONS, "the server stopped the flood");
    }
    // Under half of what one flood would make a server without the limit hold.
    assert!(
        peak_kib < idle_kib + 64 * 1024,
        "RSS within 64 MiB of idle while the flood's connection is open"
    );
}

/// A Check whose header block adds one `x-bomb: <value_len bytes>` to the HPACK dynamic table and
/// then refers to it `refs` more times: a few KiB on the wire, `refs` x (value_len + 38) decoded.
fn hpack_bomb(value_len: usize, refs: usize) -> Vec<u8> {
    let mut block = grpc_header_block(HEALTH_CHECK);
    block.extend(hpack_new_literal("x-bomb", &vec![b'b'; value_len], true));
    block.extend(std::iter::repeat_n(0x80 | 62, refs)); // indexed: dynamic entry 62
    block
}

/// `:status: 431` as h2 encodes it: static name 8, Huffman-coded value "431".
const HUFFMAN_431: [u8; 4] = [0x83, 0x69, 0x90, 0xff];

#[tokio::test]
async fn hpack_bomb_over_the_header_list_limit_gets_431_and_the_connection_lives_on() {
    let prod = Production::start(&[]).await;
    let mut tcp = raw_h2(prod.addr()).await;
    // 21 x 1038 decoded bytes: over limits.max_header_list_bytes (16384), under h2's 4x abuse
    // limit, from a block of about 1.1 KiB.
    let bomb = hpack_bomb(1000, 20);
    tcp.write_all(&frame(HEADERS, END_HEADERS, 1, &bomb))
        .await
        .unwrap();
    let mut check = frame(HEADERS, END_HEADERS, 3, &grpc_header_block(HEALTH_CHECK));
    check.extend(frame(DATA, END_STREAM, 3, &check_body()));
    tcp.write_all(&check).await.unwrap();
    let frames = frames_until(&mut tcp, |f| {
        f.stream == 3 && f.kind == HEADERS && f.flags & END_STREAM != 0
    })
    .await;
    let on = |stream: u32| frames.iter().filter(move |f| f.stream == stream);
    eprintln!(
        "HPACK bomb ({} bytes, 21.8 KB decoded): stream 1 got {:?}",
        bomb.len(),
        on(1)
            .map(|f| (f.kind, f.flags, f.payload.clone()))
            .collect::<Vec<_>>()
    );
    let answer = on(1)
        .find(|f| f.kind == HEADERS)
        .expect("a response on stream 1");
    assert!(answer.flags & END_STREAM != 0, "{answer:?}");
    assert!(
        answer.payload.windows(4).any(|w| w == HUFFMAN_431),
        "431 Request Header Fields Too Large: {answer:?}"
    );
    let rst = on(1)
        .find(|f| f.kind == RST_STREAM)
        .expect("RST_STREAM on stream 1");
    assert_eq!(rst.code(), PROTOCOL_ERROR);
    assert!(
        on(3).any(|f| f.kind == DATA && !f.payload.is_empty()),
        "the next call on the same connection is answered: {frames:?}"
    );
    assert!(frames.iter().all(|f| f.kind != GOAWAY), "{frames:?}");
    prod.control_call().await;
}

#[tokio::test]
async fn hpack_bomb_far_over_the_limit_gets_goaway_enhance_your_calm() {
    let prod = Production::start(&[]).await;
    let started = Instant::now();
    let mut tcp = raw_h2(prod.addr()).await;
    // 1001 x 4038 bytes (4 MB) decoded from a 5 KiB block.
    let bomb = hpack_bomb(4000, 1000);
    tcp.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &bomb))
        .await
        .unwrap();
    let ending = until_closed(&mut tcp, started, Duration::from_secs(10)).await;
    eprintln!(
        "HPACK bomb ({} bytes, 4 MB decoded): {:?} {:?}",
        bomb.len(),
        ending.goaway,
        ending.closed
    );
    let (code, debug, _) = ending.goaway.clone().expect("GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM);
    assert_eq!(debug, "header_list_way_too_large");
    assert!(ending.closed.is_some(), "the connection is closed");
    assert!(
        ending.on_stream(1).next().is_none(),
        "no call was made: {ending:?}"
    );
    prod.control_call().await;
}

/// What a flood may write: 128 MiB, whose answers (a 9-byte SETTINGS ACK per 15-byte SETTINGS, a
/// 17-byte PING ACK per PING) would be over 64 MiB of output for a server that kept reading
/// without ever sending them.
const FLOOD_BYTES: usize = 128 << 20;

/// Floods `unit` (whole frames) over a connection whose client never reads, until the server
/// pushes back or [`FLOOD_BYTES`] went out; returns (MiB written, why it stopped, the connection,
/// still open).
async fn flood_without_reading(
    addr: SocketAddr,
    unit: &[u8],
) -> (usize, Option<Pushback>, TcpStream) {
    let mut tcp = raw_h2(addr).await;
    let batch = unit.repeat(64 * 1024 / unit.len());
    let mut written = 0;
    while written < FLOOD_BYTES {
        if let Err(pushback) = write_all_or(&mut tcp, &batch).await {
            return (written >> 20, Some(pushback), tcp);
        }
        written += batch.len();
    }
    (written >> 20, None, tcp)
}

/// Floods `unit` from a client that never reads and, with that connection still open and unread,
/// measures the server's RSS and serves the control client; panics unless the server pushed back
/// and its RSS stayed under half of what the answers would take.
async fn assert_flood_bounded(prod: &ProductionBinary, what: &str, unit: &[u8]) {
    let idle_kib = prod.rss_kib();
    let (mib, pushback, attacker) = flood_without_reading(prod.addr(), unit).await;
    let attacked_kib = prod.rss_kib();
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "{what} flood: {mib} MiB written, then {pushback:?}; with it unread: RSS {} -> {} MiB, \
         control OK in {ms} ms",
        idle_kib / 1024,
        attacked_kib / 1024
    );
    drop(attacker);
    assert_eq!(
        pushback,
        Some(Pushback::Stalled),
        "the server stopped reading, the connection open"
    );
    assert!(
        attacked_kib < idle_kib + 64 * 1024,
        "RSS within 64 MiB of idle"
    );
}

#[tokio::test]
async fn settings_flood_from_a_client_that_never_reads_is_bounded() {
    let prod = ProductionBinary::start("");
    // SETTINGS_INITIAL_WINDOW_SIZE = 65535: each one needs an ACK the client never reads.
    let mut setting = vec![0x00, 0x04];
    setting.extend_from_slice(&65_535u32.to_be_bytes());
    assert_flood_bounded(&prod, "SETTINGS", &frame(SETTINGS, 0, 0, &setting)).await;
}

#[tokio::test]
async fn ping_flood_from_a_client_that_never_reads_is_bounded() {
    let prod = ProductionBinary::start("");
    assert_flood_bounded(&prod, "PING", &frame(PING, 0, 0, &[7; 8])).await;
}

// ---------------------------------------------------------------------------------------------
// 8, 9. Flow control: readers that never open their window, messages in 1-byte DATA frames
// ---------------------------------------------------------------------------------------------

/// Polls the RSS of `prod` every 100 ms until it has not grown for 1 s (at most 20 s), or until it
/// reaches `over_kib`; returns the largest value seen.
fn settled_rss_kib(prod: &ProductionBinary, over_kib: u64) -> u64 {
    let started = Instant::now();
    let (mut peak, mut grew) = (prod.rss_kib(), Instant::now());
    while peak < over_kib && grew.elapsed() < Duration::from_secs(1) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "RSS still growing after 20 s: {peak} KiB"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = prod.rss_kib();
        if now > peak + 256 {
            grew = Instant::now();
        }
        peak = peak.max(now);
    }
    peak
}

/// Opens `streams` SayHelloStreamReply calls on one raw connection whose client grants no stream
/// window yet (the server must read every call before it has anything to write) but 1 GiB for the
/// connection; [`open_windows`] opens the streams' windows.
async fn calls_never_read(addr: SocketAddr, streams: u32) -> TcpStream {
    let mut tcp = raw_h2(addr).await;
    let mut bytes = initial_window(0);
    bytes.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()));
    let mut block = grpc_header_block(STREAM_REPLY);
    block.extend(hpack_literal(23, format!("Bearer {TOKEN}").as_bytes())); // authorization
    for stream in (1..).step_by(2).take(streams as usize) {
        bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
        bytes.extend(frame(DATA, END_STREAM, stream, &encoded(&hello("z"))));
    }
    tcp.write_all(&bytes).await.unwrap();
    tcp
}

/// A SETTINGS frame setting SETTINGS_INITIAL_WINDOW_SIZE.
fn initial_window(bytes: u32) -> Vec<u8> {
    let mut setting = vec![0x00, 0x04];
    setting.extend_from_slice(&bytes.to_be_bytes());
    frame(SETTINGS, 0, 0, &setting)
}

/// Gives every stream of `tcp` 1 GiB of window; the client goes on never reading.
async fn open_windows(tcp: &mut TcpStream) {
    tcp.write_all(&initial_window(1 << 30)).await.unwrap();
}

#[tokio::test]
async fn readers_that_never_read_cannot_make_the_server_buffer_without_bound() {
    // Each stream's replies are 64 greetings of 8 KiB, 512 KiB that the client's open windows
    // let the server queue but that it never reads. (A zero window alone does not do: h2 gives a
    // stream no send capacity beyond its window, so nothing is queued. Here it only holds the
    // replies back until every call has been read, since a server whose socket is full stops
    // reading.) The server queues at most limits.initial_stream_window_bytes (64 KiB) per
    // stream, plus the message being written: under 30 MiB over 400 streams (the process grows
    // by about 50 MiB). Without that cap hyper queues up to 400 KiB per stream, 156 MiB; the
    // bound is half of that.
    const STREAMS_PER_CONNECTION: u32 = 200;
    const CONNECTIONS: u32 = 2;
    const STREAM_WINDOW_KIB: u64 = 64;
    const HYPER_DEFAULT_SEND_BUF_KIB: u64 = 400;
    let greeting = format!("\"{}\"", "g".repeat(8192));
    let prod = ProductionBinary::start(&format!(
        "[greeter]\nstream_interval = \"1ms\"\nstream_greetings = [{}]\n",
        vec![greeting; 64].join(", ")
    ));
    let streams = u64::from(STREAMS_PER_CONNECTION * CONNECTIONS);
    let undefended_kib = streams * HYPER_DEFAULT_SEND_BUF_KIB;
    let bound_kib = undefended_kib / 2;
    assert!(streams * (STREAM_WINDOW_KIB + 9) < bound_kib / 2);
    let idle_kib = prod.rss_kib();
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        held.push(calls_never_read(prod.addr(), STREAMS_PER_CONNECTION).await);
    }
    let metrics = prod.server.metrics_addr.expect("a metrics listener");
    common::wait_for_calls_in_flight(metrics, streams as f64).await;
    for tcp in &mut held {
        open_windows(tcp).await;
    }
    let attacked_kib = settled_rss_kib(&prod, idle_kib + bound_kib);
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "readers that never read: {streams} streams of 512 KiB replies; RSS {} -> {} MiB (bound \
         {} MiB over idle, {} MiB without the cap); control OK in {ms} ms",
        idle_kib / 1024,
        attacked_kib / 1024,
        bound_kib / 1024,
        undefended_kib / 1024
    );
    assert!(
        attacked_kib < idle_kib + bound_kib,
        "RSS within {} MiB of idle",
        bound_kib / 1024
    );
    drop(held);
}

#[tokio::test]
async fn tiny_data_frames_are_served_until_they_become_a_flood() {
    let prod = Production::start(&[]).await;
    // A small message in one-byte DATA frames is served (raw frames, so each byte really is its
    // own frame: h2's client may coalesce). 100 frames cost h2's small-frame budget 25 KB.
    let name = "t".repeat(90);
    let (frames, _) = one_byte_frames(prod.addr(), &encoded(&hello(&name))).await;
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.stream == 1 && f.kind == DATA)
        .flat_map(|f| f.payload.iter().copied())
        .collect();
    assert!(
        frames
            .iter()
            .all(|f| f.kind != RST_STREAM && f.kind != GOAWAY),
        "{frames:?}"
    );
    let reply = HelloReply::decode(body.get(5..).expect("a reply message")).unwrap();
    assert_eq!(reply.message, format!("Hello, {name}!"));

    // A flood of them is framing overhead the server would buffer: h2 budgets it against the
    // connection window (half of limits.initial_connection_window_bytes, 64 KiB) and cuts the
    // connection off with ENHANCE_YOUR_CALM.
    let name = "t".repeat(2000);
    let (frames, took) = one_byte_frames(prod.addr(), &encoded(&hello(&name))).await;
    let goaway = frames.iter().find(|f| f.kind == GOAWAY).expect("a GOAWAY");
    let ms = prod.control_call().await.as_millis();
    eprintln!(
        "1-byte DATA frames: 100 served; a flood of 2005 cut off with {goaway:?} after {took:?}; \
         control OK in {ms} ms"
    );
    assert_eq!(&goaway.payload[4..8], &[0, 0, 0, 0xb], "ENHANCE_YOUR_CALM");
    assert_eq!(&goaway.payload[8..], b"too_many_data_frames");
}

/// Sends `message` to SayHello, each byte in a DATA frame of its own, and reads the answer: the
/// frames until stream 1 ends or the connection is closed, and how long that took.
async fn one_byte_frames(addr: SocketAddr, message: &[u8]) -> (Vec<Frame>, Duration) {
    let started = Instant::now();
    let mut tcp = raw_h2(addr).await;
    let mut block = grpc_header_block(SAY_HELLO);
    block.extend(hpack_literal(23, format!("Bearer {TOKEN}").as_bytes())); // authorization
    tcp.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
        .await
        .unwrap();
    for (i, byte) in message.iter().enumerate() {
        let flags = if i + 1 == message.len() {
            END_STREAM
        } else {
            0
        };
        if tcp
            .write_all(&frame(DATA, flags, 1, &[*byte]))
            .await
            .is_err()
        {
            break;
        }
    }
    let frames = frames_until(&mut tcp, |f| {
        f.kind == GOAWAY
            || f.stream == 1
                && (f.kind == RST_STREAM || f.kind == HEADERS && f.flags & END_STREAM != 0)
    })
    .await;
    (frames, started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// 10. Slowloris over HTTP/1.1 (grpc-web on)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_slowloris_is_closed_by_the_header_read_timeout() {
    let prod = Production::start(&[("web.enabled", "true")]).await;
    let started = Instant::now();
    let (mut reader, mut writer) = tcp_from(ATTACKER_IP, prod.addr())
        .await
        .unwrap()
        .into_split();
    let server_said = tokio::spawn(async move {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer));
        let closed = read.await.is_ok().then(|| started.elapsed());
        (closed, String::from_utf8_lossy(&answer).into_owned())
    });
    let head = format!(
        "POST /helloworld.Greeter/SayHello HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\r\n",
        prod.addr()
    );
    let mut trickled = 0;
    for byte in head.bytes() {
        if server_said.is_finished() || writer.write_all(&[byte]).await.is_err() {
            break;
        }
        trickled += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (closed, answer) = server_said.await.unwrap();
    eprintln!("slowloris: {trickled} bytes trickled, closed after {closed:?}, answer {answer:?}");
    let closed = closed.expect("closed within 30 s");
    assert!(closed <= Duration::from_secs(10) + SLACK, "{closed:?}");
    assert!(trickled < head.len(), "the head never completed");
    prod.control_call().await;
}

// ---------------------------------------------------------------------------------------------
// 12. Rapid reset on the production shape
// ---------------------------------------------------------------------------------------------

/// HEADERS + RST_STREAM(CANCEL) pairs (CVE-2023-44487), as tests/limits.rs sends them.
fn rapid_reset_burst(first_stream: u32, pairs: u32) -> Vec<u8> {
    (0..pairs)
        .flat_map(|i| {
            let stream = first_stream + 2 * i;
            let mut pair = frame(
                HEADERS,
                END_HEADERS,
                stream,
                &grpc_header_block(HEALTH_CHECK),
            );
            pair.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
            pair
        })
        .collect()
}

/// One rapid-reset connection: bursts until the server closes it (at most 100 of 100 pairs);
/// returns how many bursts went out and what the server did.
async fn rapid_reset_round(addr: SocketAddr, attacking: Arc<Notify>) -> (u32, Ending) {
    let started = Instant::now();
    let (mut reader, mut writer) = raw_h2(addr).await.into_split();
    let server_said =
        tokio::spawn(
            async move { until_closed(&mut reader, started, Duration::from_secs(10)).await },
        );
    let mut bursts = 0;
    while bursts < 100 && !server_said.is_finished() {
        if write_all_or(&mut writer, &rapid_reset_burst(1 + 200 * bursts, 100))
            .await
            .is_err()
        {
            break;
        }
        bursts += 1;
        attacking.notify_one();
        tokio::task::yield_now().await;
    }
    (bursts, server_said.await.unwrap())
}

#[tokio::test]
async fn rapid_reset_is_cut_off_while_token_holders_and_probes_are_served() {
    let prod = Production::start(&[]).await;
    let addr = prod.addr();
    let (control, rounds) = during_attack(
        |attacking| rapid_reset_round(addr, attacking),
        prod.control_call(),
    )
    .await;
    eprintln!(
        "rapid reset: {} connections while the control client was served in {} ms; bursts of \
         100 written: {:?}",
        rounds.len(),
        control.as_millis(),
        rounds.iter().map(|(bursts, _)| bursts).collect::<Vec<_>>()
    );
    for (bursts, ending) in &rounds {
        let (code, _, _) = ending
            .goaway
            .clone()
            .unwrap_or_else(|| panic!("GOAWAY after {bursts} bursts: {ending:?}"));
        assert_eq!(code, ENHANCE_YOUR_CALM);
        assert!(ending.closed.is_some(), "the connection is closed");
    }
}

// ---------------------------------------------------------------------------------------------
// The probe port, and configuration
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn probe_port_serves_only_check_with_its_own_budget() {
    // A main port with no call to spare: the probe still answers.
    let prod = Production::start(&[
        ("limits.max_concurrent_calls", "1"),
        ("limits.max_anonymous_calls", "1"),
        ("greeter.stream_interval", "1s"),
    ])
    .await;
    let mut held = GreeterClient::new(channel_from(CONTROL_IP, prod.addr()).await)
        .say_hello_stream_reply(with_token(hello("held")))
        .await
        .unwrap()
        .into_inner();
    held.message().await.unwrap().unwrap();
    let _anonymous = open_watch(channel_from(ATTACKER_IP, prod.addr()).await, "")
        .await
        .unwrap();
    let busy = GreeterClient::new(channel_from(CONTROL_IP, prod.addr()).await)
        .say_hello(with_token(hello("busy")))
        .await
        .unwrap_err();
    assert_eq!(
        busy.code(),
        Code::ResourceExhausted,
        "the main port is full: {busy:?}"
    );
    let probe = channel_from(ATTACKER_IP, prod.probe()).await;
    assert_eq!(
        probe_check(probe.clone()).await.unwrap(),
        ServingStatus::Serving
    );

    let watch = open_watch(probe.clone(), "").await.unwrap_err();
    assert_eq!(watch.code(), Code::Unimplemented, "{watch:?}");

    // 4 calls per probe connection: a 5th held Check is refused, the next connection is served.
    let mut client = h2_from(ATTACKER_IP, prod.probe()).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let held = announce(
            &mut client,
            HEALTH_CHECK,
            false,
            2,
            0,
            Duration::from_millis(300),
        )
        .await;
        open.push(held.expect_err("a Check waiting for its message is held"));
    }
    let fifth = announce(
        &mut client,
        HEALTH_CHECK,
        false,
        2,
        0,
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|_| panic!("the 5th call on a probe connection: no answer within 5 s"));
    fifth.assert_refused(RESOURCE_EXHAUSTED, "too many");
    assert_eq!(probe_check(probe).await.unwrap(), ServingStatus::Serving);
    // Once the held stream ends, the main port serves token holders again.
    drop(held);
    let mut greeter = GreeterClient::new(channel_from(CONTROL_IP, prod.addr()).await);
    within(
        Duration::from_secs(5),
        "the held stream released",
        async || greeter.say_hello(with_token(hello("after"))).await.is_ok(),
    )
    .await;
    prod.control_call().await;
}

#[test]
fn zero_first_call_and_handshake_timeouts_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    for (section, key) in [
        ("connection", "first_call_timeout"),
        ("tls", "handshake_timeout"),
    ] {
        let config = dir.path().join(format!("{key}.toml"));
        std::fs::write(&config, format!("[{section}]\n{key} = \"0s\"\n")).unwrap();
        let output = greeter_bin()
            .args(["config", "check", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("{section}.{key} = 0s: {stderr}");
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("{section}.{key}")),
            "names the key: {stderr}"
        );
    }
}
