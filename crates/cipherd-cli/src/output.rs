//! Rendering command results for people (aligned `key: value` lines and tables) or
//! for programs (`--json`, serde_json, stable snake_case field names).
//!
//! Every command result is a view type here, built from the proto message and
//! implementing [`View`]. Rendering writes to any `io::Write`, so tests render into
//! a buffer. This module decides formats only; it never talks to the server.
//!
//! JSON conventions: binary values are standard base64 in fields named `*_base64`
//! (or `material`, `ciphertext` in binary mode); times are RFC 3339 UTC with
//! milliseconds; absent values are `null`, never a missing field.

use std::io::{self, Write};

use base64::Engine as _;
use cipherd_client::pb;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::error::Failure;

/// Human or machine output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned `key: value` lines, tables, raw values.
    Human,
    /// One JSON object per command (per line with `--lines`).
    Json,
}

/// A command result that can be shown either way.
pub trait View: Serialize {
    /// Writes the human-readable form.
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()>;
}

/// Writes `view` in `format`, followed by a newline in JSON mode.
pub fn emit(format: Format, view: &dyn ErasedView, w: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Human => view.write_human(w),
        Format::Json => {
            w.write_all(view.to_json()?.as_bytes())?;
            w.write_all(b"\n")
        }
    }
}

/// Object-safe form of [`View`] (serde's `Serialize` is not object safe).
pub trait ErasedView {
    /// See [`View::write_human`].
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()>;
    /// The JSON text.
    fn to_json(&self) -> io::Result<String>;
}

impl<T: View> ErasedView for T {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        View::write_human(self, w)
    }

    fn to_json(&self) -> io::Result<String> {
        serde_json::to_string(self).map_err(io::Error::other)
    }
}

/// The line printed on stderr for a failure.
pub fn error_line(failure: &Failure) -> String {
    format!("error: {}: {}", failure.reason, failure.message)
}

/// `status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Whether `init` has run.
    pub initialized: bool,
    /// Whether key material is unavailable.
    pub sealed: bool,
    /// Shares needed to unseal.
    pub threshold: u32,
    /// Shares issued at init.
    pub shares: u32,
    /// Shares submitted towards the current unseal.
    pub progress: u32,
    /// cipherd's version.
    pub version: String,
    /// Storage backend.
    pub storage: String,
    /// Whether the server runs in (insecure) dev mode.
    pub dev_mode: bool,
}

impl From<pb::StatusResponse> for StatusView {
    fn from(s: pb::StatusResponse) -> Self {
        Self {
            initialized: s.initialized,
            sealed: s.sealed,
            threshold: s.threshold,
            shares: s.shares,
            progress: s.progress,
            version: s.version,
            storage: s.storage,
            dev_mode: s.dev_mode,
        }
    }
}

impl View for StatusView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = vec![
            ("initialized", yes_no(self.initialized)),
            ("sealed", yes_no(self.sealed)),
        ];
        if self.initialized {
            if self.sealed {
                rows.push((
                    "unseal progress",
                    format!("{}/{}", self.progress, self.threshold),
                ));
            }
            rows.push(("shares", self.shares.to_string()));
            rows.push(("threshold", self.threshold.to_string()));
        }
        rows.push(("version", self.version.clone()));
        rows.push(("storage", self.storage.clone()));
        rows.push(("dev mode", yes_no(self.dev_mode)));
        write_rows(w, &rows)
    }
}

/// `init`: the shares and the root token, shown once. `Debug` redacts them.
#[derive(Serialize)]
pub struct InitView {
    /// The text-encoded unseal shares.
    pub shares: Vec<String>,
    /// How many of them unseal.
    pub threshold: u32,
    /// A token with the built-in `root` policy (`null` from a server that sends
    /// none).
    pub root_token: Option<String>,
}

impl std::fmt::Debug for InitView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitView")
            .field("shares", &format_args!("[{} redacted]", self.shares.len()))
            .field("threshold", &self.threshold)
            .field(
                "root_token",
                &self.root_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

impl View for InitView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows: Vec<(String, String)> = self
            .shares
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("unseal share {}", i + 1), s.clone()))
            .collect();
        if let Some(token) = &self.root_token {
            rows.push(("root token".to_owned(), token.clone()));
        }
        write_rows(w, &rows)
    }
}

/// The warning printed (on stderr) with the shares (and root token) from `init`.
pub fn init_warning(shares: usize, threshold: u32, root_token: bool) -> String {
    let mut warning = format!(
        "WARNING: the {shares} unseal share(s) above are shown this once; cipherd does not \
         store them.\nGive each share to a different person and store them separately (never \
         together, never in this terminal's scrollback or a shell history).\nAny {threshold} \
         of them unseal cipherd; losing more than {lost} means the data can never be \
         decrypted again.\ncipherd is sealed now: run `cipherctl unseal` {threshold} time(s), \
         once per share.",
        lost = shares.saturating_sub(threshold as usize),
    );
    if root_token {
        warning.push_str(ROOT_TOKEN_WARNING);
    }
    warning
}

/// The line about the root token in [`init_warning`].
const ROOT_TOKEN_WARNING: &str = "\nThe root token above may do anything and is shown this \
     once: store it safely (a secret manager, not a file on this host), use it to create \
     policies and least-privilege tokens, then revoke it (`cipherctl --token-file FILE token \
     lookup` shows its accessor; `cipherctl token revoke ACCESSOR`).";

/// `unseal`.
#[derive(Debug, Serialize)]
pub struct UnsealView {
    /// Whether cipherd is still sealed.
    pub sealed: bool,
    /// Shares needed.
    pub threshold: u32,
    /// Shares submitted so far (0 once unsealed).
    pub progress: u32,
}

impl From<pb::UnsealResponse> for UnsealView {
    fn from(r: pb::UnsealResponse) -> Self {
        Self {
            sealed: r.sealed,
            threshold: r.threshold,
            progress: r.progress,
        }
    }
}

impl View for UnsealView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = vec![("sealed", yes_no(self.sealed))];
        if self.sealed {
            rows.push((
                "unseal progress",
                format!("{}/{}", self.progress, self.threshold),
            ));
        }
        write_rows(w, &rows)
    }
}

/// `rekey …`.
#[derive(Debug, Serialize)]
pub struct RekeyView {
    /// `none`, `collecting`, `verifying` or `done`.
    pub phase: &'static str,
    /// The rekey's nonce (empty when none is in progress).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// Shares submitted in this phase, and how many it needs.
    pub progress: u32,
    pub required: u32,
    /// The new shares' count and threshold.
    pub new_shares: u32,
    pub new_threshold: u32,
    /// The new shares, once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<String>,
}

