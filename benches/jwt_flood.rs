//! What a flood of refused calls costs the server, per call: garbage static tokens against
//! distinct forged JWTs (RS256, ES256, EdDSA: a known `iss` and `kid`, a made-up signature that
//! gets as far as the signature arithmetic), with the per-peer budget of failed signature checks
//! (the defaults) and without it (as before issue 23: `peer_failure_burst` out of reach, no cache
//! of refused tokens). A valid cached JWT, a JWT with an unknown `kid` and garbage as long as a
//! JWT are there for scale.
//!
//! Two stacks: `minimal` (the embedded default, plaintext, logs at warn, no metrics: auth's own
//! cost stands out) and `production` (config/production.toml: TLS with dev certificates, JSON
//! access logs at info to /dev/null, metrics, probe port, quotas too large to refuse), as the
//! issue measured. Each run starts the release `greeter serve` afresh, pinned to CPU 0, with auth
//! on (an empty tokens file, one issuer whose JWKS holds an RSA, an EC P-256 and an Ed25519
//! key); this process drives it from CPU 1 over 4 connections with 64 calls in flight, every call
//! with its own token (the valid row: one token, as a workload sends it). The server's CPU time
//! over the measured calls (the sum of its threads' `schedstat` run times), divided by their
//! number, is the figure; the first 1,000 calls of a run are a warm-up (they also spend the
//! flooding peer's budget). Halfway through each flood, a valid JWT the server has never seen is
//! sent from 127.0.0.2 and must be accepted; the run fails otherwise. Rows alternate within each
//! of 3 rounds; medians are printed with the ratio to the garbage row.
//!
//! Run with `cargo bench --bench jwt_flood` (about five minutes once built).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use greeter::pb::{HelloRequest, greeter_client::GreeterClient};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair,
        RsaPublicKeyComponents,
    },
};
use serde_json::json;
use tonic::{
    Code,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const WARMUP: usize = 1_000;
const CALLS: usize = 20_000;
const ROUNDS: usize = 3;
const CONNECTIONS: usize = 4;
const IN_FLIGHT: usize = 64;

/// The issuer's keys: ring makes the EC and Ed25519 ones; the RSA one is the unit tests' fixture
/// (ring cannot make RSA keys). Forged tokens need only the public halves, in the JWKS.
struct Keys {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
}

impl Keys {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let ec = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Self {
            rsa: RsaKeyPair::from_pkcs8(include_bytes!(
                "../src/call/auth/testdata/rs256-test-key.pk8"
            ))
            .unwrap(),
            ec: EcdsaKeyPair::from_pkcs8(alg, ec.as_ref(), &rng).unwrap(),
            ed: Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap(),
        }
    }

    fn jwks(&self) -> String {
        let point = self.ec.public_key().as_ref();
        let rsa: RsaPublicKeyComponents<Vec<u8>> = self.rsa.public().into();
        json!({"keys": [
            {"kty": "RSA", "kid": "RS256", "alg": "RS256", "n": B64.encode(rsa.n), "e": B64.encode(rsa.e)},
            {"kty": "EC", "crv": "P-256", "kid": "ES256", "x": B64.encode(&point[1..33]),
             "y": B64.encode(&point[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "EdDSA", "alg": "EdDSA",
             "x": B64.encode(self.ed.public_key().as_ref())},
        ]})
        .to_string()
    }

    /// A signed EdDSA token for `sub`, valid for an hour.
    fn valid(&self, sub: &str) -> String {
        let message = unsigned("EdDSA", "EdDSA", sub);
        format!("{message}.{}", B64.encode(self.ed.sign(message.as_bytes())))
    }
}

/// The header and claims of a service-account-shaped token.
fn unsigned(alg: &str, kid: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({"alg": alg, "kid": kid, "typ": "JWT"});
    let claims = json!({"iss": ISSUER, "aud": ["greeter"], "sub": sub, "iat": now, "nbf": now,
                        "exp": now + 3600, "kubernetes.io": {"namespace": "shop"}});
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// What one row sends.
#[derive(Clone, Copy)]
enum Tokens {
    /// Static-token-shaped garbage, each distinct, of `bytes` random bytes (base64url).
    Garbage { bytes: usize },
    /// A valid token, the same on every call.
    ValidCached,
    /// Distinct tokens with a made-up signature of the algorithm's length, under `kid`.
    Forged {
        alg: &'static str,
        kid: &'static str,
    },
}

struct Row {
    name: &'static str,
    tokens: Tokens,
    /// Without the budget and the failure cache: what a flood cost before.
    unbounded: bool,
}

fn tokens(keys: &Keys, kind: Tokens, count: usize) -> Vec<MetadataValue<Ascii>> {
    let bearer = |token: String| format!("Bearer {token}").parse().unwrap();
    match kind {
        Tokens::Garbage { bytes } => (0..count)
            .map(|_| {
                let random: Vec<u8> = (0..bytes).map(|_| fastrand::u8(..)).collect();
                bearer(format!("grt_{}", B64.encode(random)))
            })
            .collect(),
        Tokens::ValidCached => {
            vec![bearer(keys.valid("system:serviceaccount:shop:checkout")); count]
        }
        Tokens::Forged { alg, kid } => {
            let length = if alg == "RS256" { 256 } else { 64 };
            let message = unsigned(alg, kid, "system:serviceaccount:shop:checkout");
            (0..count)
                .map(|_| {
                    let mut signature: Vec<u8> = (0..length).map(|_| fastrand::u8(..)).collect();
                    // Values a verifier must do the arithmetic for, not refuse at a glance: an
                    // RSA signature below the modulus, an Ed25519 S below the group order (a
                    // random one is above it 15 times in 16, and ring refuses that cheaply).
                    match alg {
                        "RS256" => signature[0] = 0,
                        "EdDSA" => signature[63] &= 0x0f,
                        _ => {}
                    }
                    bearer(format!("{message}.{}", B64.encode(signature)))
                })
                .collect()
        }
    }
}

/// The configuration a server runs.
#[derive(Clone, Copy, PartialEq)]
enum Stack {
    /// The embedded default, plaintext, logs at warn, no metrics.
    Minimal,
    /// config/production.toml with TLS, access logs and metrics, on loopback.
    Production,
}

/// A free loopback port.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `greeter serve` (release) pinned to CPU 0, stopped when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
}

impl Server {
    async fn start(dir: &Path, stack: Stack, unbounded: bool) -> Self {
        let port = free_port();
        let limits = if unbounded {
            "failure_cache_size = 0\npeer_failure_burst = 4000000000\n"
        } else {
            ""
        };
        let auth = format!(
            "[auth]\nenabled = true\ntokens_file = {tokens:?}\n[auth.jwt]\n{limits}\
             [[auth.jwt.issuers]]\nissuer = {ISSUER:?}\njwks_file = {jwks:?}\n\
             audiences = [\"greeter\"]\n[[auth.jwt.rules]]\nclaim = \"sub\"\n\
             pattern = \"system:serviceaccount:shop:*\"\nscopes = [\"greeter\"]\n",
            tokens = dir.join("tokens.toml"),
            jwks = dir.join("jwks.json"),
        );
        let certs = dir.join("certs");
        let layer = match stack {
            Stack::Minimal => format!("[metrics]\nlisten = \"\"\n[log]\nfilter = \"warn\"\n{auth}"),
            Stack::Production => format!(
                "[tls]\ncert = {cert:?}\nkey = {key:?}\n[probe]\nlisten = \"127.0.0.1:{probe}\"\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[shutdown]\ndelay = \"0s\"\n\
                 [quota]\nrate = 1000000.0\nburst = 1000000\n{auth}",
                cert = certs.join("server.pem"),
                key = certs.join("server.key"),
                probe = free_port(),
                metrics = free_port(),
            ),
        };
        let config = dir.join("layer.toml");
        std::fs::write(&config, layer).unwrap();
        let mut command = Command::new("taskset");
        command.args(["-c", "0", env!("CARGO_BIN_EXE_greeter"), "serve"]);
        if stack == Stack::Production {
            let production = concat!(env!("CARGO_MANIFEST_DIR"), "/config/production.toml");
            command.args(["--config", production]);
        }
        let child = command
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start greeter serve");
        let tls = (stack == Stack::Production).then(|| {
            let ca = std::fs::read(certs.join("ca.pem")).unwrap();
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost")
        });
        // Killed when dropped, the panic below included.
        let server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls,
        };
        for _ in 0..100 {
            if server.endpoint().connect().await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("greeter serve did not listen on {}", server.addr);
    }

    fn endpoint(&self) -> Endpoint {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{}", self.addr)).unwrap();
        match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone()).unwrap(),
            None => endpoint,
        }
    }

    /// CPU time of the server's threads so far, in seconds: the sum of their `schedstat`
    /// run times (nanoseconds; `/proc/PID/stat` counts in ticks of 10 ms, too coarse here).
    fn cpu_seconds(&self) -> f64 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).unwrap();
        let nanos: u64 = tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
            .map(|stat| stat.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        nanos as f64 / 1e9
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends every token once, `IN_FLIGHT` at a time over `channels`; returns how many calls ended
/// with each code. `halfway` runs when half the calls have been sent.
async fn flood(
    channels: &[Channel],
    tokens: Vec<MetadataValue<Ascii>>,
    halfway: impl Future<Output = ()> + 'static,
) -> Vec<(Code, usize)> {
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let (tokens, next) = (Arc::clone(&tokens), Arc::clone(&next));
            let mut client = GreeterClient::new(channels[i % channels.len()].clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(token) = tokens.get(n) else {
                        return codes;
                    };
                    let mut request = tonic::Request::new(HelloRequest { name: "you".into() });
                    request
                        .metadata_mut()
                        .insert("authorization", token.clone());
                    let code = client
                        .say_hello(request)
                        .await
                        .map_or_else(|s| s.code(), |_| Code::Ok);
                    codes.push(code);
                }
            })
        })
        .collect();
    let total = tokens.len();
    while next.load(Ordering::Relaxed) < total / 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    halfway.await;
    let mut counts: Vec<(Code, usize)> = Vec::new();
    for task in tasks {
        for code in task.await.unwrap() {
            match counts.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => counts.push((code, 1)),
            }
        }
    }
    counts
}

