//! `traceparent`, `tracestate` and `grpc-trace-bin`: the caller's span, taken from headers anyone
//! can send, through the same `CallTracer::start` every traced call goes through.
//!
//! Oracle: a `traceparent` that is valid by the W3C grammar (version 00, lowercase hex, non-zero
//! ids) makes the call's trace id its trace id; without one, a `grpc-trace-bin` that is valid by
//! OpenCensus' binary format (read here independently, after the `base64` crate decodes it) does;
//! whatever else is sent, the call gets a trace id of 32 lowercase hex digits, never all zeros.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use greeter::call::observe::trace::CallTracer;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    traceparent: Vec<&'a [u8]>,
    tracestate: Vec<&'a [u8]>,
    grpc_trace_bin: Vec<&'a [u8]>,
    path: Option<&'a str>,
}

/// A tracer that samples every call and exports nowhere: the parsing is what is under test.
fn tracer() -> &'static CallTracer {
    static TRACER: OnceLock<(SdkTracerProvider, CallTracer)> = OnceLock::new();
    &TRACER
        .get_or_init(|| {
            let provider = SdkTracerProvider::builder()
                .with_sampler(Sampler::AlwaysOn)
                .build();
            let tracer = CallTracer::new(provider.tracer("fuzz"), true);
            (provider, tracer)
        })
        .1
}

fn lower_hex(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id of a version-00 `traceparent`, by the W3C grammar.
fn traceparent_trace_id(value: &[u8]) -> Option<&[u8]> {
    let [b'0', b'0', b'-', rest @ ..] = value else {
        return None;
    };
    if rest.len() != 52 || rest[32] != b'-' || rest[49] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&rest[..32], &rest[33..49], &rest[50..]);
    let valid = lower_hex(trace)
        && lower_hex(span)
        && lower_hex(flags)
        && trace.iter().any(|&b| b != b'0')
        && span.iter().any(|&b| b != b'0')
        && flags[0] == b'0'
        && matches!(flags[1], b'0' | b'1' | b'2');
    valid.then_some(trace)
}

/// The trace id of a `grpc-trace-bin`: version 0, field 0 (16 bytes), field 1 (8), field 2 (1).
fn binary_trace_id(value: &[u8]) -> Option<String> {
    const BIN: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = BIN.decode(value).ok()?;
    if bytes.len() < 29 || bytes[0] != 0 || bytes[1] != 0 || bytes[18] != 1 || bytes[27] != 2 {
        return None;
    }
    let (trace, span) = (&bytes[2..18], &bytes[19..27]);
    let valid = trace.iter().any(|&b| b != 0) && span.iter().any(|&b| b != 0);
    valid.then(|| trace.iter().map(|b| format!("{b:02x}")).collect())
}

fn append(headers: &mut HeaderMap, name: &'static str, values: &[&[u8]]) {
    for value in values {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    append(&mut headers, "traceparent", &input.traceparent);
    append(&mut headers, "tracestate", &input.tracestate);
    append(&mut headers, "grpc-trace-bin", &input.grpc_trace_bin);
    let request_id = HeaderValue::from_static("fuzz");
    let span = tracer().start(&headers, input.path, None, &request_id);
    let trace_id = span.trace_id().to_owned();
    assert_eq!(trace_id.len(), 32);
    assert!(lower_hex(trace_id.as_bytes()) && trace_id.bytes().any(|b| b != b'0'));
    let header = span
        .response_header()
        .expect("the tracer answers with the trace id");
    assert_eq!(header.as_bytes(), trace_id.as_bytes());

    let parent = headers.get("traceparent").map(HeaderValue::as_bytes);
    let bin = headers.get("grpc-trace-bin").map(HeaderValue::as_bytes);
    if let Some(expected) = parent.and_then(traceparent_trace_id) {
        assert_eq!(trace_id.as_bytes(), expected, "traceparent {parent:?}");
    } else if parent.is_none()
        && let Some(expected) = bin.and_then(binary_trace_id)
    {
        assert_eq!(trace_id, expected, "grpc-trace-bin {bin:?}");
    }
    span.finish(0);
});
