//! The server's error type and the one place where gRPC status codes are chosen.
//!
//! Every failure the server reports goes through [`Error::classify`], which picks
//! the code, an UPPER_SNAKE `google.rpc.ErrorInfo` reason (AIP-193) and the message
//! the client sees. Unary calls use `From<Error> for tonic::Status`; batch items use
//! [`Error::to_rpc_status`]. Clients match on the reason, never the message.
//!
//! Internal failures (storage, corruption, bugs) reach the client as a generic
//! message; the detail is logged on the server with a correlation id.
//!
//! Storage faults fail closed. Only a store that cannot be reached right now
//! (`cipherd_store::Error::Unavailable`) is `UNAVAILABLE`/`STORAGE_UNAVAILABLE`,
//! which clients retry. Corrupt data, a record the barrier refuses, a missing
//! record that must exist, a schema newer than this binary and store answers no
//! caller should have let through are `DATA_LOSS` (the data) or `INTERNAL` (the
//! code) with reason `STORAGE_INTEGRITY`, which clients never retry; no code path
//! treats such an error as "absent" and creates a record in its place.
//!
//! One status is chosen outside `classify`: a request that is not valid protobuf
//! is answered INVALID_ARGUMENT with reason `MALFORMED_MESSAGE` by the gRPC codec
//! in `cipherd_proto::codec`, because tonic decodes the message before any service
//! code runs and no [`Error`] exists at that point. It uses the same
//! [`ERROR_DOMAIN`], defined there and re-exported here.

use std::collections::HashMap;

use prost::Message;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

pub use cipherd_proto::ERROR_DOMAIN;

