//! Connect request bodies: the 5-byte envelopes of streams, gzip bounded by the method's limit, and
//! JSON (protobuf's JSON mapping, through prost-reflect) or protobuf messages.
//!
//! Oracle: every envelope taken off the buffer re-encodes to exactly the bytes it consumed and is
//! never over the limit; a declared length over the limit is refused with RESOURCE_EXHAUSTED
//! before its bytes arrive. gunzip never yields more than the limit, and refuses with
//! RESOURCE_EXHAUSTED only what an unbounded inflate makes longer than the limit (INVALID_ARGUMENT
//! otherwise). A JSON request that translates decodes with prost (the generated `HelloRequest`)
//! to the name serde_json reads from the same text, and translating the reply back to JSON and in
//! again gives the same protobuf; a protobuf message prost-reflect decodes, prost decodes alike.
#![no_main]

use std::{io::Read as _, sync::OnceLock};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use greeter::{call::connect, pb::HelloRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use tonic::Code;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    json: bool,
    /// The method's message limit, small so the fuzzer reaches it.
    max: u16,
    body: &'a [u8],
}

fn hello_request() -> &'static MessageDescriptor {
    static DESC: OnceLock<MessageDescriptor> = OnceLock::new();
    DESC.get_or_init(|| {
        DescriptorPool::decode(greeter::pb::FILE_DESCRIPTOR_SET)
            .expect("the served descriptor set decodes")
            .get_message_by_name("helloworld.HelloRequest")
            .expect("HelloRequest is described")
    })
}

fn check_gunzip(payload: &[u8], max: usize) -> Option<Bytes> {
    match connect::gunzip(payload, max) {
        Ok(out) => {
            assert!(out.len() <= max);
            Some(out)
        }
        Err(status) if status.code() == Code::ResourceExhausted => {
            let mut all = Vec::new();
            let inflated = flate2::read::GzDecoder::new(payload)
                .take(max as u64 + 1)
                .read_to_end(&mut all);
            assert!(
                inflated.is_ok() && all.len() > max,
                "refused a fitting body"
            );
            None
        }
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            None
        }
    }
}

fn check_message(json: bool, message: Bytes) {
    let desc = hello_request();
    if !json {
        let reflected = connect::Codec::Json.from_proto(desc, message.clone());
        let generated = HelloRequest::decode(message);
        match (reflected, generated) {
            (Ok(text), Ok(request)) => {
                let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
                let name = value.get("name").and_then(|v| v.as_str()).unwrap_or("");
                assert_eq!(name, request.name);
            }
            (Err(status), Err(_)) => assert_eq!(status.code(), Code::Internal),
            (reflected, generated) => panic!("decoders disagree: {reflected:?} {generated:?}"),
        }
        return;
    }
    match connect::Codec::Json.to_proto(desc, message.clone()) {
        Ok(proto) => {
            let request =
                HelloRequest::decode(proto.clone()).expect("prost decodes the translation");
            if !message.iter().all(u8::is_ascii_whitespace) {
                let value: serde_json::Value =
                    serde_json::from_slice(&message).expect("serde_json reads what was accepted");
                let name = value.get("name").and_then(|v| v.as_str()).unwrap_or("");
                assert_eq!(name, request.name);
            }
            let text = connect::Codec::Json
                .from_proto(desc, proto.clone())
                .expect("a translated request translates back");
            let again = connect::Codec::Json.to_proto(desc, text).unwrap();
            assert_eq!(again, proto);
        }
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument),
    }
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max);
    // Unary: the whole body is one message, gzipped when it looks like gzip.
    let unary = if input.body.starts_with(&[0x1f, 0x8b]) {
        check_gunzip(input.body, max)
    } else {
        (input.body.len() <= max).then(|| Bytes::copy_from_slice(input.body))
    };
    if let Some(message) = unary {
        check_message(input.json, message);
    }
    // Streams: envelopes, flag 1 for gzip.
    let mut buf = BytesMut::from(input.body);
    loop {
        let before = buf.clone();
        match connect::split_envelope(&mut buf, max) {
            Ok(Some((flags, payload))) => {
                assert!(payload.len() <= max);
                let whole = connect::envelope(flags, &payload);
                assert_eq!(&before[..whole.len()], &whole[..]);
                assert_eq!(before.len() - whole.len(), buf.len());
                let message = if flags & 1 == 1 {
                    check_gunzip(&payload, max)
                } else {
                    Some(payload)
                };
                if let Some(message) = message {
                    check_message(input.json, message);
                }
            }
            Ok(None) => {
                assert_eq!(buf, before);
                let declared = before
                    .get(1..5)
                    .map(|len| u32::from_be_bytes(len.try_into().unwrap()) as usize);
                assert!(declared.is_none_or(|len| len <= max && before.len() < 5 + len));
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                let declared = u32::from_be_bytes(before[1..5].try_into().unwrap()) as usize;
                assert!(declared > max);
                break;
            }
        }
    }
});
