//! Accepting connections: TCP (optionally TLS) or a Unix domain socket, each tagged with who is
//! on the other end.
//!
//! TLS handshakes run in their own tasks under a timeout, so one slow or hostile client cannot
//! stall the accept loop. When the loop stops (shutdown), the listening socket closes at once and
//! the kernel refuses new clients.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::server::TlsStream;
use tokio_util::{either::Either, sync::CancellationToken};
use tonic::codegen::http;
use tracing::{debug, warn};

use crate::{
    ops::metrics::CounterSet,
    transport::{
        client_trust::PresentedChain,
        tls::{ClientIdentity, Reloadable},
    },
};

/// Connection facts every request of the connection carries in its extensions: the auth layer,
/// logs and handlers read it from there.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: PeerAddr,
    /// The verified client certificate's identity, when the client presented one.
    pub client_cert: Option<Arc<ClientIdentity>>,
    /// `remote_addr` as text, made once per connection: the access line writes it on every call.
    remote_text: Arc<str>,
}

impl PeerInfo {
    pub fn new(remote_addr: PeerAddr, client_cert: Option<Arc<ClientIdentity>>) -> Self {
        Self {
            remote_addr,
            client_cert,
            remote_text: remote_addr.to_string().into(),
        }
    }

    /// The peer's address as `Display` writes it: digits, dots, colons, brackets and `%` for an
    /// IPv6 address, `unix:uid=..,pid=..` for a Unix socket client.
    pub fn remote_text(&self) -> &str {
        &self.remote_text
    }
}

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    /// A client of the Unix socket, as the kernel vouches for it (`SO_PEERCRED`): its user, and
    /// its process when known.
    Unix {
        uid: u32,
        pid: Option<i32>,
    },
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => addr.fmt(f),
            Self::Unix {
                uid,
                pid: Some(pid),
            } => write!(f, "unix:uid={uid},pid={pid}"),
            Self::Unix { uid, pid: None } => write!(f, "unix:uid={uid}"),
        }
    }
}

/// Whom a budget per peer counts a connection's calls under: its IPv4 address, its IPv6 /64
/// (what one host is usually given, so a host cannot multiply its budget by its addresses), or
/// its user on the Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerPrefix {
    V4(u32),
    /// The first 64 bits of the address.
    V6(u64),
    Uid(u32),
}

impl PeerPrefix {
    /// The prefix of `peer`; calls without one (no listener put it in the request) share a
    /// prefix no user has, rather than go uncounted.
    pub fn of(peer: Option<&PeerInfo>) -> Self {
        peer.map_or(Self::Uid(u32::MAX), |peer| peer.remote_addr.prefix())
    }
}

impl PeerAddr {
    pub fn prefix(&self) -> PeerPrefix {
        match self {
            Self::Tcp(addr) => match addr.ip().to_canonical() {
                IpAddr::V4(v4) => PeerPrefix::V4(u32::from(v4)),
                IpAddr::V6(v6) => PeerPrefix::V6((u128::from(v6) >> 64) as u64),
            },
            Self::Unix { uid, .. } => PeerPrefix::Uid(*uid),
        }
    }
}

/// The byte stream of an accepted connection.
type Io = Either<TcpStream, Either<Box<TlsStream<TcpStream>>, UnixStream>>;

/// An accepted connection: TCP, TLS, or Unix socket.
pub struct Connection {
    io: Io,
    peer: PeerInfo,
    revocable: Option<Revocable>,
}

impl Connection {
    fn new(io: Io, peer: PeerInfo) -> Self {
        Self {
            io,
            peer,
            revocable: None,
        }
    }

    /// Who is on the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// What closes the connection when a reload stops trusting its client's certificate, if the
    /// client presented one: taken once, by whatever decides the connection's lifetime.
    pub fn take_revocable(&mut self) -> Option<Revocable> {
        self.revocable.take()
    }
}

