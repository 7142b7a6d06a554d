//! The `greeter` binary: parse, dispatch, map errors to exit codes.
//!
//! Exit codes: 0 success; 1 a runtime failure (cannot bind, call failed, not serving);
//! 2 bad usage or configuration, TLS and token files included (clap uses 2 for usage errors too).

use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use greeter::{
    call::auth,
    certs::{CertsError, DevPki, PkiOptions},
    cli::{
        BenchArgs, CertsArgs, Cli, Command, ConfigArgs, ConfigCommand, JwtCommand, TokenArgs,
        TokenCommand,
    },
    client::bench::Plan,
    client::{self, ClientError, Unary},
    config::{Config, ConfigError, LogFormat, Sources},
    dev_jwt,
    ops::logging,
    ops::memory::WorstCase,
    ops::shutdown::Signals,
    server::{self, Credentials, Server, ServerError},
};

/// Everything that can end a command unsuccessfully, with its exit code.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Server(#[from] ServerError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Certs(#[from] CertsError),
    #[error("{0}")]
    DevJwt(#[from] dev_jwt::DevJwtError),
    #[error("{path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Client(ClientError::InsecureToken { .. }) => 2,
            Self::Server(error) if error.is_configuration() => 2,
            _ => 1,
        }
    }
}

// mimalloc: fewer instructions per allocation than glibc's malloc on the per-call path (h2
// frames, header maps, boxed futures), and far fewer than musl's, which the static image uses
// (BENCHMARKS.md). Built with `no_thp`: with transparent huge pages its idle RSS doubled.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One CPU (a pod with a 1-CPU limit, or a pinned benchmark): the multi-threaded scheduler's
    // single worker pays for work stealing, the injection queue and cross-thread wake-ups with
    // nothing to steal from; the current-thread scheduler serves the same work with less.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`greeter stream you | head -1`): what it wanted was printed.
        Err(Failure::Client(ClientError::Stdout(e)))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("greeter: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => serve(&args.config).await,
        Command::Config(ConfigCommand::Check(args)) => {
            let config = load(&args.config)?;
            if args.offline {
                println!("configuration is valid (offline: the files it names were not read)");
            } else {
                Credentials::load(&config)?;
                println!("configuration is valid");
            }
            println!(
                "{}",
                WorstCase::of(&config, server::largest_request_bytes(&config))
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Show(args)) => {
            let sources = Sources::from_process(args.configs.clone(), args.overrides());
            print_out(&Config::load(&sources)?.to_toml_with_origins(&sources));
            Ok(())
        }
        Command::Bench(args) => bench(&args).await,
        Command::Certs(greeter::cli::CertsCommand::Generate(args)) => generate_certs(args),
        Command::Token(TokenCommand::New(args)) => new_token(&args),
        Command::Jwt(JwtCommand::Keygen(args)) => {
            dev_jwt::keygen(args.alg, &args.kid, &args.key, &args.jwks, args.force)?;
            println!("wrote {} and {}", args.key.display(), args.jwks.display());
            Ok(())
        }
        Command::Jwt(JwtCommand::Mint(args)) => {
            let claims = dev_jwt::Claims {
                issuer: args.iss,
                subject: args.sub,
                audiences: args.audiences,
                ttl: args.ttl,
            };
            println!("{}", dev_jwt::mint(&args.key, &args.kid, &claims)?);
            Ok(())
        }
        Command::Hello(a) => {
            client_logging();
            let reply = client::unary(&a.client, Unary::SayHello, a.name).await?;
            Ok(print_line(&reply)?)
        }
        Command::HelloAgain(a) => {
            client_logging();
            let reply = client::unary(&a.client, Unary::SayHelloAgain, a.name).await?;
            Ok(print_line(&reply)?)
        }
        Command::Stream(a) => {
            client_logging();
            Ok(client::stream(&a.client, a.name, write_line).await?)
        }
        Command::Chat(a) => {
            client_logging();
            Ok(client::chat(&a, write_line).await?)
        }
        Command::Health(a) => {
            client_logging();
            client::health(&a.client, a.service).await?;
            Ok(print_line("SERVING")?)
        }
    }
}

/// Writes to stdout; a reader that went away (`greeter config show | head`) is not an error.
fn print_out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("greeter: writing to stdout: {e}");
    }
}

/// One line on stdout, flushed at once (a stream's greetings appear as they arrive).
fn write_line(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").and_then(|()| stdout.flush())
}

fn print_line(text: &str) -> Result<(), ClientError> {
    write_line(text).map_err(ClientError::Stdout)
}

fn client_logging() {
    logging::init_direct("warn", LogFormat::Text);
}

fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    Config::load(&Sources::from_process(
        args.configs.clone(),
        args.overrides(),
    ))
}

async fn serve(args: &ConfigArgs) -> Result<(), Failure> {
    let config = load(args)?;
    // Held to the end: dropping it writes out the last lines (the drain's) before the exit.
    let _log = logging::init(&config.log.filter, config.log.format);
    let signals = Signals::install().map_err(ServerError::Signals)?;
    let server = Server::bind(config).await?;
    let stop = async {
        let signal = signals.first().await;
        tracing::info!(signal, "shutdown requested");
    };
    server.serve(stop).await?;
    Ok(())
}

async fn bench(args: &BenchArgs) -> Result<(), Failure> {
    client_logging();
    let plan = Plan {
        rpc: args.rpc,
        connections: args.connections.max(1),
        concurrency: args.concurrency.max(1),
        duration: args.duration,
        requests: args.requests,
        warmup: args.warmup,
        rate: args.rate,
        name: args.name.clone(),
    };
    let report = greeter::client::bench::run(&args.client, &plan).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
    } else {
        print_out(&report.table());
    }
    Ok(())
}

fn generate_certs(args: CertsArgs) -> Result<(), Failure> {
    let hosts = if args.hosts.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        args.hosts
    };
    let options = PkiOptions::valid_for_days(hosts, args.client_name, args.days);
    let pki = DevPki::generate_with_client_uris(&options, &args.client_uri_sans)?;
    for path in pki.write(&args.out, args.force)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn new_token(args: &TokenArgs) -> Result<(), Failure> {
    let token = auth::generate();
    let entry = auth::entry_toml(&auth::entry_for(&token, &args.name, &args.scopes));
    match &args.append {
        Some(path) => {
            append_private(path, &entry).map_err(|source| Failure::Write {
                path: path.clone(),
                source,
            })?;
            println!("{token}");
        }
        None => {
            println!(
                "# token for {:?}, shown once (the server keeps only its hash):",
                args.name
            );
            println!("{token}");
            println!();
            println!("# append to the tokens file (auth.tokens_file):");
            print!("{entry}");
        }
    }
    Ok(())
}

/// Appends to a tokens file, creating it readable by its owner only.
fn append_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("\n{text}").as_bytes())
}
