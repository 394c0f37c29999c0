//! The command line, as clap derive definitions: every command, flag and its help.
//!
//! This module only describes and validates the syntax (ranges, conflicts, required
//! groups); clap turns any violation into a usage error with exit code 2. It does
//! no I/O and talks to no server: `commands` does that.

use std::{path::PathBuf, time::Duration};

use base64::Engine as _;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum, builder::NonEmptyStringValueParser};

/// Where cipherctl connects when neither `--addr` nor `CIPHERD_ADDR` is set.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8210";

/// Help heading of the flags every command accepts.
const GLOBAL: &str = "Global options";

/// cipherctl: operate cipherd and encrypt, decrypt and rewrap data from scripts.
#[derive(Debug, Parser)]
#[command(name = "cipherctl", version)]
#[command(
    about = "Operate cipherd and encrypt, decrypt and rewrap data from scripts",
    after_help = "Errors are printed as `error: <REASON>: <message>` on stderr (exit 1); \
                  usage errors exit 2."
)]
pub struct Cli {
    /// Flags that apply to every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after any subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// cipherd's gRPC address, `host[:port]` or a URL; `http://` is assumed when no
    /// scheme is given, and port 8210 when no port is.
    #[arg(long, env = "CIPHERD_ADDR", default_value = DEFAULT_ADDR, global = true, help_heading = GLOBAL)]
    pub addr: String,
    /// Print machine-readable JSON (one object per command; one per line with --lines).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
    /// Deadline of each call (and of connecting), in seconds; fractions allowed.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, global = true, help_heading = GLOBAL)]
    pub timeout: Option<Duration>,
    /// Bearer token sent with every call. Prefer the environment variable or
    /// --token-file: a flag's value shows in `ps` and the shell history.
    #[arg(long, value_name = "TOKEN", env = "CIPHERD_TOKEN", hide_env_values = true,
          global = true, help_heading = GLOBAL)]
    pub token: Option<SecretArg>,
    /// Read the bearer token from FILE (its one line that is not blank or a `#`
    /// comment, such as a dev server's root-token.INSECURE); wins over --token
    /// and CIPHERD_TOKEN. Keep the file private (mode 0600).
    // No `conflicts_with = "token"`: clap counts CIPHERD_TOKEN from the
    // environment as given, and an exported variable must not break the flag.
    #[arg(long, value_name = "FILE", global = true, help_heading = GLOBAL)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) that cipherd's TLS certificate must chain to. Turns
    /// TLS on (`https://` is assumed when --addr has no scheme); an `https://`
    /// address needs it.
    #[arg(long, env = "CIPHERD_CACERT", value_name = "FILE", global = true, help_heading = GLOBAL)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for a cipherd that requires one (mTLS), with
    /// --client-key and --ca-cert.
    #[arg(long, env = "CIPHERD_CLIENT_CERT", value_name = "FILE", requires_all = ["client_key", "ca_cert"], global = true, help_heading = GLOBAL)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, env = "CIPHERD_CLIENT_KEY", value_name = "FILE", requires = "client_cert", global = true, help_heading = GLOBAL)]
    pub client_key: Option<PathBuf>,
    /// The name cipherd's certificate must carry, when it is not the host in
    /// --addr (e.g. connecting to an IP address).
    #[arg(long, env = "CIPHERD_TLS_SERVER_NAME", value_name = "NAME", global = true, help_heading = GLOBAL)]
    pub tls_server_name: Option<String>,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show whether cipherd is initialized and sealed, and unseal progress.
    Status,
    /// Initialize a new cipherd: create the root key and print the unseal shares once.
    Init(InitArgs),
    /// Submit one unseal share (from the argument, or one line read from stdin).
    Unseal(UnsealArgs),
    /// Seal cipherd: drop all key material from its memory until unsealed again.
    Seal,
    /// Replace the unseal shares and threshold (needs a threshold of the current
    /// shares, then a threshold of the new ones back).
    #[command(subcommand)]
    Rekey(RekeyCommand),
    /// Rotate the root key (needs a threshold of the current shares); every
    /// stored record is then re-sealed under the new root in the background.
    #[command(subcommand)]
    RotateRoot(RotateRootCommand),
    /// Write a backup of the whole store to FILE (mode 0600, written atomically):
    /// every record as stored, encrypted, plus the seal record. Restoring it
    /// needs the unseal shares of this server. Needs the `backup` operation.
    Backup(BackupArgs),
    /// Restore a backup FILE into an uninitialized cipherd (SQLite or PostgreSQL),
    /// which is then sealed: unseal it with the backed-up server's shares.
    Restore(RestoreArgs),
    /// Manage named keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypt a value (argument or stdin), or every line of stdin with --lines.
    Encrypt(EncryptArgs),
    /// Decrypt a ciphertext (argument or stdin), or every line of stdin with --lines.
    Decrypt(DecryptArgs),
    /// Re-encrypt ciphertexts under the latest key version without revealing them.
    Rewrap(RewrapArgs),
    /// Generate a data key for envelope encryption (plaintext and wrapped).
    Datakey(DatakeyArgs),
    /// Create, list, look up and revoke bearer tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Bind mTLS and JWT identities (principals, groups) to policies.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Write, read, list and delete access policies (TOML documents of rules).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Verify audit log files (offline), or hash a value as audit records show it.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret, this once, with its accessor.
    Create(TokenCreateArgs),
    /// List tokens by accessor (never their secrets).
    List,
    /// Show one token by accessor, or without ACCESSOR the token this command runs
    /// with.
    Lookup(TokenLookupArgs),
    /// Revoke a token by accessor; it is refused from the next call on.
    Revoke(TokenAccessorArg),
}

