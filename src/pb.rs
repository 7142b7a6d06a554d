//! The generated `helloworld` protobuf and gRPC code, and the descriptor set reflection serves.

tonic::include_proto!("helloworld");

/// Encoded `FileDescriptorSet` of `proto/helloworld.proto`, written by `build.rs`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("helloworld_descriptor");
