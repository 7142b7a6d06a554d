//! The call stack's gRPC response as Connect's: a unary reply as the bare message (or a JSON
//! error with the HTTP status its code maps to), a stream as envelopes ending in the end-of-stream
//! message. Metadata carries over: headers as headers, trailers as `trailer-` headers (unary) or
//! in the end-of-stream message (streams).

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, StreamBody};
use tonic::{Code, Status, body::Body};

use super::{
    BoxError,
    codec::{gunzip, gzip},
    protocol::{self, COMPRESSED, Framing, split_envelope},
    request::{Plan, Refusal},
};
use crate::call::grpc_headers::GRPC_ENCODING;

/// A Connect error answered without a gRPC call behind it.
pub fn refusal(refusal: Refusal) -> http::Response<Body> {
    let Refusal {
        status,
        http,
        headers,
    } = refusal;
    // Refusals carry no status details, so no descriptors are needed to render them.
    let no_details = prost_reflect::DescriptorPool::new();
    let mut response = error_response(&status, &HeaderMap::new(), &HeaderMap::new(), &no_details);
    *response.status_mut() = http;
    response.headers_mut().extend(headers);
    response
}

/// An HTTP/1.1 request that is not a Connect call, on a listener without `[web]`: `415` for a
/// `POST` (naming the content types that would do), `404` for anything else.
pub fn not_connect(method: &http::Method) -> http::Response<Body> {
    let (status, text) = if method == http::Method::POST {
        (
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "over HTTP/1.1 this server speaks Connect: application/json, application/proto, \
             application/connect+json or application/connect+proto\n",
        )
    } else {
        (http::StatusCode::NOT_FOUND, "not found\n")
    };
    let mut response =
        http::Response::new(Body::new(Full::new(Bytes::from_static(text.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == http::StatusCode::UNSUPPORTED_MEDIA_TYPE {
        response.headers_mut().insert(
            "accept-post",
            HeaderValue::from_static(
                "application/json, application/proto, application/connect+json, \
                 application/connect+proto",
            ),
        );
    }
    response
}

/// A unary call's answer, once the gRPC reply and its status are in.
pub async fn unary<B>(plan: Plan, response: http::Response<B>) -> http::Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let pool = &plan.translator.pool;
    if let Some(status) = Status::from_header_map(&parts.headers) {
        // Trailers-only: the call failed (or ended) before any reply.
        return error_response(&status, &parts.headers, &HeaderMap::new(), pool);
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(err) => {
            let status = Status::from_error(err.into());
            return error_response(&status, &parts.headers, &HeaderMap::new(), pool);
        }
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = Status::from_header_map(&trailers)
        .unwrap_or_else(|| Status::internal("the reply ended without a gRPC status"));
    if status.code() != Code::Ok {
        return error_response(&status, &parts.headers, &trailers, pool);
    }
    let mut data = BytesMut::from(collected.to_bytes());
    let reply = match split_envelope(&mut data, usize::MAX) {
        Ok(Some((flags, message))) if data.is_empty() => {
            grpc_message(&parts.headers, flags, message)
                .and_then(|message| plan.codec.from_proto(&plan.rpc.output, message))
        }
        _ => Err(Status::internal("a unary call's reply is one message")),
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(status) => return error_response(&status, &parts.headers, &trailers, pool),
    };
    let compress =
        plan.gzip_replies && reply.len() >= plan.translator.min_reply_bytes && !reply.is_empty();
    let body = if compress { gzip(&reply) } else { reply };
    let mut response = http::Response::new(Body::new(Full::new(body)));
    let headers = response.headers_mut();
    copy_metadata(&parts.headers, headers, "");
    copy_metadata(&trailers, headers, "trailer-");
    headers.insert(
        header::CONTENT_TYPE,
        protocol::content_type(Framing::Unary, plan.codec),
    );
    if compress {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// A streaming call's answer: `200` at once, then one envelope per reply as it comes, then the
/// end-of-stream message with the status and trailers.
pub fn stream<B>(plan: Plan, response: http::Response<B>) -> http::Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let compress = plan.gzip_replies && plan.translator.min_reply_bytes == 0;
    let mut answer = http::Response::builder()
        .header(
            header::CONTENT_TYPE,
            protocol::content_type(Framing::Stream, plan.codec),
        )
        .body(())
        .expect("static response parts are valid");
    copy_metadata(&parts.headers, answer.headers_mut(), "");
    if compress {
        answer.headers_mut().insert(
            protocol::STREAM_CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
    }
    let body = if let Some(status) = Status::from_header_map(&parts.headers) {
        let end = protocol::end_stream(&status, &HeaderMap::new(), &plan.translator.pool);
        Body::new(Full::new(end))
    } else {
        envelopes(plan, parts.headers, body, compress)
    };
    answer.map(|()| body)
}

struct Reading<B> {
    plan: Plan,
    headers: HeaderMap,
    body: std::pin::Pin<Box<B>>,
    buf: BytesMut,
    compress: bool,
}

fn envelopes<B>(plan: Plan, headers: HeaderMap, body: B, compress: bool) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let start = Some(Reading {
        plan,
        headers,
        body: Box::pin(body),
        buf: BytesMut::new(),
        compress,
    });
    let frames = stream::unfold(start, |state| async move {
        let mut reading = state?;
        let end = |status: &Status, trailers: &HeaderMap, reading: &Reading<B>| {
            let end = protocol::end_stream(status, trailers, &reading.plan.translator.pool);
            Some((Ok::<_, Status>(Frame::data(end)), None))
        };
        loop {
            match split_envelope(&mut reading.buf, usize::MAX) {
                Ok(Some((flags, message))) => {
                    let reply = grpc_message(&reading.headers, flags, message)
                        .and_then(|m| reading.plan.codec.from_proto(&reading.plan.rpc.output, m));
                    return match reply {
                        Ok(reply) if reading.compress => {
                            let envelope = protocol::envelope(COMPRESSED, &gzip(&reply));
                            Some((Ok(Frame::data(envelope)), Some(reading)))
                        }
                        Ok(reply) => {
                            let envelope = protocol::envelope(0, &reply);
                            Some((Ok(Frame::data(envelope)), Some(reading)))
                        }
                        Err(status) => end(&status, &HeaderMap::new(), &reading),
                    };
                }
                Ok(None) => {}
                Err(status) => return end(&status, &HeaderMap::new(), &reading),
            }
            match reading.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => reading.buf.extend_from_slice(&data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let status = Status::from_header_map(&trailers).unwrap_or_else(|| {
                            Status::internal("the stream ended without a gRPC status")
                        });
                        return end(&status, &trailers, &reading);
                    }
                },
                Some(Err(err)) => {
                    return end(&Status::from_error(err.into()), &HeaderMap::new(), &reading);
                }
                None => {
                    let status = Status::internal("the stream ended without a gRPC status");
                    return end(&status, &HeaderMap::new(), &reading);
                }
            }
        }
    });
    Body::new(StreamBody::new(frames))
}

/// One gRPC message's bytes, inflated if the service compressed it (it does not unless asked
/// with `grpc-accept-encoding`, which translated requests do not send).
fn grpc_message(headers: &HeaderMap, flags: u8, message: Bytes) -> Result<Bytes, Status> {
    if flags & COMPRESSED == 0 {
        return Ok(message);
    }
    match headers.get(GRPC_ENCODING).map(HeaderValue::as_bytes) {
        Some(b"gzip") => gunzip(&message, usize::MAX - 1),
        _ => Err(Status::internal(
            "a reply compressed with an unknown encoding",
        )),
    }
}

/// A unary error: the HTTP status its code maps to, the JSON error body, and the metadata.
fn error_response(
    status: &Status,
    headers: &HeaderMap,
    trailers: &HeaderMap,
    pool: &prost_reflect::DescriptorPool,
) -> http::Response<Body> {
    let json = serde_json::to_vec(&protocol::error_json(status, pool)).expect("JSON serializes");
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(json))));
    *response.status_mut() = protocol::http_status(status.code());
    let out = response.headers_mut();
    copy_metadata(headers, out, "");
    copy_metadata(trailers, out, "trailer-");
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Copies the metadata of `from` (not gRPC's own headers) into `to`, names prefixed.
fn copy_metadata(from: &HeaderMap, to: &mut HeaderMap, prefix: &str) {
    for (name, value) in from {
        if protocol::is_grpc_protocol_header(name) {
            continue;
        }
        let name = if prefix.is_empty() {
            name.clone()
        } else {
            match HeaderName::try_from(format!("{prefix}{name}")) {
                Ok(name) => name,
                Err(_) => continue,
            }
        };
        to.append(name, value.clone());
    }
}