impl From<pb::RekeyResponse> for RekeyView {
    fn from(r: pb::RekeyResponse) -> Self {
        let phase = match pb::RekeyPhase::try_from(r.phase) {
            Ok(pb::RekeyPhase::Collecting) => "collecting",
            Ok(pb::RekeyPhase::Verifying) => "verifying",
            Ok(pb::RekeyPhase::Done) => "done",
            _ => "none",
        };
        Self {
            phase,
            nonce: r.nonce,
            progress: r.progress,
            required: r.required,
            new_shares: r.new_shares,
            new_threshold: r.new_threshold,
            shares: r.shares,
        }
    }
}

impl View for RekeyView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = vec![("rekey".to_owned(), self.phase.to_owned())];
        if !self.nonce.is_empty() {
            rows.push(("nonce".to_owned(), self.nonce.clone()));
        }
        match self.phase {
            "collecting" => rows.push((
                "current shares".to_owned(),
                format!("{}/{}", self.progress, self.required),
            )),
            "verifying" => rows.push((
                "new shares verified".to_owned(),
                format!("{}/{}", self.progress, self.required),
            )),
            _ => {}
        }
        if self.phase != "none" {
            rows.push((
                "new shares".to_owned(),
                format!("{} (threshold {})", self.new_shares, self.new_threshold),
            ));
        }
        for (i, share) in self.shares.iter().enumerate() {
            rows.push((format!("new unseal share {}", i + 1), share.clone()));
        }
        write_rows(w, &rows)
    }
}

/// `rotate-root …`.
#[derive(Debug, Serialize)]
pub struct RotateRootView {
    /// `none`, `collecting`, `resealing`, `done` or `stopped`.
    pub phase: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// Shares submitted, and how many are needed (collecting).
    pub progress: u32,
    pub required: u32,
    /// The root generation sealed under (from re-sealing on).
    pub root_generation: u32,
    /// Records re-sealed so far.
    pub resealed: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl From<pb::RotateRootResponse> for RotateRootView {
    fn from(r: pb::RotateRootResponse) -> Self {
        let phase = match pb::RotateRootPhase::try_from(r.phase) {
            Ok(pb::RotateRootPhase::Collecting) => "collecting",
            Ok(pb::RotateRootPhase::Resealing) => "resealing",
            Ok(pb::RotateRootPhase::Done) => "done",
            Ok(pb::RotateRootPhase::Stopped) => "stopped",
            _ => "none",
        };
        Self {
            phase,
            nonce: r.nonce,
            progress: r.progress,
            required: r.required,
            root_generation: r.root_generation,
            resealed: r.resealed,
            error: r.error,
        }
    }
}

impl View for RotateRootView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = vec![("root rotation".to_owned(), self.phase.to_owned())];
        if !self.nonce.is_empty() {
            rows.push(("nonce".to_owned(), self.nonce.clone()));
        }
        if self.phase == "collecting" {
            rows.push((
                "shares".to_owned(),
                format!("{}/{}", self.progress, self.required),
            ));
        }
        if matches!(self.phase, "resealing" | "done" | "stopped") {
            rows.push((
                "root generation".to_owned(),
                self.root_generation.to_string(),
            ));
            rows.push(("records re-sealed".to_owned(), self.resealed.to_string()));
        }
        if !self.error.is_empty() {
            rows.push(("error".to_owned(), self.error.clone()));
        }
        write_rows(w, &rows)
    }
}

/// The warning printed (on stderr) with the new shares from `rekey submit`.
pub fn rekey_warning(shares: usize, threshold: u32) -> String {
    format!(
        "WARNING: the {shares} new unseal share(s) above are shown this once; cipherd does not \
         store them.\nGive each to a different person and store them separately. They are NOT \
         in force yet: the current shares still unseal until {threshold} of the new ones are \
         submitted back with `cipherctl rekey submit --nonce NONCE`; after that the current \
         shares are refused."
    )
}

/// `seal`.
#[derive(Debug, Serialize)]
pub struct SealView {
    /// Always true after a successful seal.
    pub sealed: bool,
}

impl View for SealView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(w, &[("sealed", yes_no(self.sealed))])
    }
}

/// `backup`.
#[derive(Debug, Serialize)]
pub struct BackupView {
    /// Where the backup was written.
    pub file: String,
    /// Its size.
    pub bytes: u64,
}

impl View for BackupView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(
            w,
            &[
                ("backup", self.file.clone()),
                ("bytes", self.bytes.to_string()),
            ],
        )
    }
}

/// `restore`.
#[derive(Debug, Serialize)]
pub struct RestoreView {
    /// Records restored, the seal record included.
    pub records: u64,
    /// When the backup was taken.
    pub created_at: String,
    /// The backend it was taken from.
    pub source_backend: String,
    /// Always true: a restored server starts sealed.
    pub sealed: bool,
}

impl From<pb::RestoreResponse> for RestoreView {
    fn from(r: pb::RestoreResponse) -> Self {
        Self {
            records: r.records,
            created_at: r.created_at,
            source_backend: r.source_backend,
            sealed: true,
        }
    }
}

impl View for RestoreView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(
            w,
            &[
                ("records", self.records.to_string()),
                ("backup taken", self.created_at.clone()),
                ("source backend", self.source_backend.clone()),
                ("sealed", yes_no(self.sealed)),
            ],
        )?;
        writeln!(w, "unseal with the backed-up server's shares")
    }
}

/// A key's metadata (`key create/get/rotate/config/trim`).
#[derive(Debug, Serialize)]
pub struct KeyView {
    /// Name.
    pub name: String,
    /// Type, as spelled on the command line (`xaes-256-gcm`, …).
    #[serde(rename = "type")]
    pub key_type: String,
    /// Derived per context.
    pub derived: bool,
    /// Material may be exported.
    pub exportable: bool,
    /// The key may be deleted.
    pub deletion_allowed: bool,
    /// The version that encrypts.
    pub latest_version: u32,
    /// Oldest version that decrypts.
    pub min_decryption_version: u32,
    /// Oldest version that may encrypt (0: always the latest).
    pub min_encryption_version: u32,
    /// Oldest version not trimmed.
    pub min_available_version: u32,
    /// Creation time.
    pub created_at: Option<String>,
    /// Random identity (32 hex digits; empty for keys older than ids).
    pub id: String,
    /// Seconds between automatic rotations (`null`: never).
    pub auto_rotate_period_s: Option<i64>,
    /// When the key will be destroyed (`null` unless a deletion is scheduled).
    pub deletion_time: Option<String>,
    /// The available versions, oldest first.
    pub versions: Vec<KeyVersionView>,
}

