//! Which Greeter replies go out compressed.
//!
//! A client that accepts an encoding of `compression.send` may get compressed replies, but only
//! where compressing pays: a greeting is a few dozen bytes, which compression makes larger at up
//! to four times the CPU of the whole call (BENCHMARKS.md, `benches/compression`). Unary replies
//! are decided one by one by their size (the handler, see `Greeter::respond`). A stream's
//! compression is fixed by tonic before the handler sees the request, and tonic 0.14 ignores a
//! handler's override for streams, so streams are sent plain unless `min_reply_bytes = 0`: this
//! layer hides the client's `grpc-accept-encoding` from them.

use std::task::{Context, Poll};

use tonic::server::NamedService;
use tower::Service;

use crate::{config::CompressionConfig, pb::greeter_server::GreeterServer, service::Greeter};

/// The Greeter's methods whose replies are streams.
const STREAMING_METHODS: [&str; 2] = [
    "/helloworld.Greeter/SayHelloStreamReply",
    "/helloworld.Greeter/SayHelloBidiStream",
];

const ACCEPT_ENCODING: &str = "grpc-accept-encoding";

/// The Greeter with the configured request and reply encodings.
pub fn compressed(
    mut greeter: GreeterServer<Greeter>,
    compression: &CompressionConfig,
) -> ReplyCompression<GreeterServer<Greeter>> {
    for &encoding in &compression.accept {
        greeter = greeter.accept_compressed(encoding.into());
    }
    for &encoding in &compression.send {
        greeter = greeter.send_compressed(encoding.into());
    }
    ReplyCompression {
        inner: greeter,
        plain_streams: compression.min_reply_bytes > 0,
    }
}

/// Sends streams uncompressed unless every reply may be compressed; see the module docs.
#[derive(Debug, Clone)]
pub struct ReplyCompression<S> {
    inner: S,
    plain_streams: bool,
}

impl<S: NamedService> NamedService for ReplyCompression<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for ReplyCompression<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if self.plain_streams && STREAMING_METHODS.contains(&request.uri().path()) {
            request.headers_mut().remove(ACCEPT_ENCODING);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn the_streaming_methods_are_the_greeters_streaming_methods() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let streaming: Vec<String> = set
            .file
            .iter()
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service.iter().flat_map(move |service| {
                    let prefix = format!("/{package}.{}/", service.name());
                    service
                        .method
                        .iter()
                        .filter(|m| m.server_streaming())
                        .map(move |m| format!("{prefix}{}", m.name()))
                })
            })
            .collect();
        assert_eq!(streaming, STREAMING_METHODS);
    }
}
