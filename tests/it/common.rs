//! Starting real servers for tests: in-process through the library, or as the built binary where
//! the process boundary matters (signals, exit codes, config files). Nothing here is mocked.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use greeter::{
    config::{Config, Sources},
    server::{OwnService, Server, ServerError},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The embedded default, on ephemeral loopback ports (gRPC and metrics), with a fast stream so
/// tests stay quick.
pub fn test_config(extra: &[(&str, &str)]) -> Config {
    let mut overrides = vec![
        ("server.listen".to_owned(), "127.0.0.1:0".to_owned()),
        ("metrics.listen".to_owned(), "127.0.0.1:0".to_owned()),
        ("greeter.stream_interval".to_owned(), "1ms".to_owned()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::load(&Sources {
        overrides,
        ..Sources::default()
    })
    .expect("test config is valid")
}

/// A server running in this process on a loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub probe_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub stats: std::sync::Arc<greeter::server::Stats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(test_config(&[])).await
    }

    pub async fn start_with(config: Config) -> Self {
        Self::start_serving(config, Vec::new()).await
    }

    /// Serving `own` services beside the built-in ones ([`Server::bind_with`]).
    pub async fn start_serving(config: Config, own: Vec<OwnService>) -> Self {
        let server = Server::bind_with(config, own)
            .await
            .expect("bind a loopback port");
        let addr = server.local_addr();
        let probe_addr = server.probe_addr();
        let metrics_addr = server.metrics_addr();
        let stats = server.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            probe_addr,
            metrics_addr,
            stats,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.uri())
            .unwrap()
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// Starts the shutdown sequence without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits (bounded) for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("server stops within 15s")
            .expect("server task does not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// The built `greeter` binary.
pub fn greeter_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_greeter"))
}

/// `greeter serve` as a child process; its stderr (JSON logs) is collected for assertions.
pub struct BinaryServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// The metrics listener, on an ephemeral loopback port so servers can run side by side.
    pub metrics_addr: Option<SocketAddr>,
    pub logs: Arc<Mutex<String>>,
    /// While set, nothing reads the server's stderr: a stuck log collector.
    logs_stalled: Arc<AtomicBool>,
}

impl BinaryServer {
    /// Starts `greeter serve --listen 127.0.0.1:0 -c <config>` (metrics on 127.0.0.1:0 too) and
    /// learns the ports from the startup log line, which is itself part of the contract
    /// (operators read it).
    pub fn start(config: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(config, extra_args, &[])
    }

    /// Like [`BinaryServer::start`], with environment variables (`GREETER__...` config layers).
    pub fn start_with_env(config: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = greeter_bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .args(extra_args)
            .env_remove("RUST_LOG")
            .env("GREETER__METRICS__LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn greeter serve");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        let logs_stalled = Arc::new(AtomicBool::new(false));
        let stalled = Arc::clone(&logs_stalled);
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("greeter serving") {
                    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let addr: SocketAddr = event["listen"].as_str().unwrap().parse().unwrap();
                    let metrics_addr: Option<SocketAddr> =
                        event["metrics"].as_str().map(|a| a.parse().unwrap());
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send((addr, metrics_addr));
                    }
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
                drop(logs);
                while stalled.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        let (addr, metrics_addr) = match addr_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "greeter serve did not log its address; logs:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        Self {
            child,
            addr,
            metrics_addr,
            logs,
            logs_stalled,
        }
    }

    /// Stops (or resumes) reading the server's stderr: once the pipe is full, the server's log
    /// writer blocks in `write(2)`, as it would behind a stuck collector.
    pub fn stall_logs(&self, stalled: bool) {
        self.logs_stalled.store(stalled, Ordering::Relaxed);
    }

    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns the exit code and how long it took.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = started + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("greeter did not exit within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Development certificates written to a temporary folder: real PEM files, as operators have.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub pki: greeter::certs::DevPki,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_pki("greeter-client");
        pki.write(dir.path(), false).unwrap();
        Self { dir, pki }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_owned()
    }

    /// Config overrides serving TLS with this PKI's server certificate.
    pub fn tls_overrides(&self) -> Vec<(String, String)> {
        vec![
            ("tls.enabled".into(), "true".into()),
            ("tls.cert".into(), self.path("server.pem")),
            ("tls.key".into(), self.path("server.key")),
            ("tls.reload_interval".into(), "50ms".into()),
        ]
    }

    /// A TLS client config trusting this PKI's CA, optionally presenting its client certificate.
    pub fn client_tls(&self, with_client_cert: bool) -> tonic::transport::ClientTlsConfig {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.pki.ca_cert))
            .domain_name("localhost");
        if with_client_cert {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                &self.pki.client_cert,
                &self.pki.client_key,
            ));
        }
        tls
    }
}

pub fn generate_pki(client_name: &str) -> greeter::certs::DevPki {
    let options = greeter::certs::PkiOptions::valid_for_days(
        vec!["localhost".into(), "127.0.0.1".into()],
        client_name.into(),
        30,
    );
    greeter::certs::DevPki::generate(&options).unwrap()
}