/// A TLS connection's client certificate chain, to re-verify when the client trust changes, and
/// where to count the connection if it no longer verifies (`greeter_tls_connections_revoked`).
#[derive(Debug)]
pub struct Revocable {
    pub chain: PresentedChain,
    pub revoked: Counter,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// TLS for a listener: the swappable material, how long a handshake may take, where to count
/// the handshakes that fail (`error`) or take too long (`timeout`), and the connections closed
/// because a reload stopped trusting their client's certificate.
#[derive(Debug, Clone)]
pub struct TlsAccept {
    pub material: Reloadable,
    pub handshake_timeout: Duration,
    pub handshake_failures: CounterSet,
    pub connections_revoked: Counter,
}

/// Open connections per IP address, against a cap: one host cannot take a listener's whole
/// connection budget. Touched once when a connection opens and once when it closes.
#[derive(Debug)]
pub struct PeerCounts {
    counts: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
    refused: AtomicU64,
}

impl PeerCounts {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::default(),
            limit,
            refused: AtomicU64::new(0),
        })
    }

    /// Connections closed at once because their address already had `limit` open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn try_add(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= self.limit {
            drop(counts);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

/// One connection's place in its address's count.
#[derive(Debug)]
struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A connection's places in the listener's budgets, given back when it is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
}

/// Receives each accepted (and, for TLS, handshaken) connection with its budget slot.
pub type OnConnection = Arc<dyn Fn(Connection, ConnectionSlot) + Send + Sync>;

/// How many connections a listener takes: at most `total` open at once, and at most what
/// `per_peer` allows from one IP address (TCP only).
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    pub total: Arc<Semaphore>,
    pub per_peer: Option<Arc<PeerCounts>>,
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// Plaintext: who may connect is the socket file's mode and owner.
    Unix(UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Either<TcpStream, UnixStream>, PeerAddr)> {
        match self {
            Self::Tcp(listener) => {
                let (tcp, addr) = listener.accept().await?;
                if let Err(e) = tcp.set_nodelay(true) {
                    debug!(%addr, "cannot set TCP_NODELAY: {e}");
                }
                Ok((Either::Left(tcp), PeerAddr::Tcp(addr)))
            }
            Self::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let cred = stream.peer_cred()?;
                let peer = PeerAddr::Unix {
                    uid: cred.uid(),
                    pid: cred.pid(),
                };
                Ok((Either::Right(stream), peer))
            }
        }
    }
}

/// Accepts on `listener` until `stop`, handing each connection to `on_connection`. At most
/// `budget.total` connections are open at once: past that, clients wait in the kernel's accept
/// queue (as with grpc-go's limit listener) rather than being accepted and starved. A connection
/// from an address already at its `budget.per_peer` cap is closed at once. `tls` applies to TCP
/// connections; a handshake not done within its timeout is dropped.
/// The next connection, once one of `slots` is free; `None` once `stop` fires. A failed accept
/// (EMFILE and friends) is logged and backed off instead of spun on: the next one may work.
async fn next_connection<S, A, F>(
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    mut accept: impl FnMut() -> F,
    failed: &'static str,
) -> Option<(OwnedSemaphorePermit, S, A)>
where
    F: Future<Output = io::Result<(S, A)>>,
{
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return None,
            permit = Arc::clone(slots).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => return Some((permit, stream, addr)),
            Err(e) => {
                warn!("{failed}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A plain HTTP/1.1 listener answering every request with `respond` (the metrics endpoint):
/// at most `max_connections` at once, request heads within `header_read_timeout`, every
/// connection closed when `stop` fires.
pub async fn serve_http1<R>(
    listener: TcpListener,
    max_connections: usize,
    header_read_timeout: Duration,
    stop: CancellationToken,
    respond: R,
) where
    R: Fn(&http::Request<Incoming>) -> http::Response<String> + Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    while let Some((permit, tcp, remote_addr)) = next_connection(
        &slots,
        &stop,
        || listener.accept(),
        "metrics listener: accept failed",
    )
    .await
    {
        let respond = respond.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                std::future::ready(Ok::<_, Infallible>(respond(&request)))
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                () = stop.cancelled() => {}
                result = connection => {
                    if let Err(e) = result {
                        debug!(%remote_addr, "metrics connection ended with an error: {e}");
                    }
                }
            }
            drop(permit);
        });
    }
    debug!("metrics listener closed");
}

