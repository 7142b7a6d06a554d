//! Client subcommands: one channel builder, one error type, and the calls.

use std::{future::Future, path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::{io::AsyncBufReadExt as _, net::UnixStream};
use tokio_stream::{StreamExt as _, wrappers::LinesStream};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use tower::service_fn;

use crate::{
    cli::ClientArgs,
    pb::{HelloRequest, greeter_client::GreeterClient},
};

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
    authorization: Option<MetadataValue<Ascii>>,
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
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
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
    let authorization = args
        .token
        .as_deref()
        .map(|token| {
            format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| ClientError::Token("not a valid header value".into()))
        })
        .transpose()?;
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
    let channel = connected.map_err(|e| ClientError::Connect {
        addr: target,
        reason: error_chain(&e),
    })?;
    Ok(Session {
        channel,
        authorization,
    })
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

/// Calls SayHelloStreamReply and hands each greeting to `print` as it arrives.
pub async fn stream(
    args: &ClientArgs,
    name: String,
    mut print: impl FnMut(&str),
) -> Result<(), ClientError> {
    let session = connect(args).await?;
    let mut client = GreeterClient::new(session.channel.clone());
    let timeout = Some(args.timeout.unwrap_or(DEFAULT_TIMEOUT));
    with_deadline("SayHelloStreamReply", timeout, |t| async move {
        let mut replies = client
            .say_hello_stream_reply(session.request(HelloRequest { name }, t))
            .await?
            .into_inner();
        while let Some(reply) = replies.message().await? {
            print(&reply.message);
        }
        Ok(())
    })
    .await
}

/// Calls SayHelloBidiStream with one name per stdin line, handing replies to `print` as they come.
pub async fn chat(args: &ClientArgs, mut print: impl FnMut(&str)) -> Result<(), ClientError> {
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
    with_deadline("SayHelloBidiStream", args.timeout, |t| async move {
        let mut replies = client
            .say_hello_bidi_stream(session.request(names, t))
            .await?
            .into_inner();
        while let Some(reply) = replies.message().await? {
            print(&reply.message);
        }
        Ok(())
    })
    .await?;
    match error_rx.try_recv() {
        Ok(e) => Err(ClientError::Stdin(e)),
        Err(_) => Ok(()),
    }
}

/// Checks health of `service` and succeeds only when it is SERVING.
pub async fn health(args: &ClientArgs, service: String) -> Result<(), ClientError> {
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
}
