//! A typed async client for cipherd.
//!
//! [`Client`] wraps the three gRPC services with one connection, a per-call
//! deadline, and retries of calls that are safe to repeat when the server is
//! briefly unavailable (never while it reports `SEALED` or `NOT_INITIALIZED`, which
//! need an operator, and never `STORAGE_INTEGRITY`: corrupt storage is not fixed by
//! asking again; see [`Error::is_retryable`]).
//! Batch helpers split large inputs into server-sized chunks and return exactly one
//! result per input, in order. The generated service clients remain reachable for
//! anything not wrapped here ([`Client::transit`] and friends).
//!
//! Errors carry the server's `ErrorInfo` reason ([`Error::reason`]); match on that,
//! never on message text.
//!
//! # Credentials
//!
//! A bearer token set in [`ClientOptions::token`] is sent on every call of every
//! service, generated clients included, as gRPC metadata `authorization: Bearer
//! <token>`, marked sensitive so HTTP/2 header compression never adds it to its
//! dynamic table. [`Token`] zeroizes its copy on drop and prints `[redacted]`; the
//! header value built from it lives in tonic's (non-zeroizing) buffers for as long
//! as the client does.
//!
//! ```no_run
//! # async fn example() -> cipherd_client::Result<()> {
//! use cipherd_client::{Client, ClientOptions, Purpose, Token};
//!
//! let token = std::env::var("CIPHERD_TOKEN").expect("CIPHERD_TOKEN is set");
//! let options = ClientOptions::default()
//!     .with_token(Token::from(token))
//!     // Every decrypt, rewrap and data key of this job is for research.
//!     .with_purpose(Purpose::new("research"));
//! let client = Client::connect_with("https://cipherd:8210", options).await?;
//! # let ciphertext = bytes::Bytes::new();
//! let row = client.decrypt("patients", ciphertext, "row=1", "").await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Purpose of use
//!
//! Decrypt, rewrap and data-key calls may carry a purpose (`treatment`,
//! `payment`, `operations`, `research`, `emergency`, or a word the site defines)
//! and a free-text reason; policies may allow a call only for some purposes, and
//! the audit log records both. A job usually has one purpose, so it is set once,
//! in [`ClientOptions::purpose`]; a server that acts for many users picks one per
//! request with [`Client::with_purpose`], a cheap copy sharing the connection:
//!
//! ```no_run
//! # async fn example(client: cipherd_client::Client, ct: bytes::Bytes) -> cipherd_client::Result<()> {
//! use cipherd_client::Purpose;
//!
//! let er = client.with_purpose(Purpose::emergency("patient unconscious, ER bed 4"));
//! let record = er.decrypt("patients", ct, "", "").await?;
//! # Ok(())
//! # }
//! ```
//!
//! The helpers here ([`Client::decrypt`], [`Client::rewrap`],
//! [`Client::generate_data_key`], [`Client::batch_decrypt`],
//! [`Client::batch_rewrap`]) fill the request's `purpose` and `reason` from the
//! client's purpose. Requests sent through the generated clients
//! ([`Client::transit`]) go as built: set their fields with [`Purpose::purpose`]
//! and [`Purpose::reason`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{fmt, future::Future, time::Duration};

