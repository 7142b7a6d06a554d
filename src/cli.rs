//! Command-line interface: every subcommand and flag, with its default, and nothing that runs.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// `--version` output: the crate version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GREETER_GIT_COMMIT"),
    ")"
);

/// greeter: gRPC's helloworld Greeter as a production service, and its client.
///
/// One binary: `serve` runs the server; `hello`, `hello-again`, `stream`, `chat` and `health` are
/// clients for it (and for any helloworld server); `config` checks and prints configuration.
#[derive(Debug, Parser)]
#[command(name = "greeter", version = VERSION, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (Greeter, health, reflection v1 + v1alpha).
    ///
    /// With no --config the embedded default applies: plaintext on 127.0.0.1:50051.
    /// Stops on SIGTERM or SIGINT; a second signal exits at once.
    Serve(ServeArgs),
    /// Check or print the effective configuration without serving.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Call SayHello and print the reply.
    Hello(NameArgs),
    /// Call SayHelloAgain and print the reply.
    HelloAgain(NameArgs),
    /// Call SayHelloStreamReply and print each reply as it arrives.
    Stream(NameArgs),
    /// Call SayHelloBidiStream: read names from stdin, one per line, and print each reply as it
    /// arrives. Ends when stdin closes and every reply has been received.
    Chat(ClientArgs),
    /// Check grpc.health.v1.Health and print the status; exit 0 only when SERVING.
    ///
    /// Usable as a container HEALTHCHECK or Kubernetes exec probe.
    Health(HealthArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration; exit 0 when it is valid, 2 with the reason when not.
    Check(ConfigArgs),
    /// Print the effective configuration (all layers merged) as TOML.
    Show(ConfigArgs),
}

/// Where configuration comes from (see `config/default.toml`).
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// A TOML config file; repeat for layers, later files win over earlier ones and over the
    /// embedded default. Environment variables GREETER__SECTION__KEY win over files.
    #[arg(short, long = "config", value_name = "PATH")]
    pub configs: Vec<PathBuf>,
    /// Listen address, overriding server.listen from every other layer [default: from config,
    /// 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

impl ConfigArgs {
    /// The flags that override config keys, as `(dotted key, value)` pairs.
    pub fn overrides(&self) -> Vec<(String, String)> {
        self.listen
            .iter()
            .map(|addr| ("server.listen".to_owned(), addr.clone()))
            .collect()
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// How a client subcommand reaches the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server address: host:port or a URI (http://host:port)
    #[arg(long, env = "GREETER_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Deadline for the whole call, e.g. 500ms, 5s, 1m, sent to the server as grpc-timeout
    /// [default: 10s; none for chat]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The name to greet; empty greets "world"
    #[arg(default_value = "world")]
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Service to check; "" (the default) is the server as a whole
    #[arg(default_value = "")]
    pub service: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
