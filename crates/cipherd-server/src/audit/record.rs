//! The fields of one audit record. The request path fills them; the sinks add
//! `seq` and `prev` (the chain) and serialize.

use std::{net::SocketAddr, time::SystemTime};

use serde::Serialize;

/// One call's audit record. Never holds plaintext, ciphertext, key material or
/// token secrets; batch references and derivation contexts only as
/// `hmac-sha256:<hex>` under the audit key.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the call arrived.
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    /// `"call"` for an RPC, `"chunk"` for one message of a stream, `"start"` and
    /// `"stop"` for the server's own lifecycle records.
    pub kind: &'static str,
    /// The call's `x-request-id`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// The gRPC method path, e.g. `/cipherd.v1.TransitService/Encrypt`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub rpc: String,
    /// The authenticated principal (token display name and accessor, mTLS
    /// identity, JWT subject); absent when authentication failed or was not needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// `token`, `jwt`, `mtls` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<&'static str>,
    /// The accessor of the token used, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_accessor: Option<String>,
    /// The policies that applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The client's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// The identity in the client's TLS certificate, when one was presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_certificate: Option<String>,
    /// The policy operation, e.g. `decrypt`, `key.rotate`, `token`; empty when the
    /// call never got that far.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub operation: &'static str,
    /// The key named by the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A rewrap's destination key, when another key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_key: Option<String>,
    /// Key versions used (encrypted under, decrypted from), sorted, distinct.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<u32>,
    /// Items of a batch or stream chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemCounts>,
    /// Purpose of use the call declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Free-text reason the call gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Allowed only by a break-glass rule.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// HMACs of the batch items' references (`hmac-sha256:<hex>`), in item order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// HMACs of the distinct derivation contexts used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contexts: Vec<String>,
    /// How the call ended.
    pub outcome: Outcome,
    /// Time from arrival to the reply, in microseconds (before the audit write).
    pub latency_us: u64,
}

impl AuditRecord {
    /// A record of `kind` at `time` with every optional field empty and outcome
    /// `OK`; the request path fills in the rest.
    pub fn new(kind: &'static str, time: SystemTime) -> Self {
        AuditRecord {
            time,
            kind,
            request_id: String::new(),
            rpc: String::new(),
            principal: None,
            auth_method: None,
            token_accessor: None,
            policies: Vec::new(),
            peer: None,
            peer_certificate: None,
            operation: "",
            key: None,
            destination_key: None,
            versions: Vec::new(),
            items: None,
            purpose: None,
            reason: None,
            break_glass: false,
            references: Vec::new(),
            contexts: Vec::new(),
            outcome: Outcome {
                code: "OK",
                reason: None,
            },
            latency_us: 0,
        }
    }

    /// The record as the JSON object a sink chains (the line without `seq` and
    /// `prev`).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, self).expect("an AuditRecord always serializes: no maps with non-string keys, no failing Serialize impls");
        out
    }
}

/// Item counts of a batch or stream chunk.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ItemCounts {
    /// Items in the request.
    pub total: u64,
    /// Items that succeeded.
    pub ok: u64,
    /// Items that failed.
    pub failed: u64,
}

/// The gRPC outcome of a call.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// The gRPC code name, e.g. `OK`, `PERMISSION_DENIED`.
    pub code: &'static str,
    /// The `ErrorInfo` reason, when the call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// RFC 3339 UTC with microseconds, e.g. `2026-12-01T10:33:29.123456Z`, written
/// straight into the serializer's buffer (no intermediate `String`).
pub(super) fn serialize_time<S: serde::Serializer>(
    t: &SystemTime,
    s: S,
) -> Result<S::Ok, S::Error> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    s.collect_str(&humantime::format_rfc3339_micros(
        SystemTime::UNIX_EPOCH + d,
    ))
}
