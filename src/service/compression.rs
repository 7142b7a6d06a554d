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

use crate::{
    call::resolve::Resolved,
    config::CompressionConfig,
    methods::served_methods,
    pb::{self, greeter_server::GreeterServer},
    service::Greeter,
};

/// The encodings a gRPC client accepts in replies.
pub(super) const ACCEPT_ENCODING: &str = "grpc-accept-encoding";

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
    ReplyCompression { inner: greeter }
}

/// The paths whose replies go plain: the Greeter's streaming methods, from its descriptor, or
/// none with `min_reply_bytes = 0`. Resolved once per method ([`crate::call::resolve`]).
pub fn plain_streams(compression: &CompressionConfig) -> Vec<String> {
    if compression.min_reply_bytes > 0 {
        served_methods(&[pb::FILE_DESCRIPTOR_SET])
            .into_iter()
            .filter(|method| method.kind.server_streams())
            .map(|method| method.path())
            .collect()
    } else {
        Vec::new()
    }
}

/// Sends streams uncompressed unless every reply may be compressed; see the module docs.
#[derive(Debug, Clone)]
pub struct ReplyCompression<S> {
    inner: S,
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
        if Resolved::of(&request).plain_replies {
            request.headers_mut().remove(ACCEPT_ENCODING);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_streaming_methods_go_plain_unless_every_reply_may_be_compressed() {
        let mut config = Config::embedded().compression;
        assert_eq!(
            plain_streams(&config),
            [
                "/helloworld.Greeter/SayHelloStreamReply",
                "/helloworld.Greeter/SayHelloBidiStream",
            ]
        );
        config.min_reply_bytes = 0;
        assert!(plain_streams(&config).is_empty());
    }
}