use bytes::Bytes;
pub use cipherd_proto::v1 as pb;
use pb::{
    audit_service_client::AuditServiceClient, auth_service_client::AuthServiceClient,
    key_admin_service_client::KeyAdminServiceClient, policy_service_client::PolicyServiceClient,
    system_service_client::SystemServiceClient, transit_service_client::TransitServiceClient,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{
    Code,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_types::{RpcStatusExt as _, StatusExt as _};
use zeroize::Zeroizing;

/// Items per batch request the helpers send (the server default allows 10,000).
pub const DEFAULT_BATCH_CHUNK: usize = 1000;

/// Result alias for the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Could not connect (bad address, refused, TLS).
    #[error("connecting to cipherd: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The server answered with an error status.
    #[error("{code:?} ({reason}): {message}")]
    Status {
        /// The gRPC code.
        code: Code,
        /// The `ErrorInfo` reason (empty if the server sent none).
        reason: String,
        /// The server's message.
        message: String,
    },
    /// The server's reply broke the protocol (e.g. a batch with the wrong count).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The credentials cannot be sent (e.g. a token with characters a header cannot
    /// carry). The message never repeats the token.
    #[error("credentials: {0}")]
    Credentials(&'static str),
}

impl Error {
    /// The `ErrorInfo` reason, e.g. `SEALED`, `KEY_NOT_FOUND`, `DECRYPTION_FAILED`.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Status { reason, .. } if !reason.is_empty() => Some(reason),
            _ => None,
        }
    }

    /// The gRPC code, when the server answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether a call that failed with this error may succeed if repeated unchanged
    /// after a short wait, which is what the client's own retries do: only
    /// UNAVAILABLE answers, and of those not `SEALED` or `NOT_INITIALIZED` (they
    /// wait for an operator, not for time) and not `STORAGE_INTEGRITY` (corrupt or
    /// inconsistent storage, which repeating can never fix; servers send it as
    /// DATA_LOSS or INTERNAL, and the reason is checked too so that no code a
    /// server picks for it can make a client hammer corrupt data).
    pub fn is_retryable(&self) -> bool {
        self.code() == Some(Code::Unavailable)
            && !matches!(
                self.reason(),
                Some("SEALED" | "NOT_INITIALIZED" | "STORAGE_INTEGRITY")
            )
    }

    /// The error of one batch or stream item (a `google.rpc.Status`).
    pub fn from_item(status: &tonic_types::pb::Status) -> Self {
        Error::Status {
            code: Code::from_i32(status.code),
            reason: status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default(),
            message: status.message.clone(),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status {
            code: status.code(),
            reason: status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default(),
            message: status.message().to_owned(),
        }
    }
}

/// Connection settings.
///
/// Built with `..Default::default()` or the `with_*` methods; `Debug` never shows
/// the token.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline for each call.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Extra attempts for calls that failed with a retryable error
    /// ([`Error::is_retryable`]: UNAVAILABLE, but not SEALED, NOT_INITIALIZED or
    /// STORAGE_INTEGRITY).
    pub retries: u32,
    /// Items per batch request.
    pub batch_chunk: usize,
    /// Bearer token sent with every call (`None`: no `authorization` metadata, as
    /// for `Status`, or when an mTLS certificate identifies the caller).
    pub token: Option<Token>,
    /// Purpose of use sent with every decrypt, rewrap and data-key helper call
    /// (see the crate docs); [`Client::with_purpose`] overrides it per call.
    pub purpose: Option<Purpose>,
    /// TLS: required for an `https://` endpoint, refused with `http://`.
    pub tls: Option<TlsOptions>,
}

/// How the client verifies the server and, for mTLS, identifies itself.
///
/// The connection is TLS 1.2 or 1.3 (the server decides; cipherd defaults to
/// 1.3 only) on aws-lc-rs, offering the hybrid post-quantum key exchange
/// X25519MLKEM768 first, with ALPN `h2`.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// PEM client certificate chain and private key, for a server that asks for
    /// client certificates (`tls.client_ca_file`).
    pub identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// The name the server's certificate must carry, when it is not the
    /// endpoint's host (e.g. connecting to an IP address).
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Trusts the CA certificate(s) in `ca_pem`.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            ..Self::default()
        }
    }

    /// Presents `cert_pem` with `key_pem` as the client certificate (mTLS).
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), Zeroizing::new(key_pem.into())));
        self
    }

    /// Expects the server's certificate to name `domain`.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    fn client_config(&self) -> Result<ClientTlsConfig> {
        if !contains_pem(&self.ca_pem, "CERTIFICATE") {
            return Err(Error::Protocol(
                "TLS: the CA file holds no PEM certificate".into(),
            ));
        }
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            if !contains_pem(cert, "CERTIFICATE") {
                return Err(Error::Protocol(
                    "TLS: the client certificate file holds no PEM certificate".into(),
                ));
            }
            if !contains_pem(key, "PRIVATE KEY") {
                return Err(Error::Protocol(
                    "TLS: the client key file holds no PEM private key".into(),
                ));
            }
            config = config.identity(Identity::from_pem(cert, key.as_slice()));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// Never prints key material.
impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &format_args!("[{} bytes]", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "[redacted]"))
            .field("domain", &self.domain)
            .finish()
    }
}

/// Whether `pem` has a `-----BEGIN ...LABEL-----` line (e.g. `PRIVATE KEY` also
/// matches `EC PRIVATE KEY`).
fn contains_pem(pem: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(pem);
    text.lines().any(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|found| found.ends_with(label))
    })
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retries: 2,
            batch_chunk: DEFAULT_BATCH_CHUNK,
            token: None,
            purpose: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// These options with `token` as the bearer token.
    pub fn with_token(mut self, token: impl Into<Token>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// These options with `purpose` for decrypt, rewrap and data-key calls.
    pub fn with_purpose(mut self, purpose: Purpose) -> Self {
        self.purpose = Some(purpose);
        self
    }
}

