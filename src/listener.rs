//! Accepting connections: TCP, optionally TLS, each tagged with who is on the other end.
//!
//! TLS handshakes run in their own tasks under a timeout, so one slow or hostile client cannot
//! stall the accept loop. Accepted connections reach tonic through a bounded channel; when the
//! loop stops (shutdown), the listening socket closes at once and the kernel refuses new clients.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{either::Either, sync::CancellationToken};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::tls::{ClientIdentity, Reloadable};

/// Connection facts every request of the connection carries (tonic puts it in the request
/// extensions): the auth layer, logs and handlers read it from there.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The verified client certificate's identity, when the client presented one.
    pub client_cert: Option<Arc<ClientIdentity>>,
}

/// An accepted connection, plaintext or TLS.
pub struct Connection {
    io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
    peer: PeerInfo,
}

impl Connected for Connection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
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

/// TLS for a listener: the swappable material and how long a handshake may take.
#[derive(Debug, Clone)]
pub struct TlsAccept {
    pub material: Reloadable,
    pub handshake_timeout: Duration,
}

/// Accepts on `listener` until `stop`, yielding connections for tonic's `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAccept>,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Connection>> {
    // Small: accepted connections wait here only until tonic picks them up.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the next accept may work.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(%remote_addr, "cannot set TCP_NODELAY: {e}");
            }
            match &tls {
                None => {
                    let connection = Connection {
                        io: Either::Left(tcp),
                        peer: PeerInfo {
                            remote_addr,
                            client_cert: None,
                        },
                    };
                    if tx.send(Ok(connection)).await.is_err() {
                        break;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.material.acceptor();
                    let timeout = tls.handshake_timeout;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let client_cert = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|certs| certs.first())
                                    .and_then(ClientIdentity::from_der)
                                    .map(Arc::new);
                                let connection = Connection {
                                    io: Either::Right(Box::new(stream)),
                                    peer: PeerInfo {
                                        remote_addr,
                                        client_cert,
                                    },
                                };
                                let _ = tx.send(Ok(connection)).await;
                            }
                            Ok(Err(e)) => debug!(%remote_addr, "TLS handshake failed: {e}"),
                            Err(_) => debug!(%remote_addr, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        debug!("listener closed");
    });
    ReceiverStream::new(rx)
}
