//! The edge: what stands between the network and the services. It bounds what a
//! client can make the server hold (connections, streams, buffered request bytes,
//! concurrent requests, time) and gives every request an id and a tracing span.
//!
//! From the socket inwards:
//!
//! 1. [`Incoming`] accepts connections up to `limits.max_connections`; more are
//!    closed at once. With `[tls]`, each runs its TLS handshake ([`tls`]) in its
//!    own task, within `limits.header_read_timeout_ms`. Each accepted connection
//!    is an [`EdgeIo`](conn::EdgeIo) (over TCP or TLS), which closes it when it
//!    delivers no request within `limits.header_read_timeout_ms` of opening, or
//!    has none in flight for `limits.idle_timeout_ms`. Its [`ConnInfo`] (peer
//!    address, TLS session and client certificate identity, activity tracker)
//!    reaches every request through tonic's request extensions.
//! 2. HTTP/2 itself (configured in `server.rs`): `limits.max_concurrent_streams`
//!    per connection, keep-alive PINGs, bounded flow-control windows.
//! 3. [`RequestIdLayer`]: an `x-request-id` (the client's if well-formed, else a
//!    fresh one) on the request and the response, and a `request` span.
//! 4. The access layer (`crate::access`, outside the edge): fail closed on the
//!    audit log, authentication, per-principal rate limits, the audit record.
//! 5. [`LimitsLayer`]: load shedding at `limits.max_concurrent_requests`, the
//!    request timeout, and a request body wrapper ([`RequestBody`]) that reads the
//!    gRPC framing to refuse messages over `limits.max_message_bytes` and to take
//!    each message's length from the `limits.max_buffered_request_bytes` budget
//!    before tonic allocates for it.
//!
//! Every refusal is a server [`Error`](crate::Error), turned into a status by
//! `Error::classify` like any other. The edge does not look inside messages
//! (protobuf), know services, or authenticate anyone (it reads the client
//! certificate's identity into [`ConnInfo`], for the access layer).

mod body;
mod conn;
mod limits;
mod request_id;
pub mod tls;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::{net::TcpListener, sync::Semaphore};

pub use body::RequestBody;
pub use conn::{ConnInfo, Incoming};
pub use limits::LimitsLayer;
pub use request_id::{REQUEST_ID_HEADER, RequestIdLayer};

use crate::config::Limits;
use tls::{TlsError, TlsParams, TlsState};

/// The edge of one server: shared state of its connection limit, concurrency
/// limit and buffer budget, and the layers and listener stream that use it.
#[derive(Clone)]
pub struct Edge {
    shared: Arc<Shared>,
}

impl Edge {
    /// An edge enforcing `limits`, serving TLS with `tls` (its files are read
    /// now, so a bad file stops the start), or plaintext with `None` (logged as a
    /// warning: only behind a TLS-terminating sidecar, or in dev mode on loopback).
    pub fn new(limits: &Limits, tls: Option<&TlsParams>) -> Result<Self, TlsError> {
        let tls = match tls {
            Some(params) => {
                let state = TlsState::load(params)?;
                tracing::info!(
                    cert_file = %params.cert_file.display(),
                    min_version = ?params.min_version,
                    client_certificates = params.client_ca_file.is_some(),
                    "TLS on: X25519MLKEM768 key exchange preferred, ALPN h2"
                );
                Some(state)
            }
            None => {
                tracing::warn!(
                    "TLS disabled: gRPC is served in plaintext; only behind a TLS-terminating \
                     sidecar (tls.disable = true) or in dev mode on loopback"
                );
                None
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                limits: *limits,
                budget: Arc::new(Semaphore::new(limits.max_buffered_request_bytes)),
                requests: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                tls,
            }),
        })
    }

    /// The connections accepted on `listener`, within the connection limit, with
    /// their TLS handshakes done (and the TLS files watched while it lives).
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        Incoming::new(listener, Arc::clone(&self.shared))
    }

    /// The request id and tracing span layer (outermost).
    pub fn request_id_layer(&self) -> RequestIdLayer {
        RequestIdLayer::new()
    }

    /// The limits layer: concurrency, timeout, message size and buffer budget.
    pub fn limits_layer(&self) -> LimitsLayer {
        LimitsLayer::new(Arc::clone(&self.shared))
    }
}

/// State shared by every connection and request of one server.
struct Shared {
    limits: Limits,
    /// Request message bytes that may still be buffered, one permit per byte.
    /// Never closed.
    budget: Arc<Semaphore>,
    /// Requests in flight that count against `max_concurrent_requests`.
    requests: AtomicUsize,
    /// Connections open (or handshaking).
    connections: AtomicUsize,
    /// The TLS configuration in service and its files; `None`: plaintext.
    tls: Option<Arc<TlsState>>,
}

impl Shared {
    /// Takes a request slot, or `false` if all `max_concurrent_requests` are taken.
    fn try_start_request(&self) -> bool {
        if self.requests.fetch_add(1, Ordering::AcqRel) < self.limits.max_concurrent_requests {
            return true;
        }
        self.requests.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Gives back a slot taken by [`try_start_request`](Self::try_start_request).
    fn end_request(&self) {
        self.requests.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes a connection slot, or `false` if all `max_connections` are taken.
    fn try_add_connection(&self) -> bool {
        if self.connections.fetch_add(1, Ordering::AcqRel) < self.limits.max_connections {
            return true;
        }
        self.connections.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Gives back a slot taken by [`try_add_connection`](Self::try_add_connection).
    fn remove_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}
