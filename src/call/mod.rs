//! The per-call layers, in the order the server stacks them, outermost first:
//!
//! - [`gate`]: what the listener speaks (`415` for other content types) and, on a plaintext
//!   loopback listener, the DNS-rebinding check for browsers;
//! - [`web`]: edge translation, grpc-web and CORS to plain gRPC (only with `[web]`);
//! - [`connect`]: edge translation, the Connect protocol to plain gRPC (only with `[connect]`;
//!   behind [`web`]'s CORS when both are on);
//! - [`observe`]: request id, log span, go-grpc-prometheus metrics, one access line;
//! - [`auth`]: who is calling, and whether the method allows it;
//! - [`quota`]: per-caller rate quotas (token buckets), refusing with RetryInfo and QuotaFailure;
//! - [`limit`]: call budgets by trust class, shedding instead of queueing;
//! - [`intake`]: request bytes held (per-method message limits, server-wide budget);
//! - [`lifetime`]: the deadline ([`deadline`] is its policy), the end at shutdown, a client gone;
//! - [`faults`]: failed and delayed calls on purpose, for rehearsals (only with `[faults]`).
//!
//! [`resolve`] is what they share: `observe` resolves the call's method once, into everything the
//! layers further in need, and hands it down in the request's extensions. [`body`] is the
//! pass-through body of the layers that only watch a body or hold something until it ends;
//! [`grpc_headers`] the header names they read, ready-made.

pub mod auth;
pub mod body;
pub mod connect;
pub mod deadline;
pub mod faults;
pub mod gate;
pub mod grpc_headers;
pub mod intake;
pub mod lifetime;
pub mod limit;
pub mod observe;
pub mod quota;
pub mod resolve;
pub mod web;
