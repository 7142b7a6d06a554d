//! `greeter bench`: a load generator for any helloworld Greeter server.
//!
//! Two modes. Closed loop: every worker sends its next call as soon as the previous one answers,
//! which measures maximum throughput. Open loop: calls are scheduled at a fixed rate and each
//! latency is measured from when the call *should* have been sent, so a server that stalls cannot
//! hide the stall by slowing the generator down (coordinated omission).
//!
//! Every answer is counted by its gRPC status code: a benchmark that counts HTTP 200s as success
//! would hide errors, since gRPC reports failures in trailers of 200 responses.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tonic::Code;

use crate::{
    client::{self, ClientArgs, ClientError, Session, code_name},
    pb::{HelloRequest, greeter_client::GreeterClient},
};

/// Which RPC to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchRpc {
    /// SayHello, one call per request.
    Unary,
    /// SayHelloBidiStream: one long-lived stream per worker, a greeting per message.
    Bidi,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rpc: BenchRpc,
    pub connections: usize,
    /// Concurrent calls (unary) or streams (bidi) per connection.
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many recorded requests instead (the duration still bounds the run).
    pub requests: Option<u64>,
    pub warmup: Duration,
    /// Requests per second across all workers (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    pub name: String,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rpc: BenchRpc,
    pub mode: &'static str,
    pub connections: usize,
    pub concurrency: usize,
    pub target_rate: Option<f64>,
    pub seconds: f64,
    pub requests: u64,
    pub ok: u64,
    pub per_second: f64,
    pub latency_us: Latency,
    /// Answers by canonical gRPC status name.
    pub status: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// One worker's tally.
struct Tally {
    latency: Histogram<u64>,
    status: BTreeMap<i32, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs to 60 s at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
            status: BTreeMap::new(),
        }
    }

    fn record(&mut self, latency: Duration, code: Code) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
        *self.status.entry(code as i32).or_default() += 1;
    }
}

/// When each call should start (open loop) and when to stop recording.
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
    next: AtomicU64,
    /// Requests recorded so far, against `Plan::requests`.
    recorded: AtomicU64,
    limit: Option<u64>,
}

impl Schedule {
    /// The next call's scheduled start, or `None` when the run is over.
    fn next_slot(&self) -> Option<Instant> {
        let now = Instant::now();
        if now >= self.end
            || self
                .limit
                .is_some_and(|l| self.recorded.load(Ordering::Relaxed) >= l)
        {
            return None;
        }
        Some(match self.interval {
            Some(interval) => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                let slot = self.start + interval.mul_f64(i as f64);
                if slot >= self.end {
                    return None;
                }
                slot
            }
            None => now,
        })
    }

    fn measuring(&self, at: Instant) -> bool {
        at >= self.measure_from
    }
}