/// `token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// A policy the token holds (repeat the flag for several; the token may do
    /// what any of them allows). Unless you may administer policies, only
    /// policies you hold yourself.
    #[arg(long = "policy", value_name = "NAME", required = true,
          value_parser = NonEmptyStringValueParser::new())]
    pub policies: Vec<String>,
    /// Lifetime, e.g. `15m`, `1h`, `7d` (default: the server's
    /// `auth.default_token_ttl_s`).
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// Shown in listings and audit records, e.g. "ehr-api (prod)".
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub display_name: String,
}

/// `token lookup`.
#[derive(Debug, Args)]
pub struct TokenLookupArgs {
    /// The token's accessor (omit it for the token in use).
    pub accessor: Option<String>,
}

/// `token revoke`.
#[derive(Debug, Args)]
pub struct TokenAccessorArg {
    /// The token's accessor (from `token create` or `token list`), not its secret.
    pub accessor: String,
}

/// `role …`.
#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Create or replace a role.
    Write(RoleWriteArgs),
    /// Show one role.
    Read(RoleNameArg),
    /// List every role.
    List,
    /// Delete a role: callers it matched lose its policies at once.
    Delete(RoleNameArg),
}

/// `role write`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("who")
        .required(true)
        .multiple(true)
        .args(["principals", "groups"])
))]
pub struct RoleWriteArgs {
    /// The role's name.
    pub name: String,
    /// An mTLS identity (URI SAN, DNS SAN or CN) or JWT principal, exact or a glob
    /// (`*`, `?`), e.g. `spiffe://hospital/ns/ehr/*`. Repeat for several.
    #[arg(long = "principal", value_name = "GLOB", value_parser = NonEmptyStringValueParser::new())]
    pub principals: Vec<String>,
    /// A JWT group, exact or a glob. Repeat for several.
    #[arg(long = "group", value_name = "GLOB", value_parser = NonEmptyStringValueParser::new())]
    pub groups: Vec<String>,
    /// A policy the role grants. Repeat for several.
    #[arg(long = "policy", value_name = "NAME", required = true,
          value_parser = NonEmptyStringValueParser::new())]
    pub policies: Vec<String>,
}

/// A command that takes only a role name.
#[derive(Debug, Args)]
pub struct RoleNameArg {
    /// The role's name.
    pub name: String,
}

/// `policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy from a TOML file of `[[rule]]` tables (the server
    /// checks it).
    #[command(
        after_help = "A policy file:\n\n  [[rule]]\n  keys = [\"patients\", \"clinic-*\"]\n  \
                            operations = [\"encrypt\", \"decrypt\"]\n  \
                            purposes = [\"treatment\"]       # optional\n\n  \
                            [[rule]]\n  keys = [\"patients\"]\n  operations = [\"decrypt\"]\n  \
                            break_glass = true             # purpose emergency with a reason"
    )]
    Write(PolicyWriteArgs),
    /// Print a policy's document as written.
    Read(PolicyNameArg),
    /// List policy names.
    List,
    /// Delete a policy: tokens and roles naming it lose what it allowed at once.
    Delete(PolicyNameArg),
}

/// `policy write`.
#[derive(Debug, Args)]
pub struct PolicyWriteArgs {
    /// The policy's name.
    pub name: String,
    /// The TOML document; `-` reads it from stdin.
    pub file: PathBuf,
}

/// A command that takes only a policy name.
#[derive(Debug, Args)]
pub struct PolicyNameArg {
    /// The policy's name.
    pub name: String,
}

/// Purpose of use, for the commands that reveal or move data.
#[derive(Debug, Args)]
pub struct PurposeArgs {
    /// Purpose of use: treatment, payment, operations, research, emergency, or a
    /// word your site defines. Policies may allow a key only for some purposes;
    /// the audit log records it.
    #[arg(long, value_name = "WORD", value_parser = NonEmptyStringValueParser::new())]
    pub purpose: Option<String>,
    /// Why (free text, recorded in the audit log; keep PHI out of it). Required
    /// with `--purpose emergency` under a break-glass rule.
    #[arg(long, value_name = "TEXT", requires = "purpose")]
    pub reason: Option<String>,
}

/// `audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit log files, offline (no server is contacted).
    /// Give a rotated series oldest first: `audit.log.2 audit.log.1 audit.log`.
    /// Exits 0 with a summary, or 1 naming the first line removed, reordered or
    /// edited.
    Verify(AuditVerifyArgs),
    /// HMAC-SHA256 of VALUE under the server's audit key: the form
    /// (`hmac-sha256:<hex>`) in which batch references and derivation contexts
    /// appear in audit records, to find a value's records.
    Hash(AuditHashArgs),
}

