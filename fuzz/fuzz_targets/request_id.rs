//! `x-request-id`: a client's id goes into every log line of its call.
//!
//! Oracle: the id is kept byte for byte exactly when it is 1 to 128 printable ASCII characters
//! without spaces; anything else (as many values as the client sends) is replaced by 32 lowercase
//! hex digits, and the first value counts.
#![no_main]

use greeter::call::observe::request_id;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|values: Vec<&[u8]>| {
    let mut headers = HeaderMap::new();
    for value in &values {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(request_id::HEADER, value);
        }
    }
    let id = request_id::for_request(&headers);
    let first = headers.get(request_id::HEADER).map(HeaderValue::as_bytes);
    let usable = first.is_some_and(|b| {
        !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..=0x7e).contains(c))
    });
    if usable {
        assert_eq!(Some(id.as_bytes()), first);
    } else {
        let bytes = id.as_bytes();
        assert_eq!(bytes.len(), 32);
        assert!(bytes.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
    }
    assert!(request_id::is_valid(&id));
});