/// A bearer token: zeroized on drop, `[redacted]` in `Debug`, and never shown by
/// anything in this crate.
#[derive(Clone)]
pub struct Token(Zeroizing<String>);

impl Token {
    /// The token text, for a caller that must hand it on (e.g. to store a freshly
    /// created token); never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl From<String> for Token {
    fn from(token: String) -> Self {
        Self(Zeroizing::new(token))
    }
}

impl From<&str> for Token {
    fn from(token: &str) -> Self {
        Self(Zeroizing::new(token.to_owned()))
    }
}

impl From<Zeroizing<String>> for Token {
    fn from(token: Zeroizing<String>) -> Self {
        Self(token)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// A purpose of use and its justification, sent with decrypt, rewrap and
/// data-key calls. The server's policies decide which purposes a caller may
/// give; the audit log records both fields. Neither is secret, but the reason is
/// free text: keep PHI out of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Purpose {
    /// `treatment`, `payment`, `operations`, `research`, `emergency`, or a word
    /// the site defines.
    pub purpose: String,
    /// Free-text justification; required with `emergency` under a break-glass
    /// rule.
    pub reason: String,
}

impl Purpose {
    /// A purpose without a reason.
    pub fn new(purpose: impl Into<String>) -> Self {
        Self {
            purpose: purpose.into(),
            reason: String::new(),
        }
    }

    /// Purpose `emergency` with its reason: what a break-glass rule allows.
    pub fn emergency(reason: impl Into<String>) -> Self {
        Self::new("emergency").with_reason(reason)
    }

    /// This purpose with `reason` as its justification.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// The request field `purpose` (empty when `purpose` is `None`).
    pub fn purpose(purpose: Option<&Purpose>) -> String {
        purpose.map(|p| p.purpose.clone()).unwrap_or_default()
    }

    /// The request field `reason` (empty when `purpose` is `None`).
    pub fn reason(purpose: Option<&Purpose>) -> String {
        purpose.map(|p| p.reason.clone()).unwrap_or_default()
    }
}

/// The interceptor that adds `authorization: Bearer <token>` to every call. The
/// value is marked sensitive (HPACK never indexes it) and `Debug` redacts it. A
/// request that already carries `authorization` metadata keeps its own.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// No credentials: calls go without `authorization` metadata.
    pub fn none() -> Self {
        Self::default()
    }

    /// `Bearer <token>`. Refuses a token that is empty or not visible ASCII (a
    /// header cannot carry it), without repeating it.
    pub fn bearer(token: &Token) -> Result<Self> {
        let token = token.expose_secret();
        if token.is_empty() {
            return Err(Error::Credentials("the token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Credentials(
                "the token holds characters other than visible ASCII (a stray space or \
                 line break?)",
            ));
        }
        let header = Zeroizing::new(format!("Bearer {token}"));
        let mut value = MetadataValue::try_from(header.as_str())
            .map_err(|_| Error::Credentials("the token cannot be sent as a header"))?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
        })
    }

    /// Whether a token is attached.
    pub fn is_set(&self) -> bool {
        self.authorization.is_some()
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization
            && !request.metadata().contains_key(AUTHORIZATION)
        {
            request.metadata_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.is_set() {
            "Bearer [redacted]"
        } else {
            "none"
        };
        f.debug_tuple("Credentials")
            .field(&format_args!("{shown}"))
            .finish()
    }
}

/// The metadata key of bearer credentials.
const AUTHORIZATION: &str = "authorization";

/// The transport every service client runs over: the connection, with the
/// client's [`Credentials`] added to each call.
pub type AuthChannel = InterceptedService<Channel, Credentials>;
/// The generated `TransitService` client, as [`Client::transit`] returns it.
pub type TransitClient = TransitServiceClient<AuthChannel>;
/// The generated `KeyAdminService` client, as [`Client::admin`] returns it.
pub type AdminClient = KeyAdminServiceClient<AuthChannel>;
/// The generated `SystemService` client, as [`Client::system`] returns it.
pub type SystemClient = SystemServiceClient<AuthChannel>;
/// The generated `AuthService` client, as [`Client::auth`] returns it.
pub type AuthClient = AuthServiceClient<AuthChannel>;
/// The generated `PolicyService` client, as [`Client::policy`] returns it.
pub type PolicyClient = PolicyServiceClient<AuthChannel>;
/// The generated `AuditService` client, as [`Client::audit`] returns it.
pub type AuditClient = AuditServiceClient<AuthChannel>;

/// One connection to cipherd with typed helpers.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    credentials: Credentials,
    options: ClientOptions,
}

