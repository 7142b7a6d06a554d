//! What a listener speaks, checked before anything else looks at a request.
//!
//! - **Content types.** The gRPC spec says a server SHOULD answer `415` to a request whose
//!   content type is not `application/grpc*`; without this check, tonic reads any body as gRPC
//!   frames (`curl -d '{"name":"x"}'` became "a message of 577659245 bytes"). A `POST` in a content
//!   type the listener does not speak (gRPC always; grpc-web with `[web]`; Connect's JSON and
//!   protobuf with `[connect]`) gets `415`, a plain-text line naming what the port speaks and, when
//!   Connect is off, the setting that turns JSON on, and `Accept-Post` listing the types. A
//!   listener that speaks gRPC alone answers other methods `405` with `Allow: POST`.
//! - **DNS rebinding.** On a plaintext loopback listener (the quick start), any web site could
//!   rebind its own DNS name to 127.0.0.1 and call the local server as if same-origin. Browsers
//!   reach a plaintext server over HTTP/1.1 only, so every request but gRPC over HTTP/2 (grpc-web,
//!   Connect, the page, CORS preflights) must name the server `localhost` or a loopback address,
//!   or get `421`: with `[web]` or with `[connect]` alone alike.
//!
//! gRPC over HTTP/2 passes with one header comparison: the check costs real calls nothing more.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{
    TryFutureExt as _,
    future::{BoxFuture, Either, MapOk, Ready, ready},
};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::Full;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::call::{
    body, connect,
    grpc_headers::{GRPC_CONTENT_TYPE, starts_with_ignore_case},
};

const GRPC_TYPES: &str = "application/grpc, application/grpc+proto";
const GRPC_WEB_TYPES: &str = "application/grpc-web, application/grpc-web+proto, \
    application/grpc-web-text, application/grpc-web-text+proto";
const CONNECT_TYPES: &str =
    "application/json, application/proto, application/connect+json, application/connect+proto";

/// The protocols one listener speaks, and its answers for requests in anything else.
#[derive(Debug)]
pub struct Speaks {
    grpc_web: bool,
    connect: bool,
    /// Browsers must name the server by a loopback host (a plaintext loopback listener).
    loopback_only: bool,
    unsupported: Bytes,
    accept_post: HeaderValue,
}

impl Speaks {
    pub fn new(grpc_web: bool, connect: bool, loopback_only: bool) -> Self {
        let mut names = vec!["gRPC (application/grpc)"];
        let mut types = vec![GRPC_TYPES];
        if grpc_web {
            names.push("grpc-web (application/grpc-web, application/grpc-web-text)");
            types.push(GRPC_WEB_TYPES);
        }
        if connect {
            names.push(
                "Connect (application/json, application/proto, application/connect+json, \
                 application/connect+proto)",
            );
            types.push(CONNECT_TYPES);
        }
        let mut text = format!("this port speaks {}", names.join(" and "));
        if !connect {
            text.push_str(
                "; for JSON or protobuf over plain HTTP (curl), turn on the Connect protocol: \
                 [connect] enabled = true",
            );
        }
        text.push('\n');
        Self {
            grpc_web,
            connect,
            loopback_only,
            unsupported: Bytes::from(text),
            accept_post: HeaderValue::from_str(&types.join(", "))
                .expect("content type lists are valid header values"),
        }
    }

