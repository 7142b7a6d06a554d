//! The gRPC header names the per-call layers read and write, ready-made: a lookup by `&str`
//! parses and validates the name on every call (about 100 instructions each, several per call).
//! And gRPC's content type, which the gate and Connect both tell calls apart by.

use tonic::codegen::http::{HeaderMap, HeaderValue, header::HeaderName};

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// The `grpc-status` of a header block. A status's block (trailers, or a trailers-only answer's
/// headers) holds a handful of entries, and comparing their names costs a third of a lookup,
/// which hashes the name first (~200 instructions, twice a call: `lifetime` and `observe`).
pub fn grpc_status(headers: &HeaderMap) -> Option<&HeaderValue> {
    if headers.len() <= 4 {
        headers
            .iter()
            .find_map(|(name, value)| (*name == GRPC_STATUS).then_some(value))
    } else {
        headers.get(GRPC_STATUS)
    }
}

/// The prefix of every gRPC content type (`application/grpc`, `application/grpc+proto`) and of
/// grpc-web's (`application/grpc-web...`).
pub const GRPC_CONTENT_TYPE: &[u8] = b"application/grpc";

/// Whether `text` starts with `prefix`, ASCII case ignored (content types are case-insensitive).
pub fn starts_with_ignore_case(text: &[u8], prefix: &[u8]) -> bool {
    text.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_is_found_in_blocks_small_and_large() {
        for entries in 0..8 {
            let mut headers = HeaderMap::new();
            for i in 0..entries {
                let name = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
                headers.insert(name, HeaderValue::from_static("v"));
            }
            assert_eq!(grpc_status(&headers), None, "{entries} others");
            headers.append(GRPC_STATUS, HeaderValue::from_static("7"));
            headers.append(GRPC_STATUS, HeaderValue::from_static("8"));
            assert_eq!(grpc_status(&headers).unwrap(), "7", "{entries} others");
        }
    }
}