/// Options of one encryption (all empty by default).
#[derive(Debug, Clone, Default)]
pub struct EncryptOptions {
    /// Bound to the ciphertext, not stored in it.
    pub associated_data: Bytes,
    /// Required for derived keys.
    pub context: Bytes,
    /// Encrypt under this version instead of the latest.
    pub key_version: Option<u32>,
    /// Return the text form `cipherd:v<N>:<base64>`.
    pub text: bool,
}

/// Options of one rewrap (all empty by default: same key, latest version, binary).
#[derive(Debug, Clone, Default)]
pub struct RewrapOptions {
    /// The associated data the ciphertext was made with (kept).
    pub associated_data: Bytes,
    /// The source key's derivation context.
    pub context: Bytes,
    /// Re-encrypt under this key instead of the source key.
    pub destination_key: Option<String>,
    /// Context for a derived destination key (empty: reuse `context`).
    pub destination_context: Bytes,
    /// Return the text form `cipherd:v<N>:<base64>`.
    pub text: bool,
}

/// Options of one data key (256 bits, plaintext and wrapped, binary by default).
#[derive(Debug, Clone, Default)]
pub struct DataKeyOptions {
    /// Data key length in bits: 128, 256 or 512 (0: the server's default, 256).
    pub bits: u32,
    /// Return only the wrapped key.
    pub wrapped_only: bool,
    /// Bound to the wrapped key.
    pub associated_data: Bytes,
    /// Required for derived keys.
    pub context: Bytes,
    /// Return the wrapped key in the text form.
    pub text: bool,
}

/// A token just created: its secret, shown once, and its description.
#[derive(Debug)]
pub struct CreatedToken {
    /// The bearer token.
    pub token: Token,
    /// Accessor, policies, expiry.
    pub info: pb::TokenInfo,
}

/// One item's outcome in a batch.
pub type ItemResult = Result<Bytes>;

impl Client {
    /// Connects to `endpoint`, e.g. `http://127.0.0.1:8210` (plaintext: dev mode
    /// on loopback, or behind a TLS sidecar), or `https://cipherd.example:8210`
    /// with [`ClientOptions::tls`].
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects with explicit options. A token that cannot be sent is refused
    /// before connecting ([`Error::Credentials`]).
    pub async fn connect_with(endpoint: impl Into<String>, options: ClientOptions) -> Result<Self> {
        let credentials = match &options.token {
            Some(token) => Credentials::bearer(token)?,
            None => Credentials::none(),
        };
        let endpoint = endpoint.into();
        let mut builder = Channel::from_shared(endpoint.clone())
            .map_err(|e| Error::Protocol(format!("bad endpoint: {e}")))?;
        let https = endpoint.starts_with("https://");
        match (&options.tls, https) {
            (Some(tls), true) => builder = builder.tls_config(tls.client_config()?)?,
            (Some(_), false) => {
                return Err(Error::Protocol(format!(
                    "TLS options need an https:// endpoint, not {endpoint}"
                )));
            }
            (None, true) => {
                return Err(Error::Protocol(format!(
                    "{endpoint}: https:// needs TLS options (the CA certificate to trust)"
                )));
            }
            (None, false) => {}
        }
        let channel = builder
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .tcp_nodelay(true)
            // Large batches: avoid a flow-control round trip per 64 KiB.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .connect()
            .await?;
        Ok(Self {
            channel,
            credentials,
            options,
        })
    }

