//! The end-to-end tests: one crate, so the shared helpers in [`common`] compile once and every
//! test file is a module of it. Real servers on loopback, real clients; nothing is mocked.

mod common;

mod auth;
mod cli;
mod compression;
mod connect;
mod crl;
mod faults;
mod greeter;
mod health_reflection;
mod hostile;
mod jwt;
mod limits;
mod logging;
mod monitoring;
mod observability;
mod own_service;
mod quota;
mod quota_redis;
mod shutdown;
mod tls;
mod unix;
mod web;
