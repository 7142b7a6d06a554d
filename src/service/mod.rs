//! gRPC service implementations: what a call does once it has passed transport and policy.

mod compression;
mod greeter;
mod validate;

pub use compression::{ReplyCompression, compressed};
pub use greeter::Greeter;
pub use validate::{NameError, validate_name};
