//! greeter: gRPC's helloworld Greeter grown into a production service.
//!
//! The binary (`src/main.rs`) only parses the command line and dispatches; everything it runs is
//! here, so integration tests drive the same code paths through this library.

pub mod auth;
pub mod bench;
pub mod call;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod deadline;
pub mod health;
pub mod intake;
pub mod limit;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod methods;
pub mod metrics;
pub mod observe;
pub mod pb;
pub mod reload;
pub mod request_id;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod tls;
pub mod unix_socket;
pub mod web;
