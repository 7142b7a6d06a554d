//! Transport: what happens before there is a call. Sockets are accepted (TCP, TLS, a Unix
//! socket), tagged with their peer, and served as HTTP/2 (or HTTP/1.1 for grpc-web) connections
//! with every protocol limit set. Nothing here knows about methods or callers.

pub mod client_trust;
pub mod connection;
pub mod dn;
pub mod listener;
pub mod tls;
pub mod unix_socket;
