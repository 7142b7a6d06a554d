//! The generated protobuf and gRPC code of every proto under `proto/` (one module per package),
//! and the descriptor set reflection serves. The Greeter's types are re-exported at the top, where
//! every caller names them.

include!(concat!(env!("OUT_DIR"), "/greeter_protos.rs"));

pub use helloworld::*;

/// Encoded `FileDescriptorSet` of every proto under `proto/` (but `proto/grpc/`, which
/// tonic-health describes), written by `build.rs`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("greeter_descriptor");
