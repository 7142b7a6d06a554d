//! `grpc-timeout` and `connect-timeout-ms`: the two deadlines a client writes as text.
//!
//! Oracle: `grpc-timeout` parses exactly when the gRPC over HTTP/2 spec's grammar (1 to 8 ASCII
//! digits, then one of `HMSmun`) accepts it, to the same duration as an independent reading of that
//! grammar; `connect-timeout-ms` is accepted exactly when it is 1 to 10 ASCII digits, refused with
//! INVALID_ARGUMENT otherwise, and its translation parses back as `grpc-timeout` to the same
//! milliseconds (whole seconds past gRPC's 8 digits, never longer than asked).
#![no_main]

use std::time::Duration;

use greeter::call::{connect, deadline};
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

/// The spec's grammar, read byte by byte.
fn reference(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert_eq!(
            deadline::parse_grpc_timeout(text),
            reference(data),
            "{text:?}"
        );
    }
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let digits = !data.is_empty() && data.len() <= 10 && data.iter().all(u8::is_ascii_digit);
    match connect::grpc_timeout(&value) {
        Ok(grpc) => {
            assert!(digits, "accepted {data:?}");
            let millis: u64 = std::str::from_utf8(data).unwrap().parse().unwrap();
            let text = grpc.to_str().expect("the translation is ASCII");
            let back = deadline::parse_grpc_timeout(text).expect("the translation parses");
            let asked = Duration::from_millis(millis);
            if millis <= 99_999_999 {
                assert_eq!(back, asked);
            } else {
                assert_eq!(back, Duration::from_secs(millis / 1000));
            }
        }
        Err(status) => {
            assert!(!digits, "refused {data:?}");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
});