/// A valid token the server has not seen, sent from 127.0.0.2: must be accepted.
async fn first_seen_elsewhere(endpoint: Endpoint, addr: SocketAddr, token: MetadataValue<Ascii>) {
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 0)))?;
            socket.connect(addr).await.map(hyper_util::rt::TokioIo::new)
        }))
        .await
        .unwrap();
    let mut request = tonic::Request::new(HelloRequest { name: "you".into() });
    request.metadata_mut().insert("authorization", token);
    if let Err(status) = GreeterClient::new(channel).say_hello(request).await {
        panic!("a valid first-seen JWT from 127.0.0.2 was refused: {status:?}");
    }
}

/// Server CPU µs per measured call, and the codes the calls ended with.
async fn run(dir: &Path, keys: &Keys, stack: Stack, row: &Row) -> (f64, Vec<(Code, usize)>) {
    let server = Server::start(dir, stack, row.unbounded).await;
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(server.endpoint().connect().await.unwrap());
    }
    flood(&channels, tokens(keys, row.tokens, WARMUP), async {}).await;
    let measured = tokens(keys, row.tokens, CALLS);
    let fresh = format!(
        "Bearer {}",
        keys.valid(&format!("system:serviceaccount:shop:{}", fastrand::u64(..)))
    );
    let addr = server.addr;
    let before = server.cpu_seconds();
    let codes = flood(
        &channels,
        measured,
        first_seen_elsewhere(server.endpoint(), addr, fresh.parse().unwrap()),
    )
    .await;
    let after = server.cpu_seconds();
    ((after - before) * 1e6 / CALLS as f64, codes)
}

