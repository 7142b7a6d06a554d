//! Browsers: grpc-web translation (tonic-web), CORS from `[web]`, and the demo page at `/`.
//! Connect calls, when `[connect]` is on, take the same CORS and page checks (`call::connect`).
//!
//! Browsers cannot speak gRPC itself (fetch exposes neither HTTP/2 trailers nor framing), so
//! grpc-web carries the trailers in the body. [`WebLayer`] sits above the call stack: a grpc-web
//! call is translated into a gRPC call before request ids, metrics, limits, auth and deadlines see
//! it, so a browser's call is logged, counted, limited and authorized like any other. gRPC calls
//! go straight to the call stack: through CORS and tonic-web they would pay for two boxed bodies
//! and CORS headers on every answer (7% more CPU per call, measured with h2load).
//!
//! On a plaintext loopback listener (the quick start) browsers are answered only when they name
//! the server `localhost` or a loopback address, against DNS rebinding: [`super::gate`] checks
//! that before this layer, for Connect alone too.

use std::{
    convert::Infallible,
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{
    TryFutureExt as _,
    future::{self, Either, MapOk, Ready},
};
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::Full;
use tonic::body::Body;
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower::{
    Layer, Service, ServiceExt as _,
    util::{MapResponse, Oneshot},
};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

use crate::{
    call::connect::{Connect, ConnectLayer},
    config::{Problem, Section, WebConfig},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The files of the page, embedded: the binary ships `FROM scratch`, with nothing beside it.
const FILES: [(&str, &str, &str); 3] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("web/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("web/style.css"),
    ),
];

/// The page loads its own script and style and talks to this server only: a link that prefills
/// another server (`?server=`) cannot make the page send a pasted token elsewhere. No other site
/// may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Request headers a grpc-web or Connect client sends (grpc-web's own list, Connect's, plus
/// credentials and request id).
const ALLOWED_HEADERS: [&str; 11] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-accept-encoding",
    "authorization",
    "x-request-id",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-content-encoding",
    "connect-accept-encoding",
];

/// Response headers a cross-origin page may read: trailers-only answers carry the status in
/// headers, and the request id ties a browser's error to the server's access log.
const EXPOSED_HEADERS: [&str; 5] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
    "connect-content-encoding",
];

/// Routes gRPC calls to the call stack, and everything else through CORS, the page and grpc-web
/// translation to the same stack.
#[derive(Debug, Clone)]
pub struct WebLayer {
    cors: CorsLayer,
    connect: Option<ConnectLayer>,
}

impl WebLayer {
    /// # Panics
    /// On an origin [`WebConfig::check`] refuses: `config` comes from `Config::load`, which ran it.
    pub fn new(config: &WebConfig) -> Self {
        let origins = if config.allowed_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            let list = config
                .allowed_origins
                .iter()
                .map(|origin| {
                    HeaderValue::from_str(origin).expect("web.allowed_origins were checked")
                })
                .collect::<Vec<_>>();
            AllowOrigin::list(list)
        };
        let cors = CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(config.cors_max_age);
        Self {
            cors,
            connect: None,
        }
    }

    /// Connect calls (`[connect]`) too: they take the same page checks and CORS as grpc-web.
    #[must_use]
    pub fn with_connect(self, connect: Option<ConnectLayer>) -> Self {
        Self { connect, ..self }
    }
}

impl Section for WebConfig {
    /// Origins as browsers send them in `Origin`, since CORS compares them byte for byte; `"*"`
    /// only alone.
    fn check(&self) -> Result<(), Problem> {
        let problem = |message| {
            Err(Problem {
                key: "web.allowed_origins",
                message,
            })
        };
        let allowed = &self.allowed_origins;
        if allowed.iter().any(|o| o == "*") {
            if allowed.len() > 1 {
                return problem("\"*\" allows every origin: give it alone, or list origins".into());
            }
            return Ok(());
        }
        for origin in allowed {
            if let Some(why) = origin_problem(origin) {
                return problem(format!(
                    "{origin:?} is not an origin as browsers send it: {why}"
                ));
            }
        }
        Ok(())
    }
}

/// Why `text` is not an origin as browsers send it in `Origin`: `http` or `https`, a lowercase
/// host, a port only when not the scheme's default, nothing after.
fn origin_problem(text: &str) -> Option<&'static str> {
    let Ok(uri) = text.parse::<http::Uri>() else {
        return Some("write scheme://host[:port], no path");
    };
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Some("write scheme://host[:port], no path");
    };
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Some("the scheme is http or https"),
    };
    if text.ends_with('/')
        || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        || text.contains('@')
    {
        return Some("write scheme://host[:port], no path");
    }
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some("browsers send it in lowercase");
    }
    if authority.port_u16() == Some(default_port) {
        return Some("browsers leave out the scheme's default port");
    }
    None
}

