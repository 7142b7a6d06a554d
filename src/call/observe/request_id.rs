//! Request ids: the handle that ties a client's report ("my call failed") to the server's logs.
//!
//! A client (or a proxy in front of the server) may send one as `x-request-id` metadata; the server
//! keeps it when it is safe to log, and otherwise makes one up. Either way it is returned in the
//! response metadata and put in every log line of the call.

use tonic::codegen::http::{HeaderMap, HeaderValue, header::HeaderName};

/// The metadata key, as proxies (Envoy, nginx) and most tracing setups spell it.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id kept from a client: longer ones are replaced, so a client cannot bloat every log line.
pub const MAX_LEN: usize = 128;

/// The client's id when it is usable, or a fresh one.
pub fn for_request(headers: &HeaderMap) -> HeaderValue {
    match headers.get(HEADER) {
        Some(given) if is_valid(given) => given.clone(),
        _ => generate(),
    }
}

/// Kept when 1 to [`MAX_LEN`] bytes of printable ASCII without spaces: nothing that could break a
/// log line or a log query.
pub fn is_valid(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 128 random bits as 32 lowercase hex digits (the shape of a W3C trace id).
///
/// The bits come from a per-thread generator seeded from OS randomness: ids must be unique, not
/// secret, and a syscall per call would cost more than the rest of the call's bookkeeping.
pub fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&text).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn a_usable_client_id_is_kept() {
        assert_eq!(for_request(&headers(b"abc-123_X.y")), "abc-123_X.y");
        let longest = "a".repeat(MAX_LEN);
        assert_eq!(for_request(&headers(longest.as_bytes())), longest.as_str());
    }

    #[test]
    fn unusable_client_ids_are_replaced() {
        let too_long = "a".repeat(MAX_LEN + 1);
        for bad in [
            &b""[..],
            b"has space",
            b"tab\there",
            b"\xff\xfe",
            too_long.as_bytes(),
        ] {
            let id = for_request(&headers(bad));
            assert_ne!(id.as_bytes(), bad);
            assert!(is_valid(&id));
        }
    }

    #[test]
    fn generated_ids_are_32_hex_digits_and_differ() {
        let a = for_request(&HeaderMap::new());
        let b = generate();
        assert_ne!(a, b);
        // 128 random bits each: a thousand never collide.
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 1000);
        for id in [a, b] {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32, "{text}");
            assert!(
                text.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
    }
}