fn main() {
    let pin = Command::new("taskset")
        .args(["-a", "-cp", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    if !pin.is_ok_and(|s| s.success()) {
        eprintln!("jwt_flood: could not pin to CPU 1 (taskset); figures will be noisier");
    }
    let keys = Keys::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), keys.jwks()).unwrap();
    std::fs::write(dir.path().join("tokens.toml"), "").unwrap();
    let certs = Command::new(env!("CARGO_BIN_EXE_greeter"))
        .args(["certs", "generate", "--out"])
        .arg(dir.path().join("certs"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(certs.success(), "greeter certs generate");
    let forged = |name, alg, unbounded| Row {
        name,
        tokens: Tokens::Forged { alg, kid: alg },
        unbounded,
    };
    let rows = [
        Row {
            name: "garbage static token",
            tokens: Tokens::Garbage { bytes: 32 },
            unbounded: false,
        },
        Row {
            name: "garbage, RS256 JWT's size",
            tokens: Tokens::Garbage { bytes: 520 },
            unbounded: false,
        },
        Row {
            name: "valid JWT, cached",
            tokens: Tokens::ValidCached,
            unbounded: false,
        },
        Row {
            name: "JWT, unknown kid",
            tokens: Tokens::Forged {
                alg: "ES256",
                kid: "nope",
            },
            unbounded: false,
        },
        forged("forged RS256", "RS256", false),
        forged("forged ES256", "ES256", false),
        forged("forged EdDSA", "EdDSA", false),
        forged("forged RS256, unbounded", "RS256", true),
        forged("forged ES256, unbounded", "ES256", true),
        forged("forged EdDSA, unbounded", "EdDSA", true),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (stack, name) in [
        (Stack::Minimal, "minimal"),
        (Stack::Production, "production"),
    ] {
        let mut figures = vec![Vec::new(); rows.len()];
        let mut codes = vec![Vec::new(); rows.len()];
        for round in 1..=ROUNDS {
            for (i, row) in rows.iter().enumerate() {
                let (us, seen) = runtime.block_on(run(dir.path(), &keys, stack, row));
                eprintln!(
                    "{name} round {round}: {:<26} {us:>7.2} µs/call {seen:?}",
                    row.name
                );
                figures[i].push(us);
                codes[i] = seen;
            }
        }
        report(name, &rows, &figures, &codes);
    }
}

/// The table of one stack: medians, and their ratio to the first row's.
fn report(stack: &str, rows: &[Row], figures: &[Vec<f64>], codes: &[Vec<(Code, usize)>]) {
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let garbage = median(&figures[0]);
    println!(
        "\n{stack} stack: server CPU per call, {CALLS} calls, median of {ROUNDS} rounds (a valid \
         first-seen JWT from another peer was accepted during every flood):\n"
    );
    println!("| calls | server CPU µs/call | x garbage | answers (last round) |");
    println!("|---|---:|---:|---|");
    for ((row, values), seen) in rows.iter().zip(figures).zip(codes) {
        let us = median(values);
        let answers: Vec<String> = seen.iter().map(|(c, n)| format!("{c:?} {n}")).collect();
        println!(
            "| {} | {us:.1} | {:.2} | {} |",
            row.name,
            us / garbage,
            answers.join(", ")
        );
    }
}
