//! The cipherd crypto core: key types, AEAD, the ciphertext format, named keys and
//! their versions, key derivation, the storage barrier, Shamir secret sharing and
//! the audit log's hash chain.
//!
//! This crate does no I/O: no files, no sockets, no async runtime. Randomness comes
//! from the AEAD provider's CSPRNG (aws-lc-rs). Callers (the server) own persistence
//! and networking and hand this crate bytes.
//!
//! Secrets live in zeroize-on-drop newtypes ([`secret`]); nothing here derives
//! `Debug`, `Clone` or `Hash` on secret material.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aead;
pub mod audit_chain;
pub mod barrier;
pub mod ciphertext;
mod error;
pub mod key_type;
pub mod keyring;
pub mod mac;
pub mod secret;
pub mod shamir;
mod xaes;
mod xchacha;

pub use error::{Error, Result};
pub use key_type::KeyType;
