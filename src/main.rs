//! The `greeter` binary: parse, dispatch, map errors to exit codes.
//!
//! Exit codes: 0 success; 1 a runtime failure (cannot bind, call failed, not serving);
//! 2 bad usage or configuration (clap uses 2 for usage errors too).

use std::process::ExitCode;

use clap::Parser as _;
use greeter::{
    cli::{Cli, Command, ConfigArgs, ConfigCommand},
    client::{self, Unary},
    config::{Config, ConfigError, LogFormat, Sources},
    logging,
    server::Server,
    shutdown,
};

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve(args) => serve(&args.config).await,
        Command::Config(ConfigCommand::Check(args)) => match load(&args) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Config(ConfigCommand::Show(args)) => match load(&args) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        client_command => {
            logging::init("warn", LogFormat::Text);
            let result = match client_command {
                Command::Hello(a) => client::unary(&a.client, Unary::SayHello, a.name)
                    .await
                    .map(|reply| println!("{reply}")),
                Command::HelloAgain(a) => client::unary(&a.client, Unary::SayHelloAgain, a.name)
                    .await
                    .map(|reply| println!("{reply}")),
                Command::Stream(a) => client::stream(&a.client, a.name, |r| println!("{r}")).await,
                Command::Chat(a) => client::chat(&a, |r| println!("{r}")).await,
                Command::Health(a) => client::health(&a.client, a.service)
                    .await
                    .map(|()| println!("SERVING")),
                Command::Serve(_) | Command::Config(_) => unreachable!("handled above"),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("greeter: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    Config::load(&Sources::from_process(
        args.configs.clone(),
        args.overrides(),
    ))
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("greeter: invalid configuration: {error}");
    ExitCode::from(EXIT_CONFIG)
}

async fn serve(args: &ConfigArgs) -> ExitCode {
    let config = match load(args) {
        Ok(config) => config,
        Err(e) => return config_failure(&e),
    };
    logging::init(&config.log.filter, config.log.format);
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let stop = async {
        let signal = shutdown::terminate().await;
        tracing::info!(signal, "shutdown requested");
    };
    match server.serve(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