/// Result alias for the server.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a cipherd request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service is sealed: no key material is in memory.
    #[error("cipherd is sealed; unseal it with `cipherctl unseal`")]
    Sealed,
    /// The storage has not been initialized yet.
    #[error("cipherd is not initialized; run `cipherctl init`")]
    NotInitialized,
    /// `Init` on storage that is already initialized.
    #[error("cipherd is already initialized")]
    AlreadyInitialized,
    /// `Unseal` while already unsealed.
    #[error("cipherd is already unsealed")]
    AlreadyUnsealed,
    /// The submitted shares do not reconstruct the root key.
    #[error("unseal failed: {0}")]
    UnsealFailed(String),
    /// No key of this name exists.
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    /// `CreateKey` for a name that is taken.
    #[error("key {0:?} already exists")]
    KeyExists(String),
    /// The key is scheduled for deletion: it neither encrypts nor decrypts, and
    /// only `GetKey`, `ListKeys` and `CancelKeyDeletion` accept it.
    #[error("key {0:?} is scheduled for deletion; cancel the deletion to use it again")]
    KeyPendingDeletion(String),
    /// A request field is invalid; the message says which and how.
    #[error("{0}")]
    InvalidArgument(String),
    /// An input exceeds a configured limit; the message names the limit.
    #[error("{what} is {actual} {unit}; the limit is {limit} {unit} ({setting})")]
    TooLarge {
        /// What was too large ("plaintext", "batch").
        what: &'static str,
        /// Its size.
        actual: usize,
        /// The limit.
        limit: usize,
        /// "bytes" or "items".
        unit: &'static str,
        /// The config option that sets the limit.
        setting: &'static str,
    },
    /// A request message declared a length over `limits.max_message_bytes`; refused
    /// from its 5-byte gRPC prefix, before any of it was buffered.
    #[error(
        "request message is {declared} bytes; the limit is {limit} bytes (limits.max_message_bytes)"
    )]
    MessageTooLarge {
        /// The length the message's prefix declared.
        declared: usize,
        /// The limit.
        limit: usize,
    },
    /// The server is serving `limits.max_concurrent_requests` requests already; this
    /// one was shed rather than queued. Retry with backoff.
    #[error(
        "the server is at its limit of {limit} concurrent requests (limits.max_concurrent_requests); retry with backoff"
    )]
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// A request took longer than `limits.request_timeout_ms` for `waiting_for`.
    #[error(
        "request timed out after {timeout_ms} ms waiting for {waiting_for} (limits.request_timeout_ms)"
    )]
    RequestTimeout {
        /// What the server waited for: the response, the next request message,
        /// or request buffer space.
        waiting_for: &'static str,
        /// The limit, in milliseconds.
        timeout_ms: u64,
    },
    /// A named object (token, policy, role) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A policy document that cannot be used; the message says where and why.
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    /// No credential, or one that is malformed, expired, revoked or forged. The
    /// message never says which (it is logged on the server).
    #[error("authentication required: {0}")]
    Unauthenticated(&'static str),
    /// The caller's policies do not allow this operation on this key. Identical
    /// whether the key exists or not.
    #[error("permission denied")]
    PermissionDenied,
    /// No audit sink accepted the call's record, so the call was refused (fail
    /// closed) or its reply withheld.
    #[error("the audit log cannot be written; calls are refused until it can")]
    AuditUnavailable,
    /// The caller exceeded its per-principal rate limit (`limits.principal_rate`).
    #[error(
        "rate limit of {per_second} requests per second exceeded (limits.principal_rate); retry with backoff"
    )]
    RateLimited {
        /// The configured rate.
        per_second: u32,
    },
    /// The ciphertext does not authenticate under this key, version, context and
    /// associated data, or is malformed. Deliberately one opaque error.
    #[error(
        "decryption failed: the ciphertext is invalid for this key, context and associated data"
    )]
    DecryptionFailed,
    /// The operation is not allowed in the key's current state (version below the
    /// minimum, deletion not allowed, not exportable, trim limits).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A key version reached its safe encryption count.
    #[error("{0}")]
    UsageExhausted(String),
    /// Concurrent changes kept a read-modify-write from completing; retry.
    #[error("concurrent update of {0:?}; retry")]
    Aborted(String),
    /// Stored data failed its integrity check (the barrier refused it), could not
    /// be decoded, or is missing while other records say it must exist (a used
    /// version's usage record). The service refuses to serve instead of guessing
    /// (invariant 8): `DATA_LOSS`/`STORAGE_INTEGRITY`, never retried.
    #[error("stored record {0:?} failed its integrity check")]
    Corrupt(String),
    /// The storage backend failed. Classified by kind (see [`Error::classify`]):
    /// only [`cipherd_store::Error::Unavailable`] is `UNAVAILABLE` and retryable.
    #[error("storage: {0}")]
    Storage(#[from] cipherd_store::Error),
    /// A bug or an unexpected provider failure.
    #[error("internal: {0}")]
    Internal(String),
}

/// The reason of every failure that retrying cannot fix because stored data is
/// corrupt, missing or inconsistent, or the store broke its own contract. Clients
/// never retry it, and the server never answers it by creating anything afresh.
pub const STORAGE_INTEGRITY: &str = "STORAGE_INTEGRITY";

/// The reason of a store that is briefly unreachable; clients retry it.
pub const STORAGE_UNAVAILABLE: &str = "STORAGE_UNAVAILABLE";

/// The client-facing message of every `STORAGE_INTEGRITY` failure: one line, no
/// path, no backend detail (that goes to the server log).
const INTEGRITY_MESSAGE: &str = "stored data failed its integrity check; see the server log";

/// The code and reason of a store error that reached a client.
///
/// - A lost or refused connection, a lock held past the busy timeout, a closed
///   store ([`cipherd_store::Error::Unavailable`]): `UNAVAILABLE`, retryable.
/// - Data the backend finds corrupt ([`cipherd_store::Error::Corrupt`]):
///   `DATA_LOSS`.
/// - Everything else: `INTERNAL`. A schema newer than this binary or another
///   permanent backend failure ([`cipherd_store::Error::Backend`]), an invalid
///   path (a bug here), and the precondition answers (`AlreadyExists`,
///   `Conflict`, `NotFound`, `NotEmpty`), which every caller handles itself, so one that
///   reaches a client is an invariant violation, not a reason to retry.
///
/// All but the first carry `STORAGE_INTEGRITY`.
fn storage_status(err: &cipherd_store::Error) -> (Code, &'static str) {
    use cipherd_store::Error as S;
    match err {
        S::Unavailable(_) => (Code::Unavailable, STORAGE_UNAVAILABLE),
        S::Corrupt(_) => (Code::DataLoss, STORAGE_INTEGRITY),
        S::Backend(_)
        | S::InvalidPath(_)
        | S::AlreadyExists { .. }
        | S::Conflict { .. }
        | S::NotFound { .. }
        | S::NotEmpty => (Code::Internal, STORAGE_INTEGRITY),
        // A kind added to the store later fails closed until classified here.
        _ => (Code::Internal, STORAGE_INTEGRITY),
    }
}

