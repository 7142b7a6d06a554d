//! The Connect protocol (connectrpc.com/docs/protocol), translated to gRPC at the edge.
//!
//! Connect is what curl, `fetch`, buf curl and the Connect clients (connect-go, connect-es,
//! connect-swift, connect-kotlin) speak: a unary call is a `POST` of one JSON or protobuf message,
//! answered with one message or a JSON error; streams are enveloped messages ending in an
//! end-of-stream message. [`Connect`] sits where grpc-web's translation sits, above the call
//! stack: a Connect call becomes a gRPC call (same path, metadata and credentials,
//! `connect-timeout-ms` as `grpc-timeout`, framed protobuf), so request ids, metrics (with the
//! method's own `grpc_type`), the access line, auth, limits, message limits and deadlines apply to
//! it unchanged; the gRPC response becomes Connect's on the way out.
//!
//! JSON is protobuf's canonical JSON mapping, from the descriptor sets reflection serves
//! (prost-reflect), so every served method speaks it without code per message.
//!
//! What is answered here, before the stack (so without an access line): paths no service has
//! (`404`, `unimplemented`), a content type that does not fit the method's kind (`415`), an invalid
//! `connect-timeout-ms` or `connect-protocol-version` (`400`), an encoding other than gzip or
//! identity (`501`). Streams of all kinds are served, bidi as full duplex over HTTP/2 (HTTP/1.1
//! clients send every message before they read replies). `GET` for idempotent methods is not
//! served.

mod codec;
mod protocol;
mod request;
mod response;

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{
    TryFutureExt as _,
    future::{Either, MapOk},
};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt as _};

use crate::{
    call::grpc_headers::GRPC_STATUS,
    config::{CompressionConfig, Encoding},
    methods::MethodKind,
};

// The envelope, gzip and timeout parsers are public for fuzz/ (connect_message, timeouts), which
// holds them to oracles directly rather than through a whole call.
pub use codec::{Codec, gunzip};
pub use protocol::{Framing, envelope, grpc_timeout, kind, split_envelope};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the Connect translation could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the served descriptor sets do not describe their messages: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
}

/// One served method, as translation needs it.
#[derive(Debug)]
pub struct Rpc {
    input: MessageDescriptor,
    output: MessageDescriptor,
    kind: MethodKind,
    /// The most request bytes one message may take as sent (JSON or protobuf, before inflating
    /// gzip and after): twice the method's message limit, as JSON runs longer than protobuf.
    max_request_bytes: usize,
}

/// Every served method by path, the descriptors for JSON, and the compression settings.
#[derive(Debug)]
pub struct Translator {
    methods: HashMap<String, Arc<Rpc>>,
    pool: DescriptorPool,
    accept_gzip: bool,
    send_gzip: bool,
    min_reply_bytes: usize,
}

impl Translator {
    /// `descriptor_sets`: what the server serves (and describes by reflection);
    /// `message_limit`: the largest request message of a method, by path.
    pub fn new(
        descriptor_sets: &[&[u8]],
        compression: &CompressionConfig,
        message_limit: impl Fn(&str) -> usize,
    ) -> Result<Self, ConnectError> {
        let mut pool = DescriptorPool::new();
        for set in descriptor_sets {
            pool.decode_file_descriptor_set(*set)?;
        }
        let methods = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .map(|method| {
                let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
                let kind = match (method.is_client_streaming(), method.is_server_streaming()) {
                    (false, false) => MethodKind::Unary,
                    (true, false) => MethodKind::ClientStream,
                    (false, true) => MethodKind::ServerStream,
                    (true, true) => MethodKind::BidiStream,
                };
                let rpc = Rpc {
                    input: method.input(),
                    output: method.output(),
                    kind,
                    max_request_bytes: message_limit(&path).saturating_mul(2),
                };
                (path, Arc::new(rpc))
            })
            .collect();
        Ok(Self {
            methods,
            pool,
            accept_gzip: compression.accept.contains(&Encoding::Gzip),
            send_gzip: compression.send.contains(&Encoding::Gzip),
            min_reply_bytes: compression.min_reply_bytes,
        })
    }
}

/// Adds Connect to a listener's calls; see [`Connect`].
#[derive(Debug, Clone)]
pub struct ConnectLayer {
    translator: Arc<Translator>,
}

impl ConnectLayer {
    pub fn new(translator: Arc<Translator>) -> Self {
        Self { translator }
    }

    /// Connect in front of `other`, translated calls going to `calls`: grpc-web puts its own
    /// translation in `other`, so both share the page's checks and CORS.
    pub fn with_other<T, O>(translator: Option<&Self>, calls: T, other: O) -> Connect<T, O> {
        Connect {
            translator: translator.map(|layer| Arc::clone(&layer.translator)),
            calls: Arc::new(calls),
            other,
            refuse_http1: false,
        }
    }
}

impl<S: Clone> Layer<S> for ConnectLayer {
    type Service = Connect<S, S>;

