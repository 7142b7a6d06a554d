//! Client subcommands: one channel builder, one error type, and the calls.

pub mod bearer;
pub mod bench;

use std::{
    future::Future,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Args;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UnixStream},
};
use tokio_stream::{StreamExt as _, wrappers::LinesStream};
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use tower::service_fn;

use crate::pb::{HelloRequest, greeter_client::GreeterClient};
use bearer::{Bearer, TokenFile};

/// How a client subcommand reaches the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server address: host:port, a URI (http://host:port), or unix:PATH for the Unix socket
    #[arg(
        long,
        env = "GREETER_ADDR",
        hide_env_values = true,
        default_value = "127.0.0.1:50051"
    )]
    pub addr: String,
    /// Deadline for the whole call, e.g. 500ms, 5s, 1m, sent to the server as grpc-timeout
    /// [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Connect with TLS (implied by --ca, --cert and https:// addresses); without --ca the
    /// server certificate must chain to the Mozilla root set
    #[arg(long)]
    pub tls: bool,
    /// PEM CA bundle to verify the server certificate with
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mTLS (with --key)
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against [default: the host of --addr]
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Bearer token, sent as `authorization: Bearer <token>`; refused over plaintext beyond
    /// loopback (see --allow-insecure-token)
    #[arg(long, env = "GREETER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the bearer token (its first line), re-read when it changes: a projected
    /// service-account token, which the kubelet rotates while the pod runs
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Send --token over plaintext to a non-loopback address, readable by anyone on the path
    /// (only for a network you trust, e.g. a mesh sidecar's mTLS); loopback and unix: need no flag
    #[arg(long)]
    pub allow_insecure_token: bool,
}

impl ClientArgs {
    /// Whether to speak TLS.
    pub fn use_tls(&self) -> bool {
        self.tls || self.ca.is_some() || self.cert.is_some() || self.addr.starts_with("https://")
    }
}

/// Deadline of unary, server-streaming and health calls when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong on the client side, worded for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{rpc} failed: {} ({})", code_name(.status.code()), describe(.status))]
    Rpc { rpc: &'static str, status: Status },
    #[error("{rpc} failed: DEADLINE_EXCEEDED (no answer within {timeout:?})")]
    Deadline {
        rpc: &'static str,
        timeout: Duration,
    },
    #[error("reading stdin: {0}")]
    Stdin(#[from] std::io::Error),
    #[error("not serving: {service:?} is {status}")]
    NotServing { service: String, status: String },
    #[error("{path}: {source}")]
    ReadFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--token: {0}")]
    Token(String),
    #[error(
        "--token: refusing to send the bearer token in cleartext to {addr}: anyone on the path \
         could read and replay it. Connect with TLS (--ca FILE, or --tls), or pass \
         --allow-insecure-token if the network is trusted (loopback and unix: need no flag)"
    )]
    InsecureToken { addr: String },
    /// One sentence naming the flag to change; the transport's own error stays the source.
    #[error("{hint}")]
    WrongProtocol {
        #[source]
        error: Box<ClientError>,
        hint: &'static str,
    },
    #[error("cannot connect to {addr}: {problem}")]
    Certificate { addr: String, problem: String },
    #[error("writing to stdout: {0}")]
    Stdout(std::io::Error),
}

impl ClientError {
    /// Whether the failure came from the connection rather than from the server's answer: a
    /// plaintext client meeting a TLS server, or the reverse, fails this way.
    fn failed_at_transport(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Rpc { status, .. } => std::error::Error::source(status).is_some(),
            _ => false,
        }
    }
}

/// gRPC's canonical upper-case name of a status code, as grpcurl and every other stack print it.
pub fn code_name(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.char_indices() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// An open channel plus what every call on it carries.
pub struct Session {
    channel: Channel,
    authorization: Option<Bearer>,
}

impl Session {
    /// The channel: cheap to clone, all clones share the one HTTP/2 connection.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A request with the deadline (sent as `grpc-timeout`) and the bearer token, if any.
    pub fn request<T>(&self, message: T, timeout: Option<Duration>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(limit) = timeout {
            request.set_timeout(limit);
        }
        if let Some(bearer) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", bearer.value());
        }
        request
    }
}

