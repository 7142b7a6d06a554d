//! Command-line interface: every subcommand and flag, with its default, and nothing that runs.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::client::{ClientArgs, bench::BenchRpc};

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
/// clients for it (and for any helloworld server); `bench` load-tests one; `config` checks and
/// prints configuration; `certs` and `token` make development certificates and bearer tokens.
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
    #[command(mut_arg("timeout", |arg| arg.help(
        "Deadline for the whole chat, e.g. 5m, sent to the server as grpc-timeout [default: none]"
    )))]
    Chat(ClientArgs),
    /// Check grpc.health.v1.Health and print the status; exit 0 only when SERVING.
    ///
    /// Usable as a container HEALTHCHECK or Kubernetes exec probe.
    Health(HealthArgs),
    /// Load-test a Greeter server (this one or any helloworld server) and report throughput,
    /// latency percentiles and answers by gRPC status code.
    #[command(mut_arg("timeout", |arg| arg.help(
        "Bound on opening each connection, e.g. 5s [default: 10s]; calls carry no deadline"
    )))]
    Bench(BenchArgs),
    /// Development certificates (a CA, a server and a client certificate), made without openssl.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Bearer tokens for auth.tokens_file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Development JWTs for [auth.jwt]: a signing key with its JWKS, and tokens signed with it.
    #[command(subcommand)]
    Jwt(JwtCommand),
}

#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Write a signing key (PKCS#8 PEM, mode 0600) and the JWKS of its public key, the file
    /// [[auth.jwt.issuers]] jwks_file names.
    ///
    /// For development and tests only: real tokens come from your cluster or OIDC provider.
    Keygen(JwtKeygenArgs),
    /// Print a token signed with a key from `greeter jwt keygen`, with the claims of a Kubernetes
    /// projected service-account token (iss, sub, aud, iat, nbf, exp).
    Mint(JwtMintArgs),
}

#[derive(Debug, Args)]
pub struct JwtKeygenArgs {
    /// The signature algorithm
    #[arg(long, value_enum, default_value = "EdDSA")]
    pub alg: crate::dev_jwt::Alg,
    /// The key's id: tokens name it in their header, the JWKS holds it
    #[arg(long, default_value = "dev")]
    pub kid: String,
    /// Where to write the private key
    #[arg(long, value_name = "FILE", default_value = "certs/jwt.key")]
    pub key: PathBuf,
    /// Where to write the JWKS
    #[arg(long, value_name = "FILE", default_value = "certs/jwks.json")]
    pub jwks: PathBuf,
    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct JwtMintArgs {
    /// The private key from `greeter jwt keygen`
    #[arg(long, value_name = "FILE", default_value = "certs/jwt.key")]
    pub key: PathBuf,
    /// The key's id, as in the JWKS
    #[arg(long, default_value = "dev")]
    pub kid: String,
    /// Issuer (iss): the issuer of an [[auth.jwt.issuers]] entry
    #[arg(long)]
    pub iss: String,
    /// Subject (sub): the caller's identity, e.g. system:serviceaccount:shop:checkout
    #[arg(long)]
    pub sub: String,
    /// Audience (aud); repeat for several
    #[arg(long = "aud", value_name = "AUDIENCE", required = true)]
    pub audiences: Vec<String>,
    /// Lifetime, e.g. 10m, 1h
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub ttl: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The RPC to drive
    #[arg(long, value_enum, default_value = "unary")]
    pub rpc: BenchRpc,
    /// HTTP/2 connections to open
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Concurrent calls (unary) or streams (bidi) per connection
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// How long to measure, after the warm-up
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many measured requests (the duration still bounds the run)
    #[arg(long)]
    pub requests: Option<u64>,
    /// Warm-up before measuring (connections, caches, CPU frequency)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Open loop at this many requests per second in total; latency then counts from each
    /// call's scheduled start (no coordinated omission) [default: closed loop, max throughput]
    #[arg(long)]
    pub rate: Option<f64>,
    /// The name sent in every request
    #[arg(long, default_value = "bench")]
    pub name: String,
    /// Print the report as JSON (for scripts) instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write ca.pem, server.pem, server.key, client.pem and client.key into --out.
    ///
    /// For development and tests only: production certificates come from your PKI.
    Generate(CertsArgs),
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Output folder (created if missing)
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// DNS name or IP address the server certificate is valid for; repeat for several
    /// [default: localhost, 127.0.0.1, ::1]
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Common name of the client certificate: the identity mTLS callers show in logs
    #[arg(long, default_value = "greeter-client")]
    pub client_name: String,
    /// A URI SAN for the client certificate, e.g. a SPIFFE ID
    /// (spiffe://cluster.local/ns/shop/sa/checkout) for auth.cert_rules; repeat for several
    #[arg(long = "client-uri-san", value_name = "URI")]
    pub client_uri_sans: Vec<String>,
    /// Validity of the server and client certificates, in days
    #[arg(long, default_value_t = 90)]
    pub days: u64,
    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a random token; print it once, with the entry (its hash) for the tokens file.
    New(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Who holds the token: shown in logs and PERMISSION_DENIED messages, never the token
    #[arg(long)]
    pub name: String,
    /// A scope the token grants (see auth.policy); repeat for several
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<String>,
    /// Append the entry to this tokens file (created, mode 0600, if missing) and print only the
    /// token, for scripts: TOKEN=$(greeter token new --name ci --scope greeter --append FILE)
    #[arg(long, value_name = "FILE")]
    pub append: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration; exit 0 when it is valid, 2 with the reason when not.
    Check(CheckArgs),
    /// Print the effective configuration (all layers merged) as TOML.
    Show(ConfigArgs),
}

/// `config check`'s flags.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Check keys, types and values only, without reading the files the config names (TLS,
    /// tokens, JWKS, ...): for a config meant for another machine, such as a ConfigMap whose
    /// files are Secret mounts there
    #[arg(long)]
    pub offline: bool,
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
