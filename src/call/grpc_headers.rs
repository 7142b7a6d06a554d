//! The gRPC header names the per-call layers read and write, ready-made: a lookup by `&str`
//! parses and validates the name on every call (about 100 instructions each, several per call).

use tonic::codegen::http::header::HeaderName;

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