impl<S: Clone> Layer<S> for WebLayer {
    type Service = Web<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let translated = ConnectLayer::with_other(
            self.connect.as_ref(),
            inner.clone(),
            GrpcWebLayer::new().layer(inner.clone()),
        );
        Web {
            web: Arc::new(self.cors.layer(Page {
                inner: MapResponse::new(translated, one_body as OneBody),
            })),
            grpc: inner,
        }
    }
}

/// See [`WebLayer`].
///
/// hyper clones the service for every request; the web side is shared and cloned only for the
/// requests that take it, since a CORS configuration's clone allocates.
#[derive(Debug, Clone)]
pub struct Web<S> {
    web: Arc<WebStack<S>>,
    grpc: S,
}

type Answer<B> = http::Response<http_body_util::Either<Body, B>>;
type WebStack<S> = Cors<Page<MapResponse<Connect<S, GrpcWebService<S>>, OneBody>>>;
type OneBody = fn(http::Response<http_body_util::Either<Body, Body>>) -> http::Response<Body>;

/// Connect's answers and grpc-web's, as the one body type the page and CORS pass on.
fn one_body(response: http::Response<http_body_util::Either<Body, Body>>) -> http::Response<Body> {
    response.map(|body| match body {
        http_body_util::Either::Left(body) | http_body_util::Either::Right(body) => body,
    })
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Web<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>, Error = Infallible>
        + Service<http::Request<Body>, Response = http::Response<ResBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <S as Service<http::Request<Body>>>::Future: Send,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError> + fmt::Display,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError> + fmt::Display,
{
    type Response = Answer<ResBody>;
    type Error = Infallible;
    type Future = Either<
        MapOk<
            Oneshot<WebStack<S>, http::Request<ReqBody>>,
            fn(http::Response<Body>) -> Answer<ResBody>,
        >,
        MapOk<
            <S as Service<http::Request<ReqBody>>>::Future,
            fn(http::Response<ResBody>) -> Answer<ResBody>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        <S as Service<http::Request<ReqBody>>>::poll_ready(&mut self.grpc, cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if is_grpc(&request) {
            Either::Right(self.grpc.call(request).map_ok(grpc_answer as fn(_) -> _))
        } else {
            let web = WebStack::clone(&self.web);
            Either::Left(web.oneshot(request).map_ok(web_answer as fn(_) -> _))
        }
    }
}

fn web_answer<B>(response: http::Response<Body>) -> Answer<B> {
    response.map(http_body_util::Either::Left)
}

fn grpc_answer<B>(response: http::Response<B>) -> Answer<B> {
    response.map(http_body_util::Either::Right)
}

/// A gRPC call proper: `POST` over HTTP/2 with a gRPC content type that is not grpc-web's.
fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request.version() == http::Version::HTTP_2
        && request.method() == Method::POST
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|ct| {
                ct.starts_with("application/grpc") && !ct.starts_with("application/grpc-web")
            })
}

/// Answers `GET`/`HEAD` with the page's files (404 for any other path), and hands every other
/// request to grpc-web translation: gRPC calls are always `POST`.
#[derive(Debug, Clone)]
pub struct Page<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Page<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = if request.method() != Method::GET && request.method() != Method::HEAD {
            return Either::Right(self.inner.call(request));
        } else {
            // hyper sends no body in answer to HEAD, but keeps the length.
            match FILES
                .iter()
                .find(|(file, ..)| *file == request.uri().path())
            {
                Some((_, content_type, text)) => http::Response::builder()
                    .header(header::CONTENT_TYPE, *content_type)
                    .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
                    .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
                    .header(header::REFERRER_POLICY, "no-referrer")
                    // The files change with the binary: a browser revalidates rather than keep a
                    // page that no longer matches the server.
                    .header(header::CACHE_CONTROL, "no-cache")
                    .body(static_body(text))
                    .expect("static response parts are valid"),
                None => plain_text(StatusCode::NOT_FOUND, "not found\n"),
            }
        };
        Either::Left(future::ready(Ok(response)))
    }
}

fn plain_text(status: StatusCode, text: &'static str) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(static_body(text))
        .expect("static response parts are valid")
}

fn static_body(text: &'static str) -> Body {
    Body::new(Full::new(Bytes::from_static(text.as_bytes())))
}
