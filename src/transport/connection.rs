//! One HTTP/2 connection (or HTTP/1.1, for grpc-web and Connect): every protocol limit set
//! explicitly, keepalive pings, and GOAWAY when the connection is idle too long, too old, starts no
//! call in time, a reload stops trusting its client's certificate, or the server drains; then a
//! close after a grace, whatever the client does.
//!
//! greeter drives hyper directly instead of through `tonic::transport::Server`: tonic passes its
//! own values for some limits (and has panicked with a connection-age grace in some 0.14
//! releases), answers deadlines with CANCELLED, and waits for open streams without bound at
//! shutdown. Here each of those is decided in one visible place.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    sync::mpsc,
    time::{Instant, sleep, sleep_until},
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tonic::codegen::http;
use tower::Service;
use tracing::{debug, warn};

use crate::{
    config::{ConnectionConfig, LimitsConfig},
    transport::listener::{Connection, PeerAddr, Revocable},
};

/// What one connection is doing, for idle detection and its share of the call budgets.
#[derive(Debug, Default)]
pub struct Activity {
    /// Calls in progress; the limit layer admits and releases them.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) anonymous_in_flight: AtomicUsize,
    pub(crate) started: AtomicU64,
}

impl Activity {
    /// Calls in progress on the connection.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Calls ever started on the connection: unchanged between two looks means none started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }
}

/// An HTTP/1.1 client must finish sending a request's headers within this (slowloris); hyper
/// counts from when it starts waiting for a request, so an idle keep-alive connection is closed
/// after this too (browsers reconnect).
const HTTP1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's floor for its HTTP/1.1 read buffer, which bounds a request's head.
const HTTP1_MIN_BUF_BYTES: usize = 8192;

/// How soon the probe port reclaims a connection that is idle, or that never starts a call:
/// probes connect, ask and leave, and the port's few slots are open to anyone.
pub const PROBE_IDLE: Duration = Duration::from_secs(5);

/// A connection closed for starting no call gets this long after its GOAWAY: nothing of it is
/// running, the GOAWAY only tells a well-behaved client why.
const UNUSED_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The HTTP server settings and the connection lifetime rules, built once from config.
#[derive(Clone)]
pub struct Settings {
    http: auto::Builder<TokioExecutor>,
    max_idle: Option<Duration>,
    max_age: Option<Duration>,
    max_age_grace: Duration,
    first_call_timeout: Duration,
}

impl Settings {
    /// HTTP/2 only, unless `http1` (grpc-web, Connect): then the protocol is told by the client's first
    /// bytes, HTTP/2's preface or an HTTP/1.1 request line.
    pub fn new(limits: &LimitsConfig, connection: &ConnectionConfig, http1: bool) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_list_bytes)
            .max_frame_size(limits.max_frame_bytes)
            .initial_stream_window_size(limits.initial_stream_window_bytes)
            .initial_connection_window_size(limits.initial_connection_window_bytes)
            .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.max_local_error_reset_streams)
            // Bound what one slow reader can make the server buffer per stream.
            .max_send_buf_size(limits.initial_stream_window_bytes as usize);
        if !connection.keepalive_interval.is_zero() {
            http.http2()
                .keep_alive_interval(connection.keepalive_interval)
                .keep_alive_timeout(connection.keepalive_timeout);
        }
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP1_HEADER_READ_TIMEOUT)
            .max_buf_size(HTTP1_MIN_BUF_BYTES.max(limits.max_header_list_bytes as usize));
        let http = if http1 { http } else { http.http2_only() };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Self {
            http,
            max_idle: nonzero(connection.max_idle),
            max_age: nonzero(connection.max_age),
            max_age_grace: connection.max_age_grace,
            first_call_timeout: connection.first_call_timeout,
        }
    }

    /// The probe port's: HTTP/2 only, and connections idle or unused for [`PROBE_IDLE`] (or
    /// less, if the config says so) are closed, with at most that much grace after GOAWAY.
    pub fn probe(limits: &LimitsConfig, connection: &ConnectionConfig) -> Self {
        let mut settings = Self::new(limits, connection, false);
        settings.max_idle = Some(settings.max_idle.map_or(PROBE_IDLE, |d| d.min(PROBE_IDLE)));
        settings.first_call_timeout = settings.first_call_timeout.min(PROBE_IDLE);
        settings.max_age_grace = settings.max_age_grace.min(PROBE_IDLE);
        settings
    }
}

