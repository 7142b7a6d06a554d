//! greeter: gRPC's helloworld Greeter grown into a production service.
//!
//! The binary (`src/main.rs`) only parses the command line ([`cli`]) and dispatches; everything it
//! runs is here, so integration tests drive the same code paths through this library.
//!
//! The modules follow the path of a call (ARCHITECTURE.md has the picture):
//!
//! - [`transport`]: sockets to connections: accept (TCP, TLS, Unix socket), HTTP/2 and HTTP/1.1;
//! - [`call`]: the per-call layers in stacking order: grpc-web, Connect, observe (which resolves
//!   the call's method once for all of them), auth, limit, intake, lifetime (deadline, drain);
//! - [`service`]: the RPCs: the Greeter, health, and which replies go compressed;
//! - [`server`]: the wiring of the three, and the drain when the server stops.
//!
//! Beside the calls: [`ops`] (metrics, logging, reload, shutdown, memory), [`client`] (the client
//! subcommands and bench), [`config`] (types, layered loading with provenance; each section's
//! checks live with the module that owns it), [`methods`] (kinds, patterns, per-method tables),
//! [`pb`] (generated code) and [`certs`] (the development PKI).

pub mod call;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev_jwt;
pub mod methods;
pub mod ops;
pub mod pb;
pub mod server;
pub mod service;
pub mod transport;