    /// `None` when `request` is for the listener's protocols, else the answer that refuses it.
    pub fn refuse<B>(&self, request: &http::Request<B>) -> Option<http::Response<Body>> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|value| essence(value.as_bytes()));
        let post = request.method() == Method::POST;
        if post && request.version() == http::Version::HTTP_2 && content_type.is_some_and(is_grpc) {
            return None;
        }
        if self.loopback_only && !names_loopback(request) {
            return Some(plain_text(
                StatusCode::MISDIRECTED_REQUEST,
                Bytes::from_static(
                    b"this server answers browsers at localhost or a loopback address only\n",
                ),
            ));
        }
        if !post {
            // The page, CORS preflights and Connect's own 404s answer other methods.
            if self.grpc_web || self.connect {
                return None;
            }
            let mut answer = plain_text(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(b"this port speaks gRPC: every call is a POST\n"),
            );
            answer
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return Some(answer);
        }
        if content_type.is_some_and(|ct| self.speaks(ct)) {
            return None;
        }
        let mut answer = plain_text(StatusCode::UNSUPPORTED_MEDIA_TYPE, self.unsupported.clone());
        answer
            .headers_mut()
            .insert("accept-post", self.accept_post.clone());
        Some(answer)
    }

    fn speaks(&self, content_type: &[u8]) -> bool {
        is_grpc(content_type)
            || (self.grpc_web && starts_with_ignore_case(content_type, b"application/grpc-web"))
            || (self.connect
                && std::str::from_utf8(content_type).is_ok_and(|ct| connect::kind(ct).is_some()))
    }
}

/// A content type without its parameters (`; charset=...`) and surrounding spaces.
fn essence(value: &[u8]) -> &[u8] {
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    value[..end].trim_ascii()
}

/// `application/grpc`, or `application/grpc+<codec>`; not grpc-web's `application/grpc-web`.
fn is_grpc(content_type: &[u8]) -> bool {
    starts_with_ignore_case(content_type, GRPC_CONTENT_TYPE)
        && matches!(content_type.get(GRPC_CONTENT_TYPE.len()), None | Some(b'+'))
}

/// Whether the request names the server `localhost` or a loopback address (HTTP/2's `:authority`,
/// HTTP/1.1's `Host`).
fn names_loopback<B>(request: &http::Request<B>) -> bool {
    let authority = match request.uri().authority() {
        Some(authority) => Some(authority.clone()),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok()),
    };
    authority.is_some_and(|authority| {
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

fn plain_text(status: StatusCode, text: Bytes) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Puts [`Speaks`] in front of a listener's requests.
#[derive(Debug, Clone)]
pub struct GateLayer {
    speaks: Arc<Speaks>,
}

impl GateLayer {
    pub fn new(speaks: Speaks) -> Self {
        Self {
            speaks: Arc::new(speaks),
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            speaks: Arc::clone(&self.speaks),
        }
    }
}

/// See [`GateLayer`].
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    speaks: Arc<Speaks>,
}

type Answer<B> = http::Response<http_body_util::Either<Body, B>>;

/// The most bytes of a refused request's body read and thrown away.
const REFUSED_DRAIN_BYTES: usize = 64 << 10;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Gate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Error: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Answer<ResBody>;
    type Error = S::Error;
    type Future = Either<
        Either<
            Ready<Result<Answer<ResBody>, S::Error>>,
            BoxFuture<'static, Result<Answer<ResBody>, S::Error>>,
        >,
        MapOk<S::Future, fn(http::Response<ResBody>) -> Answer<ResBody>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    /// A refused request's body is drained, so a client still sending it reads the answer
    /// (`body::drain`): over HTTP/2 beside the answer, over HTTP/1.1 before it.
    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Some(answer) = self.speaks.refuse(&request) else {
            return Either::Right(self.inner.call(request).map_ok(passed as fn(_) -> _));
        };
        let answer = answer.map(http_body_util::Either::Left);
        let http1 = request.version() < http::Version::HTTP_2;
        let body = request.into_body();
        if http1 {
            Either::Left(Either::Right(Box::pin(async move {
                body::drain(body, REFUSED_DRAIN_BYTES).await;
                Ok(answer)
            })))
        } else {
            tokio::spawn(body::drain(body, REFUSED_DRAIN_BYTES));
            Either::Left(Either::Left(ready(Ok(answer))))
        }
    }
}