    /// Alone (without `[web]`), Connect is what HTTP/1.1 is on for: other HTTP/1.1 requests are
    /// refused here rather than reach the gRPC stack, which answers only over HTTP/2.
    fn layer(&self, inner: S) -> Self::Service {
        Connect {
            refuse_http1: true,
            ..Self::with_other(Some(self), inner.clone(), inner)
        }
    }
}

/// Connect calls are translated and served by `calls`; every other request goes to `other`
/// untouched (and, without a translator, every request does).
///
/// hyper clones the service for every request: `calls` sits behind an `Arc` and is cloned only for
/// the requests that take it, so gRPC calls pay one reference count for Connect.
#[derive(Debug, Clone)]
pub struct Connect<T, O> {
    translator: Option<Arc<Translator>>,
    calls: Arc<T>,
    other: O,
    refuse_http1: bool,
}

type Answer<B> = http::Response<http_body_util::Either<Body, B>>;
type Translated<B> = Pin<Box<dyn Future<Output = Result<Answer<B>, Infallible>> + Send>>;

impl<T, O, ReqBody, CallBody, OtherBody> Service<http::Request<ReqBody>> for Connect<T, O>
where
    T: Service<http::Request<Body>, Response = http::Response<CallBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    T::Future: Send,
    CallBody: http_body::Body<Data = Bytes> + Send + 'static,
    CallBody::Error: Into<BoxError>,
    O: Service<http::Request<ReqBody>, Response = http::Response<OtherBody>, Error = Infallible>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    OtherBody: Send + 'static,
{
    type Response = Answer<OtherBody>;
    type Error = Infallible;
    type Future = Either<
        Translated<OtherBody>,
        MapOk<O::Future, fn(http::Response<OtherBody>) -> Answer<OtherBody>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.other.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if let Some(translator) = &self.translator
            && let Some((framing, codec)) = protocol::classify(&request)
        {
            let translator = Arc::clone(translator);
            let calls = T::clone(&self.calls);
            Either::Left(Box::pin(async move {
                let answer = serve(&translator, calls, request, framing, codec).await;
                Ok(answer.map(http_body_util::Either::Left))
            }))
        } else if self.refuse_http1 && request.version() < http::Version::HTTP_2 {
            let answer = response::not_connect(request.method());
            Either::Left(Box::pin(std::future::ready(Ok(
                answer.map(http_body_util::Either::Left)
            ))))
        } else {
            Either::Right(self.other.call(request).map_ok(other_answer as fn(_) -> _))
        }
    }
}

fn other_answer<B>(response: http::Response<B>) -> Answer<B> {
    response.map(http_body_util::Either::Right)
}

