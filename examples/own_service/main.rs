//! greeter serving a service of its own beside the Greeter: `tally.v1.Tally`, from
//! `examples/proto/tally/v1/tally.proto` and `tally.rs`, registered in one line below. Every layer
//! applies to it as to the Greeter: auth policy, message limits, deadlines, quotas, metrics,
//! traces, access lines, Connect JSON, reflection, health (ARCHITECTURE.md, "Adding your own
//! service").
//!
//! ```sh
//! cargo run --example own_service -- [--config file.toml ...]
//! grpcurl -plaintext -d '{"amount": 2}' 127.0.0.1:50051 tally.v1.Tally/Add
//! ```
//!
//! Takes greeter's config files (`GREETER__*` variables apply too); stops on SIGTERM or SIGINT.

use std::path::PathBuf;

use greeter::{
    config::{Config, Sources},
    ops::{logging, shutdown::Signals},
    server::{OwnService, Server},
};

mod tally;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let own = vec![OwnService::new(
        tally::TallyServer::new(tally::Tally::default()),
        tally::FILE_DESCRIPTOR_SET,
    )];
    let configs = std::env::args_os()
        .skip(1)
        .filter(|arg| arg != "--config")
        .map(PathBuf::from)
        .collect();
    let sets: Vec<_> = own.iter().map(OwnService::descriptor_set).collect();
    let config = Config::load_serving(&Sources::from_process(configs, Vec::new()), &sets)?;
    let _log = logging::init(&config.log.filter, config.log.format);
    let signals = Signals::install()?;
    let server = Server::bind_with(config, own).await?;
    server
        .serve(async {
            signals.first().await;
        })
        .await?;
    Ok(())
}
