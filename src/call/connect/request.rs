//! A Connect request as the gRPC request the call stack serves: same path, extensions and
//! metadata (credentials, request id), `connect-timeout-ms` as `grpc-timeout`, and the body as
//! 5-byte framed protobuf, converted from JSON and inflated from gzip on the way.
//!
//! The body is converted lazily, as the handler reads it: by then auth, the call budgets and the
//! deadline apply, so an unauthenticated or shed caller makes the server read and hold nothing.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, HeaderValue, header};
use http_body::Frame;
use http_body_util::{BodyExt as _, Limited, StreamBody};
use tonic::{Status, body::Body};

use super::{
    BoxError, Rpc, Translator,
    codec::{Codec, gunzip},
    protocol::{self, COMPRESSED, Framing, split_envelope},
};
use crate::call::{body, grpc_headers::GRPC_TIMEOUT};

/// What the response side needs to know of the call.
pub struct Plan {
    pub translator: Arc<Translator>,
    pub rpc: Arc<Rpc>,
    pub codec: Codec,
    /// The client accepts gzip replies and the server sends gzip (`compression.send`).
    pub gzip_replies: bool,
}

/// Why a Connect request is answered before it reaches the call stack.
pub struct Refusal {
    pub status: Status,
    pub http: http::StatusCode,
    /// `accept-encoding` / `accept-post` and the like, telling the client what would work.
    pub headers: HeaderMap,
}

/// The status of a request body that could not be read whole: over `max` bytes, or broken off.
fn body_error(err: BoxError, max: usize) -> Status {
    if err.is::<http_body_util::LengthLimitError>() {
        Status::resource_exhausted(format!(
            "the request is over this method's limit of {max} bytes"
        ))
    } else {
        Status::cancelled(format!("the request body failed: {err}"))
    }
}

impl Refusal {
    fn new(status: Status) -> Self {
        Self {
            http: protocol::http_status(status.code()),
            status,
            headers: HeaderMap::new(),
        }
    }
}

/// The most bytes thrown away of a request refused before translation (a bad header, a path no
/// service has): enough for any served method's message, which such a request was meant to be.
pub const REFUSED_DRAIN_BYTES: usize = 64 << 10;

/// The Connect request's body until the translated body first reads it: the call stack may
/// answer without reading it at all (auth refused, budget full, deadline gone).
pub struct Unread<B>(Arc<Mutex<Option<B>>>);

impl<B> Unread<B>
where
    B: http_body::Body<Data = Bytes>,
{
    pub fn new(body: B) -> Self {
        Self(Arc::new(Mutex::new(Some(body))))
    }

    fn share(&self) -> Self {
        Self(Arc::clone(&self.0))
    }

    fn take(&self) -> Option<B> {
        self.0.lock().expect("no panic while held").take()
    }

    /// Reads and discards the body if no one read it, at most `max` bytes and for at most
    /// [`body::DRAIN_TIMEOUT`], so that a call answered before its body was read ends cleanly.
    ///
    /// Over HTTP/1.1, a server that answers a request it has not read closes the connection, and
    /// a client still writing the body fails with a broken pipe instead of reading the answer: a
    /// call refused by auth would look like a network error. So the answer waits for the drain.
    ///
    /// Over HTTP/2 the answer goes first and the body is drained beside it: dropping the body
    /// unread makes h2 end the stream with `RST_STREAM(NO_ERROR)` (RFC 9113 8.1 allows it), which
    /// clients still uploading, curl 7.x among them, report as a stream error instead of the
    /// answer. The stream keeps its slot in `max_concurrent_streams` until drained, which bounds
    /// these tasks. Nothing is kept either way, so draining holds no memory.
    pub async fn discard(self, http1: bool, max: usize)
    where
        B: Send + 'static,
    {
        let Some(body) = self.take() else {
            return;
        };
        if http1 {
            body::drain(body, max).await;
        } else {
            tokio::spawn(body::drain(body, max));
        }
    }
}