/// One Connect call: translated, served by the call stack, its answer translated back.
async fn serve<T, ReqBody, CallBody>(
    translator: &Arc<Translator>,
    calls: T,
    request: http::Request<ReqBody>,
    framing: Framing,
    codec: Codec,
) -> http::Response<Body>
where
    T: Service<http::Request<Body>, Response = http::Response<CallBody>, Error = Infallible>,
    CallBody: http_body::Body<Data = Bytes> + Send + 'static,
    CallBody::Error: Into<BoxError>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
{
    let http1 = request.version() < http::Version::HTTP_2;
    let (parts, body) = request.into_parts();
    let unread = request::Unread::new(body);
    let (grpc, plan) = match request::translate(translator, parts, &unread, framing, codec) {
        Ok(translated) => translated,
        Err(refusal) => {
            unread.discard(http1, request::REFUSED_DRAIN_BYTES).await;
            return response::refusal(refusal);
        }
    };
    let Ok(answer) = calls.oneshot(grpc).await;
    if answer.headers().contains_key(GRPC_STATUS) {
        unread.discard(http1, plan.rpc.max_request_bytes).await;
    }
    match framing {
        Framing::Unary => response::unary(plan, answer).await,
        Framing::Stream => response::stream(plan, answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::BodyExt as _;
    use prost::Message as _;
    use request::Plan;

    fn translator() -> Arc<Translator> {
        let sets = [crate::pb::FILE_DESCRIPTOR_SET];
        let compression = Config::embedded().compression;
        Arc::new(Translator::new(&sets, &compression, |_| 100).unwrap())
    }

    fn plan(path: &str) -> Plan {
        let translator = translator();
        Plan {
            rpc: Arc::clone(&translator.methods[path]),
            translator,
            codec: Codec::Json,
            gzip_replies: false,
        }
    }

    fn hello_reply(message: &str) -> Vec<u8> {
        crate::pb::HelloReply {
            message: message.into(),
        }
        .encode_to_vec()
    }

    /// A gRPC answer as the call stack gives it: headers with `x-head` and the gRPC ones, one
    /// HelloReply, then trailers with the status and `x-trail` (twice).
    fn grpc_answer(message: &str) -> http::Response<Body> {
        grpc_frames(
            "identity",
            vec![protocol::envelope(0, &hello_reply(message))],
        )
    }

    /// [`grpc_answer`] with other frames, sent with `grpc-encoding: encoding`.
    fn grpc_frames(encoding: &'static str, frames: Vec<Bytes>) -> http::Response<Body> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.append("x-trail", "t1".parse().unwrap());
        trailers.append("x-trail", "t2".parse().unwrap());
        let frames = frames
            .into_iter()
            .map(http_body::Frame::data)
            .chain([http_body::Frame::trailers(trailers)])
            .map(Ok::<_, Infallible>);
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-encoding", encoding)
            .header("x-head", "h")
            .body(Body::new(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            )))
            .unwrap()
    }

    async fn json_body(answer: http::Response<Body>) -> serde_json::Value {
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    /// tonic compresses a reply only for a request that asks (`grpc-accept-encoding`), which a
    /// translated request never does; a compressed reply is still read, if its encoding is gzip.
    #[tokio::test]
    async fn a_compressed_reply_is_inflated_if_its_encoding_is_gzip() {
        let frame = protocol::envelope(protocol::COMPRESSED, &codec::gzip(&hello_reply("hi")));
        let say_hello = "/helloworld.Greeter/SayHello";
        let gzipped = grpc_frames("gzip", vec![frame.clone()]);
        let answer = response::unary(plan(say_hello), gzipped).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(
            json_body(answer).await,
            serde_json::json!({"message": "hi"})
        );
        let answer = response::unary(plan(say_hello), grpc_frames("zstd", vec![frame])).await;
        assert_eq!(answer.status(), 500);
        assert_eq!(json_body(answer).await["code"], "internal");
    }

    #[tokio::test]
    async fn a_unary_reply_of_two_messages_is_an_internal_error() {
        let frame = protocol::envelope(0, &hello_reply("hi"));
        let frames = vec![frame.clone(), frame];
        let answer = response::unary(
            plan("/helloworld.Greeter/SayHello"),
            grpc_frames("identity", frames),
        )
        .await;
        assert_eq!(answer.status(), 500);
        assert_eq!(json_body(answer).await["code"], "internal");
    }

    /// The translated request keeps the caller's metadata and none of the headers that describe
    /// the Connect request itself (the gate has already read `host`).
    #[test]
    fn translation_keeps_metadata_and_drops_connects_own_headers() {
        let request = http::Request::post("/helloworld.Greeter/SayHelloStreamReply")
            .header("content-type", "application/connect+json")
            .header("host", "localhost")
            .header("connect-accept-encoding", "gzip")
            .header("connect-timeout-ms", "250")
            .header("grpc-timeout", "1n")
            .header("authorization", "Bearer token")
            .header("x-custom", "c")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let (parts, body) = request.into_parts();
        let unread = request::Unread::new(body);
        let translated =
            request::translate(&translator(), parts, &unread, Framing::Stream, Codec::Json);
        let Ok((grpc, _)) = translated else {
            panic!("a valid Connect request is translated");
        };
        let mut names: Vec<_> = grpc.headers().keys().map(|name| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "authorization",
                "content-type",
                "grpc-timeout",
                "te",
                "x-custom"
            ]
        );
        assert_eq!(grpc.headers()["grpc-timeout"], "250m");
        assert_eq!(grpc.headers()["content-type"], "application/grpc");
    }

    #[tokio::test]
    async fn unary_metadata_is_headers_and_trailer_headers() {
        let answer = response::unary(plan("/helloworld.Greeter/SayHello"), grpc_answer("hi")).await;
        let headers = answer.headers();
        assert_eq!(headers["x-head"], "h");
        let trailer: Vec<_> = headers.get_all("trailer-x-trail").iter().collect();
        assert_eq!(trailer, ["t1", "t2"]);
        assert!(
            headers.keys().all(|name| !name.as_str().contains("grpc-")),
            "{headers:?}"
        );
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"{"message":"hi"}"#);
    }

    #[tokio::test]
    async fn stream_metadata_is_headers_and_the_end_of_stream_metadata() {
        let answer = response::stream(
            plan("/helloworld.Greeter/SayHelloStreamReply"),
            grpc_answer("hi"),
        );
        assert_eq!(answer.headers()["x-head"], "h");
        assert!(answer.headers().get("grpc-encoding").is_none());
        let mut body =
            bytes::BytesMut::from(answer.into_body().collect().await.unwrap().to_bytes());
        let (_, reply) = protocol::split_envelope(&mut body, usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(reply, r#"{"message":"hi"}"#);
        let (flags, end) = protocol::split_envelope(&mut body, usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(flags, 2, "end of stream");
        let end: serde_json::Value = serde_json::from_slice(&end).unwrap();
        assert_eq!(
            end,
            serde_json::json!({"metadata": {"x-trail": ["t1", "t2"]}})
        );
    }

    #[test]
    fn every_served_method_is_translated() {
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            tonic_types::pb::FILE_DESCRIPTOR_SET,
        ];
        let translator = Translator::new(&sets, &Config::embedded().compression, |_| 100).unwrap();
        let served = crate::methods::served_methods(&sets);
        assert_eq!(translator.methods.len(), served.len());
        for method in served {
            let rpc = &translator.methods[&method.path()];
            assert_eq!(rpc.kind, method.kind, "{}", method.path());
            assert_eq!(rpc.max_request_bytes, 200);
        }
        assert!(
            translator
                .pool
                .get_message_by_name("google.rpc.BadRequest")
                .is_some()
        );
    }
}