fn passed<B>(response: http::Response<B>) -> Answer<B> {
    response.map(http_body_util::Either::Right)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: http::Version, method: Method, content_type: &str) -> http::Request<()> {
        http::Request::builder()
            .version(version)
            .method(method)
            .uri("http://localhost/helloworld.Greeter/SayHello")
            .header(header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    fn status(speaks: &Speaks, request: &http::Request<()>) -> Option<u16> {
        speaks
            .refuse(request)
            .map(|answer| answer.status().as_u16())
    }

    #[test]
    fn content_types_by_what_the_listener_speaks() {
        let h2 = http::Version::HTTP_2;
        let post = |ct| request(h2, Method::POST, ct);
        let grpc_only = Speaks::new(false, false, false);
        let everything = Speaks::new(true, true, false);
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC; charset=utf-8",
        ] {
            assert_eq!(status(&grpc_only, &post(ct)), None, "{ct}");
        }
        for ct in [
            "application/json",
            "text/plain",
            "application/grpc-web+proto",
            "application/grpcx",
            "",
        ] {
            assert_eq!(status(&grpc_only, &post(ct)), Some(415), "{ct}");
        }
        for ct in [
            "application/grpc-web-text",
            "application/json; charset=utf-8",
            "application/connect+proto",
        ] {
            assert_eq!(status(&everything, &post(ct)), None, "{ct}");
        }
        assert_eq!(
            status(&everything, &post("application/x-www-form-urlencoded")),
            Some(415)
        );
        // gRPC alone: other methods are 405; with a browser protocol, the page answers them.
        let get = request(h2, Method::GET, "");
        assert_eq!(status(&grpc_only, &get), Some(405));
        assert_eq!(status(&everything, &get), None);
    }

    #[test]
    fn the_refusal_says_what_the_port_speaks_and_how_to_get_json() {
        let answer = Speaks::new(false, false, false)
            .refuse(&request(
                http::Version::HTTP_2,
                Method::POST,
                "application/json",
            ))
            .unwrap();
        assert_eq!(answer.headers()["accept-post"], GRPC_TYPES);
        let speaks = Speaks::new(false, false, false);
        let text = String::from_utf8(speaks.unsupported.to_vec()).unwrap();
        assert!(text.contains("[connect] enabled = true"), "{text}");
        let speaks = Speaks::new(true, true, false);
        let text = String::from_utf8(speaks.unsupported.to_vec()).unwrap();
        assert!(text.contains("Connect (application/json"), "{text}");
        assert!(!text.contains("enabled = true"), "{text}");
        assert_eq!(
            speaks.accept_post,
            [GRPC_TYPES, GRPC_WEB_TYPES, CONNECT_TYPES].join(", ")
        );
    }

    #[test]
    fn browsers_must_name_a_loopback_listener_by_a_loopback_host() {
        let named = |host: &str| {
            http::Request::post("/helloworld.Greeter/SayHello")
                .header(header::HOST, host)
                .header(header::CONTENT_TYPE, "application/json")
                .body(())
                .unwrap()
        };
        let loopback = Speaks::new(false, true, true);
        for host in [
            "localhost:50051",
            "LOCALHOST",
            "127.0.0.1:50051",
            "127.9.9.9",
            "[::1]:50051",
        ] {
            assert_eq!(status(&loopback, &named(host)), None, "{host}");
        }
        for host in [
            "attacker.example",
            "localhost.evil.example",
            "10.0.0.1:50051",
            "[::2]",
            "",
        ] {
            assert_eq!(status(&loopback, &named(host)), Some(421), "{host}");
        }
        // gRPC over HTTP/2 is no browser's: it is never checked.
        let grpc = http::Request::post("http://attacker.example/helloworld.Greeter/SayHello")
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(status(&loopback, &grpc), None);
        let mut web = grpc;
        *web.version_mut() = http::Version::HTTP_11;
        assert_eq!(status(&loopback, &web), Some(421));
        // A listener that is not plaintext on loopback answers any host.
        let exposed = Speaks::new(false, true, false);
        assert_eq!(status(&exposed, &named("attacker.example")), None);
    }
}