/// The gRPC request for a Connect request's `parts` and its body (`unread`), or why there is none.
pub fn translate<B>(
    translator: &Arc<Translator>,
    mut parts: http::request::Parts,
    unread: &Unread<B>,
    framing: Framing,
    codec: Codec,
) -> Result<(http::Request<Body>, Plan), Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let path = parts.uri.path();
    let Some(rpc) = translator.methods.get(path).cloned() else {
        let mut refusal = Refusal::new(Status::unimplemented(format!("no method {path}")));
        refusal.http = http::StatusCode::NOT_FOUND;
        return Err(refusal);
    };
    let streams = rpc.kind.client_streams() || rpc.kind.server_streams();
    if streams != (framing == Framing::Stream) {
        let wanted = if streams {
            "application/connect+json or application/connect+proto"
        } else {
            "application/json or application/proto"
        };
        let mut refusal = Refusal::new(Status::invalid_argument(format!(
            "{path} is a {} method: send {wanted}",
            rpc.kind.as_str()
        )));
        refusal.http = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        refusal.headers.insert(
            "accept-post",
            HeaderValue::from_static(if streams {
                "application/connect+json, application/connect+proto"
            } else {
                "application/json, application/proto"
            }),
        );
        return Err(refusal);
    }
    let headers = &mut parts.headers;
    if let Some(version) = headers.remove(protocol::PROTOCOL_VERSION)
        && version != "1"
    {
        return Err(Refusal::new(Status::invalid_argument(
            "connect-protocol-version must be 1",
        )));
    }
    let timeout = headers
        .remove(protocol::TIMEOUT)
        .map(|value| protocol::grpc_timeout(&value))
        .transpose()
        .map_err(Refusal::new)?;
    let (encoding_header, accept_header) = match framing {
        Framing::Unary => (header::CONTENT_ENCODING, header::ACCEPT_ENCODING),
        Framing::Stream => (
            protocol::STREAM_CONTENT_ENCODING,
            protocol::STREAM_ACCEPT_ENCODING,
        ),
    };
    let gzipped = match headers.get(&encoding_header).map(HeaderValue::as_bytes) {
        None | Some(b"identity") => false,
        Some(b"gzip") if translator.accept_gzip => true,
        Some(other) => {
            let mut refusal = Refusal::new(Status::unimplemented(format!(
                "{encoding_header} {} is not accepted",
                String::from_utf8_lossy(other)
            )));
            let accepted = if translator.accept_gzip {
                "gzip, identity"
            } else {
                "identity"
            };
            refusal
                .headers
                .insert(accept_header, HeaderValue::from_static(accepted));
            return Err(refusal);
        }
    };
    let gzip_replies = translator.send_gzip && protocol::accepts_gzip(headers, &accept_header);
    headers.retain_grpc_metadata();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(timeout) = timeout {
        headers.insert(GRPC_TIMEOUT, timeout);
    }
    let body = match framing {
        Framing::Unary => unary_body(unread.share(), Arc::clone(&rpc), codec, gzipped),
        Framing::Stream => stream_body(unread.share(), Arc::clone(&rpc), codec, gzipped),
    };
    let plan = Plan {
        translator: Arc::clone(translator),
        rpc,
        codec,
        gzip_replies,
    };
    Ok((http::Request::from_parts(parts, body), plan))
}

/// Headers that describe the Connect request itself, or would make the stack read the translated
/// body as something it is not, go; the rest (authorization, x-request-id, custom metadata) stay.
trait RetainMetadata {
    fn retain_grpc_metadata(&mut self);
}

impl RetainMetadata for HeaderMap {
    fn retain_grpc_metadata(&mut self) {
        let drop = self
            .keys()
            .filter(|name| {
                protocol::is_grpc_protocol_header(name)
                    || name.as_str().starts_with("connect-")
                    || *name == header::HOST
            })
            .cloned()
            .collect::<Vec<_>>();
        for name in drop {
            self.remove(name);
        }
    }
}

/// A unary request: the whole body (at most the method's limit), one gRPC frame.
fn unary_body<B>(body: Unread<B>, rpc: Arc<Rpc>, codec: Codec, gzipped: bool) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let frame = async move {
        let max = rpc.max_request_bytes;
        let body = body
            .take()
            .ok_or_else(|| Status::internal("the request was read twice"))?;
        let bytes = Limited::new(body, max)
            .collect()
            .await
            .map_err(|err| body_error(err, max))?
            .to_bytes();
        let bytes = if gzipped { gunzip(&bytes, max)? } else { bytes };
        let message = codec.to_proto(&rpc.input, bytes)?;
        Ok::<_, Status>(Frame::data(protocol::envelope(0, &message)))
    };
    Body::new(StreamBody::new(stream::once(frame)))
}

/// A streaming request: each envelope (at most the method's limit) becomes one gRPC frame as it
/// arrives, so client and bidi streams flow.
fn stream_body<B>(body: Unread<B>, rpc: Arc<Rpc>, codec: Codec, gzipped: bool) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    enum State<B> {
        Unread(Unread<B>),
        Reading(Reading<B>),
    }
    struct Reading<B> {
        body: Pin<Box<B>>,
        buf: BytesMut,
        ended: bool,
    }
    let start = Some(State::Unread(body));
    let frames = stream::unfold(start, move |state| {
        let rpc = Arc::clone(&rpc);
        async move {
            let mut reading = match state? {
                State::Reading(reading) => reading,
                State::Unread(body) => Reading {
                    body: Box::pin(body.take()?),
                    buf: BytesMut::new(),
                    ended: false,
                },
            };
            let max = rpc.max_request_bytes;
            loop {
                match split_envelope(&mut reading.buf, max) {
                    Err(status) => return Some((Err(status), None)),
                    Ok(Some((flags, payload))) => {
                        let message = if flags & protocol::END_STREAM != 0 {
                            Err(Status::invalid_argument(
                                "clients send no end-of-stream message",
                            ))
                        } else if flags & COMPRESSED != 0 && !gzipped {
                            Err(Status::invalid_argument(
                                "a compressed message without connect-content-encoding",
                            ))
                        } else if flags & COMPRESSED != 0 {
                            gunzip(&payload, max)
                        } else {
                            Ok(payload)
                        };
                        let frame = message
                            .and_then(|m| codec.to_proto(&rpc.input, m))
                            .map(|m| Frame::data(protocol::envelope(0, &m)));
                        let next = frame.is_ok().then_some(State::Reading(reading));
                        return Some((frame, next));
                    }
                    Ok(None) if reading.ended => {
                        if reading.buf.is_empty() {
                            return None;
                        }
                        let status = Status::invalid_argument("the request ends inside a message");
                        return Some((Err(status), None));
                    }
                    Ok(None) => {}
                }
                match reading.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            reading.buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(err)) => {
                        let status =
                            Status::cancelled(format!("the request body failed: {}", err.into()));
                        return Some((Err(status), None));
                    }
                    None => reading.ended = true,
                }
            }
        }
    });
    Body::new(StreamBody::new(frames))
}