/// `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// The files, oldest first.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// `audit hash`.
#[derive(Debug, Args)]
pub struct AuditHashArgs {
    /// The value (UTF-8, or base64 of binary data with --base64).
    pub value: String,
    /// VALUE is base64 of binary data.
    #[arg(long)]
    pub base64: bool,
}

/// `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// How many unseal shares to create.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=255))]
    pub shares: u32,
    /// How many shares unseal (at least 2 unless there is only one share).
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..=255))]
    pub threshold: u32,
}

/// `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the backup; an existing file is replaced only once the
    /// new backup is complete.
    pub file: PathBuf,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A backup written by `cipherctl backup`.
    pub file: PathBuf,
}

/// `unseal`.
#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// The share (`cipherd-share:v…`). Omit it (or pass `-`) to read it from stdin,
    /// which keeps it out of the shell history. A whole line of `init`'s output
    /// (`unseal share 2: cipherd-share:…`) and a dev share file (comment lines
    /// starting with `#`) are accepted too.
    pub share: Option<SecretArg>,
    /// Discard the shares submitted so far first. Without SHARE, only resets.
    #[arg(long)]
    pub reset: bool,
}

/// `rekey …`.
#[derive(Debug, Subcommand)]
pub enum RekeyCommand {
    /// Start a rekey to N new shares, T of which unseal (discards one in progress).
    Start(InitArgs),
    /// Submit one share (from the argument, or one line read from stdin): of the
    /// current seal first; the one that completes them prints the new shares,
    /// once; then submit a threshold of the new shares to put them in force.
    Submit(RekeySubmitArgs),
    /// Show where the rekey stands.
    Status,
    /// Abandon the rekey in progress; the current shares stay in force.
    Cancel,
}

/// `rotate-root …`.
#[derive(Debug, Subcommand)]
pub enum RotateRootCommand {
    /// Start collecting shares for a root rotation.
    Start,
    /// Submit one current share (argument, or one line of stdin); the one that
    /// completes the threshold starts the re-seal.
    Submit(RekeySubmitArgs),
    /// Show where the rotation stands (shares collected, records re-sealed).
    Status,
    /// Abandon the collection of shares.
    Cancel,
}

/// `rekey submit`, `rotate-root submit`.
#[derive(Debug, Args)]
pub struct RekeySubmitArgs {
    /// The rekey's nonce, as `rekey start` and `rekey status` print it.
    #[arg(long)]
    pub nonce: String,
    /// The share. Omit it (or pass `-`) to read it from stdin.
    pub share: Option<SecretArg>,
}

/// `key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a named key.
    Create(KeyCreateArgs),
    /// Show a key's metadata and versions (never its material).
    Get(KeyNameArg),
    /// List key names.
    List(KeyListArgs),
    /// Add a new version, which becomes the one that encrypts.
    Rotate(KeyNameArg),
    /// Change a key's minimum versions and flags.
    Config(KeyConfigArgs),
    /// Permanently destroy versions below a floor.
    Trim(KeyTrimArgs),
    /// Schedule a key's deletion (only if created or configured with deletion
    /// allowed): after the waiting period (7 days unless the server says
    /// otherwise) its material is destroyed, and every ciphertext under it with
    /// it. Until then the key refuses every use and `key cancel-deletion` undoes it.
    Delete(KeyDeleteArgs),
    /// Cancel a scheduled deletion: the key works again.
    CancelDeletion(KeyNameArg),
    /// Print an exportable key's material (base64). For a derived key this is the
    /// base material, which opens the data of every context, not of one.
    Export(KeyExportArgs),
    /// Write a backup of one key to FILE (mode 0600, atomically): its versions,
    /// material and usage counters, sealed under this server's backup wrapping
    /// key. It restores only on this server or on one restored from its full
    /// backup. Needs `key.backup` on the key.
    Backup(KeyBackupArgs),
    /// Restore a key from a `key backup` FILE under its original name; an
    /// existing key of that name is never overwritten.
    Restore(RestoreArgs),
}

/// `key backup`.
#[derive(Debug, Args)]
pub struct KeyBackupArgs {
    /// The key's name.
    pub name: String,
    /// Where to write the key backup.
    pub file: PathBuf,
}

/// A command that takes only a key name.
#[derive(Debug, Args)]
pub struct KeyNameArg {
    /// The key's name.
    pub name: String,
}

/// `key create`.
#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    /// The key's name.
    pub name: String,
    /// The key type.
    #[arg(long = "type", value_enum, default_value_t = KeyTypeArg::Xaes256Gcm)]
    pub key_type: KeyTypeArg,
    /// Derive a working key per caller context (every call must pass --context).
    #[arg(long)]
    pub derived: bool,
    /// Allow `key export` of the material (cannot be undone).
    #[arg(long)]
    pub exportable: bool,
    /// Allow `key delete`.
    #[arg(long)]
    pub deletion_allowed: bool,
    /// Rotate automatically this long after the latest version (e.g. `90d`,
    /// `12h`; at least an hour unless the server allows less).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub auto_rotate_period: Option<u64>,
}