/// One version in a [`KeyView`].
#[derive(Debug, Serialize)]
pub struct KeyVersionView {
    /// Version number.
    pub version: u32,
    /// Creation time.
    pub created_at: Option<String>,
    /// Encryptions reserved so far (counted types; 0 otherwise).
    pub encryptions: u64,
    /// The enforced limit (0: not counted).
    pub encryption_limit: u64,
    /// Items encrypted under it, on every replica.
    pub encrypt_count: u64,
    /// Items decrypted under it, on every replica.
    pub decrypt_count: u64,
    /// The last encryption or decryption (`null`: none recorded).
    pub last_used: Option<String>,
}

impl From<pb::Key> for KeyView {
    fn from(k: pb::Key) -> Self {
        Self {
            key_type: key_type_name(k.r#type),
            derived: k.derived,
            exportable: k.exportable,
            deletion_allowed: k.deletion_allowed,
            latest_version: k.latest_version,
            min_decryption_version: k.min_decryption_version,
            min_encryption_version: k.min_encryption_version,
            min_available_version: k.min_available_version,
            created_at: k.created_at.map(|t| rfc3339(t.seconds, t.nanos)),
            id: k.id,
            auto_rotate_period_s: k.auto_rotate_period.map(|d| d.seconds),
            deletion_time: k.deletion_time.map(|t| rfc3339(t.seconds, t.nanos)),
            versions: k
                .versions
                .into_iter()
                .map(|v| KeyVersionView {
                    version: v.version,
                    created_at: v.created_at.map(|t| rfc3339(t.seconds, t.nanos)),
                    encryptions: v.encryptions,
                    encryption_limit: v.encryption_limit,
                    encrypt_count: v.encrypt_count,
                    decrypt_count: v.decrypt_count,
                    last_used: v.last_used.map(|t| rfc3339(t.seconds, t.nanos)),
                })
                .collect(),
            name: k.name,
        }
    }
}

impl View for KeyView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let min_enc = match self.min_encryption_version {
            0 => "0 (latest)".to_owned(),
            n => n.to_string(),
        };
        write_rows(
            w,
            &[
                ("name", self.name.clone()),
                ("type", self.key_type.clone()),
                ("derived", yes_no(self.derived)),
                ("exportable", yes_no(self.exportable)),
                ("deletion allowed", yes_no(self.deletion_allowed)),
                ("created", opt(&self.created_at)),
                ("latest version", self.latest_version.to_string()),
                (
                    "min decryption version",
                    self.min_decryption_version.to_string(),
                ),
                ("min encryption version", min_enc),
                (
                    "min available version",
                    self.min_available_version.to_string(),
                ),
                (
                    "auto rotate",
                    self.auto_rotate_period_s
                        .map_or_else(|| "off".to_owned(), |s| format!("every {s} s")),
                ),
                (
                    "deletion",
                    self.deletion_time.as_ref().map_or_else(
                        || "not scheduled".to_owned(),
                        |t| format!("scheduled at {t}"),
                    ),
                ),
                (
                    "id",
                    if self.id.is_empty() {
                        "-".to_owned()
                    } else {
                        self.id.clone()
                    },
                ),
            ],
        )?;
        writeln!(w)?;
        let mut table = vec![vec![
            "VERSION".to_owned(),
            "CREATED".to_owned(),
            "USAGE (ENCRYPTIONS/LIMIT)".to_owned(),
            "ENCRYPTS".to_owned(),
            "DECRYPTS".to_owned(),
            "LAST USED".to_owned(),
        ]];
        for v in &self.versions {
            table.push(vec![
                v.version.to_string(),
                opt(&v.created_at),
                usage(v.encryptions, v.encryption_limit),
                v.encrypt_count.to_string(),
                v.decrypt_count.to_string(),
                opt(&v.last_used),
            ]);
        }
        write_table(w, &table)?;
        if self.versions.iter().any(|v| v.encryption_limit > 0) {
            writeln!(
                w,
                "\nEncryptions are reserved from storage in blocks, so the count is an \
                 upper bound on those made."
            )?;
        }
        Ok(())
    }
}

/// `key list`.
#[derive(Debug, Serialize)]
pub struct KeyListView {
    /// Key names in order.
    pub names: Vec<String>,
    /// Token of the next page (`null` on the last page or with `--all`).
    pub next_page_token: Option<String>,
}

impl View for KeyListView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        for name in &self.names {
            writeln!(w, "{name}")?;
        }
        Ok(())
    }
}

/// `key delete`.
#[derive(Debug, Serialize)]
pub struct DeletedView {
    /// The deleted key.
    pub name: String,
    /// Always true.
    pub deleted: bool,
}

impl View for DeletedView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(w, &[("deleted", self.name.clone())])
    }
}

/// `key delete`.
#[derive(Debug, Serialize)]
pub struct KeyDeletionView {
    /// The key.
    pub name: String,
    /// When its material is (or was) destroyed.
    pub deletion_time: Option<String>,
    /// Whether it was destroyed already (a waiting period of zero).
    pub destroyed: bool,
}

impl KeyDeletionView {
    /// The view of a `DeleteKey` reply.
    pub fn new(name: String, reply: pb::DeleteKeyResponse) -> Self {
        Self {
            name,
            deletion_time: reply.deletion_time.map(|t| rfc3339(t.seconds, t.nanos)),
            destroyed: reply.key.is_none(),
        }
    }
}

impl View for KeyDeletionView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.destroyed {
            return write_rows(w, &[("destroyed", self.name.clone())]);
        }
        write_rows(
            w,
            &[
                ("scheduled for deletion", self.name.clone()),
                ("deletion time", opt(&self.deletion_time)),
            ],
        )?;
        writeln!(
            w,
            "\nUntil then the key refuses every use; `cipherctl key cancel-deletion {}` undoes this.",
            self.name
        )
    }
}

/// `key export`.
#[derive(Debug, Serialize)]
pub struct ExportView {
    /// Key name.
    pub name: String,
    /// Key type.
    #[serde(rename = "type")]
    pub key_type: String,
    /// The exported versions.
    pub versions: Vec<ExportedVersionView>,
}

