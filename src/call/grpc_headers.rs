//! The gRPC header names the per-call layers read and write, ready-made: a lookup by `&str`
//! parses and validates the name on every call (about 100 instructions each, several per call).
//! And gRPC's content type, which the gate and Connect both tell calls apart by.

use tonic::codegen::http::header::HeaderName;

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// The prefix of every gRPC content type (`application/grpc`, `application/grpc+proto`) and of
/// grpc-web's (`application/grpc-web...`).
pub const GRPC_CONTENT_TYPE: &[u8] = b"application/grpc";

/// Whether `text` starts with `prefix`, ASCII case ignored (content types are case-insensitive).
pub fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}