/// `key delete`.
#[derive(Debug, Args)]
pub struct KeyDeleteArgs {
    /// The key's name.
    pub name: String,
    /// Wait this long before destroying it (e.g. `30d`; default: the server's
    /// keys.deletion_waiting_period_s, which is also the shortest allowed).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub waiting_period: Option<u64>,
}

/// Whole seconds of a duration such as `90d`, `12h 30m` or `0` (humantime's syntax).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 90d, 12h)"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{text:?}: whole seconds only"));
    }
    Ok(d.as_secs())
}

/// The key types, spelled as in the docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    /// C2SP XAES-256-GCM, 192-bit nonces (the default).
    #[value(name = "xaes-256-gcm")]
    Xaes256Gcm,
    /// AES-256-GCM with 96-bit nonces; usage counted and capped (Vault-compatible).
    #[value(name = "aes256-gcm96")]
    Aes256Gcm96,
    /// ChaCha20-Poly1305; usage counted and capped.
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
    /// XChaCha20-Poly1305, 192-bit nonces.
    #[value(name = "xchacha20-poly1305")]
    Xchacha20Poly1305,
}

/// `key list`.
#[derive(Debug, Args)]
pub struct KeyListArgs {
    /// Names per page (server default 100, at most 1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: Option<u32>,
    /// Continue after a previous page (its next_page_token).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow every page and print all names.
    #[arg(long)]
    pub all: bool,
}

/// `key config`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["min_decryption_version", "min_encryption_version", "deletion_allowed", "auto_rotate_period"])
))]
pub struct KeyConfigArgs {
    /// The key's name.
    pub name: String,
    /// Refuse to decrypt ciphertexts made under older versions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_decryption_version: Option<u32>,
    /// Encrypt under at least this version (0: always the latest).
    #[arg(long, value_name = "N")]
    pub min_encryption_version: Option<u32>,
    /// Allow or forbid `key delete`. (Exportability is not here: it is fixed when
    /// a key is created, `key create --exportable`.)
    #[arg(long, value_name = "BOOL")]
    pub deletion_allowed: Option<bool>,
    /// Rotate automatically this long after the latest version (`0` turns it
    /// off).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub auto_rotate_period: Option<u64>,
}

/// `key trim`.
#[derive(Debug, Args)]
pub struct KeyTrimArgs {
    /// The key's name.
    pub name: String,
    /// Destroy every version below this one (at most min_decryption_version).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_available_version: u32,
}

/// `key export`.
#[derive(Debug, Args)]
pub struct KeyExportArgs {
    /// The key's name.
    pub name: String,
    /// Export only this version (default: every available version).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub version: Option<u32>,
}

/// Associated data and derivation context, shared by the data-plane commands.
#[derive(Debug, Args)]
pub struct BindingArgs {
    /// Associated data (UTF-8): authenticated, not stored; decrypt must repeat it.
    #[arg(long, value_name = "TEXT", conflicts_with = "aad_base64")]
    pub aad: Option<String>,
    /// Associated data given as base64 of binary data.
    #[arg(long, value_name = "BASE64", value_parser = parse_base64)]
    pub aad_base64: Option<Base64Bytes>,
    /// Derivation context (UTF-8), required for derived keys.
    #[arg(long, value_name = "TEXT", conflicts_with = "context_base64")]
    pub context: Option<String>,
    /// Derivation context given as base64 of binary data.
    #[arg(long, value_name = "BASE64", value_parser = parse_base64)]
    pub context_base64: Option<Base64Bytes>,
}

impl BindingArgs {
    /// The associated data bytes (empty when not given).
    pub fn associated_data(&self) -> Vec<u8> {
        pick(&self.aad, &self.aad_base64)
    }

    /// The context bytes (empty when not given).
    pub fn context(&self) -> Vec<u8> {
        pick(&self.context, &self.context_base64)
    }
}

/// `encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The key's name.
    pub key: String,
    /// The plaintext. Omit it to read stdin as raw bytes (nothing is trimmed);
    /// arguments can end up in shell history and process listings.
    #[arg(conflicts_with = "lines")]
    pub plaintext: Option<SecretArg>,
    /// The input is base64 of binary data (each line, with --lines).
    #[arg(long)]
    pub base64: bool,
    /// Associated data and context.
    #[command(flatten)]
    pub binding: BindingArgs,
    /// Encrypt under this version instead of the latest.
    #[arg(long, value_name = "N", conflicts_with = "lines",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub key_version: Option<u32>,
    /// Print base64 of the binary ciphertext instead of the text form `cipherd:v<N>:…`.
    #[arg(long)]
    pub binary: bool,
    /// Encrypt every line of stdin; print one ciphertext (or error) per line, in order.
    #[arg(long)]
    pub lines: bool,
}