/// One exported version.
#[derive(Serialize)]
pub struct ExportedVersionView {
    /// Version number.
    pub version: u32,
    /// The 256-bit material, base64.
    pub material: String,
}

impl std::fmt::Debug for ExportedVersionView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedVersionView")
            .field("version", &self.version)
            .field("material", &"[redacted]")
            .finish()
    }
}

impl From<pb::ExportKeyResponse> for ExportView {
    fn from(r: pb::ExportKeyResponse) -> Self {
        Self {
            name: r.name,
            key_type: key_type_name(r.r#type),
            versions: r
                .versions
                .into_iter()
                .map(|v| ExportedVersionView {
                    version: v.version,
                    material: b64(&v.material),
                })
                .collect(),
        }
    }
}

impl View for ExportView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = vec![
            ("name".to_owned(), self.name.clone()),
            ("type".to_owned(), self.key_type.clone()),
        ];
        rows.extend(
            self.versions
                .iter()
                .map(|v| (format!("version {}", v.version), v.material.clone())),
        );
        write_rows(w, &rows)
    }
}

/// A token's description (`token lookup`, rows of `token list`); never its secret.
#[derive(Debug, Clone, Serialize)]
pub struct TokenView {
    /// Non-secret handle for lookup and revocation.
    pub accessor: String,
    /// Display name.
    pub display_name: String,
    /// The policies it holds.
    pub policies: Vec<String>,
    /// Creation time.
    pub created: Option<String>,
    /// Expiry time (`null`: never).
    pub expires: Option<String>,
    /// The principal that created it.
    pub created_by: String,
}

impl From<pb::TokenInfo> for TokenView {
    fn from(t: pb::TokenInfo) -> Self {
        Self {
            accessor: t.accessor,
            display_name: t.display_name,
            policies: t.policies,
            created: (t.created_unix != 0).then(|| rfc3339(t.created_unix, 0)),
            expires: (t.expires_unix != 0).then(|| rfc3339(t.expires_unix, 0)),
            created_by: t.created_by,
        }
    }
}

impl TokenView {
    fn rows(&self) -> Vec<(&'static str, String)> {
        vec![
            ("accessor", self.accessor.clone()),
            ("display name", dash(&self.display_name)),
            ("policies", list(&self.policies)),
            ("created", opt(&self.created)),
            (
                "expires",
                self.expires.clone().unwrap_or_else(|| "never".to_owned()),
            ),
            ("created by", dash(&self.created_by)),
        ]
    }
}

impl View for TokenView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(w, &self.rows())
    }
}

/// `token create`: the secret, shown once, then the description. `Debug` redacts
/// the secret.
#[derive(Serialize)]
pub struct CreatedTokenView {
    /// The bearer token.
    #[serde(serialize_with = "expose")]
    pub token: Zeroizing<String>,
    /// Its description.
    #[serde(flatten)]
    pub info: TokenView,
}

impl std::fmt::Debug for CreatedTokenView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedTokenView")
            .field("token", &"[redacted]")
            .field("info", &self.info)
            .finish()
    }
}

impl View for CreatedTokenView {
    /// The token alone on the first line (so `| head -1` takes it), then the
    /// description.
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "{}", self.token.as_str())?;
        write_rows(w, &self.info.rows())
    }
}

fn expose<S: serde::Serializer>(secret: &Zeroizing<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret)
}

/// The note printed (on stderr) after `token create`.
pub fn token_warning(accessor: &str) -> String {
    format!(
        "The token above is shown this once: hand it to its user through a secret manager \
         or an environment variable (CIPHERD_TOKEN), never a command line. Revoke it with \
         `cipherctl token revoke {accessor}`."
    )
}

/// `token list`.
#[derive(Debug, Serialize)]
pub struct TokenListView {
    /// Every token's description.
    pub tokens: Vec<TokenView>,
}

impl View for TokenListView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let mut table = vec![vec![
            "ACCESSOR".to_owned(),
            "DISPLAY NAME".to_owned(),
            "POLICIES".to_owned(),
            "EXPIRES".to_owned(),
        ]];
        for t in &self.tokens {
            table.push(vec![
                t.accessor.clone(),
                dash(&t.display_name),
                list(&t.policies),
                t.expires.clone().unwrap_or_else(|| "never".to_owned()),
            ]);
        }
        write_table(w, &table)
    }
}

/// `token revoke`.
#[derive(Debug, Serialize)]
pub struct RevokedView {
    /// The revoked token's accessor.
    pub accessor: String,
    /// Always true.
    pub revoked: bool,
}

impl View for RevokedView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(w, &[("revoked", self.accessor.clone())])
    }
}

/// A role (`role write/read`).
#[derive(Debug, Clone, Serialize)]
pub struct RoleView {
    /// Name.
    pub name: String,
    /// Principal globs.
    pub principals: Vec<String>,
    /// Group globs.
    pub groups: Vec<String>,
    /// Policies granted.
    pub policies: Vec<String>,
}

impl From<pb::Role> for RoleView {
    fn from(r: pb::Role) -> Self {
        Self {
            name: r.name,
            principals: r.principals,
            groups: r.groups,
            policies: r.policies,
        }
    }
}

impl View for RoleView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(
            w,
            &[
                ("name", self.name.clone()),
                ("principals", list(&self.principals)),
                ("groups", list(&self.groups)),
                ("policies", list(&self.policies)),
            ],
        )
    }
}

/// `role list`.
#[derive(Debug, Serialize)]
pub struct RoleListView {
    /// Every role.
    pub roles: Vec<RoleView>,
}

impl View for RoleListView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.roles.is_empty() {
            return Ok(());
        }
        let mut table = vec![vec![
            "NAME".to_owned(),
            "PRINCIPALS".to_owned(),
            "GROUPS".to_owned(),
            "POLICIES".to_owned(),
        ]];
        for r in &self.roles {
            table.push(vec![
                r.name.clone(),
                list(&r.principals),
                list(&r.groups),
                list(&r.policies),
            ]);
        }
        write_table(w, &table)
    }
}

/// `policy write`.
#[derive(Debug, Serialize)]
pub struct PolicyWrittenView {
    /// The policy written.
    pub name: String,
    /// Always true.
    pub written: bool,
}

impl View for PolicyWrittenView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        write_rows(w, &[("written", self.name.clone())])
    }
}

/// `policy read`: the document, printed as is so it can be edited and written back.
#[derive(Debug, Serialize)]
pub struct PolicyView {
    /// Name.
    pub name: String,
    /// The TOML document as written.
    pub document: String,
}

