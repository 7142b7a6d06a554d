//! Messages between Connect's codecs and gRPC's protobuf: JSON in protobuf's canonical JSON
//! mapping, from the descriptors the server serves by reflection (no per-message code), and gzip.

use std::io::{Read as _, Write as _};

use bytes::Bytes;
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use tonic::Status;

/// How a Connect call encodes its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    /// A request message as protobuf: JSON is parsed against `desc` (unknown fields refused, as
    /// protobuf's JSON parsers do by default); protobuf passes as sent, for the service to decode.
    /// An empty JSON body is the empty message, as an empty protobuf body is.
    pub fn to_proto(self, desc: &MessageDescriptor, bytes: Bytes) -> Result<Bytes, Status> {
        match self {
            Self::Proto => Ok(bytes),
            Self::Json if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Bytes::new()),
            Self::Json => {
                let mut json = serde_json::Deserializer::from_slice(&bytes);
                DynamicMessage::deserialize(desc.clone(), &mut json)
                    .and_then(|message| json.end().map(|()| message))
                    .map(|message| message.encode_to_vec().into())
                    .map_err(|err| {
                        Status::invalid_argument(format!(
                            "the request is not a {} in JSON: {err}",
                            desc.full_name()
                        ))
                    })
            }
        }
    }

    /// A reply message, from protobuf.
    pub fn from_proto(self, desc: &MessageDescriptor, bytes: Bytes) -> Result<Bytes, Status> {
        match self {
            Self::Proto => Ok(bytes),
            Self::Json => DynamicMessage::decode(desc.clone(), bytes)
                .map_err(|err| Status::internal(format!("cannot decode the reply: {err}")))
                .and_then(|message| {
                    serde_json::to_vec(&message)
                        .map(Bytes::from)
                        .map_err(|err| Status::internal(format!("cannot write JSON: {err}")))
                }),
        }
    }
}

/// Inflates a gzip payload, refusing to produce more than `max` bytes: a few kilobytes of gzip
/// can expand to gigabytes.
pub fn gunzip(bytes: &[u8], max: usize) -> Result<Bytes, Status> {
    let mut out = Vec::new();
    GzDecoder::new(bytes)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| Status::invalid_argument(format!("invalid gzip data: {err}")))?;
    if out.len() > max {
        return Err(Status::resource_exhausted(format!(
            "the message inflates past this method's limit of {max} bytes"
        )));
    }
    Ok(out.into())
}

pub fn gzip(bytes: &[u8]) -> Bytes {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(bytes.len() / 2 + 32),
        Compression::fast(),
    );
    encoder
        .write_all(bytes)
        .expect("writing to a Vec cannot fail");
    encoder
        .finish()
        .expect("writing to a Vec cannot fail")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trip_and_bomb() {
        let text = vec![b'a'; 10_000];
        let packed = gzip(&text);
        assert!(packed.len() < 200);
        assert_eq!(gunzip(&packed, 10_000).unwrap(), text);
        let err = gunzip(&packed, 9_999).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let err = gunzip(b"not gzip", 100).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