/// `decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The key's name.
    pub key: String,
    /// The ciphertext, text form or base64 of the binary form. Omit it to read stdin.
    #[arg(conflicts_with = "lines")]
    pub ciphertext: Option<String>,
    /// Print the plaintext as base64 instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
    /// Associated data and context (as given at encryption).
    #[command(flatten)]
    pub binding: BindingArgs,
    /// Purpose of use and reason.
    #[command(flatten)]
    pub purpose: PurposeArgs,
    /// Decrypt every line of stdin; print one plaintext (or error) per line, in order.
    #[arg(long)]
    pub lines: bool,
}

/// `rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// The key the ciphertext is under now.
    pub key: String,
    /// The ciphertext, text form or base64 of the binary form. Omit it to read stdin.
    #[arg(conflicts_with = "lines")]
    pub ciphertext: Option<String>,
    /// Re-encrypt under this key instead (default: the same key's latest version).
    #[arg(long, value_name = "DEST_KEY")]
    pub to: Option<String>,
    /// Associated data (kept) and the source context.
    #[command(flatten)]
    pub binding: BindingArgs,
    /// Purpose of use and reason.
    #[command(flatten)]
    pub purpose: PurposeArgs,
    /// Context for a derived destination key (UTF-8; default: the source context).
    #[arg(long, value_name = "TEXT", conflicts_with = "dest_context_base64")]
    pub dest_context: Option<String>,
    /// Destination context given as base64 of binary data.
    #[arg(long, value_name = "BASE64", value_parser = parse_base64)]
    pub dest_context_base64: Option<Base64Bytes>,
    /// Print base64 of the binary ciphertext instead of the text form.
    #[arg(long)]
    pub binary: bool,
    /// Rewrap every line of stdin; print one ciphertext (or error) per line, in order.
    #[arg(long)]
    pub lines: bool,
}

impl RewrapArgs {
    /// The destination context bytes (empty: the server reuses the source context).
    pub fn dest_context(&self) -> Vec<u8> {
        pick(&self.dest_context, &self.dest_context_base64)
    }
}

/// `datakey`.
#[derive(Debug, Args)]
pub struct DatakeyArgs {
    /// The key that wraps the data key.
    pub key: String,
    /// Data key length.
    #[arg(long, value_enum, default_value_t = Bits::B256)]
    pub bits: Bits,
    /// Return only the wrapped key, for a component that stores it but does not use it.
    #[arg(long)]
    pub wrapped_only: bool,
    /// Associated data and context for the wrapping.
    #[command(flatten)]
    pub binding: BindingArgs,
    /// Purpose of use and reason.
    #[command(flatten)]
    pub purpose: PurposeArgs,
    /// Print base64 of the binary wrapped key instead of the text form.
    #[arg(long)]
    pub binary: bool,
}

/// Data key lengths the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bits {
    /// 128 bits.
    #[value(name = "128")]
    B128,
    /// 256 bits.
    #[value(name = "256")]
    B256,
    /// 512 bits.
    #[value(name = "512")]
    B512,
}

impl Bits {
    /// The length in bits.
    pub fn get(self) -> u32 {
        match self {
            Bits::B128 => 128,
            Bits::B256 => 256,
            Bits::B512 => 512,
        }
    }
}

/// A secret given on the command line (a plaintext, an unseal share). Its `Debug`
/// prints `[redacted]`, so a parsed command line can be logged or shown in a test
/// failure without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretArg(String);

impl SecretArg {
    /// The secret text; callers send it to the server and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretArg {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Bytes given on the command line as standard base64. A newtype because clap reads
/// a `Vec<u8>` field as a list of values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base64Bytes(pub Vec<u8>);

fn parse_base64(s: &str) -> Result<Base64Bytes, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(Base64Bytes)
        .map_err(|e| format!("not valid base64: {e}"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("the timeout must be positive".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 30m, 1h or 7d: {e}"))?;
    if ttl < Duration::from_secs(1) {
        return Err("the TTL must be at least one second".into());
    }
    Ok(ttl)
}

fn pick(text: &Option<String>, b64: &Option<Base64Bytes>) -> Vec<u8> {
    match (text, b64) {
        (Some(t), _) => t.as_bytes().to_vec(),
        (None, Some(b)) => b.0.clone(),
        (None, None) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cipherctl").chain(args.iter().copied()))
    }

    #[test]
    fn durations_are_whole_seconds() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("12h 30m"), Ok(45_000));
        assert_eq!(parse_duration("0"), Ok(0));
        for bad in ["", "ten days", "-1d", "1.5s", "1500ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let cli = ok(&["key", "delete", "k", "--waiting-period", "30d"]);
        assert!(
            format!("{cli:?}").contains("waiting_period: Some(2592000)"),
            "{cli:?}"
        );
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
    }

    fn usage_error(args: &[&str]) -> ErrorKind {
        match parse(args) {
            Ok(cli) => panic!("{args:?} should be refused, got {cli:?}"),
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "usage errors exit 2");
                e.kind()
            }
        }
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let cli = ok(&["--addr", "http://h:1", "--json", "status"]);
        assert_eq!(cli.global.addr, "http://h:1");
        assert!(cli.global.json);
        let cli = ok(&["status", "--timeout", "2.5", "--json"]);
        assert_eq!(cli.global.timeout, Some(Duration::from_millis(2500)));
        assert!(cli.global.json);
        assert!(matches!(cli.command, Command::Status));
    }