impl View for PolicyView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(self.document.as_bytes())?;
        if !self.document.is_empty() && !self.document.ends_with('\n') {
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// `policy list`.
#[derive(Debug, Serialize)]
pub struct PolicyListView {
    /// Policy names, sorted.
    pub names: Vec<String>,
}

impl View for PolicyListView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        for name in &self.names {
            writeln!(w, "{name}")?;
        }
        Ok(())
    }
}

/// `encrypt`, `rewrap`: one ciphertext.
#[derive(Debug, Serialize)]
pub struct CiphertextView {
    /// Text form, or base64 of the binary form with `--binary`.
    pub ciphertext: String,
    /// The key version that encrypted it.
    pub key_version: u32,
}

impl View for CiphertextView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        writeln!(w, "{}", self.ciphertext)
    }
}

/// `decrypt`: one plaintext.
pub struct PlaintextView {
    /// The plaintext bytes.
    pub plaintext: Vec<u8>,
    /// The version the ciphertext was made under.
    pub key_version: u32,
    /// Human output as base64 (plus newline) instead of raw bytes.
    pub base64: bool,
    /// Human raw output ends with a newline if the plaintext lacks one, so a
    /// terminal prompt does not run into it. Set only when stdout is a terminal:
    /// piped output stays byte for byte.
    pub terminal_newline: bool,
}

impl Serialize for PlaintextView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        PlaintextJson::new(None, &self.plaintext, Some(self.key_version)).serialize(s)
    }
}

impl View for PlaintextView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        if self.base64 {
            return writeln!(w, "{}", b64(&self.plaintext));
        }
        w.write_all(&self.plaintext)?;
        if self.terminal_newline && !self.plaintext.ends_with(b"\n") {
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// `datakey`.
pub struct DataKeyView {
    /// The plaintext data key (absent with `--wrapped-only`).
    pub plaintext: Option<Vec<u8>>,
    /// The wrapped key: text form, or base64 of the binary form.
    pub ciphertext: String,
    /// The wrapping key's version.
    pub key_version: u32,
}

#[derive(Serialize)]
struct DataKeyJson<'a> {
    plaintext_base64: Option<String>,
    ciphertext: &'a str,
    key_version: u32,
}

impl Serialize for DataKeyView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        DataKeyJson {
            plaintext_base64: self.plaintext.as_deref().map(b64),
            ciphertext: &self.ciphertext,
            key_version: self.key_version,
        }
        .serialize(s)
    }
}

impl View for DataKeyView {
    fn write_human(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut rows = Vec::new();
        if let Some(p) = &self.plaintext {
            rows.push(("plaintext (base64)", b64(p)));
        }
        rows.push(("ciphertext", self.ciphertext.clone()));
        rows.push(("key version", self.key_version.to_string()));
        write_rows(w, &rows)
    }
}

/// What a successful `--lines` item produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineValue {
    /// A ciphertext (already in its printable form).
    Ciphertext(String),
    /// A plaintext.
    Plaintext(Vec<u8>),
}

/// Writes the output line for input line `line` (1-based). Returns false when the
/// line reports an error, which includes a plaintext that cannot be printed on one
/// line in human mode (it contains a line break; `--base64` avoids that).
pub fn write_line(
    format: Format,
    line: u64,
    outcome: Result<LineValue, Failure>,
    plaintext_base64: bool,
    w: &mut dyn Write,
) -> io::Result<bool> {
    let outcome = match outcome {
        Ok(LineValue::Plaintext(p))
            if format == Format::Human
                && !plaintext_base64
                && p.iter().any(|&b| b == b'\n' || b == b'\r') =>
        {
            Err(Failure::new(
                "LINE_BREAK_IN_PLAINTEXT",
                "the plaintext contains a line break; use --base64 to print it",
            ))
        }
        other => other,
    };
    let ok = outcome.is_ok();
    match format {
        Format::Human => match outcome {
            Ok(LineValue::Ciphertext(c)) => writeln!(w, "{c}")?,
            Ok(LineValue::Plaintext(p)) if plaintext_base64 => writeln!(w, "{}", b64(&p))?,
            Ok(LineValue::Plaintext(p)) => {
                w.write_all(&p)?;
                w.write_all(b"\n")?;
            }
            Err(f) => writeln!(w, "{}", error_line(&f))?,
        },
        Format::Json => {
            let json = match &outcome {
                Ok(LineValue::Ciphertext(c)) => serde_json::to_string(&LineCiphertextJson {
                    line,
                    ciphertext: c,
                }),
                Ok(LineValue::Plaintext(p)) => {
                    serde_json::to_string(&PlaintextJson::new(Some(line), p, None))
                }
                Err(f) => serde_json::to_string(&LineErrorJson {
                    line,
                    error: ErrorJson {
                        reason: &f.reason,
                        message: &f.message,
                    },
                }),
            }
            .map_err(io::Error::other)?;
            writeln!(w, "{json}")?;
        }
    }
    Ok(ok)
}

#[derive(Serialize)]
struct LineCiphertextJson<'a> {
    line: u64,
    ciphertext: &'a str,
}

#[derive(Serialize)]
struct LineErrorJson<'a> {
    line: u64,
    error: ErrorJson<'a>,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    reason: &'a str,
    message: &'a str,
}

/// A plaintext in JSON: as a string when it is UTF-8 (else `null`), and always as
/// base64, so binary values survive and text stays readable.
#[derive(Serialize)]
struct PlaintextJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<u64>,
    plaintext: Option<&'a str>,
    plaintext_base64: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_version: Option<u32>,
}

impl<'a> PlaintextJson<'a> {
    fn new(line: Option<u64>, plaintext: &'a [u8], key_version: Option<u32>) -> Self {
        Self {
            line,
            plaintext: std::str::from_utf8(plaintext).ok(),
            plaintext_base64: b64(plaintext),
            key_version,
        }
    }
}

/// The command-line spelling of a proto key type.
pub fn key_type_name(value: i32) -> String {
    match pb::KeyType::try_from(value) {
        Ok(pb::KeyType::Xaes256Gcm) => "xaes-256-gcm".to_owned(),
        Ok(pb::KeyType::Aes256Gcm96) => "aes256-gcm96".to_owned(),
        Ok(pb::KeyType::Chacha20Poly1305) => "chacha20-poly1305".to_owned(),
        Ok(pb::KeyType::Xchacha20Poly1305) => "xchacha20-poly1305".to_owned(),
        Ok(pb::KeyType::Unspecified) | Err(_) => format!("unknown ({value})"),
    }
}

