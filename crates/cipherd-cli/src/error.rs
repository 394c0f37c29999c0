//! How failures are named and printed: `error: <REASON>: <message>`.
//!
//! The server's `ErrorInfo` reason is the stable part scripts match on (never the
//! message). Failures that never reached the server get client-side reasons of the
//! same UPPER_SNAKE shape (`CONNECT_FAILED`, `INVALID_INPUT`, `INVALID_TOKEN`, `IO`, …); a server
//! status without a reason falls back to its gRPC code name (`UNAVAILABLE`,
//! `DEADLINE_EXCEEDED`). Nothing here prints Rust `Debug` output.

use std::fmt;

use cipherd_client::Error as ClientError;
use tonic::Code;

/// A reason and a message, as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// UPPER_SNAKE reason, stable for scripts.
    pub reason: String,
    /// Human-readable detail; may change between versions.
    pub message: String,
}

impl Failure {
    /// A failure with a client-side reason.
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// Names a client error: the server's reason, else the gRPC code name.
    pub fn from_client(err: &ClientError) -> Self {
        match err {
            ClientError::Status {
                code,
                reason,
                message,
            } => Self {
                reason: if reason.is_empty() {
                    code_name(*code).to_owned()
                } else {
                    reason.clone()
                },
                message: message.clone(),
            },
            ClientError::Connect(e) => Self::new("CONNECT_FAILED", chain(e)),
            ClientError::Protocol(m) => Self::new("PROTOCOL", m.clone()),
            ClientError::Credentials(m) => Self::new("INVALID_TOKEN", *m),
            other => Self::new("CLIENT", other.to_string()),
        }
    }

    /// Names whatever a command failed with, looking through anyhow's context chain
    /// for the most specific cause it knows.
    pub fn from_anyhow(err: &anyhow::Error) -> Self {
        for cause in err.chain() {
            if let Some(f) = cause.downcast_ref::<Failure>() {
                return f.clone();
            }
            if let Some(e) = cause.downcast_ref::<ClientError>() {
                return Self::from_client(e);
            }
            if let Some(s) = cause.downcast_ref::<tonic::Status>() {
                return Self::from_client(&ClientError::from(s.clone()));
            }
        }
        let reason = if err.chain().any(|c| c.is::<std::io::Error>()) {
            "IO"
        } else {
            "CLIENT"
        };
        Self::new(reason, format!("{err:#}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Failure {}

/// A gRPC status from a raw generated client, as a [`Failure`].
impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Self::from_client(&ClientError::from(status))
    }
}

/// The canonical UPPER_SNAKE name of a gRPC code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources joined with `: `, since transport errors put the useful
/// part (e.g. "Connection refused") in their sources.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn server_reason_wins_over_code() {
        let f = Failure::from_client(&ClientError::Status {
            code: Code::FailedPrecondition,
            reason: "FAILED_PRECONDITION".into(),
            message: "key \"k\" was not created exportable".into(),
        });
        assert_eq!(
            f.to_string(),
            "FAILED_PRECONDITION: key \"k\" was not created exportable"
        );
    }

    #[test]
    fn missing_reason_falls_back_to_the_code_name() {
        let f = Failure::from_client(&ClientError::Status {
            code: Code::DeadlineExceeded,
            reason: String::new(),
            message: "timeout expired".into(),
        });
        assert_eq!(f.reason, "DEADLINE_EXCEEDED");
    }

    #[test]
    fn reasons_are_found_through_context() {
        let err = anyhow::Error::new(Failure::new("INVALID_INPUT", "stdin is not base64"))
            .context("reading the plaintext");
        assert_eq!(Failure::from_anyhow(&err).reason, "INVALID_INPUT");

        let status = tonic::Status::unavailable("sealed");
        let err = anyhow::Error::new(status).context("calling");
        assert_eq!(Failure::from_anyhow(&err).reason, "UNAVAILABLE");

        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let err = Err::<(), _>(io).context("writing").unwrap_err();
        let f = Failure::from_anyhow(&err);
        assert_eq!(f.reason, "IO");
        assert_eq!(f.message, "writing: broken pipe");
    }

    #[test]
    fn every_code_has_an_upper_snake_name() {
        for i in 0..=16 {
            let name = code_name(Code::from_i32(i));
            assert!(name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        }
    }
}