    #[test]
    fn timeout_must_be_a_positive_number() {
        usage_error(&["--timeout", "0", "status"]);
        usage_error(&["--timeout", "-1", "status"]);
        usage_error(&["--timeout", "soon", "status"]);
        usage_error(&["--timeout", "NaN", "status"]);
    }

    #[test]
    fn init_requires_both_counts_in_range() {
        let cli = ok(&["init", "--shares", "5", "--threshold", "3"]);
        let Command::Init(a) = cli.command else {
            panic!("init")
        };
        assert_eq!((a.shares, a.threshold), (5, 3));
        usage_error(&["init", "--shares", "5"]);
        usage_error(&["init", "--shares", "0", "--threshold", "1"]);
        usage_error(&["init", "--shares", "256", "--threshold", "2"]);
    }

    #[test]
    fn unseal_share_is_optional() {
        let Command::Unseal(a) = ok(&["unseal"]).command else {
            panic!("unseal")
        };
        assert_eq!(a.share, None);
        assert!(!a.reset);
        let cli = ok(&["unseal", "--reset", "abc"]);
        assert!(
            !format!("{cli:?}").contains("abc"),
            "shares are redacted in Debug"
        );
        let Command::Unseal(a) = cli.command else {
            panic!("unseal")
        };
        assert_eq!(a.share.as_ref().map(SecretArg::expose), Some("abc"));
        assert!(a.reset);
    }