/// A config from the embedded default plus `overrides`, on ephemeral loopback ports.
pub fn config_with(overrides: Vec<(String, String)>) -> Config {
    let mut all = vec![
        ("server.listen".to_owned(), "127.0.0.1:0".to_owned()),
        ("metrics.listen".to_owned(), "127.0.0.1:0".to_owned()),
        ("greeter.stream_interval".to_owned(), "1ms".to_owned()),
    ];
    all.extend(overrides);
    Config::load(&Sources {
        overrides: all,
        ..Sources::default()
    })
    .expect("test config is valid")
}

/// Overrides turning token auth on, with a tokens file in `dir` holding one token with the
/// `greeter` scope, held by `name`. The file is replaced whole (a rename), as servers already
/// started on it may be reading it: written in place, it is empty for a moment, and a reload
/// then would refuse every token.
pub fn greeter_token_auth(dir: &Path, token: &str, name: &str) -> Vec<(String, String)> {
    let tokens = dir.join("tokens.toml");
    let entry = greeter::call::auth::entry_for(token, name, &["greeter".into()]);
    let partial = dir.join("tokens.toml.tmp");
    std::fs::write(&partial, greeter::call::auth::entry_toml(&entry)).unwrap();
    std::fs::rename(&partial, &tokens).unwrap();
    vec![
        ("auth.enabled".into(), "true".into()),
        ("auth.tokens_file".into(), tokens.to_str().unwrap().into()),
    ]
}

/// Connects over TLS to `addr` (verifying the name "localhost").
pub async fn tls_channel(
    addr: SocketAddr,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// An HTTP/1.1 response as a test sees it.
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A plain `METHOD path` request over a fresh TCP connection (`Connection: close`), as a scraper
/// or curl would send it; `accept` is the Accept header, if any.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> HttpResponse {
    let headers: Vec<_> = accept.map(|a| ("Accept", a)).into_iter().collect();
    http_request_with(addr, method, path, &headers).await
}

/// Like [`http_request`], with any headers (a browser's CORS preflight, say; `Host` replaces the
/// default one) and no body.
pub async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let host = if headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    let headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!("{method} {path} HTTP/1.1\r\n{host}{headers}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("the response arrives within 10s")
        .unwrap();
    let raw = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `GET /metrics` on a metrics listener; panics unless it answers 200.
pub async fn scrape(metrics_addr: SocketAddr) -> String {
    let response = http_request(metrics_addr, "GET", "/metrics", None).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// The value of `greeter_reloads_total{kind, outcome}` in a scrape; 0 when the series is absent.
pub async fn reloads(metrics_addr: SocketAddr, kind: &str, outcome: &str) -> f64 {
    let text = scrape(metrics_addr).await;
    text.lines()
        .filter(|line| line.starts_with("greeter_reloads_total{"))
        .filter(|line| line.contains(&format!("kind=\"{kind}\"")))
        .filter(|line| line.contains(&format!("outcome=\"{outcome}\"")))
        .map(|line| line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

/// Waits (up to 10s) until the server has counted at least `count` reloads of `kind` with
/// `outcome`: the reloader has read the file and decided, whatever the decision was.
pub async fn wait_for_reloads(metrics_addr: SocketAddr, kind: &str, outcome: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = reloads(metrics_addr, kind, outcome).await;
        if seen >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} {kind} reloads with outcome {outcome} after 10s, want {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A HelloRequest as one gRPC message (uncompressed), as a raw HTTP/2 client sends it.
pub fn grpc_message(name: &str) -> bytes::Bytes {
    let mut message = vec![0x0a, u8::try_from(name.len()).unwrap()];
    message.extend_from_slice(name.as_bytes());
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    frame.into()
}

/// `greeter_calls_in_flight` on a metrics listener.
pub async fn calls_in_flight(metrics_addr: SocketAddr) -> f64 {
    scrape(metrics_addr)
        .await
        .lines()
        .find_map(|line| line.strip_prefix("greeter_calls_in_flight "))
        .expect("greeter_calls_in_flight is exposed")
        .parse()
        .unwrap()
}

/// Waits (up to 10s) until the server counts exactly `count` calls in flight.
pub async fn wait_for_calls_in_flight(metrics_addr: SocketAddr, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = calls_in_flight(metrics_addr).await;
        if seen == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} calls in flight after 10s, want {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series (its name and labels, as exposed) in a scrape of `metrics_addr`.
pub async fn metric(metrics_addr: SocketAddr, series: &str) -> f64 {
    scrape(metrics_addr)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} is exposed"))
        .parse()
        .unwrap()
}

/// Waits (up to 10s) until the series reads `want`.
pub async fn wait_for_metric(metrics_addr: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = metric(metrics_addr, series).await;
        if seen == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {seen} after 10s, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `server`'s captured logs (every 20ms) until `found` returns `Some` for them, or fails
/// after `within` with `what` and the logs so far.
pub async fn wait_for_log_line<T>(
    server: &BinaryServer,
    within: Duration,
    what: &str,
    mut found: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let logs = server.logs.lock().unwrap().clone();
        if let Some(found) = found(&logs) {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP connection to `addr` from `source` (any 127.0.0.0/8 address is loopback).
pub async fn tcp_from(
    source: std::net::Ipv4Addr,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(std::net::IpAddr::V4(source), 0))?;
    socket.connect(addr).await
}

/// A gRPC channel (one connection) to `addr` from `source`.
pub async fn channel_from(source: std::net::Ipv4Addr, addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| async move {
            tcp_from(source, addr)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }))
        .await
        .expect("connect")
}
