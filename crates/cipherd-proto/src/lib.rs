//! Generated protobuf and gRPC code for the `cipherd.v1` API (`proto/cipherd/v1`).
//!
//! The code in `src/gen/` is generated and committed; `tests/bootstrap.rs`
//! regenerates it and fails on any difference. Beside it this crate holds only
//! what every user of the messages needs the same way: the redacting `Debug` impls
//! (`redact.rs`) for messages that carry plaintext, key material or unseal shares,
//! the gRPC [`codec`] that answers malformed messages INVALID_ARGUMENT with an
//! `ErrorInfo`, the [`ERROR_DOMAIN`] of every cipherd error, and `From`
//! conversions (`convert.rs`) between the stream RPCs' chunk messages and the batch
//! messages with the same fields. No service logic.
#![forbid(unsafe_code)]

/// Messages and services of package `cipherd.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unused_qualifications)]
pub mod v1 {
    include!("gen/cipherd.v1.rs");
}

pub mod codec;
mod convert;
mod redact;

pub use codec::{ERROR_DOMAIN, MALFORMED_MESSAGE};

/// The encoded `FileDescriptorSet` of the API and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/cipherd_descriptor.bin");