    #[test]
    fn key_create_parses_types_and_flags() {
        let Command::Key(KeyCommand::Create(a)) = ok(&["key", "create", "k"]).command else {
            panic!("key create")
        };
        assert_eq!(a.key_type, KeyTypeArg::Xaes256Gcm);
        assert!(!a.derived && !a.exportable && !a.deletion_allowed);
        for (name, want) in [
            ("xaes-256-gcm", KeyTypeArg::Xaes256Gcm),
            ("aes256-gcm96", KeyTypeArg::Aes256Gcm96),
            ("chacha20-poly1305", KeyTypeArg::Chacha20Poly1305),
            ("xchacha20-poly1305", KeyTypeArg::Xchacha20Poly1305),
        ] {
            let cli = ok(&[
                "key",
                "create",
                "k",
                "--type",
                name,
                "--derived",
                "--exportable",
                "--deletion-allowed",
            ]);
            let Command::Key(KeyCommand::Create(a)) = cli.command else {
                panic!("create")
            };
            assert_eq!(a.key_type, want);
            assert!(a.derived && a.exportable && a.deletion_allowed);
        }
        assert_eq!(
            usage_error(&["key", "create", "k", "--type", "aes128"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn key_config_needs_at_least_one_change() {
        assert_eq!(
            usage_error(&["key", "config", "k"]),
            ErrorKind::MissingRequiredArgument
        );
        let cli = ok(&["key", "config", "k", "--deletion-allowed", "false"]);
        let Command::Key(KeyCommand::Config(a)) = cli.command else {
            panic!("config")
        };
        assert_eq!(a.deletion_allowed, Some(false));
        assert_eq!(a.min_decryption_version, None);
        let cli = ok(&[
            "key",
            "config",
            "k",
            "--min-decryption-version",
            "2",
            "--min-encryption-version",
            "0",
        ]);
        let Command::Key(KeyCommand::Config(a)) = cli.command else {
            panic!("config")
        };
        assert_eq!(a.min_decryption_version, Some(2));
        assert_eq!(a.min_encryption_version, Some(0));
        // Exportability is fixed at creation, so `key config` has no flag for it.
        usage_error(&["key", "config", "k", "--exportable"]);
        usage_error(&["key", "config", "k", "--min-decryption-version", "0"]);
        usage_error(&["key", "config", "k", "--deletion-allowed", "maybe"]);
    }

    #[test]
    fn key_trim_list_and_export() {
        usage_error(&["key", "trim", "k"]);
        let cli = ok(&["key", "trim", "k", "--min-available-version", "3"]);
        let Command::Key(KeyCommand::Trim(a)) = cli.command else {
            panic!("trim")
        };
        assert_eq!(a.min_available_version, 3);

        let cli = ok(&[
            "key",
            "list",
            "--page-size",
            "10",
            "--page-token",
            "b",
            "--all",
        ]);
        let Command::Key(KeyCommand::List(a)) = cli.command else {
            panic!("list")
        };
        assert_eq!(
            (a.page_size, a.page_token.as_deref(), a.all),
            (Some(10), Some("b"), true)
        );
        usage_error(&["key", "list", "--page-size", "1001"]);

        let cli = ok(&["key", "export", "k", "--version", "2"]);
        let Command::Key(KeyCommand::Export(a)) = cli.command else {
            panic!("export")
        };
        assert_eq!(a.version, Some(2));
        for sub in ["get", "rotate", "delete"] {
            usage_error(&["key", sub]);
            ok(&["key", sub, "k"]);
        }
    }

    #[test]
    fn encrypt_takes_plaintext_binding_and_output_flags() {
        let cli = ok(&[
            "encrypt",
            "k",
            "hello",
            "--aad",
            "row=1",
            "--context-base64",
            "AAEC",
            "--key-version",
            "2",
            "--binary",
        ]);
        let Command::Encrypt(a) = cli.command else {
            panic!("encrypt")
        };
        assert_eq!(a.plaintext.as_ref().map(SecretArg::expose), Some("hello"));
        assert_eq!(a.binding.associated_data(), b"row=1");
        assert_eq!(a.binding.context(), [0, 1, 2]);
        assert_eq!(a.key_version, Some(2));
        assert!(a.binary && !a.lines && !a.base64);

        let Command::Encrypt(a) = ok(&["encrypt", "k", "--lines"]).command else {
            panic!("encrypt")
        };
        assert!(a.lines && a.plaintext.is_none());
        assert!(a.binding.associated_data().is_empty() && a.binding.context().is_empty());
    }

    #[test]
    fn conflicting_inputs_are_usage_errors() {
        for args in [
            &["encrypt", "k", "x", "--lines"][..],
            &["encrypt", "k", "--lines", "--key-version", "1"],
            &["encrypt", "k", "x", "--aad", "a", "--aad-base64", "YQ=="],
            &[
                "decrypt",
                "k",
                "x",
                "--context",
                "a",
                "--context-base64",
                "YQ==",
            ],
            &["decrypt", "k", "cipherd:v1:x", "--lines"],
            &[
                "rewrap",
                "k",
                "x",
                "--dest-context",
                "a",
                "--dest-context-base64",
                "YQ==",
            ],
        ] {
            assert_eq!(usage_error(args), ErrorKind::ArgumentConflict, "{args:?}");
        }
        assert_eq!(
            usage_error(&["encrypt", "k", "--aad-base64", "not base64!"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn rewrap_and_datakey() {
        let cli = ok(&[
            "rewrap",
            "src",
            "cipherd:v1:AAAA",
            "--to",
            "dst",
            "--context",
            "a",
            "--dest-context",
            "b",
        ]);
        let Command::Rewrap(a) = cli.command else {
            panic!("rewrap")
        };
        assert_eq!(a.to.as_deref(), Some("dst"));
        assert_eq!(a.binding.context(), b"a");
        assert_eq!(a.dest_context(), b"b");

        let Command::Datakey(a) = ok(&["datakey", "k"]).command else {
            panic!("datakey")
        };
        assert_eq!(a.bits.get(), 256);
        assert!(!a.wrapped_only);
        let cli = ok(&["datakey", "k", "--bits", "512", "--wrapped-only"]);
        let Command::Datakey(a) = cli.command else {
            panic!("datakey")
        };
        assert_eq!(a.bits.get(), 512);
        assert!(a.wrapped_only);
        assert_eq!(
            usage_error(&["datakey", "k", "--bits", "192"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn token_flags_are_global_redacted_and_exclusive() {
        let cli = ok(&["status", "--token", "s.SECRET"]);
        assert_eq!(
            cli.global.token.as_ref().map(SecretArg::expose),
            Some("s.SECRET")
        );
        assert!(!format!("{cli:?}").contains("s.SECRET"), "Debug redacts it");
        let cli = ok(&["--token-file", "/run/secrets/t", "key", "list"]);
        assert_eq!(
            cli.global.token_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/t"))
        );
        // Both given (as with CIPHERD_TOKEN exported): the file wins, in `commands`.
        let cli = ok(&["--token", "a", "--token-file", "f", "status"]);
        assert!(cli.global.token.is_some() && cli.global.token_file.is_some());
        // `--help` must never print the environment's token.
        let command = Cli::command();
        let token = command
            .get_arguments()
            .find(|a| a.get_id() == "token")
            .expect("--token");
        assert!(token.is_hide_env_values_set());
        assert_eq!(token.get_env(), Some(std::ffi::OsStr::new("CIPHERD_TOKEN")));
        let help = token.get_help().expect("help").to_string();
        assert!(
            help.contains("ps") && help.contains("--token-file"),
            "{help}"
        );
    }

    #[test]
    fn token_commands() {
        let cli = ok(&[
            "token",
            "create",
            "--policy",
            "etl",
            "--policy",
            "audit",
            "--ttl",
            "1h 30m",
            "--display-name",
            "nightly etl",
            "--json",
        ]);
        assert!(cli.global.json);
        let Command::Token(TokenCommand::Create(a)) = cli.command else {
            panic!("token create")
        };
        assert_eq!(a.policies, ["etl", "audit"]);
        assert_eq!(a.ttl, Some(Duration::from_secs(5400)));
        assert_eq!(a.display_name, "nightly etl");
        let Command::Token(TokenCommand::Create(a)) =
            ok(&["token", "create", "--policy", "p", "--ttl", "7d"]).command
        else {
            panic!("token create")
        };
        assert_eq!(a.ttl, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(a.display_name, "");
        assert_eq!(
            usage_error(&["token", "create"]),
            ErrorKind::MissingRequiredArgument
        );
        for bad in ["soon", "0s", "500ms", "-1h"] {
            usage_error(&["token", "create", "--policy", "p", "--ttl", bad]);
        }
        usage_error(&["token", "create", "--policy", ""]);

        assert!(matches!(
            ok(&["token", "list"]).command,
            Command::Token(TokenCommand::List)
        ));
        let Command::Token(TokenCommand::Lookup(a)) = ok(&["token", "lookup"]).command else {
            panic!("lookup")
        };
        assert_eq!(a.accessor, None);
        let Command::Token(TokenCommand::Lookup(a)) = ok(&["token", "lookup", "acc"]).command
        else {
            panic!("lookup")
        };
        assert_eq!(a.accessor.as_deref(), Some("acc"));
        usage_error(&["token", "revoke"]);
        let Command::Token(TokenCommand::Revoke(a)) = ok(&["token", "revoke", "acc"]).command
        else {
            panic!("revoke")
        };
        assert_eq!(a.accessor, "acc");
    }

    #[test]
    fn role_commands() {
        // Whom the role matches and what it grants are both required.
        assert_eq!(
            usage_error(&["role", "write", "r", "--policy", "p"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["role", "write", "r", "--group", "g"]),
            ErrorKind::MissingRequiredArgument
        );
        let Command::Role(RoleCommand::Write(a)) =
            ok(&["role", "write", "r", "--group", "g", "--policy", "p"]).command
        else {
            panic!("role write")
        };
        assert_eq!((a.groups, a.principals), (vec!["g".to_owned()], vec![]));
        for sub in ["read", "delete"] {
            usage_error(&["role", sub]);
            ok(&["role", sub, "r"]);
        }
        assert!(matches!(
            ok(&["role", "list"]).command,
            Command::Role(RoleCommand::List)
        ));
    }

    #[test]
    fn policy_commands() {
        let Command::Policy(PolicyCommand::Write(a)) = ok(&["policy", "write", "p", "-"]).command
        else {
            panic!("policy write")
        };
        assert_eq!((a.name.as_str(), a.file.to_str()), ("p", Some("-")));
        assert_eq!(
            usage_error(&["policy", "write", "p"]),
            ErrorKind::MissingRequiredArgument
        );
        for sub in ["read", "delete"] {
            usage_error(&["policy", sub]);
            ok(&["policy", sub, "p"]);
        }
        assert!(matches!(
            ok(&["policy", "list"]).command,
            Command::Policy(PolicyCommand::List)
        ));
    }

    #[test]
    fn purpose_and_reason_on_the_commands_that_reveal_or_move_data() {
        for args in [
            &["decrypt", "k", "cipherd:v1:A"][..],
            &["decrypt", "k", "--lines"],
            &["rewrap", "k", "cipherd:v1:A"],
            &["rewrap", "k", "--lines", "--to", "k2"],
            &["datakey", "k"],
        ] {
            let mut argv = args.to_vec();
            argv.extend(["--purpose", "emergency", "--reason", "ER bed 4"]);
            let purpose = match ok(&argv).command {
                Command::Decrypt(a) => a.purpose,
                Command::Rewrap(a) => a.purpose,
                Command::Datakey(a) => a.purpose,
                other => panic!("{other:?}"),
            };
            assert_eq!(purpose.purpose.as_deref(), Some("emergency"), "{argv:?}");
            assert_eq!(purpose.reason.as_deref(), Some("ER bed 4"), "{argv:?}");

            let mut argv = args.to_vec();
            argv.extend(["--reason", "why"]);
            assert_eq!(
                usage_error(&argv),
                ErrorKind::MissingRequiredArgument,
                "a reason needs a purpose: {argv:?}"
            );
            let mut argv = args.to_vec();
            argv.extend(["--purpose", ""]);
            usage_error(&argv);
        }
        // Encrypting reveals nothing: no purpose there.
        assert_eq!(
            usage_error(&["encrypt", "k", "x", "--purpose", "treatment"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn address_comes_from_the_environment_default() {
        // Not setting the variable here (tests run in parallel); the default applies
        // unless the runner exported CIPHERD_ADDR.
        if std::env::var_os("CIPHERD_ADDR").is_none() {
            assert_eq!(ok(&["status"]).global.addr, DEFAULT_ADDR);
        }
    }

    #[test]
    fn audit_verbs_parse() {
        let cli = ok(&["audit", "verify", "audit.log.1", "audit.log"]);
        let Command::Audit(AuditCommand::Verify(a)) = cli.command else {
            panic!("verify");
        };
        assert_eq!(a.files.len(), 2);
        assert_eq!(
            usage_error(&["audit", "verify"]),
            ErrorKind::MissingRequiredArgument
        );
        let cli = ok(&["audit", "hash", "--base64", "AAE=", "--json"]);
        let Command::Audit(AuditCommand::Hash(h)) = cli.command else {
            panic!("hash");
        };
        assert!(h.base64 && cli.global.json);
        assert_eq!(h.value, "AAE=");
    }
}
