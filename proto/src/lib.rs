//! The `corral.v1` API: messages, the `Agent` service's client and server, and the encoded file
//! descriptor set for gRPC reflection. Generated code only; the lint allowances stay here.

#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("corral.v1");

    /// The encoded `FileDescriptorSet` of `corral.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("corral_descriptor");
}
