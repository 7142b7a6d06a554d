//! The Connect protocol's wire vocabulary (connectrpc.com/docs/protocol): which requests are
//! Connect calls, its headers, its error codes and their HTTP statuses, its envelopes and the JSON
//! of its errors and end-of-stream messages.

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

use super::codec::Codec;
use crate::call::grpc_headers::{GRPC_CONTENT_TYPE, starts_with_ignore_case};

/// How a call's messages travel: unary calls carry one bare message each way, streaming calls
/// (`application/connect+...`) enveloped messages and an end-of-stream message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Unary,
    Stream,
}

/// Envelope flag: the payload is compressed with the stream's `connect-content-encoding`.
pub const COMPRESSED: u8 = 0b01;
/// Envelope flag: the end-of-stream message (JSON, error and trailers).
pub const END_STREAM: u8 = 0b10;

pub const TIMEOUT: HeaderName = HeaderName::from_static("connect-timeout-ms");
pub const PROTOCOL_VERSION: HeaderName = HeaderName::from_static("connect-protocol-version");
pub const STREAM_CONTENT_ENCODING: HeaderName = HeaderName::from_static("connect-content-encoding");
pub const STREAM_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("connect-accept-encoding");

/// Whether `request` is a Connect call and how: a `POST` with one of Connect's content types
/// (parameters such as `charset=utf-8` allowed). Anything else is gRPC, grpc-web or the page.
pub fn classify<B>(request: &http::Request<B>) -> Option<(Framing, Codec)> {
    if request.method() != Method::POST {
        return None;
    }
    let value = request.headers().get(header::CONTENT_TYPE)?.as_bytes();
    // gRPC calls, nearly every call on a port that serves both, are told apart first and at the
    // cost of one comparison: they made a gRPC call with `[connect]` on ~1,700 instructions
    // dearer than with it off.
    // None of Connect's content types starts with gRPC's (or grpc-web's) prefix.
    if starts_with_ignore_case(value, GRPC_CONTENT_TYPE) {
        return None;
    }
    kind(std::str::from_utf8(value).ok()?.split(';').next()?.trim())
}

/// The framing and codec of one of Connect's content types, without parameters.
pub fn kind(essence: &str) -> Option<(Framing, Codec)> {
    let kind = if essence.eq_ignore_ascii_case("application/json") {
        (Framing::Unary, Codec::Json)
    } else if essence.eq_ignore_ascii_case("application/proto") {
        (Framing::Unary, Codec::Proto)
    } else if essence.eq_ignore_ascii_case("application/connect+json") {
        (Framing::Stream, Codec::Json)
    } else if essence.eq_ignore_ascii_case("application/connect+proto") {
        (Framing::Stream, Codec::Proto)
    } else {
        return None;
    };
    Some(kind)
}

/// The content type of a response with this framing and codec.
pub fn content_type(framing: Framing, codec: Codec) -> HeaderValue {
    HeaderValue::from_static(match (framing, codec) {
        (Framing::Unary, Codec::Json) => "application/json",
        (Framing::Unary, Codec::Proto) => "application/proto",
        (Framing::Stream, Codec::Json) => "application/connect+json",
        (Framing::Stream, Codec::Proto) => "application/connect+proto",
    })
}

/// `connect-timeout-ms` as gRPC's `grpc-timeout`, so the deadline policy applies unchanged. Connect
/// allows up to 10 digits of milliseconds, gRPC 8 digits of a unit: past 8 digits, whole seconds.
pub fn grpc_timeout(value: &HeaderValue) -> Result<HeaderValue, Status> {
    let text = value.to_str().unwrap_or_default();
    let millis = (!text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "connect-timeout-ms must be 1 to 10 digits of milliseconds, not {text:?}"
            ))
        })?;
    let timeout = if millis <= 99_999_999 {
        format!("{millis}m")
    } else {
        format!("{}S", millis / 1000)
    };
    Ok(HeaderValue::from_str(&timeout).expect("digits and a unit are a valid header value"))
}

/// Whether an `accept-encoding`-style header (comma-separated, with optional `;q=` weights) lists
/// gzip with a non-zero weight.
pub fn accepts_gzip(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            parts.next().is_some_and(|c| c.eq_ignore_ascii_case("gzip"))
                && !parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.trim() == "0"))
        })
}

/// Connect's name of a gRPC code (the codes are the same set).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a unary Connect error, as the protocol maps codes.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A Connect error as JSON: code, message and the status details of `grpc-status-details-bin`
/// (a `google.rpc.Status`), each detail with its type, its protobuf bytes and, when the type is
/// one the server describes (`google.rpc.BadRequest`, ...), a `debug` rendering in JSON.
pub fn error_json(status: &Status, pool: &DescriptorPool) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), code_name(status.code()).into());
    if !status.message().is_empty() {
        error.insert("message".into(), status.message().into());
    }
    let details = tonic_types::pb::Status::decode(status.details())
        .map(|rpc| rpc.details)
        .unwrap_or_default();
    if !details.is_empty() {
        let details = details
            .into_iter()
            .map(|any| {
                let name = any.type_url.rsplit('/').next().unwrap_or_default();
                let mut detail = json!({
                    "type": name,
                    "value": STANDARD_NO_PAD.encode(&any.value),
                });
                let debug = pool
                    .get_message_by_name(name)
                    .and_then(|desc| DynamicMessage::decode(desc, any.value.as_slice()).ok())
                    .and_then(|message| serde_json::to_value(message).ok());
                if let Some(debug) = debug {
                    detail["debug"] = debug;
                }
                detail
            })
            .collect::<Vec<_>>();
        error.insert("details".into(), details.into());
    }
    Value::Object(error)
}

