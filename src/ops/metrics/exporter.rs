//! What the metrics listener answers: `GET /metrics` and nothing else, over plain HTTP/1.1.
//!
//! It shares only the registry with the gRPC server, so a scrape never takes a gRPC call or
//! connection slot and keeps working while the gRPC listener sheds load or drains. Prometheus
//! asks for OpenMetrics in its `Accept` header and gets it; anything else (curl, older scrapers)
//! gets the classic text format, which is what client_golang serves by default.

use std::{sync::Arc, time::Duration};

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use prometheus_client::{encoding, registry::Registry};
use tonic::codegen::http::{HeaderValue, header};

pub const PATH: &str = "/metrics";

const OPENMETRICS: &str = "application/openmetrics-text";
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapers connected at once; more wait in the kernel's accept queue. Prometheus uses one
/// connection per target, so this only bounds what a misbehaving client can hold.
pub const MAX_CONNECTIONS: usize = 16;

/// A client must finish sending its request head within this, so idle sockets cannot pile up.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to every request of the metrics listener (`transport::listener::serve_http1`
/// accepts and speaks HTTP/1.1 for it).
pub fn responder(
    registry: Arc<Registry>,
) -> impl Fn(&Request<Incoming>) -> Response<String> + Clone + Send + Sync + 'static {
    move |request| respond(&registry, request)
}

fn respond(registry: &Registry, request: &Request<Incoming>) -> Response<String> {
    if request.uri().path() != PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let openmetrics = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|accept| accept.to_str().is_ok_and(|a| a.contains(OPENMETRICS)));
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            encoding::text::encode(&mut body, registry),
            OPENMETRICS_CONTENT_TYPE,
        )
    } else {
        (
            encoding::prometheus_text::encode(&mut body, registry),
            encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
    }
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, text: &str) -> Response<String> {
    let mut response = Response::new(text.to_owned());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