/// Connects to `args.addr` (`host:port`, a URI, or `unix:PATH`), over TLS when asked.
pub async fn connect(args: &ClientArgs) -> Result<Session, ClientError> {
    let tls = args.use_tls();
    let address_error = |reason: String| ClientError::Address {
        addr: args.addr.clone(),
        reason,
    };
    let unix = args.addr.strip_prefix("unix:").map(PathBuf::from);
    let uri = match &unix {
        // The authority a Unix-socket call carries, as grpc-go sends it.
        Some(_) => "http://localhost".to_owned(),
        None if args.addr.contains("://") => args.addr.clone(),
        None => format!("{}://{}", if tls { "https" } else { "http" }, args.addr),
    };
    // A bare host has no port to imply (a URI's scheme does: https://host is 443): dialing 80,
    // where nobody serves gRPC, would hang or be refused instead of naming the mistake.
    if unix.is_none()
        && !args.addr.contains("://")
        && uri
            .parse::<http::Uri>()
            .is_ok_and(|parsed| parsed.port_u16().is_none())
    {
        return Err(address_error(
            "no port: give host:port, e.g. 127.0.0.1:50051 (the quick start's)".into(),
        ));
    }
    let sends_token = args.token.is_some() || args.token_file.is_some();
    if sends_token && !tls && unix.is_none() && !args.allow_insecure_token {
        let host = uri.parse::<http::Uri>().ok();
        if !host
            .as_ref()
            .and_then(http::Uri::host)
            .is_some_and(is_loopback)
        {
            return Err(ClientError::InsecureToken {
                addr: args.addr.clone(),
            });
        }
    }
    let mut endpoint =
        Channel::from_shared(uri.clone()).map_err(|e| address_error(e.to_string()))?;
    if tls {
        if unix.is_some() {
            return Err(address_error(
                "the Unix socket is plaintext: drop --tls, --ca and --cert".into(),
            ));
        }
        endpoint = endpoint
            .tls_config(tls_config(args)?)
            .map_err(|e| address_error(error_chain(&e)))?;
    }
    let authorization = match (&args.token, &args.token_file) {
        (Some(token), _) => Some(Bearer::Fixed(bearer::header(token)?)),
        (None, Some(path)) => Some(Bearer::File(TokenFile::open(path)?)),
        (None, None) => None,
    };
    let endpoint = endpoint.connect_timeout(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    // What the user asked for, with the scheme it implies: http:// and https:// tell plaintext
    // from TLS at a glance.
    let target = match &unix {
        Some(_) => args.addr.clone(),
        None => uri,
    };
    let connected = match unix {
        Some(path) => {
            endpoint
                .connect_with_connector(service_fn(move |_| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
        None => endpoint.connect().await,
    };
    let channel = connected.map_err(|e| {
        let reason = error_chain(&e);
        match certificate_problem(&reason, args) {
            Some(problem) => ClientError::Certificate {
                addr: target,
                problem,
            },
            None => ClientError::Connect {
                addr: target,
                reason,
            },
        }
    })?;
    Ok(Session {
        channel,
        authorization,
    })
}

/// `localhost` or a loopback address (`127.0.0.0/8`, `[::1]`): traffic that never leaves the host.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What a server answers to the plaintext HTTP/2 connection preface.
#[derive(Debug)]
enum Speaks {
    /// A TLS alert record: the server expected a TLS handshake.
    Tls,
    /// An HTTP/2 SETTINGS frame: the server speaks plaintext HTTP/2.
    PlaintextH2,
}

/// Asks the server at `args.addr` which protocol it speaks, by sending the plaintext HTTP/2
/// preface on a fresh connection and reading the first bytes of the answer. `None`: no answer,
/// or one that says neither.
async fn probe(args: &ClientArgs) -> Option<Speaks> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let uri = if args.addr.contains("://") {
        args.addr.parse::<http::Uri>().ok()?
    } else {
        format!("http://{}", args.addr).parse::<http::Uri>().ok()?
    };
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let exchange = async {
        let mut socket = TcpStream::connect((host, port)).await.ok()?;
        socket.write_all(PREFACE).await.ok()?;
        let mut head = [0u8; 5];
        socket.read_exact(&mut head).await.ok()?;
        match head {
            [0x15, 0x03, ..] => Some(Speaks::Tls),
            [_, _, _, 0x04, _] => Some(Speaks::PlaintextH2),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// Runs a client command; when it fails at the transport, finds out whether the server speaks
/// the other protocol (TLS for a plaintext client, plaintext for a TLS one) and says so: h2's
/// "frame with invalid size" or a broken pipe do not.
async fn diagnosed<T>(
    args: &ClientArgs,
    command: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    let error = match command.await {
        Err(error) if error.failed_at_transport() && !args.addr.starts_with("unix:") => error,
        other => return other,
    };
    let hint = match (args.use_tls(), probe(args).await) {
        (false, Some(Speaks::Tls)) => {
            "the server speaks TLS: pass --ca FILE (or --tls for a publicly trusted certificate)"
        }
        (true, Some(Speaks::PlaintextH2)) => {
            "the server speaks plaintext: drop --tls, --ca and --cert (and https://)"
        }
        _ => return Err(error),
    };
    Err(ClientError::WrongProtocol {
        error: Box::new(error),
        hint,
    })
}

/// rustls' verdict on the server's certificate, as one sentence naming the flag to change:
/// `invalid peer certificate: UnknownIssuer` says neither what is wrong nor what to do.
fn certificate_problem(reason: &str, args: &ClientArgs) -> Option<String> {
    let (_, verdict) = reason.split_once("invalid peer certificate: ")?;
    let ca = args.ca.as_ref().map(|ca| ca.display().to_string());
    Some(
        if verdict.starts_with("UnknownIssuer") || verdict.starts_with("BadSignature") {
            match ca {
                Some(ca) => format!(
                    "the server's certificate was not issued by the CA in --ca {ca} (certificates \
                 generated again?): pass --ca with the CA that issued it"
                ),
                None => "the server's certificate was not issued by a CA this system trusts (a \
                     development certificate?): pass --ca FILE with the CA that issued it \
                     (certs/ca.pem for `greeter certs generate`'s)"
                    .to_owned(),
            }
        } else if verdict.contains("not valid for name") || verdict.starts_with("NotValidForName") {
            format!(
                "the server's certificate is not valid for the name dialed ({verdict}): use a name \
             it was issued for in --addr, or --server-name NAME"
            )
        } else if verdict.contains("xpired") {
            format!("the server's certificate has expired ({verdict}): the server must renew it")
        } else {
            return None;
        },
    )
}

fn tls_config(args: &ClientArgs) -> Result<ClientTlsConfig, ClientError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| ClientError::ReadFile {
            path: path.to_owned(),
            source,
        })
    };
    let mut config = ClientTlsConfig::new();
    config = match &args.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => config.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &args.server_name {
        config = config.domain_name(name.clone());
    }
    Ok(config)
}

/// A status's message, plus its causes when tonic made it from a transport error (a message of
/// "transport error" alone does not say that the server speaks TLS and we did not).
fn describe(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => format!("{}: {}", status.message(), error_chain(source)),
        None => status.message().to_owned(),
    }
}

/// "transport error" alone says nothing; the causes below it say "Connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and tonic wrap the same io::Error at several levels; say each thing once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Runs `call` under the deadline: sent to the server as `grpc-timeout`, and enforced here too, so
/// a server that ignores it still cannot hang the client.
async fn with_deadline<T, F>(
    rpc: &'static str,
    timeout: Option<Duration>,
    call: impl FnOnce(Option<Duration>) -> F,
) -> Result<T, ClientError>
where
    F: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let result = match timeout {
        Some(limit) => tokio::time::timeout(limit, call(Some(limit)))
            .await
            .map_err(|_| ClientError::Deadline {
                rpc,
                timeout: limit,
            })?,
        None => call(None).await,
    };
    result.map_err(|status| match status.code() {
        Code::DeadlineExceeded => ClientError::Deadline {
            rpc,
            timeout: timeout.unwrap_or_default(),
        },
        // tonic's channel enforces the `grpc-timeout` it sends too, and reports its own expiry as
        // CANCELLED ("Timeout expired"); at or past the deadline that is the deadline.
        Code::Cancelled if timeout.is_some_and(|limit| started.elapsed() >= limit) => {
            ClientError::Deadline {
                rpc,
                timeout: timeout.unwrap_or_default(),
            }
        }
        _ => ClientError::Rpc { rpc, status },
    })
}

/// Which unary Greeter RPC to call.
#[derive(Debug, Clone, Copy)]
pub enum Unary {
    SayHello,
    SayHelloAgain,
}

/// Calls a unary RPC and returns the greeting.
pub async fn unary(args: &ClientArgs, rpc: Unary, name: String) -> Result<String, ClientError> {
    diagnosed(args, unary_call(args, rpc, name)).await
}

async fn unary_call(args: &ClientArgs, rpc: Unary, name: String) -> Result<String, ClientError> {
    let session = connect(args).await?;
    let mut client = GreeterClient::new(session.channel.clone());
    let timeout = Some(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let reply = match rpc {
        Unary::SayHello => {
            with_deadline("SayHello", timeout, |t| {
                client.say_hello(session.request(HelloRequest { name }, t))
            })
            .await?
        }
        Unary::SayHelloAgain => {
            with_deadline("SayHelloAgain", timeout, |t| {
                client.say_hello_again(session.request(HelloRequest { name }, t))
            })
            .await?
        }
    };
    Ok(reply.into_inner().message)
}

/// Calls SayHelloStreamReply and hands each greeting to `print` as it arrives; an error from
/// `print` ends the call.
pub async fn stream(
    args: &ClientArgs,
    name: String,
    print: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    diagnosed(args, stream_call(args, name, print)).await
}

async fn stream_call(
    args: &ClientArgs,
    name: String,
    mut print: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    let session = connect(args).await?;
    let mut client = GreeterClient::new(session.channel.clone());
    let timeout = Some(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let mut printed = Ok(());
    let outcome = &mut printed;
    with_deadline("SayHelloStreamReply", timeout, |t| async move {
        let mut replies = client
            .say_hello_stream_reply(session.request(HelloRequest { name }, t))
            .await?
            .into_inner();
        while let Some(reply) = replies.message().await? {
            *outcome = print(&reply.message);
            if outcome.is_err() {
                break;
            }
        }
        Ok(())
    })
    .await?;
    printed.map_err(ClientError::Stdout)
}

/// Calls SayHelloBidiStream with one name per stdin line, handing replies to `print` as they come;
/// an error from `print` ends the call.
pub async fn chat(
    args: &ClientArgs,
    print: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    diagnosed(args, chat_call(args, print)).await
}

async fn chat_call(
    args: &ClientArgs,
    mut print: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<(), ClientError> {
    let session = connect(args).await?;
    let mut client = GreeterClient::new(session.channel.clone());
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    // A stdin read error ends the outbound stream; it is reported after the replies drain.
    let (error_tx, mut error_rx) = tokio::sync::oneshot::channel();
    let mut error_tx = Some(error_tx);
    let names = LinesStream::new(stdin.lines()).map_while(move |line| match line {
        Ok(name) => Some(HelloRequest { name }),
        Err(e) => {
            if let Some(tx) = error_tx.take() {
                let _ = tx.send(e);
            }
            None
        }
    });
    let mut printed = Ok(());
    let outcome = &mut printed;
    with_deadline("SayHelloBidiStream", args.timeout, |t| async move {
        let mut replies = client
            .say_hello_bidi_stream(session.request(names, t))
            .await?
            .into_inner();
        while let Some(reply) = replies.message().await? {
            *outcome = print(&reply.message);
            if outcome.is_err() {
                break;
            }
        }
        Ok(())
    })
    .await?;
    printed.map_err(ClientError::Stdout)?;
    match error_rx.try_recv() {
        Ok(e) => Err(ClientError::Stdin(e)),
        Err(_) => Ok(()),
    }
}

/// Checks health of `service` and succeeds only when it is SERVING.
pub async fn health(args: &ClientArgs, service: String) -> Result<(), ClientError> {
    diagnosed(args, health_call(args, service)).await
}

async fn health_call(args: &ClientArgs, service: String) -> Result<(), ClientError> {
    let session = connect(args).await?;
    let mut client = HealthClient::new(session.channel.clone());
    let timeout = Some(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let reply = with_deadline("Health/Check", timeout, |t| {
        client.check(session.request(
            HealthCheckRequest {
                service: service.clone(),
            },
            t,
        ))
    })
    .await?;
    let status = reply.into_inner().status();
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(ClientError::NotServing {
            service,
            status: status.as_str_name().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_grpc_canonical() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.5",
            "example.com",
            "[2001:db8::1]",
            "0.0.0.0",
            "localhost.evil",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
