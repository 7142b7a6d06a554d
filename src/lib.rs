//! greeter: gRPC's helloworld Greeter grown into a production service.
//!
//! The binary (`src/main.rs`) only parses the command line and dispatches; everything it runs is
//! here, so integration tests drive the same code paths through this library.

pub mod call;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod methods;
pub mod ops;
pub mod pb;
pub mod server;
pub mod service;
pub mod transport;