/// Serves `connection` with `service` until the client leaves, or until GOAWAY (idle, age, a
/// revoked client certificate or `draining`) has let its calls finish. A connection past its
/// grace is closed outright.
pub async fn serve<S, B>(
    mut connection: Connection,
    service: S,
    settings: Arc<Settings>,
    activity: Arc<Activity>,
    draining: CancellationToken,
) where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = connection.peer().remote_addr;
    let revocable = connection.take_revocable();
    let conn = settings
        .http
        .serve_connection(TokioIo::new(connection), TowerToHyperService::new(service));
    tokio::pin!(conn);

    // The lifetime rules (drain, age, idle) run in a task of their own and send their verdicts
    // here: a `select!` over their timers in this task would poll every timer each time the
    // connection wakes, i.e. on every read and write of every call.
    let (verdicts, mut verdict) = mpsc::channel(2);
    let lifetime = AbortOnDropHandle::new(tokio::spawn(lifetime(
        Arc::clone(&settings),
        activity,
        draining,
        verdicts,
        peer,
        revocable,
    )));

    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, "connection ended with an error: {e}");
                }
                break;
            }
            next = verdict.recv() => match next {
                Some(Verdict::GoAway) => conn.as_mut().graceful_shutdown(),
                Some(Verdict::Close) | None => break,
            },
        }
    }
    drop(lifetime);
}

/// What the lifetime task tells the connection.
enum Verdict {
    /// Send GOAWAY and let the open calls finish.
    GoAway,
    /// Close now, with calls still open (the age grace passed).
    Close,
}

/// Decides when the connection gets GOAWAY (drain, max age, max idle, no first call, a client
/// certificate no longer trusted) and when it is closed outright: every GOAWAY but the drain's is
/// followed by a close after a grace (the drain is bounded by `shutdown.grace`), so a client that
/// ignores GOAWAY, or a socket that never spoke HTTP/2 at all, cannot keep its slot. Ends when
/// the connection does.
async fn lifetime(
    settings: Arc<Settings>,
    activity: Arc<Activity>,
    draining: CancellationToken,
    verdicts: mpsc::Sender<Verdict>,
    peer: PeerAddr,
    mut revocable: Option<Revocable>,
) {
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let age_limit = settings
        .max_age
        .map_or(far, |age| Instant::now() + jittered(age));
    let first_call_by = Instant::now() + settings.first_call_timeout;
    let idle_check = settings.max_idle.unwrap_or(Duration::MAX);
    let mut force_close_at = far;
    let mut goaway_sent = false;
    let mut started_at_last_check = activity.started();

    loop {
        let (verdict, grace) = tokio::select! {
            () = verdicts.closed() => return,
            () = draining.cancelled(), if !goaway_sent => {
                debug!(%peer, "draining: GOAWAY");
                (Verdict::GoAway, None)
            }
            () = sleep_until(first_call_by), if !goaway_sent && activity.started() == 0 => {
                if activity.started() > 0 {
                    continue;
                }
                debug!(%peer, "no call within connection.first_call_timeout: GOAWAY, then close");
                (Verdict::GoAway, Some(UNUSED_CLOSE_GRACE))
            }
            () = revoked(&mut revocable, peer), if !goaway_sent => {
                // The calls in flight were admitted before the change: they get the age grace.
                (Verdict::GoAway, Some(settings.max_age_grace))
            }
            () = sleep_until(age_limit), if !goaway_sent => {
                debug!(%peer, "max connection age: GOAWAY");
                (Verdict::GoAway, Some(settings.max_age_grace))
            }
            () = sleep(idle_check), if !goaway_sent && settings.max_idle.is_some() => {
                let started = activity.started();
                let idle = activity.in_flight() == 0 && started == started_at_last_check;
                started_at_last_check = started;
                if !idle {
                    continue;
                }
                debug!(%peer, "max connection idle: GOAWAY");
                // A connection that never started a call has nothing to let finish.
                let grace = if started == 0 { UNUSED_CLOSE_GRACE } else { settings.max_age_grace };
                (Verdict::GoAway, Some(grace))
            }
            () = sleep_until(force_close_at) => {
                debug!(%peer, "grace after GOAWAY passed: closing with calls still open");
                (Verdict::Close, None)
            }
        };
        if matches!(verdict, Verdict::GoAway) {
            goaway_sent = true;
            if let Some(grace) = grace {
                force_close_at = Instant::now() + grace;
            }
        }
        let close = matches!(verdict, Verdict::Close);
        if verdicts.send(verdict).await.is_err() || close {
            return;
        }
    }
}

/// Resolves when a reload stops trusting the client's certificate chain, once counted and logged
/// (the subject, never more of the certificate); never for a connection without one.
async fn revoked(revocable: &mut Option<Revocable>, peer: PeerAddr) {
    let Some(revocable) = revocable else {
        return std::future::pending().await;
    };
    let reason = revocable.chain.distrusted().await;
    revocable.revoked.inc();
    warn!(
        %peer,
        subject = %revocable.chain.subject(),
        %reason,
        "client certificate no longer trusted after a TLS reload: GOAWAY, closing once its \
         calls finish"
    );
}

/// ±10% around `age`, as grpc-go does, so connections made together do not all reconnect together.
fn jittered(age: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // A value in [0.9, 1.1) from the clock's low bits: spread, not secrecy, is the point.
    let factor = 0.9 + f64::from(nanos % 1000) / 5000.0;
    age.mul_f64(factor)
}
