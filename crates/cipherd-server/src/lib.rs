//! The cipherd server: configuration, the seal lifecycle, named keys at run time,
//! identities, policies and the audit log, the gRPC services (`Transit`,
//! `KeyAdmin`, `System`, `Auth`, `Policy`, `Audit`, health, reflection), the one
//! error→status mapping, and [`run`].
//!
//! Cryptography lives in `cipherd-core` and persistence in `cipherd-store`; this
//! crate wires them to the network and never implements a primitive itself.
//!
//! Embedding and tests call [`run`] with a listener bound to port 0:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let params = cipherd_server::Params::for_data_dir("/tmp/cipherd-demo", true);
//! cipherd_server::run(listener, params, std::future::pending()).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod access;
mod admin;
pub mod audit;
pub mod auth;
mod auth_service;
mod backup;
pub mod config;
pub mod datadir;
mod edge;
mod error;
pub mod keys;
pub mod memory;
mod seal;
mod server;
mod store_health;
mod system;
mod transit;

pub use config::DEFAULT_MAX_MESSAGE_BYTES;
pub use config::Params;
pub use edge::{ConnInfo, tls};
pub use error::{Error, Result};
pub use seal::{DEV_ROOT_TOKEN_FILE, DEV_SHARE_FILE};
pub use server::{
    CONNECTION_WINDOW, MAX_FRAME, RunError, STREAM_WINDOW, run, run_with_store, shutdown_signal,
};
pub use store_health::PROBE_INTERVAL;
pub use transit::STREAM_CHUNKS_IN_FLIGHT;
