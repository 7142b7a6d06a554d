//! `helloworld.Greeter`: the four RPCs.
//!
//! Streams here are lazy: a reply is produced only when the transport asks for the next one, so a
//! slow reader applies backpressure through HTTP/2 flow control all the way to this code, nothing
//! is buffered beyond the stream window, and dropping the response (client gone) drops the work.

use std::{pin::Pin, sync::Arc};

use prost::Message as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming, codec::SingleMessageCompressionOverride};

use super::{compression::ACCEPT_ENCODING, validate_name};
use crate::{
    config::{GreeterConfig, Problem, Section},
    pb::{HelloReply, HelloRequest, greeter_server},
};

/// The stream type of both streaming RPCs.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send + 'static>>;

impl Section for GreeterConfig {
    /// Names can be greeted (a byte at least), and every greeting streamed is visible text.
    fn check(&self) -> Result<(), Problem> {
        if self.max_name_bytes == 0 {
            return Err(Problem {
                key: "greeter.max_name_bytes",
                message: "must be at least 1".into(),
            });
        }
        if self.stream_greetings.is_empty() {
            return Err(Problem {
                key: "greeter.stream_greetings",
                message: "must hold at least one greeting".into(),
            });
        }
        if let Some(bad) = self
            .stream_greetings
            .iter()
            .find(|g| g.trim().is_empty() || g.chars().any(char::is_control))
        {
            return Err(Problem {
                key: "greeter.stream_greetings",
                message: format!("{bad:?} is empty or holds a control character"),
            });
        }
        Ok(())
    }
}

/// The Greeter service; cheap to clone (shares its settings).
#[derive(Debug, Clone)]
pub struct Greeter {
    settings: Arc<GreeterConfig>,
    /// `compression.min_reply_bytes`.
    min_compressed_bytes: usize,
}

/// The largest request message the Greeter reads: a HelloRequest is one name, so anything much
/// larger than `greeter.max_name_bytes` is refused (RESOURCE_EXHAUSTED) as soon as its length is
/// announced, before it is buffered. Names up to twice the limit still reach the handler, and get
/// the precise INVALID_ARGUMENT with its BadRequest details.
pub fn max_request_bytes(settings: &GreeterConfig) -> usize {
    settings.max_name_bytes.saturating_mul(2).saturating_add(64)
}

impl Greeter {
    pub fn new(settings: GreeterConfig, min_compressed_bytes: usize) -> Self {
        Self {
            settings: Arc::new(settings),
            min_compressed_bytes,
        }
    }

    /// A unary reply, sent uncompressed when smaller than `compression.min_reply_bytes` even to a
    /// client that accepts compression (streams: `service::compression`).
    fn respond(
        &self,
        greeting: &str,
        request: &Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let reply = self.greet(greeting, &request.get_ref().name)?;
        // A client that names no encoding it accepts gets no compression anyway: the override
        // would cost its reply an extension map and a box for nothing (most clients by default).
        let small = reply.encoded_len() < self.min_compressed_bytes
            && request.metadata().contains_key(ACCEPT_ENCODING);
        let mut response = Response::new(reply);
        if small {
            response
                .extensions_mut()
                .insert(SingleMessageCompressionOverride::Disable);
        }
        Ok(response)
    }

    fn greet(&self, greeting: &str, name: &str) -> Result<HelloReply, Status> {
        let name = validate_name(name, self.settings.max_name_bytes)?;
        Ok(HelloReply {
            message: format!("{greeting}, {name}!"),
        })
    }
}

#[tonic::async_trait]
impl greeter_server::Greeter for Greeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.respond("Hello", &request)
    }

    async fn say_hello_again(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        self.respond("Hello again", &request)
    }

    type SayHelloStreamReplyStream = ReplyStream;

    /// One greeting per configured language, `stream_interval` apart. The name is validated once,
    /// up front, so a bad name fails the call before any reply is sent.
    async fn say_hello_stream_reply(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<Self::SayHelloStreamReplyStream>, Status> {
        let name = validate_name(&request.get_ref().name, self.settings.max_name_bytes)?.to_owned();
        let settings = Arc::clone(&self.settings);
        let replies = (0..settings.stream_greetings.len()).map(move |i| {
            Ok(HelloReply {
                message: format!("{}, {name}!", settings.stream_greetings[i]),
            })
        });
        // The pause goes before every greeting but the first, so the stream ends as soon as the
        // last greeting is sent (a throttle would idle one more interval before ending).
        let interval = self.settings.stream_interval;
        let stream = tokio_stream::iter(replies.enumerate()).then(move |(i, reply)| async move {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            reply
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type SayHelloBidiStreamStream = ReplyStream;

    /// A reply per request, in order, as each arrives. An invalid name ends the stream with
    /// INVALID_ARGUMENT (a gRPC stream carries one final status); the replies before it stand.
    async fn say_hello_bidi_stream(
        &self,
        request: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<Self::SayHelloBidiStreamStream>, Status> {
        let this = self.clone();
        let replies = request
            .into_inner()
            .map(move |request| this.greet("Hello", &request?.name));
        Ok(Response::new(Box::pin(replies)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn greetings_must_be_visible_text_and_names_at_least_a_byte() {
        let config = Config::embedded().greeter;
        assert!(config.check().is_ok());
        for bad in [" ", "", "tab\there", "bell\u{7}"] {
            let mut greeter = config.clone();
            greeter.stream_greetings = vec!["Hi".into(), bad.into()];
            let problem = greeter.check().unwrap_err();
            assert_eq!(problem.key, "greeter.stream_greetings", "{bad:?}");
        }
        let mut greeter = config;
        greeter.max_name_bytes = 0;
        assert_eq!(greeter.check().unwrap_err().key, "greeter.max_name_bytes");
    }
}
