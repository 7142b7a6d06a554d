//! What observability costs: unary throughput of one process serving itself on loopback, with
//! and without metrics and per-call logging, in the same run.
//!
//! Three setups of the same build, each round in a fresh child process of this bench (so each gets
//! exactly the subscriber the server installs, an `EnvFilter` and the JSON formatter, nothing
//! switchable), rounds alternating so that drift on a shared machine hits each alike:
//! - `bare`: `metrics.listen = ""` (no per-call metrics) and log filter `warn` (no access line):
//!   what is left is the request id every call gets and the layers' pass-through;
//! - `metrics`: metrics kept, log filter `warn`;
//! - `full`: metrics and log filter `info`, the production level: the access line, formatted as
//!   JSON exactly as the server formats it, into a writer that discards (the cost of the write
//!   syscall to stderr depends on where stderr goes, not on greeter).
//!
//! Two measures per round: calls/s, and CPU time per call (user + system, client and server
//! together, from `/proc/self/stat`). On a machine shared with other work both swing with what
//! else runs, so each setup is summed up twice: its median round, and its best round (most
//! calls/s, least CPU per call), the one least disturbed.
//!
//! Run with `cargo bench --bench observability` (under a minute). It prints each round, then the
//! overhead of `full` over `bare`; the goal is under 5%.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use greeter::{
    call::observe::request_id,
    config::{Config, LogFormat, Sources},
    ops::logging,
    pb::{HelloRequest, greeter_client::GreeterClient},
    server::Server,
};
use tonic::transport::Channel;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// Set in a child: which setup to measure.
const CHILD: &str = "GREETER_BENCH_SETUP";
const WARMUP: Duration = Duration::from_millis(500);
const ROUND: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 7;
/// Calls in flight at once, spread over [`CHANNELS`] HTTP/2 connections.
const WORKERS: usize = 16;
const CHANNELS: usize = 2;

/// `(name, metrics.listen, log filter)`.
const SETUPS: [(&str, &str, &str); 3] = [
    ("bare", "", "warn"),
    ("metrics", "127.0.0.1:0", "warn"),
    ("full", "127.0.0.1:0", "info"),
];

fn main() {
    match std::env::var(CHILD) {
        Ok(name) => child(&name),
        Err(_) => parent(),
    }
}

/// Runs every setup in alternating rounds, each in a child process, and compares them.
fn parent() {
    println!(
        "unary SayHello, {WORKERS} calls in flight over {CHANNELS} connections, \
         {ROUNDS} rounds of {ROUND:?} per setup"
    );
    let exe = std::env::current_exe().expect("the bench knows its own path");
    let mut rates = [const { Vec::new() }; SETUPS.len()];
    let mut costs = [const { Vec::new() }; SETUPS.len()];
    for round in 0..ROUNDS {
        // Rotate the order, so no setup always runs first (or right after another).
        for i in 0..SETUPS.len() {
            let which = (round + i) % SETUPS.len();
            let name = SETUPS[which].0;
            let output = Command::new(&exe)
                .env(CHILD, name)
                .output()
                .expect("run a bench child");
            assert!(
                output.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let mut figures = stdout.split_whitespace().map(|f| {
                f.parse::<f64>()
                    .expect("a child prints calls/s and CPU µs per call")
            });
            let (rate, cost) = (figures.next().unwrap(), figures.next().unwrap());
            println!("round {round} {name:>8}: {rate:>9.0} calls/s {cost:>7.2} µs CPU/call");
            rates[which].push(rate);
            costs[which].push(cost);
        }
    }

    println!();
    let percent = |ratio: f64| (ratio - 1.0) * 100.0;
    let summaries: [(&str, Summary, Summary); 2] =
        [("median", median, median), ("best", highest, lowest)];
    for (summary, rate_of, cost_of) in summaries {
        let rates = rates.each_ref().map(|r| rate_of(r));
        let costs = costs.each_ref().map(|c| cost_of(c));
        for (((name, _, _), rate), cost) in SETUPS.iter().zip(&rates).zip(&costs) {
            println!("{summary:>6} {name:>8}: {rate:>9.0} calls/s {cost:>7.2} µs CPU/call");
        }
        println!(
            "{summary:>6} overhead of full over bare: {:+.1}% CPU per call, {:+.1}% throughput \
             (metrics alone: {:+.1}% CPU per call, {:+.1}% throughput)",
            percent(costs[2] / costs[0]),
            percent(rates[2] / rates[0]),
            percent(costs[1] / costs[0]),
            percent(rates[1] / rates[0]),
        );
    }

    let ids = 1_000_000u32;
    let started = Instant::now();
    for _ in 0..ids {
        std::hint::black_box(request_id::generate());
    }
    println!(
        "request id generation (in every setup): {:.0} ns each",
        started.elapsed().as_nanos() as f64 / f64::from(ids)
    );
}

/// Serves and drives one setup for one round; prints calls/s.
fn child(name: &str) {
    let (_, metrics_listen, filter) = SETUPS
        .iter()
        .find(|(n, _, _)| *n == name)
        .expect("a known setup");
    // What `logging::init` installs, writing to a sink instead of stderr.
    tracing_subscriber::registry()
        .with(EnvFilter::new(filter))
        .with(logging::layer(LogFormat::Json, std::io::sink))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (calls, cpu) = runtime.block_on(async {
        let addr = start(metrics_listen).await;
        drive(addr, WARMUP).await;
        let cpu_before = cpu_time();
        let calls = drive(addr, ROUND).await;
        (calls as f64, cpu_time() - cpu_before)
    });
    let rate = calls / ROUND.as_secs_f64();
    let micros_per_call = cpu.as_secs_f64() * 1e6 / calls;
    println!("{rate:.0} {micros_per_call:.3}");
}

/// User + system CPU time of this process so far (fields 14 and 15 of proc(5)'s `stat`, in
/// ticks of 1/100 s).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    let after_name = &stat[stat.rfind(')').expect("a command name") + 1..];
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("a tick count"))
        .collect();
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

/// A server on loopback with the embedded default config and `metrics.listen` as given.
async fn start(metrics_listen: &str) -> SocketAddr {
    let config = Config::load(&Sources {
        overrides: vec![
            ("server.listen".into(), "127.0.0.1:0".into()),
            ("metrics.listen".into(), metrics_listen.into()),
        ],
        ..Sources::default()
    })
    .expect("bench config is valid");
    let server = Server::bind(config).await.expect("bind loopback");
    let addr = server.local_addr();
    tokio::spawn(server.serve(std::future::pending()));
    addr
}

/// Unary calls as fast as they complete, for `length`; returns how many succeeded.
async fn drive(addr: SocketAddr, length: Duration) -> u64 {
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connect to the bench server");
        channels.push(channel);
    }
    let calls = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + length;
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let mut client = GreeterClient::new(channels[i % CHANNELS].clone());
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                while Instant::now() < until {
                    let request = HelloRequest {
                        name: "bench".into(),
                    };
                    if client.say_hello(request).await.is_ok() {
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a bench worker does not panic");
    }
    calls.load(Ordering::Relaxed)
}

/// Reduces the rounds of one setup to one figure.
type Summary = fn(&[f64]) -> f64;

fn highest(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn lowest(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