/// How an [`Error`] is presented to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The gRPC status code.
    pub code: Code,
    /// The `ErrorInfo` reason, UPPER_SNAKE.
    pub reason: &'static str,
    /// The client-facing message (generic for internal errors).
    pub message: String,
    /// For a limit that was exceeded, the config option that sets it; sent as the
    /// `ErrorInfo` metadata entry `setting`.
    pub setting: Option<&'static str>,
}

impl Classified {
    /// The `ErrorInfo.metadata` of this error.
    fn metadata(&self) -> HashMap<String, String> {
        self.setting
            .map(|s| HashMap::from([("setting".to_owned(), s.to_owned())]))
            .unwrap_or_default()
    }
}

impl Error {
    /// The single error→status mapping of the server.
    pub fn classify(&self) -> Classified {
        use Error::*;
        let (code, reason) = match self {
            Sealed => (Code::Unavailable, "SEALED"),
            // Like SEALED: this server cannot serve until an operator acts.
            NotInitialized => (Code::Unavailable, "NOT_INITIALIZED"),
            AlreadyInitialized => (Code::FailedPrecondition, "ALREADY_INITIALIZED"),
            AlreadyUnsealed => (Code::FailedPrecondition, "ALREADY_UNSEALED"),
            UnsealFailed(_) => (Code::InvalidArgument, "UNSEAL_FAILED"),
            KeyNotFound(_) => (Code::NotFound, "KEY_NOT_FOUND"),
            KeyExists(_) => (Code::AlreadyExists, "KEY_EXISTS"),
            KeyPendingDeletion(_) => (Code::FailedPrecondition, "KEY_PENDING_DELETION"),
            InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            TooLarge { .. } => (Code::InvalidArgument, "TOO_LARGE"),
            MessageTooLarge { .. } => (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
            Overloaded { .. } => (Code::ResourceExhausted, "OVERLOADED"),
            RequestTimeout { .. } => (Code::DeadlineExceeded, "REQUEST_TIMEOUT"),
            NotFound(_) => (Code::NotFound, "NOT_FOUND"),
            InvalidPolicy(_) => (Code::InvalidArgument, "INVALID_POLICY"),
            Unauthenticated(_) => (Code::Unauthenticated, "UNAUTHENTICATED"),
            PermissionDenied => (Code::PermissionDenied, "PERMISSION_DENIED"),
            AuditUnavailable => (Code::Unavailable, "AUDIT_UNAVAILABLE"),
            RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            DecryptionFailed => (Code::InvalidArgument, "DECRYPTION_FAILED"),
            FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
            UsageExhausted(_) => (Code::ResourceExhausted, "KEY_USAGE_EXHAUSTED"),
            Aborted(_) => (Code::Aborted, "CONFLICT"),
            Corrupt(_) => (Code::DataLoss, STORAGE_INTEGRITY),
            Storage(e) => storage_status(e),
            Internal(_) => (Code::Internal, "INTERNAL"),
        };
        let message = match self {
            Corrupt(_) => INTEGRITY_MESSAGE.to_owned(),
            Storage(_) if reason == STORAGE_INTEGRITY => INTEGRITY_MESSAGE.to_owned(),
            Storage(_) => "storage is unavailable; see the server log".to_owned(),
            Internal(_) => "internal error; see the server log".to_owned(),
            other => other.to_string(),
        };
        if matches!(self, Corrupt(_) | Storage(_) | Internal(_)) {
            tracing::error!(error = %self, reason, "request failed");
        }
        Classified {
            code,
            reason,
            message,
            setting: self.setting(),
        }
    }

    /// The config option whose limit this error reports, if any.
    fn setting(&self) -> Option<&'static str> {
        match self {
            Error::TooLarge { setting, .. } => Some(setting),
            Error::MessageTooLarge { .. } => Some("limits.max_message_bytes"),
            Error::Overloaded { .. } => Some("limits.max_concurrent_requests"),
            Error::RequestTimeout { .. } => Some("limits.request_timeout_ms"),
            Error::RateLimited { .. } => Some("limits.principal_rate"),
            _ => None,
        }
    }