/// Whether a gRPC header or trailer is the protocol's own, not metadata to hand on.
pub fn is_grpc_protocol_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type"
            | "content-length"
            | "content-encoding"
            | "accept-encoding"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
    ) || name.starts_with("grpc-")
}

/// Metadata as the end-of-stream message carries it: each name with all its values.
pub fn metadata_json(headers: &HeaderMap) -> Value {
    let mut metadata = Map::new();
    for name in headers.keys().filter(|n| !is_grpc_protocol_header(n)) {
        let values = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(Value::from)
            .collect::<Vec<_>>();
        metadata.insert(name.as_str().into(), values.into());
    }
    Value::Object(metadata)
}

/// One envelope: flags, the payload's length (big-endian u32), the payload.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).expect("messages are bounded far below 4 GiB"));
    out.put_slice(payload);
    out.freeze()
}

/// Takes one whole envelope (or gRPC frame: the same 5-byte prefix) off the front of `buf`, if
/// one is there. A declared length over `max` is refused before its bytes are awaited.
pub fn split_envelope(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, Status> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max {
        return Err(Status::resource_exhausted(format!(
            "message of {len} bytes is over this method's limit of {max}"
        )));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let flags = buf[0];
    let mut frame = buf.split_to(5 + len);
    Ok(Some((flags, frame.split_off(5).freeze())))
}

/// The end-of-stream message: the error unless the call succeeded, and the trailers.
pub fn end_stream(status: &Status, trailers: &HeaderMap, pool: &DescriptorPool) -> Bytes {
    let mut end = Map::new();
    if status.code() != Code::Ok {
        end.insert("error".into(), error_json(status, pool));
    }
    let metadata = metadata_json(trailers);
    if metadata.as_object().is_some_and(|m| !m.is_empty()) {
        end.insert("metadata".into(), metadata);
    }
    let json = serde_json::to_vec(&Value::Object(end)).expect("JSON values serialize");
    envelope(END_STREAM, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connect's four content types, with parameters and in any case, and nothing else: gRPC's
    /// (told apart by their prefix, first) are never Connect calls, nor is a GET.
    #[test]
    fn connect_calls_are_told_from_grpc_ones_by_content_type() {
        let request = |method: Method, content_type: &str| {
            http::Request::builder()
                .method(method)
                .header(header::CONTENT_TYPE, content_type)
                .body(())
                .unwrap()
        };
        for (content_type, expected) in [
            ("application/json", Some((Framing::Unary, Codec::Json))),
            (
                "Application/JSON; charset=utf-8",
                Some((Framing::Unary, Codec::Json)),
            ),
            ("application/proto", Some((Framing::Unary, Codec::Proto))),
            (
                "application/connect+json",
                Some((Framing::Stream, Codec::Json)),
            ),
            (
                "application/connect+proto ;x=y",
                Some((Framing::Stream, Codec::Proto)),
            ),
            ("application/grpc", None),
            ("APPLICATION/GRPC+proto", None),
            ("application/grpc-web+json", None),
            ("application/grp", None),
            ("text/plain", None),
            ("", None),
        ] {
            assert_eq!(
                classify(&request(Method::POST, content_type)),
                expected,
                "{content_type:?}"
            );
        }
        assert_eq!(classify(&request(Method::GET, "application/json")), None);
    }

    #[test]
    fn timeouts_become_grpc_timeouts() {
        let grpc = |ms: &str| grpc_timeout(&HeaderValue::from_str(ms).unwrap());
        assert_eq!(grpc("250").unwrap(), "250m");
        assert_eq!(grpc("99999999").unwrap(), "99999999m");
        assert_eq!(grpc("9999999999").unwrap(), "9999999S");
        for bad in ["", "-1", "1.5", "12345678901", "1s"] {
            let err = grpc(bad).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn every_code_has_the_http_status_the_connect_protocol_gives_it() {
        // The table of connectrpc.com/docs/protocol, "Error Codes".
        let table = [
            (Code::Cancelled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ];
        for (code, status) in table {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn gzip_acceptance() {
        let accepts = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(value).unwrap(),
            );
            accepts_gzip(&headers, &header::ACCEPT_ENCODING)
        };
        assert!(accepts("gzip"));
        assert!(accepts("br, GZIP;q=0.5"));
        assert!(!accepts("gzip;q=0"));
        assert!(!accepts("identity, br"));
    }

    #[test]
    fn envelopes_split_whole_and_bounded() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&envelope(0, b"abc"));
        buf.extend_from_slice(&envelope(COMPRESSED, b"de")[..4]);
        assert_eq!(
            split_envelope(&mut buf, 10).unwrap(),
            Some((0, Bytes::from_static(b"abc")))
        );
        assert_eq!(split_envelope(&mut buf, 10).unwrap(), None);
        buf.extend_from_slice(&envelope(COMPRESSED, b"de")[4..]);
        assert_eq!(
            split_envelope(&mut buf, 10).unwrap(),
            Some((COMPRESSED, Bytes::from_static(b"de")))
        );
        buf.extend_from_slice(&envelope(0, &[7; 10]));
        assert_eq!(
            split_envelope(&mut buf, 10).unwrap(),
            Some((0, Bytes::from_static(&[7; 10]))),
            "a message of exactly the limit"
        );
        buf.extend_from_slice(&envelope(0, &[0; 11])[..5]);
        let err = split_envelope(&mut buf, 10).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }
}
