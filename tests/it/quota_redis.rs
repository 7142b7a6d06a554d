//! Fleet quotas in a real Redis (Debian's `redis-server`, started here on a free loopback port in
//! a temporary directory, stopped at the end): servers sharing one Redis share their callers'
//! buckets; what each `quota.redis.on_error` does when Redis goes away or never answers; TLS with
//! a password; overrides, method patterns and anonymous peers as with the local store.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use greeter::pb::{HelloRequest, greeter_client::GreeterClient};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt as _;

use crate::common::{TestServer, config_with, greeter_token_auth, scrape};

const TOKEN: &str = "grt_fleet-token";

/// A `redis-server` of our own: no persistence, loopback only, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Redis {
    fn start() -> Self {
        Self::start_with_port(free_port(), &[])
    }

    /// On `port` (the one a client dials: with TLS, the TLS port), with `extra` arguments after
    /// ours (a later one wins: `--port 0` turns plaintext off).
    fn start_with_port(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let child = spawn_redis(port, dir.path(), &args);
        let redis = Self {
            child,
            port,
            dir,
            args,
        };
        redis.wait_until_up();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_until_up(&self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not listen on {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, empty.
    fn restart(&mut self) {
        self.stop();
        self.child = spawn_redis(self.port, self.dir.path(), &self.args);
        self.wait_until_up();
    }

    /// Keys under `prefix` (plaintext Redis without a password only).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw", "keys"])
            .arg(format!("{prefix}*"))
            .output()
            .expect("run redis-cli (scripts/install-tools installs redis-tools)");
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_redis(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (scripts/install-tools installs it)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A token-auth server with quotas on, counting in Redis at `url` unless `extra` says otherwise.
async fn server(dir: &Path, url: &str, extra: &[(&str, &str)]) -> TestServer {
    TestServer::start_with(config(dir, url, extra)).await
}

fn config(dir: &Path, url: &str, extra: &[(&str, &str)]) -> greeter::config::Config {
    let mut overrides = greeter_token_auth(dir, TOKEN, "fleet");
    overrides.extend(
        [
            ("quota.enabled", "true"),
            ("quota.store", "redis"),
            ("quota.redis.url", url),
            ("metrics.listen", "127.0.0.1:0"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    config_with(overrides)
}

async fn hello(channel: &Channel) -> Result<(), Status> {
    let mut request = Request::new(HelloRequest { name: "q".into() });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    GreeterClient::new(channel.clone())
        .say_hello(request)
        .await
        .map(drop)
}

/// The sum of a counter's series whose line contains `filter` (the series must exist).
fn counter(metrics: &str, name: &str, filter: &str) -> f64 {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        !values.is_empty(),
        "no {name} series with {filter}:\n{metrics}"
    );
    values.iter().sum()
}

/// One caller spreads calls round robin over `channels` at `per_second` for `seconds`; returns
/// how many were admitted. Every call is answered OK or RESOURCE_EXHAUSTED.
async fn spread(channels: &[Channel], per_second: u32, seconds: u32) -> usize {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let mut calls = Vec::new();
    for i in 0..(per_second * seconds) as usize {
        tick.tick().await;
        let channel = channels[i % channels.len()].clone();
        calls.push(tokio::spawn(async move { hello(&channel).await }));
    }
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_sharing_redis_hold_one_callers_rate_fleet_wide() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let (rate, burst, seconds) = (10u32, 10u32, 10u32);
    let sizes = [
        ("quota.rate", rate.to_string()),
        ("quota.burst", burst.to_string()),
    ];
    let sizes: Vec<(&str, &str)> = sizes.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut fleet = Vec::new();
    for store in ["redis", "local"] {
        let mut extra = sizes.clone();
        extra.push(("quota.store", store));
        let mut servers = Vec::new();
        for _ in 0..3 {
            servers.push(server(dir.path(), &redis.url(), &extra).await);
        }
        let mut channels = Vec::new();
        for server in &servers {
            channels.push(server.channel().await);
        }
        // Three times the caller's rate, a third on each server.
        let admitted = spread(&channels, 3 * rate, seconds).await;
        println!(
            "{store}: {admitted} of {} calls admitted",
            3 * rate * seconds
        );
        fleet.push(admitted as f64);
    }
    let expected = f64::from(rate * seconds + burst);
    let [shared, local] = [fleet[0], fleet[1]];
    assert!(
        (shared - expected).abs() <= expected * 0.1,
        "shared store: {shared} admitted, expected {expected} ± 10%"
    );
    // Each server's own buckets admit the rate each: the whole offered load.
    assert!(
        local >= 2.5 * expected,
        "local store: {local} admitted; shared {shared}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_on_error_does_what_it_says_while_redis_is_down() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(20);
    let mut servers = Vec::new();
    for on_error in ["local", "allow", "deny"] {
        let server = server(
            dir.path(),
            &redis.url(),
            &[
                ("quota.rate", "0.01"),
                ("quota.burst", "2"),
                ("quota.redis.timeout", "20ms"),
                ("quota.redis.on_error", on_error),
                ("quota.redis.key_prefix", &format!("{on_error}:")),
            ],
        )
        .await;
        let channel = server.channel().await;
        // Shared while Redis is up: the burst, then a refusal, and the keys are in Redis.
        hello(&channel).await.unwrap();
        hello(&channel).await.unwrap();
        assert_eq!(
            hello(&channel).await.unwrap_err().code(),
            Code::ResourceExhausted
        );
        assert!(
            !redis.keys(&format!("{on_error}:")).is_empty(),
            "{on_error}"
        );
        servers.push((on_error, server, channel));
    }
    redis.stop();
    for (on_error, server, channel) in &servers {
        let mut outcomes = Vec::new();
        let mut slowest = Duration::ZERO;
        for _ in 0..4 {
            let started = Instant::now();
            outcomes.push(hello(channel).await.map_err(|s| s.code()));
            slowest = slowest.max(started.elapsed());
        }
        println!("Redis down, on_error = {on_error}: {outcomes:?}, slowest {slowest:?}");
        // No call waits past the timeout by more than a scheduling hiccup: generous here, the
        // point is that none waits for Redis to come back.
        assert!(slowest < timeout + Duration::from_secs(2), "{slowest:?}");
        let expected: Vec<Result<(), Code>> = match *on_error {
            // This server's own buckets, full: the burst of 2, then refusals.
            "local" => vec![
                Ok(()),
                Ok(()),
                Err(Code::ResourceExhausted),
                Err(Code::ResourceExhausted),
            ],
            "allow" => vec![Ok(()); 4],
            _ => vec![Err(Code::Unavailable); 4],
        };
        assert_eq!(outcomes, expected, "on_error = {on_error}");
        let metrics = scrape(server.metrics_addr.unwrap()).await;
        assert!(
            counter(&metrics, "greeter_quota_store_errors_total", "") >= 4.0,
            "{metrics}"
        );
        assert!(
            counter(
                &metrics,
                "greeter_quota_store_fallbacks_total",
                &format!("on_error=\"{on_error}\"")
            ) >= 4.0,
            "{metrics}"
        );
    }
    // Back (empty): shared again within seconds, as the keys show.
    redis.restart();
    let (_, _, channel) = &servers[1];
    let started = Instant::now();
    while redis.keys("allow:").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not shared again within 20 s"
        );
        let _ = hello(channel).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("shared again {:?} after Redis came back", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_never_answers_costs_each_call_the_timeout_only() {
    // Accepts connections and never answers a byte.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        dir.path(),
        &format!("redis://{addr}"),
        &[
            ("quota.rate", "0.01"),
            ("quota.burst", "3"),
            ("quota.redis.timeout", "50ms"),
            ("quota.anonymous", "exempt"),
        ],
    )
    .await;
    let channel = server.channel().await;
    // Serving (the startup's one try at Redis has given up): from here, each call's wait.
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(hello(&channel).await.map_err(|s| s.code()));
    }
    let took = started.elapsed();
    println!("4 calls against a silent Redis in {took:?}: {outcomes:?}");
    // on_error = "local" (the default): this server's own bucket of 3.
    assert_eq!(
        outcomes,
        [Ok(()), Ok(()), Ok(()), Err(Code::ResourceExhausted)]
    );
    assert!(
        took < 4 * (Duration::from_millis(50) + Duration::from_secs(1)),
        "{took:?}"
    );
    let metrics = scrape(server.metrics_addr.unwrap()).await;
    assert!(
        counter(
            &metrics,
            "greeter_quota_store_errors_total",
            "kind=\"timeout\""
        ) >= 4.0,
        "{metrics}"
    );
    // Refused before the call budgets: no call is left in flight.
    assert_eq!(counter(&metrics, "greeter_calls_in_flight", ""), 0.0);
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_password_file_and_a_wrong_password_is_a_startup_error() {
    let pki = crate::common::Pki::new();
    let password = "redis-s3cr3t-password";
    let port_args = |port: u16| {
        vec![
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            pki.path("server.pem"),
            "--tls-key-file".to_owned(),
            pki.path("server.key"),
            "--tls-ca-cert-file".to_owned(),
            pki.path("ca.pem"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
            "--requirepass".to_owned(),
            password.to_owned(),
        ]
    };
    let port = free_port();
    let args = port_args(port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The plaintext port is off (--port 0 after ours): wait on the TLS one.
    let redis = Redis::start_with_port(port, &args);
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let url = format!("rediss://localhost:{port}");
    let tls = [
        ("quota.redis.ca_file", pki.path("ca.pem")),
        (
            "quota.redis.password_file",
            password_file.to_str().unwrap().to_owned(),
        ),
        ("quota.rate", "0.01".into()),
        ("quota.burst", "2".into()),
        ("quota.redis.on_error", "deny".into()),
    ];
    let tls: Vec<(&str, &str)> = tls.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = server(dir.path(), &url, &tls).await;
    let channel = server.channel().await;
    // Counted in Redis (on_error = "deny" would refuse everything otherwise).
    hello(&channel).await.unwrap();
    hello(&channel).await.unwrap();
    let refused = hello(&channel).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // A wrong password stops startup, naming the setting and never the password.
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    let mut overrides = greeter_token_auth(dir.path(), TOKEN, "fleet");
    overrides.extend(
        [
            ("quota.enabled", "true"),
            ("quota.store", "redis"),
            ("quota.redis.url", url.as_str()),
        ]
        .iter()
        .chain(&tls)
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let bound = greeter::server::Server::bind(config_with(overrides))
        .await
        .unwrap();
    let error = bound
        .serve(std::future::ready(()))
        .await
        .expect_err("a refused password stops the server");
    let message = error.to_string();
    assert!(message.contains("quota.redis.password_file"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");
    assert!(!message.contains(password), "{message}");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_method_patterns_and_anonymous_peers_as_with_the_local_store() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(
        dir.path(),
        &redis.url(),
        &[
            ("quota.rate", "0.01"),
            ("quota.burst", "1"),
            ("quota.identities.fleet.class", "token"),
            ("quota.identities.fleet.rate", "0.01"),
            ("quota.identities.fleet.burst", "3"),
        ],
    );
    config.quota.methods.insert(
        "/helloworld.Greeter/SayHello".into(),
        greeter::config::QuotaLimits {
            rate: 0.01,
            burst: 2,
        },
    );
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    // The method's bucket (2) refuses first, naming its pattern; the override (3) has one left.
    hello(&channel).await.unwrap();
    hello(&channel).await.unwrap();
    let refused = hello(&channel).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    let violation = &details.quota_failure().unwrap().violations[0];
    assert_eq!(violation.subject, "method:/helloworld.Greeter/SayHello");
    let delay = refused
        .get_error_details()
        .retry_info()
        .unwrap()
        .retry_delay;
    assert!(
        delay.is_some_and(|d| d > Duration::from_secs(90)),
        "{delay:?}"
    );
    // Anonymous health checks: per peer, of the default size (1).
    let mut health = HealthClient::new(channel.clone());
    health.check(HealthCheckRequest::default()).await.unwrap();
    let refused = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    let violation = &details.quota_failure().unwrap().violations[0];
    assert_eq!(violation.subject, "caller:anonymous");
    let keys = redis.keys("greeter:quota:");
    assert!(
        keys.iter().any(|k| k.contains("{ip:127.0.0.1}")),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.ends_with(":m:/helloworld.Greeter/SayHello")),
        "{keys:?}"
    );
    assert!(
        keys.iter().all(|k| !k.contains("fleet")),
        "names never in Redis: {keys:?}"
    );
}