    /// The error as a `google.rpc.Status`, for one item of a batch reply. The
    /// message is cut to `MAX_ITEM_MESSAGE` (256) bytes so that the size of a batch
    /// reply can be bounded before the work is done.
    pub fn to_rpc_status(&self) -> tonic_types::pb::Status {
        let mut c = self.classify();
        truncate_at_char(&mut c.message, MAX_ITEM_MESSAGE);
        let info = tonic_types::pb::ErrorInfo {
            reason: c.reason.to_owned(),
            domain: ERROR_DOMAIN.to_owned(),
            metadata: c.metadata(),
        };
        tonic_types::pb::Status {
            code: c.code as i32,
            message: c.message,
            details: vec![prost_types::Any {
                type_url: tonic_types::ErrorInfo::TYPE_URL.to_owned(),
                value: info.encode_to_vec(),
            }],
        }
    }
}

/// The longest message of a failed batch item's status, in bytes.
pub const MAX_ITEM_MESSAGE: usize = 256;

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let c = err.classify();
        let metadata = c.metadata();
        tonic::Status::with_error_details(
            c.code,
            c.message,
            ErrorDetails::with_error_info(c.reason, ERROR_DOMAIN, metadata),
        )
    }
}

impl From<cipherd_core::Error> for Error {
    fn from(err: cipherd_core::Error) -> Self {
        use cipherd_core::Error as C;
        match err {
            C::DecryptionFailed => Error::DecryptionFailed,
            C::InvalidArgument(m) => Error::InvalidArgument(m),
            e @ (C::UnknownKeyType(_) | C::InvalidKeyName(_) | C::Context(_)) => {
                Error::InvalidArgument(e.to_string())
            }
            // Decrypt paths map this to the opaque DecryptionFailed themselves
            // (see transit::open); elsewhere it is a bad version argument.
            e @ C::VersionNotFound(_) => Error::InvalidArgument(e.to_string()),
            e @ (C::VersionBelowMinimum { .. } | C::Precondition(_)) => {
                Error::FailedPrecondition(e.to_string())
            }
            e @ C::UsageLimitExceeded { .. } => Error::UsageExhausted(e.to_string()),
            C::Shamir(m) => Error::UnsealFailed(m),
            C::Barrier { path } => Error::Corrupt(path),
            e => Error::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn every_status_carries_one_error_info() {
        let status: tonic::Status = Error::Sealed.into();
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "SEALED");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn internal_details_stay_on_the_server() {
        let status: tonic::Status = Error::Internal("secret path /x/y".into()).into();
        assert!(!status.message().contains("/x/y"));
        let status: tonic::Status = Error::Corrupt("keys/patients".into()).into();
        assert!(!status.message().contains("patients"));
    }

    #[test]
    fn decryption_failures_are_one_opaque_error() {
        let a: tonic::Status = Error::from(cipherd_core::Error::DecryptionFailed).into();
        let b: tonic::Status = Error::DecryptionFailed.into();
        assert_eq!(a.code(), b.code());
        assert_eq!(a.message(), b.message());
    }

    #[test]
    fn item_status_messages_are_bounded() {
        let long = Error::InvalidArgument("é".repeat(1000)).to_rpc_status();
        assert!(
            long.message.len() <= MAX_ITEM_MESSAGE,
            "{}",
            long.message.len()
        );
        assert!(long.message.len() >= MAX_ITEM_MESSAGE - 1);
        assert!(long.encode_to_vec().len() <= 2 * MAX_ITEM_MESSAGE);
        let short = Error::DecryptionFailed.to_rpc_status();
        assert_eq!(short.message, Error::DecryptionFailed.to_string());
    }

    #[test]
    fn limit_errors_name_their_setting_in_error_info() {
        for (err, code, reason, setting) in [
            (
                Error::MessageTooLarge {
                    declared: 1 << 26,
                    limit: 1 << 24,
                },
                Code::ResourceExhausted,
                "MESSAGE_TOO_LARGE",
                "limits.max_message_bytes",
            ),
            (
                Error::Overloaded { limit: 8 },
                Code::ResourceExhausted,
                "OVERLOADED",
                "limits.max_concurrent_requests",
            ),
            (
                Error::RequestTimeout {
                    waiting_for: "the response",
                    timeout_ms: 5,
                },
                Code::DeadlineExceeded,
                "REQUEST_TIMEOUT",
                "limits.request_timeout_ms",
            ),
        ] {
            let status: tonic::Status = err.into();
            assert_eq!(status.code(), code);
            assert!(status.message().contains(setting), "{}", status.message());
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason);
            assert_eq!(
                info.metadata.get("setting").map(String::as_str),
                Some(setting)
            );
        }
        // The metadata keeps a batch item's status within its bound.
        let item = Error::TooLarge {
            what: "associated data",
            actual: usize::MAX,
            limit: usize::MAX - 1,
            unit: "bytes",
            setting: "limits.max_associated_data_bytes",
        }
        .to_rpc_status();
        assert!(item.encode_to_vec().len() <= 2 * MAX_ITEM_MESSAGE);
    }

    /// Every store error kind, and the server's own corrupt-data error, with the
    /// code and reason a client sees: only unavailability is UNAVAILABLE.
    #[test]
    fn storage_errors_are_classified_by_kind() {
        use cipherd_store::Error as S;
        let path = || "keys/patients".to_owned();
        let cases = [
            (
                Error::Storage(S::Unavailable("ping: the store is closed".into())),
                Code::Unavailable,
                STORAGE_UNAVAILABLE,
            ),
            (
                Error::Storage(S::Corrupt("read: database disk image is malformed".into())),
                Code::DataLoss,
                STORAGE_INTEGRITY,
            ),
            (
                Error::Storage(S::Backend("migration 3 is newer".into())),
                Code::Internal,
                STORAGE_INTEGRITY,
            ),
            (
                Error::Storage(S::InvalidPath("empty".into())),
                Code::Internal,
                STORAGE_INTEGRITY,
            ),
            (
                Error::Storage(S::AlreadyExists { path: path() }),
                Code::Internal,
                STORAGE_INTEGRITY,
            ),
            (
                Error::Storage(S::Conflict { path: path() }),
                Code::Internal,
                STORAGE_INTEGRITY,
            ),
            (
                Error::Storage(S::NotFound { path: path() }),
                Code::Internal,
                STORAGE_INTEGRITY,
            ),
            (Error::Corrupt(path()), Code::DataLoss, STORAGE_INTEGRITY),
            (
                Error::from(cipherd_core::Error::Barrier { path: path() }),
                Code::DataLoss,
                STORAGE_INTEGRITY,
            ),
        ];
        for (err, code, reason) in cases {
            let shown = format!("{err:?}");
            let item = err.to_rpc_status();
            let status: tonic::Status = err.into();
            assert_eq!(status.code(), code, "{shown}");
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason, "{shown}");
            // One line, no path, no backend detail.
            let message = status.message();
            assert!(!message.contains('\n'), "{message}");
            for detail in ["patients", "keys/", "malformed", "migration", "closed"] {
                assert!(!message.contains(detail), "{shown}: {message}");
            }
            assert_eq!(item.code, code as i32, "{shown}");
            assert_eq!(item.message, message);
        }
    }

    #[test]
    fn batch_item_status_matches_unary_mapping() {
        let s = Error::KeyNotFound("k".into()).to_rpc_status();
        assert_eq!(s.code, Code::NotFound as i32);
        assert_eq!(s.details.len(), 1);
    }
}