/// Standard padded base64.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-05-01T09:30:00.250Z`.
pub fn rfc3339(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs_of_day = seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
        nanos.clamp(0, 999_999_999) / 1_000_000,
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard
/// Hinnant's `civil_from_days`, exact for every i64 day count we can meet.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn usage(encryptions: u64, limit: u64) -> String {
    if limit == 0 {
        return "not counted".to_owned();
    }
    // Display only; f64 rounding is irrelevant at one decimal.
    let percent = encryptions as f64 * 100.0 / limit as f64;
    format!("{encryptions}/{limit} ({percent:.1}%)")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".to_owned())
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-" } else { s }.to_owned()
}

/// A list as `a, b, c`, or `-` when empty.
fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// `label: value` lines with the values aligned one space after the longest label.
fn write_rows<L: AsRef<str>>(w: &mut dyn Write, rows: &[(L, String)]) -> io::Result<()> {
    let width = rows
        .iter()
        .map(|(l, _)| l.as_ref().len())
        .max()
        .unwrap_or(0)
        + 1;
    for (label, value) in rows {
        let label = format!("{}:", label.as_ref());
        writeln!(w, "{label:<width$} {value}", width = width)?;
    }
    Ok(())
}

/// Left-aligned columns two spaces apart, no trailing spaces.
fn write_table(w: &mut dyn Write, rows: &[Vec<String>]) -> io::Result<()> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(w, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn human(view: &dyn ErasedView) -> String {
        let mut out = Vec::new();
        emit(Format::Human, view, &mut out).expect("render");
        String::from_utf8(out).expect("utf-8")
    }

    fn json(view: &dyn ErasedView) -> serde_json::Value {
        let mut out = Vec::new();
        emit(Format::Json, view, &mut out).expect("render");
        assert_eq!(out.last(), Some(&b'\n'), "one object, one line");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        serde_json::from_slice(&out).expect("json")
    }

    fn ts(seconds: i64, millis: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds,
            nanos: millis * 1_000_000,
        })
    }

    fn sample_key() -> pb::Key {
        pb::Key {
            name: "patients".into(),
            r#type: pb::KeyType::Aes256Gcm96 as i32,
            derived: false,
            exportable: true,
            deletion_allowed: false,
            latest_version: 2,
            min_decryption_version: 1,
            min_encryption_version: 0,
            min_available_version: 1,
            versions: vec![
                pb::KeyVersionInfo {
                    version: 1,
                    created_at: ts(1_700_000_000, 5),
                    encryptions: 65_536,
                    encryption_limit: 3_865_470_566,
                    encrypt_count: 1200,
                    decrypt_count: 34,
                    last_used: ts(1_700_003_000, 0),
                },
                pb::KeyVersionInfo {
                    version: 2,
                    created_at: ts(1_700_003_600, 0),
                    encryptions: 0,
                    encryption_limit: 3_865_470_566,
                    ..Default::default()
                },
            ],
            created_at: ts(1_700_000_000, 5),
            id: "0123456789abcdef0123456789abcdef".into(),
            auto_rotate_period: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
            deletion_time: None,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_700_000_000, 5_000_000),
            "2023-11-14T22:13:20.005Z"
        );
        assert_eq!(rfc3339(951_825_600, 0), "2000-02-29T12:00:00.000Z");
        assert_eq!(rfc3339(-1, 0), "1969-12-31T23:59:59.000Z");
        assert_eq!(
            rfc3339(4_102_444_800, 999_999_999),
            "2100-01-01T00:00:00.999Z"
        );
    }

    #[test]
    fn key_human_shows_fields_aligned_and_a_usage_table() {
        let text = human(&KeyView::from(sample_key()));
        let expected = "\
name:                   patients
type:                   aes256-gcm96
derived:                no
exportable:             yes
deletion allowed:       no
created:                2023-11-14T22:13:20.005Z
latest version:         2
min decryption version: 1
min encryption version: 0 (latest)
min available version:  1
auto rotate:            every 86400 s
deletion:               not scheduled
id:                     0123456789abcdef0123456789abcdef

VERSION  CREATED                   USAGE (ENCRYPTIONS/LIMIT)  ENCRYPTS  DECRYPTS  LAST USED
1        2023-11-14T22:13:20.005Z  65536/3865470566 (0.0%)    1200      34        2023-11-14T23:03:20.000Z
2        2023-11-14T23:13:20.000Z  0/3865470566 (0.0%)        0         0         -

Encryptions are reserved from storage in blocks, so the count is an upper bound on those made.
";
        assert_eq!(text, expected);
    }

    #[test]
    fn uncounted_types_say_so() {
        let mut key = sample_key();
        key.r#type = pb::KeyType::Xaes256Gcm as i32;
        for v in &mut key.versions {
            v.encryption_limit = 0;
        }
        let text = human(&KeyView::from(key));
        assert!(text.contains("type:                   xaes-256-gcm\n"));
        assert!(
            text.lines()
                .nth(15)
                .is_some_and(|l| l.contains("  not counted  ")),
            "{text}"
        );
    }

    #[test]
    fn key_json_has_stable_field_names() {
        let v = json(&KeyView::from(sample_key()));
        assert_eq!(v["name"], "patients");
        assert_eq!(v["type"], "aes256-gcm96");
        assert_eq!(v["latest_version"], 2);
        assert_eq!(v["min_encryption_version"], 0);
        assert_eq!(v["exportable"], true);
        assert_eq!(v["created_at"], "2023-11-14T22:13:20.005Z");
        assert_eq!(v["versions"][0]["encryptions"], 65_536);
        assert_eq!(v["versions"][1]["encryption_limit"], 3_865_470_566_u64);
        let fields: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(fields.len(), 14, "{fields:?}");
        assert_eq!(v["auto_rotate_period_s"], 86_400);
        assert_eq!(v["deletion_time"], serde_json::Value::Null);
        assert_eq!(v["versions"][0]["encrypt_count"], 1200);
        assert_eq!(v["versions"][0]["last_used"], "2023-11-14T23:03:20.000Z");
    }

    #[test]
    fn status_hides_share_counts_before_init_and_shows_progress_while_sealed() {
        let mut s = pb::StatusResponse {
            initialized: true,
            sealed: true,
            threshold: 3,
            shares: 5,
            progress: 1,
            version: "0.1.0".into(),
            storage: "sqlite".into(),
            dev_mode: false,
        };
        let text = human(&StatusView::from(s.clone()));
        assert_eq!(
            text,
            "initialized:     yes\nsealed:          yes\nunseal progress: 1/3\nshares:          5\n\
             threshold:       3\nversion:         0.1.0\nstorage:         sqlite\n\
             dev mode:        no\n"
        );
        s.initialized = false;
        let text = human(&StatusView::from(s.clone()));
        assert!(
            !text.contains("shares") && !text.contains("progress"),
            "{text}"
        );
        let v = json(&StatusView::from(s));
        assert_eq!(v["initialized"], false);
        assert_eq!(v["threshold"], 3);
        assert_eq!(v["dev_mode"], false);
    }

    #[test]
    fn init_prints_numbered_shares_and_json_list() {
        let view = InitView {
            shares: vec!["s1".into(), "s2".into(), "s3".into()],
            threshold: 2,
            root_token: None,
        };
        assert_eq!(
            human(&view),
            "unseal share 1: s1\nunseal share 2: s2\nunseal share 3: s3\n"
        );
        let v = json(&view);
        assert_eq!(v["shares"], serde_json::json!(["s1", "s2", "s3"]));
        assert_eq!(v["root_token"], serde_json::Value::Null);
        assert!(!format!("{view:?}").contains("s1"));
        let warning = init_warning(3, 2, false);
        assert!(warning.starts_with("WARNING"));
        assert!(warning.contains("separately") && warning.contains("Any 2"));
        assert!(!warning.contains("root token"));
    }

    #[test]
    fn init_prints_the_root_token_once_after_the_shares() {
        let view = InitView {
            shares: vec!["s1".into(), "s2".into()],
            threshold: 2,
            root_token: Some("s.ROOT".into()),
        };
        assert_eq!(
            human(&view),
            "unseal share 1: s1\nunseal share 2: s2\nroot token:     s.ROOT\n"
        );
        let v = json(&view);
        assert_eq!(v["root_token"], "s.ROOT");
        assert_eq!(v["shares"], serde_json::json!(["s1", "s2"]));
        assert!(!format!("{view:?}").contains("s.ROOT"));
        let warning = init_warning(2, 2, true);
        assert!(
            warning.contains("root token") && warning.contains("revoke"),
            "{warning}"
        );
    }

    fn sample_token() -> pb::TokenInfo {
        pb::TokenInfo {
            accessor: "acc-1".into(),
            display_name: "etl (prod)".into(),
            policies: vec!["read".into(), "write".into()],
            created_unix: 1_700_000_000,
            expires_unix: 1_700_003_600,
            created_by: "root".into(),
        }
    }

    #[test]
    fn created_token_prints_the_secret_alone_first_and_json_flat() {
        let view = CreatedTokenView {
            token: Zeroizing::new("s.SECRET".into()),
            info: TokenView::from(sample_token()),
        };
        assert_eq!(
            human(&view),
            "s.SECRET\naccessor:     acc-1\ndisplay name: etl (prod)\npolicies:     read, write\n\
             created:      2023-11-14T22:13:20.000Z\nexpires:      2023-11-14T23:13:20.000Z\n\
             created by:   root\n"
        );
        let v = json(&view);
        assert_eq!(v["token"], "s.SECRET");
        assert_eq!(v["accessor"], "acc-1");
        assert_eq!(v["policies"], serde_json::json!(["read", "write"]));
        assert_eq!(v["expires"], "2023-11-14T23:13:20.000Z");
        assert_eq!(v["display_name"], "etl (prod)");
        assert!(!format!("{view:?}").contains("SECRET"));
        assert!(token_warning("acc-1").contains("cipherctl token revoke acc-1"));
    }

    #[test]
    fn token_lookup_and_list() {
        let mut never = sample_token();
        never.expires_unix = 0;
        never.display_name.clear();
        never.policies.clear();
        let view = TokenView::from(never.clone());
        let text = human(&view);
        assert!(text.contains("expires:      never\n"), "{text}");
        assert!(text.contains("display name: -\n") && text.contains("policies:     -\n"));
        let v = json(&view);
        assert_eq!(v["expires"], serde_json::Value::Null);
        assert_eq!(v["policies"], serde_json::json!([]));
        assert!(v.get("token").is_none(), "a lookup has no secret");

        let list = TokenListView {
            tokens: vec![TokenView::from(sample_token()), view],
        };
        assert_eq!(
            human(&list),
            "ACCESSOR  DISPLAY NAME  POLICIES     EXPIRES\n\
             acc-1     etl (prod)    read, write  2023-11-14T23:13:20.000Z\n\
             acc-1     -             -            never\n"
        );
        assert_eq!(json(&list)["tokens"][0]["accessor"], "acc-1");
        assert_eq!(human(&TokenListView { tokens: vec![] }), "");
        let revoked = RevokedView {
            accessor: "acc-1".into(),
            revoked: true,
        };
        assert_eq!(human(&revoked), "revoked: acc-1\n");
        assert_eq!(json(&revoked)["revoked"], true);
    }

    #[test]
    fn roles_render_as_rows_and_a_table() {
        let role = RoleView::from(pb::Role {
            name: "ehr".into(),
            principals: vec!["spiffe://hospital/ns/ehr/*".into()],
            groups: vec![],
            policies: vec!["clinical".into()],
        });
        assert_eq!(
            human(&role),
            "name:       ehr\nprincipals: spiffe://hospital/ns/ehr/*\ngroups:     -\n\
             policies:   clinical\n"
        );
        let v = json(&role);
        assert_eq!(v["groups"], serde_json::json!([]));
        assert_eq!(v["principals"][0], "spiffe://hospital/ns/ehr/*");
        let list = RoleListView { roles: vec![role] };
        assert_eq!(
            human(&list),
            "NAME  PRINCIPALS                  GROUPS  POLICIES\n\
             ehr   spiffe://hospital/ns/ehr/*  -       clinical\n"
        );
        assert_eq!(json(&list)["roles"][0]["name"], "ehr");
    }

    #[test]
    fn policies_print_their_document_as_written() {
        let doc = "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\n";
        let view = PolicyView {
            name: "p".into(),
            document: doc.into(),
        };
        assert_eq!(human(&view), doc);
        let unterminated = PolicyView {
            name: "p".into(),
            document: "# empty".into(),
        };
        assert_eq!(human(&unterminated), "# empty\n");
        let v = json(&view);
        assert_eq!(
            (v["name"].as_str(), v["document"].as_str()),
            (Some("p"), Some(doc))
        );
        let list = PolicyListView {
            names: vec!["a".into(), "b".into()],
        };
        assert_eq!(human(&list), "a\nb\n");
        assert_eq!(json(&list)["names"], serde_json::json!(["a", "b"]));
        let written = PolicyWrittenView {
            name: "p".into(),
            written: true,
        };
        assert_eq!(human(&written), "written: p\n");
    }

    #[test]
    fn unseal_and_seal() {
        let sealed = UnsealView {
            sealed: true,
            threshold: 3,
            progress: 2,
        };
        assert_eq!(
            human(&sealed),
            "sealed:          yes\nunseal progress: 2/3\n"
        );
        let open = UnsealView {
            sealed: false,
            threshold: 3,
            progress: 0,
        };
        assert_eq!(human(&open), "sealed: no\n");
        assert_eq!(json(&open)["sealed"], false);
        assert_eq!(human(&SealView { sealed: true }), "sealed: yes\n");
    }

    #[test]
    fn list_prints_names_one_per_line() {
        let view = KeyListView {
            names: vec!["a".into(), "b".into()],
            next_page_token: None,
        };
        assert_eq!(human(&view), "a\nb\n");
        assert_eq!(json(&view)["next_page_token"], serde_json::Value::Null);
    }

    #[test]
    fn export_shows_base64_material_and_redacts_debug() {
        let view = ExportView::from(pb::ExportKeyResponse {
            name: "k".into(),
            r#type: pb::KeyType::Xchacha20Poly1305 as i32,
            versions: vec![pb::ExportedKeyVersion {
                version: 1,
                material: vec![0xff; 4].into(),
            }],
        });
        assert_eq!(
            human(&view),
            "name:      k\ntype:      xchacha20-poly1305\nversion 1: /////w==\n"
        );
        assert_eq!(json(&view)["versions"][0]["material"], "/////w==");
        assert!(!format!("{view:?}").contains("/////w=="));
    }

    #[test]
    fn ciphertext_is_one_line() {
        let view = CiphertextView {
            ciphertext: "cipherd:v2:AAAA".into(),
            key_version: 2,
        };
        assert_eq!(human(&view), "cipherd:v2:AAAA\n");
        let v = json(&view);
        assert_eq!(v["ciphertext"], "cipherd:v2:AAAA");
        assert_eq!(v["key_version"], 2);
    }

    #[test]
    fn plaintext_is_raw_or_base64_and_json_carries_both() {
        let view = PlaintextView {
            plaintext: b"hi\n".to_vec(),
            key_version: 1,
            base64: false,
            terminal_newline: true,
        };
        assert_eq!(human(&view), "hi\n");
        let piped = PlaintextView {
            plaintext: b"hi".to_vec(),
            key_version: 1,
            base64: false,
            terminal_newline: false,
        };
        assert_eq!(human(&piped), "hi");
        let terminal = PlaintextView {
            terminal_newline: true,
            ..piped
        };
        assert_eq!(human(&terminal), "hi\n");
        let v = json(&view);
        assert_eq!(v["plaintext"], "hi\n");
        assert_eq!(v["plaintext_base64"], "aGkK");
        assert_eq!(v["key_version"], 1);

        let binary = PlaintextView {
            plaintext: vec![0xff, 0x00],
            key_version: 3,
            base64: true,
            terminal_newline: false,
        };
        assert_eq!(human(&binary), "/wA=\n");
        assert_eq!(json(&binary)["plaintext"], serde_json::Value::Null);
    }

    #[test]
    fn datakey_rows_and_json() {
        let view = DataKeyView {
            plaintext: Some(vec![1, 2, 3]),
            ciphertext: "cipherd:v1:xyz".into(),
            key_version: 1,
        };
        assert_eq!(
            human(&view),
            "plaintext (base64): AQID\nciphertext:         cipherd:v1:xyz\n\
             key version:        1\n"
        );
        let wrapped = DataKeyView {
            plaintext: None,
            ..view
        };
        assert!(!human(&wrapped).contains("plaintext"));
        let v = json(&wrapped);
        assert_eq!(v["plaintext_base64"], serde_json::Value::Null);
        assert_eq!(v["ciphertext"], "cipherd:v1:xyz");
    }

    fn line(format: Format, outcome: Result<LineValue, Failure>, b64: bool) -> (String, bool) {
        let mut out = Vec::new();
        let ok = write_line(format, 7, outcome, b64, &mut out).expect("write");
        (String::from_utf8_lossy(&out).into_owned(), ok)
    }

    #[test]
    fn lines_print_values_or_errors() {
        let failure = Failure::new("DECRYPTION_FAILED", "decryption failed");
        assert_eq!(
            line(
                Format::Human,
                Ok(LineValue::Ciphertext("cipherd:v1:A".into())),
                false
            ),
            ("cipherd:v1:A\n".into(), true)
        );
        assert_eq!(
            line(Format::Human, Err(failure.clone()), false),
            (
                "error: DECRYPTION_FAILED: decryption failed\n".into(),
                false
            )
        );
        assert_eq!(
            line(
                Format::Human,
                Ok(LineValue::Plaintext(b"x y".to_vec())),
                false
            ),
            ("x y\n".into(), true)
        );
        assert_eq!(
            line(
                Format::Human,
                Ok(LineValue::Plaintext(b"x\ny".to_vec())),
                true
            ),
            ("eAp5\n".into(), true)
        );
        let (text, ok) = line(
            Format::Human,
            Ok(LineValue::Plaintext(b"x\ny".to_vec())),
            false,
        );
        assert!(!ok);
        assert!(
            text.starts_with("error: LINE_BREAK_IN_PLAINTEXT: "),
            "{text}"
        );

        let (text, ok) = line(Format::Json, Err(failure), false);
        assert!(!ok);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["line"], 7);
        assert_eq!(v["error"]["reason"], "DECRYPTION_FAILED");
        let (text, ok) = line(
            Format::Json,
            Ok(LineValue::Plaintext(b"a\nb".to_vec())),
            false,
        );
        assert!(ok, "JSON escapes line breaks, so they are fine there");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["plaintext"], "a\nb");
        assert!(v.get("key_version").is_none());
    }

    #[test]
    fn error_line_format() {
        assert_eq!(
            error_line(&Failure::new("KEY_NOT_FOUND", "key \"x\" not found")),
            "error: KEY_NOT_FOUND: key \"x\" not found"
        );
    }

    #[test]
    fn unknown_key_types_are_named_not_dumped() {
        assert_eq!(key_type_name(0), "unknown (0)");
        assert_eq!(key_type_name(42), "unknown (42)");
    }
}