pub async fn accept(
    listener: Listener,
    tls: Option<TlsAccept>,
    budget: ConnectionBudget,
    stop: CancellationToken,
    on_connection: OnConnection,
) {
    while let Some((permit, stream, remote_addr)) =
        next_connection(&budget.total, &stop, || listener.accept(), "accept failed").await
    {
        let peer_slot = match (&budget.per_peer, remote_addr) {
            (Some(counts), PeerAddr::Tcp(addr)) => match counts.try_add(addr.ip()) {
                Some(slot) => Some(slot),
                None => {
                    debug!(%remote_addr, "too many connections from this address: closed");
                    continue;
                }
            },
            _ => None,
        };
        let slot = ConnectionSlot {
            _permit: permit,
            _peer: peer_slot,
        };
        let plain = |io| Connection::new(io, PeerInfo::new(remote_addr, None));
        let tcp = match stream {
            Either::Left(tcp) => tcp,
            Either::Right(unix) => {
                on_connection(plain(Either::Right(Either::Right(unix))), slot);
                continue;
            }
        };
        let Some(tls) = &tls else {
            on_connection(plain(Either::Left(tcp)), slot);
            continue;
        };
        let (acceptor, trust) = tls.material.acceptor();
        let timeout = tls.handshake_timeout;
        let on_connection = Arc::clone(&on_connection);
        let failures = tls.handshake_failures.clone();
        let revoked = tls.connections_revoked.clone();
        tokio::spawn(async move {
            // A plain HTTP request is handed back, to be answered once it is counted.
            let handshake = async {
                if sent_plain_http(&tcp).await {
                    return Err(tcp);
                }
                Ok(acceptor.accept(tcp).await)
            };
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Err(tcp)) => {
                    failures.inc("error");
                    debug!(%remote_addr, "plain HTTP on the TLS port: answered 400");
                    answer_plain_http(tcp).await;
                }
                Ok(Ok(Ok(stream))) => {
                    let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
                    let client_cert = certs
                        .first()
                        .and_then(ClientIdentity::from_der)
                        .map(Arc::new);
                    let revocable = trust
                        .and_then(|trust| PresentedChain::new(certs, trust))
                        .map(|chain| Revocable { chain, revoked });
                    let peer = PeerInfo::new(remote_addr, client_cert);
                    let io = Either::Right(Either::Left(Box::new(stream)));
                    let connection = Connection {
                        revocable,
                        ..Connection::new(io, peer)
                    };
                    on_connection(connection, slot);
                }
                Ok(Ok(Err(e))) => {
                    failures.inc("error");
                    debug!(%remote_addr, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    failures.inc("timeout");
                    debug!(%remote_addr, "TLS handshake timed out");
                }
            }
        });
    }
    debug!("listener closed");
}

/// Whether the first bytes on a TLS port are a plain HTTP/1.x request (an upper-case method)
/// rather than a TLS record (0x16). The HTTP/2 preface (`PRI `) is left to the handshake, whose
/// alert is what gRPC clients (and `greeter`'s own diagnosis) recognise.
async fn sent_plain_http(tcp: &TcpStream) -> bool {
    let mut head = [0u8; 4];
    loop {
        let Ok(n) = tcp.peek(&mut head).await else {
            return false;
        };
        if n == 0 || !head[0].is_ascii_uppercase() {
            return false;
        }
        if n == head.len() {
            return &head != b"PRI ";
        }
        // A method split over packets: peek answers at once with what is there, so wait a moment.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Go's net/http answer to a plain request on a TLS port: a readable 400 instead of the TLS
/// alert that curl shows as "Received HTTP/0.9". The request is read (what has arrived) first,
/// so closing does not reset the connection under the answer.
async fn answer_plain_http(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: &str = "this port speaks TLS: call it with https:// (and, for a private CA, the \
        CA certificate: curl --cacert FILE, greeter --ca FILE)\n";
    let mut request = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut request)).await;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    // Until the client closes (it has its answer), briefly: the caller's timeout bounds it too.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(tcp.read(&mut request).await, Ok(n) if n > 0) {}
    })
    .await;
}