/// Runs the plan against the server of `target` and reports. Progress goes to stderr on a TTY.
pub async fn run(target: &ClientArgs, plan: &Plan) -> Result<Report, ClientError> {
    let mut sessions = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        sessions.push(Arc::new(client::connect(target).await?));
    }
    let start = Instant::now();
    let schedule = Arc::new(Schedule {
        start,
        measure_from: start + plan.warmup,
        end: start + plan.warmup + plan.duration,
        interval: plan
            .rate
            .map(|r| Duration::from_secs_f64(1.0 / r.max(1e-9))),
        next: AtomicU64::new(0),
        recorded: AtomicU64::new(0),
        limit: plan.requests,
    });
    let (done_tx, mut done_rx) = mpsc::channel(plan.connections * plan.concurrency);
    for session in &sessions {
        for _ in 0..plan.concurrency {
            let (session, schedule, done) =
                (Arc::clone(session), Arc::clone(&schedule), done_tx.clone());
            let name = plan.name.clone();
            let rpc = plan.rpc;
            tokio::spawn(async move {
                let tally = match rpc {
                    BenchRpc::Unary => unary_worker(&session, &schedule, name).await,
                    BenchRpc::Bidi => bidi_worker(&session, &schedule, name).await,
                };
                let _ = done.send(tally).await;
            });
        }
    }
    drop(done_tx);
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(progress(Arc::clone(&schedule))));

    let mut total = Tally::new();
    while let Some(tally) = done_rx.recv().await {
        total
            .latency
            .add(&tally.latency)
            .expect("histograms share bounds");
        for (code, n) in tally.status {
            *total.status.entry(code).or_default() += n;
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let seconds = (Instant::now().min(schedule.end) - schedule.measure_from)
        .as_secs_f64()
        .max(1e-9);
    let requests: u64 = total.status.values().sum();
    let ok = total.status.get(&(Code::Ok as i32)).copied().unwrap_or(0);
    let q = |quantile: f64| total.latency.value_at_quantile(quantile);
    Ok(Report {
        rpc: plan.rpc,
        mode: if plan.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        connections: plan.connections,
        concurrency: plan.concurrency,
        target_rate: plan.rate,
        seconds,
        requests,
        ok,
        per_second: requests as f64 / seconds,
        latency_us: Latency {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: total.latency.max(),
            mean: total.latency.mean(),
        },
        status: total
            .status
            .into_iter()
            .map(|(code, n)| (code_name(Code::from(code)), n))
            .collect(),
    })
}

/// Waits until `slot`. tokio's timer rounds every deadline up to the next millisecond tick, and
/// `sleep_until(now)` waits for that tick too: sleeping before each call would add up to 1 ms to
/// every call (closed loop) or to every measured latency (open loop). So: no wait for a slot that
/// is due, a timer sleep to within a tick of a later one, then yields until it.
async fn wait_for(slot: Instant) {
    const TICK: Duration = Duration::from_millis(1);
    if slot <= Instant::now() {
        return;
    }
    if slot.saturating_duration_since(Instant::now()) > TICK {
        tokio::time::sleep_until(slot - TICK).await;
    }
    while Instant::now() < slot {
        tokio::task::yield_now().await;
    }
}

async fn unary_worker(session: &Session, schedule: &Schedule, name: String) -> Tally {
    let mut tally = Tally::new();
    let mut client = GreeterClient::new(session.channel());
    while let Some(slot) = schedule.next_slot() {
        wait_for(slot).await;
        let request = session.request(HelloRequest { name: name.clone() }, None);
        let code = match client.say_hello(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        let done = Instant::now();
        if schedule.measuring(slot) {
            schedule.recorded.fetch_add(1, Ordering::Relaxed);
            tally.record(done - slot, code);
        }
    }
    tally
}

async fn bidi_worker(session: &Session, schedule: &Schedule, name: String) -> Tally {
    let mut tally = Tally::new();
    let mut client = GreeterClient::new(session.channel());
    let (tx, rx) = mpsc::channel(1);
    // The first request is queued before the call starts: grpc-go and grpcio send the response
    // headers only with the first reply, so awaiting them before sending anything deadlocks.
    let Some(mut slot) = schedule.next_slot() else {
        return tally;
    };
    wait_for(slot).await;
    if tx.send(HelloRequest { name: name.clone() }).await.is_err() {
        return tally;
    }
    let request = session.request(tokio_stream::wrappers::ReceiverStream::new(rx), None);
    let mut replies = match client.say_hello_bidi_stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tally.record(Duration::ZERO, status.code());
            return tally;
        }
    };
    loop {
        let (code, ended) = match replies.message().await {
            Ok(Some(_)) => (Code::Ok, false),
            Ok(None) => (Code::Unknown, true),
            Err(status) => (status.code(), true),
        };
        if schedule.measuring(slot) {
            schedule.recorded.fetch_add(1, Ordering::Relaxed);
            tally.record(Instant::now() - slot, code);
        }
        if ended {
            break;
        }
        let Some(next) = schedule.next_slot() else {
            break;
        };
        slot = next;
        wait_for(slot).await;
        if tx.send(HelloRequest { name: name.clone() }).await.is_err() {
            break;
        }
    }
    tally
}

/// A line a second on stderr while the run lasts.
async fn progress(schedule: Arc<Schedule>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = schedule.recorded.load(Ordering::Relaxed);
        let phase = if Instant::now() < schedule.measure_from {
            "warm-up"
        } else {
            "measuring"
        };
        eprint!("\r{phase}: {now} requests recorded, {}/s    ", now - last);
        last = now;
    }
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let l = &self.latency_us;
        let mut out = format!(
            "rpc {:?}, {} loop{}, {} connections x {} concurrent, {:.1}s measured\n\
             requests      {:>12}\n\
             ok            {:>12}\n\
             per second    {:>12.0}\n\
             latency (µs)  p50 {} | p90 {} | p99 {} | p99.9 {} | max {} | mean {:.0}\n\
             status\n",
            self.rpc,
            self.mode,
            self.target_rate
                .map(|r| format!(" at {r:.0}/s"))
                .unwrap_or_default(),
            self.connections,
            self.concurrency,
            self.seconds,
            self.requests,
            self.ok,
            self.per_second,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
        );
        for (code, n) in &self.status {
            out.push_str(&format!("  {code:<20} {n:>12}\n"));
        }
        out
    }
}