    /// This client with another token on the same connection (`None`: none), e.g.
    /// to act as a token just created.
    pub fn with_token<'a>(&self, token: impl Into<Option<&'a Token>>) -> Result<Self> {
        let token = token.into();
        let credentials = match token {
            Some(token) => Credentials::bearer(token)?,
            None => Credentials::none(),
        };
        let mut options = self.options.clone();
        options.token = token.cloned();
        Ok(Self {
            channel: self.channel.clone(),
            credentials,
            options,
        })
    }

    /// This client with `purpose` for its decrypt, rewrap and data-key helpers, on
    /// the same connection (`None`: send none). Cheap: clone per request freely.
    pub fn with_purpose(&self, purpose: impl Into<Option<Purpose>>) -> Self {
        let mut client = self.clone();
        client.options.purpose = purpose.into();
        client
    }

    /// The purpose of use the helpers send, if any.
    pub fn purpose(&self) -> Option<&Purpose> {
        self.options.purpose.as_ref()
    }

    /// The connection with this client's credentials, for raw gRPC calls.
    pub fn transport(&self) -> AuthChannel {
        self.authed()
    }

    /// The generated `TransitService` client on this connection.
    pub fn transit(&self) -> TransitClient {
        TransitServiceClient::new(self.authed())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// The generated `KeyAdminService` client on this connection.
    pub fn admin(&self) -> AdminClient {
        KeyAdminServiceClient::new(self.authed())
    }

    /// The generated `SystemService` client on this connection.
    pub fn system(&self) -> SystemClient {
        SystemServiceClient::new(self.authed())
    }

    /// The generated `AuthService` client (tokens and roles) on this connection.
    pub fn auth(&self) -> AuthClient {
        AuthServiceClient::new(self.authed())
    }

    /// The generated `PolicyService` client on this connection.
    pub fn policy(&self) -> PolicyClient {
        PolicyServiceClient::new(self.authed())
    }

    /// The generated `AuditService` client on this connection.
    pub fn audit(&self) -> AuditClient {
        AuditServiceClient::new(self.authed())
    }

    /// The connection with this client's credentials on every call.
    fn authed(&self) -> AuthChannel {
        InterceptedService::new(self.channel.clone(), self.credentials.clone())
    }

    /// Service status (initialized, sealed, unseal progress, version).
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.retrying(|| async { self.system().status(pb::StatusRequest {}).await })
            .await
    }

    /// Encrypts one value under `key`; returns the ciphertext.
    pub async fn encrypt(
        &self,
        key: &str,
        plaintext: impl Into<Bytes>,
        options: &EncryptOptions,
    ) -> Result<pb::EncryptResponse> {
        let request = pb::EncryptRequest {
            key: key.to_owned(),
            plaintext: plaintext.into(),
            associated_data: options.associated_data.clone(),
            context: options.context.clone(),
            key_version: options.key_version,
            encoding: encoding(options.text),
        };
        self.retrying(|| async { self.transit().encrypt(request.clone()).await })
            .await
    }

    /// Decrypts one ciphertext (binary or text form).
    pub async fn decrypt(
        &self,
        key: &str,
        ciphertext: impl Into<Bytes>,
        associated_data: impl Into<Bytes>,
        context: impl Into<Bytes>,
    ) -> Result<pb::DecryptResponse> {
        let request = pb::DecryptRequest {
            key: key.to_owned(),
            ciphertext: ciphertext.into(),
            associated_data: associated_data.into(),
            context: context.into(),
            purpose: Purpose::purpose(self.purpose()),
            reason: Purpose::reason(self.purpose()),
        };
        self.retrying(|| async { self.transit().decrypt(request.clone()).await })
            .await
    }

    /// Re-encrypts one ciphertext under the latest version of its key, or of
    /// `options.destination_key`; the plaintext never reaches the client.
    pub async fn rewrap(
        &self,
        key: &str,
        ciphertext: impl Into<Bytes>,
        options: &RewrapOptions,
    ) -> Result<pb::RewrapResponse> {
        let request = pb::RewrapRequest {
            key: key.to_owned(),
            ciphertext: ciphertext.into(),
            associated_data: options.associated_data.clone(),
            context: options.context.clone(),
            destination_key: options.destination_key.clone().unwrap_or_default(),
            destination_context: options.destination_context.clone(),
            encoding: encoding(options.text),
            purpose: Purpose::purpose(self.purpose()),
            reason: Purpose::reason(self.purpose()),
        };
        self.retrying(|| async { self.transit().rewrap(request.clone()).await })
            .await
    }

    /// Generates a data key wrapped under `key` (and in plaintext unless
    /// `options.wrapped_only`). Repeating it after a lost reply only makes another
    /// key, so it is retried like the others.
    pub async fn generate_data_key(
        &self,
        key: &str,
        options: &DataKeyOptions,
    ) -> Result<pb::GenerateDataKeyResponse> {
        let request = pb::GenerateDataKeyRequest {
            key: key.to_owned(),
            bits: options.bits,
            wrapped_only: options.wrapped_only,
            associated_data: options.associated_data.clone(),
            context: options.context.clone(),
            encoding: encoding(options.text),
            purpose: Purpose::purpose(self.purpose()),
            reason: Purpose::reason(self.purpose()),
        };
        self.retrying(|| async { self.transit().generate_data_key(request.clone()).await })
            .await
    }

    /// Encrypts many items under `key`, in chunks of `batch_chunk` items. Returns
    /// exactly one result per item, in order.
    pub async fn batch_encrypt(
        &self,
        key: &str,
        items: Vec<pb::EncryptItem>,
        text: bool,
    ) -> Result<Vec<ItemResult>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.options.batch_chunk.max(1)) {
            let request = pb::BatchEncryptRequest {
                key: key.to_owned(),
                items: chunk.to_vec(),
                key_version: None,
                encoding: encoding(text),
            };
            let reply = self
                .retrying(|| async { self.transit().batch_encrypt(request.clone()).await })
                .await?;
            check_count(chunk.len(), reply.results.len())?;
            out.extend(reply.results.into_iter().map(|r| match r.result {
                Some(pb::ciphertext_result::Result::Ciphertext(c)) => Ok(c),
                Some(pb::ciphertext_result::Result::Error(e)) => Err(Error::from_item(&e)),
                None => Err(Error::Protocol("empty batch result".into())),
            }));
        }
        Ok(out)
    }

    /// Decrypts many items under `key`; one result per item, in order.
    pub async fn batch_decrypt(
        &self,
        key: &str,
        items: Vec<pb::DecryptItem>,
    ) -> Result<Vec<ItemResult>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.options.batch_chunk.max(1)) {
            let request = pb::BatchDecryptRequest {
                key: key.to_owned(),
                items: chunk.to_vec(),
                purpose: Purpose::purpose(self.purpose()),
                reason: Purpose::reason(self.purpose()),
            };
            let reply = self
                .retrying(|| async { self.transit().batch_decrypt(request.clone()).await })
                .await?;
            check_count(chunk.len(), reply.results.len())?;
            out.extend(reply.results.into_iter().map(|r| match r.result {
                Some(pb::plaintext_result::Result::Plaintext(p)) => Ok(p),
                Some(pb::plaintext_result::Result::Error(e)) => Err(Error::from_item(&e)),
                None => Err(Error::Protocol("empty batch result".into())),
            }));
        }
        Ok(out)
    }

    /// Rewraps many items under the latest version of `destination` (or of `key`
    /// when `None`), never exposing plaintext to the client.
    pub async fn batch_rewrap(
        &self,
        key: &str,
        destination: Option<&str>,
        items: Vec<pb::RewrapItem>,
        text: bool,
    ) -> Result<Vec<ItemResult>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.options.batch_chunk.max(1)) {
            let request = pb::BatchRewrapRequest {
                key: key.to_owned(),
                items: chunk.to_vec(),
                destination_key: destination.unwrap_or_default().to_owned(),
                encoding: encoding(text),
                purpose: Purpose::purpose(self.purpose()),
                reason: Purpose::reason(self.purpose()),
            };
            let reply = self
                .retrying(|| async { self.transit().batch_rewrap(request.clone()).await })
                .await?;
            check_count(chunk.len(), reply.results.len())?;
            out.extend(reply.results.into_iter().map(|r| match r.result {
                Some(pb::ciphertext_result::Result::Ciphertext(c)) => Ok(c),
                Some(pb::ciphertext_result::Result::Error(e)) => Err(Error::from_item(&e)),
                None => Err(Error::Protocol("empty batch result".into())),
            }));
        }
        Ok(out)
    }

    /// Creates a token with `policies`, a lifetime (`None`: the server's default)
    /// and a display name. Sent once, never retried: a retry after a lost reply
    /// would leave a live token whose secret nobody saw.
    pub async fn create_token(
        &self,
        policies: Vec<String>,
        ttl: Option<Duration>,
        display_name: &str,
    ) -> Result<CreatedToken> {
        let request = pb::CreateTokenRequest {
            policies,
            // Whole seconds, rounded up so a sub-second TTL is not "the default".
            ttl_seconds: ttl.map_or(0, |t| t.as_secs() + u64::from(t.subsec_nanos() > 0)),
            display_name: display_name.to_owned(),
        };
        let reply = self
            .auth()
            .create_token(request)
            .await
            .map_err(Error::from)?
            .into_inner();
        let pb::CreateTokenResponse { token, info } = reply;
        let token = Token::from(token);
        let info = info.ok_or_else(|| Error::Protocol("token created without its info".into()))?;
        Ok(CreatedToken { token, info })
    }

    /// Every token's description (never a secret).
    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>> {
        let reply = self
            .retrying(|| async { self.auth().list_tokens(pb::ListTokensRequest {}).await })
            .await?;
        Ok(reply.tokens)
    }

    /// One token by accessor, or the caller's own with `None`.
    pub async fn lookup_token(&self, accessor: Option<&str>) -> Result<pb::TokenInfo> {
        let request = pb::LookupTokenRequest {
            accessor: accessor.unwrap_or_default().to_owned(),
        };
        let reply = self
            .retrying(|| async { self.auth().lookup_token(request.clone()).await })
            .await?;
        reply
            .token
            .ok_or_else(|| Error::Protocol("token lookup answered without a token".into()))
    }

    /// Revokes a token by accessor. Sent once.
    pub async fn revoke_token(&self, accessor: &str) -> Result<()> {
        self.auth()
            .revoke_token(pb::RevokeTokenRequest {
                accessor: accessor.to_owned(),
            })
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// Creates or replaces a role.
    pub async fn write_role(&self, role: pb::Role) -> Result<()> {
        let request = pb::WriteRoleRequest { role: Some(role) };
        self.retrying(|| async { self.auth().write_role(request.clone()).await })
            .await?;
        Ok(())
    }

    /// One role.
    pub async fn read_role(&self, name: &str) -> Result<pb::Role> {
        let request = pb::ReadRoleRequest {
            name: name.to_owned(),
        };
        let reply = self
            .retrying(|| async { self.auth().read_role(request.clone()).await })
            .await?;
        reply
            .role
            .ok_or_else(|| Error::Protocol("role read answered without a role".into()))
    }

    /// Every role.
    pub async fn list_roles(&self) -> Result<Vec<pb::Role>> {
        let reply = self
            .retrying(|| async { self.auth().list_roles(pb::ListRolesRequest {}).await })
            .await?;
        Ok(reply.roles)
    }

    /// Deletes a role. Sent once.
    pub async fn delete_role(&self, name: &str) -> Result<()> {
        self.auth()
            .delete_role(pb::DeleteRoleRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// Creates or replaces a policy from its TOML document (the server parses and
    /// validates it: `INVALID_POLICY`).
    pub async fn write_policy(&self, name: &str, document: &str) -> Result<()> {
        let request = pb::WritePolicyRequest {
            name: name.to_owned(),
            document: document.to_owned(),
        };
        self.retrying(|| async { self.policy().write_policy(request.clone()).await })
            .await?;
        Ok(())
    }

    /// One policy's document, as written.
    pub async fn read_policy(&self, name: &str) -> Result<String> {
        let request = pb::ReadPolicyRequest {
            name: name.to_owned(),
        };
        let reply = self
            .retrying(|| async { self.policy().read_policy(request.clone()).await })
            .await?;
        Ok(reply.document)
    }

    /// Every policy's name, sorted.
    pub async fn list_policies(&self) -> Result<Vec<String>> {
        let reply = self
            .retrying(|| async {
                self.policy()
                    .list_policies(pb::ListPoliciesRequest {})
                    .await
            })
            .await?;
        Ok(reply.names)
    }

    /// Deletes a policy. Sent once.
    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        self.policy()
            .delete_policy(pb::DeletePolicyRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(Error::from)?;
        Ok(())
    }

    /// HMAC-SHA256 of `value` under the server's audit key, as audit records show
    /// batch references and derivation contexts (`hmac-sha256:<hex>`).
    pub async fn audit_hash(&self, value: impl Into<Bytes>) -> Result<String> {
        let request = pb::HashRequest {
            value: value.into(),
        };
        let reply = self
            .retrying(|| async { self.audit().hash(request.clone()).await })
            .await?;
        Ok(reply.hmac)
    }

    /// Runs `call`, retrying errors that [`Error::is_retryable`] with a short
    /// exponential back-off. Only used for calls that are safe to repeat.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) => {
                    let err = Error::from(status);
                    if !err.is_retryable() || attempt >= self.options.retries {
                        return Err(err);
                    }
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        }
    }
}

