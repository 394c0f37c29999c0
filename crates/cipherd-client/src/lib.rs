//! A typed async client for cipherd.
//!
//! [`Client`] wraps the three gRPC services with one connection, a per-call
//! deadline, and retries of calls that are safe to repeat when the server is
//! briefly unavailable (never while it reports `SEALED` or `NOT_INITIALIZED`, which
//! need an operator).
//! Batch helpers split large inputs into server-sized chunks and return exactly one
//! result per input, in order. The generated service clients remain reachable for
//! anything not wrapped here ([`Client::transit`] and friends).
//!
//! Errors carry the server's `ErrorInfo` reason ([`Error::reason`]); match on that,
//! never on message text.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::{future::Future, time::Duration};

use bytes::Bytes;
pub use cipherd_proto::v1 as pb;
use pb::{
    key_admin_service_client::KeyAdminServiceClient, system_service_client::SystemServiceClient,
    transit_service_client::TransitServiceClient,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_types::{RpcStatusExt as _, StatusExt as _};

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
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline for each call.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Extra attempts for calls that failed with UNAVAILABLE (not SEALED or
    /// NOT_INITIALIZED).
    pub retries: u32,
    /// Items per batch request.
    pub batch_chunk: usize,
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
    pub identity: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
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
        self.identity = Some((cert_pem.into(), zeroize::Zeroizing::new(key_pem.into())));
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
impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
            tls: None,
        }
    }
}

/// One connection to cipherd with typed helpers.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
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

/// One item's outcome in a batch.
pub type ItemResult = Result<Bytes>;

impl Client {
    /// Connects to `endpoint`, e.g. `http://127.0.0.1:8210` (plaintext: dev mode
    /// on loopback, or behind a TLS sidecar), or `https://cipherd.example:8210`
    /// with [`ClientOptions::tls`].
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(endpoint: impl Into<String>, options: ClientOptions) -> Result<Self> {
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
        Ok(Self { channel, options })
    }

    /// The generated `TransitService` client on this connection.
    pub fn transit(&self) -> TransitServiceClient<Channel> {
        TransitServiceClient::new(self.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// The generated `KeyAdminService` client on this connection.
    pub fn admin(&self) -> KeyAdminServiceClient<Channel> {
        KeyAdminServiceClient::new(self.channel.clone())
    }

    /// The generated `SystemService` client on this connection.
    pub fn system(&self) -> SystemServiceClient<Channel> {
        SystemServiceClient::new(self.channel.clone())
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
            ..Default::default()
        };
        self.retrying(|| async { self.transit().decrypt(request.clone()).await })
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
                ..Default::default()
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
                ..Default::default()
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

    /// Runs `call`, retrying UNAVAILABLE answers other than SEALED and
    /// NOT_INITIALIZED with a short
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
                    // SEALED and NOT_INITIALIZED wait for an operator, not for time.
                    let transient = err.code() == Some(Code::Unavailable)
                        && !matches!(err.reason(), Some("SEALED" | "NOT_INITIALIZED"));
                    if !transient || attempt >= self.options.retries {
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
