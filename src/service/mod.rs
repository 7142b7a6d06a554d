//! gRPC service implementations: what a call does once it has passed transport and policy.

mod greeter;
mod validate;

pub use greeter::Greeter;
pub use validate::{NameError, validate_name};
