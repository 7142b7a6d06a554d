//! gRPC service implementations: what a call does once it has passed transport and policy.

mod compression;
mod greeter;
pub mod health;
mod validate;

pub use compression::{ReplyCompression, compressed, plain_streams};
pub use greeter::{Greeter, max_request_bytes};
pub use validate::{NameError, validate_name};
