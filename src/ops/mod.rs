//! The operator's side: what runs beside the calls rather than in them. Metrics and their
//! listener, logging, reloading rotated files, the signals that stop the server, and the memory a
//! configuration can make the server hold.

pub mod logging;
pub mod memory;
pub mod metrics;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
