//! The "bare tonic" Greeter: the framework's ceiling, for `benches/compare`.
//!
//! `tonic::transport::Server` with only the generated `GreeterServer` (shared with greeter through
//! `greeter::pb`), default settings, no layers, no health, no reflection, no limits, no logging:
//! what a tonic quick start serves. greeter's own stack is measured as a ratio to this.
//!
//! ```sh
//! cargo run --release --example bare_tonic -- 127.0.0.1:50061
//! ```
//!
//! Listens on the address given as the first argument (default `127.0.0.1:50061`) and exits 0 on
//! SIGTERM or SIGINT.

use std::{net::SocketAddr, pin::Pin};

use greeter::pb::{
    HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming, transport::Server};

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send + 'static>>;

#[derive(Debug, Default)]
struct Bare;

fn hello(greeting: &str, name: &str) -> HelloReply {
    HelloReply {
        message: format!("{greeting}, {name}!"),
    }
}

#[tonic::async_trait]
impl Greeter for Bare {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(hello("Hello", &request.get_ref().name)))
    }

    async fn say_hello_again(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(hello("Hello again", &request.get_ref().name)))
    }

    type SayHelloStreamReplyStream = ReplyStream;

    async fn say_hello_stream_reply(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<Self::SayHelloStreamReplyStream>, Status> {
        let name = request.into_inner().name;
        let replies = ["Hello", "Bonjour", "Hola"].map(|g| Ok(hello(g, &name)));
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    type SayHelloBidiStreamStream = ReplyStream;

    /// A greeting per request, as each arrives (echo style).
    async fn say_hello_bidi_stream(
        &self,
        request: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<Self::SayHelloBidiStreamStream>, Status> {
        let replies = request
            .into_inner()
            .map(|request| request.map(|r| hello("Hello", &r.name)));
        Ok(Response::new(Box::pin(replies)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:50061")
        .parse()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    eprintln!("bare tonic Greeter listening on {addr}");
    Server::builder()
        .add_service(GreeterServer::new(Bare))
        .serve_with_shutdown(addr, stop)
        .await?;
    Ok(())
}