fn encoding(text: bool) -> i32 {
    if text {
        pb::CiphertextEncoding::Text as i32
    } else {
        pb::CiphertextEncoding::Binary as i32
    }
}

fn check_count(sent: usize, got: usize) -> Result<()> {
    if sent == got {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "batch of {sent} items answered with {got} results"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intercept(credentials: &Credentials, request: tonic::Request<()>) -> tonic::Request<()> {
        credentials
            .clone()
            .call(request)
            .expect("the interceptor never refuses")
    }

    #[test]
    fn bearer_credentials_add_a_sensitive_authorization_header() {
        let credentials = Credentials::bearer(&Token::from("s.abc123")).expect("valid token");
        let request = intercept(&credentials, tonic::Request::new(()));
        let value = request
            .metadata()
            .get("authorization")
            .expect("authorization set");
        assert_eq!(value.to_str().expect("ascii"), "Bearer s.abc123");
        assert!(value.is_sensitive(), "HPACK must never index the token");
    }

    #[test]
    fn no_credentials_add_nothing_and_a_request_keeps_its_own() {
        let request = intercept(&Credentials::none(), tonic::Request::new(()));
        assert!(request.metadata().get("authorization").is_none());

        let credentials = Credentials::bearer(&Token::from("mine")).expect("valid token");
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer other"));
        let request = intercept(&credentials, request);
        let values: Vec<_> = request.metadata().get_all("authorization").iter().collect();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].to_str().expect("ascii"), "Bearer other");
    }

    #[test]
    fn tokens_that_a_header_cannot_carry_are_refused_without_echo() {
        for bad in ["", "has space", "line\nbreak", "tab\t", "caf\u{e9}"] {
            let err = Credentials::bearer(&Token::from(bad)).expect_err(bad);
            assert!(matches!(err, Error::Credentials(_)), "{bad:?}: {err}");
            if !bad.is_empty() {
                assert!(!err.to_string().contains(bad), "{err}");
            }
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = Token::from("s.TOPSECRET");
        assert!(!format!("{token:?}").contains("TOPSECRET"));
        let credentials = Credentials::bearer(&token).expect("valid");
        let shown = format!("{credentials:?}");
        assert!(
            !shown.contains("TOPSECRET") && shown.contains("redacted"),
            "{shown}"
        );
        let options = ClientOptions::default()
            .with_token(token)
            .with_purpose(Purpose::new("research"));
        let shown = format!("{options:?}");
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(shown.contains("research"), "{shown}");
    }

    #[test]
    fn only_transient_unavailability_is_retried() {
        let status = |code: Code, reason: &str| -> Error {
            tonic::Status::with_error_details(
                code,
                "m",
                tonic_types::ErrorDetails::with_error_info(
                    reason,
                    "cipherd.dev",
                    std::collections::HashMap::new(),
                ),
            )
            .into()
        };
        for (code, reason, retry) in [
            (Code::Unavailable, "STORAGE_UNAVAILABLE", true),
            (Code::Unavailable, "AUDIT_UNAVAILABLE", true),
            (Code::Unavailable, "SEALED", false),
            (Code::Unavailable, "NOT_INITIALIZED", false),
            // Corruption is never retried, whatever code carries it.
            (Code::DataLoss, "STORAGE_INTEGRITY", false),
            (Code::Internal, "STORAGE_INTEGRITY", false),
            (Code::Unavailable, "STORAGE_INTEGRITY", false),
            (Code::Internal, "INTERNAL", false),
            (Code::InvalidArgument, "DECRYPTION_FAILED", false),
            (Code::ResourceExhausted, "OVERLOADED", false),
        ] {
            assert_eq!(
                status(code, reason).is_retryable(),
                retry,
                "{code:?} {reason}"
            );
        }
        // A bare UNAVAILABLE (a proxy, a reset connection) is retried.
        assert!(Error::from(tonic::Status::unavailable("reset")).is_retryable());
        assert!(!Error::Protocol("x".into()).is_retryable());
    }

    #[test]
    fn purposes_fill_request_fields() {
        let p = Purpose::emergency("ER bed 4");
        assert_eq!(
            (p.purpose.as_str(), p.reason.as_str()),
            ("emergency", "ER bed 4")
        );
        assert_eq!(Purpose::purpose(Some(&p)), "emergency");
        assert_eq!(Purpose::reason(Some(&p)), "ER bed 4");
        assert_eq!(Purpose::purpose(None), "");
        assert_eq!(Purpose::reason(None), "");
        let p = Purpose::new("treatment");
        assert!(p.reason.is_empty());
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str =
        "-----BEGIN EC PRIVATE KEY-----\nsecret-key-bytes\n-----END EC PRIVATE KEY-----\n";

    #[test]
    fn tls_options_never_print_the_key() {
        let tls = TlsOptions::new(CERT)
            .with_identity(CERT, KEY)
            .with_domain("kms");
        let shown = format!("{tls:?}");
        assert!(
            !shown.contains("secret-key-bytes") && shown.contains("[redacted]"),
            "{shown}"
        );
        assert!(contains_pem(KEY.as_bytes(), "PRIVATE KEY"));
        assert!(!contains_pem(b"garbage", "CERTIFICATE"));
    }

    #[tokio::test]
    async fn tls_and_the_endpoint_scheme_must_agree() {
        let with_tls = ClientOptions {
            tls: Some(TlsOptions::new(CERT)),
            ..ClientOptions::default()
        };
        let err = Client::connect_with("http://127.0.0.1:1", with_tls.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("https://"), "{err}");
        let err = Client::connect("https://127.0.0.1:1")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS options"), "{err}");
        let bad_ca = ClientOptions {
            tls: Some(TlsOptions::new("not a certificate")),
            ..ClientOptions::default()
        };
        let err = Client::connect_with("https://127.0.0.1:1", bad_ca)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("CA file"), "{err}");
    }
}
