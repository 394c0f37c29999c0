//! TLS on the gRPC listener: the `[tls]` options, the rustls server
//! configuration built from the certificate files, the peer's identity from its
//! client certificate, and reloading the files without a restart.
//!
//! - **Versions**: TLS 1.3 only by default; `tls.min_version = "1.2"` adds 1.2.
//! - **Key exchange**: the hybrid post-quantum group X25519MLKEM768 is offered
//!   first, then X25519 and secp256r1 (for clients without ML-KEM). Traffic
//!   recorded today cannot be decrypted later by whoever breaks X25519 with a
//!   quantum computer, as long as ML-KEM-768 holds (and the reverse).
//! - **ALPN**: `h2` only (gRPC is HTTP/2).
//! - **mTLS**: with `tls.client_ca_file`, every client must present a
//!   certificate chaining to one of the CAs in that file
//!   (`WebPkiClientVerifier`). Its identity is [`peer_identity`]: the first URI
//!   SAN (`spiffe://hospital/ns/ehr/sa/api`), else the first DNS SAN, else the
//!   subject CN.
//! - **Reload**: the files are read again every [`RELOAD_INTERVAL`] and on
//!   SIGHUP. When their contents changed (Kubernetes swaps a symlink, cert-manager
//!   rewrites the files), a new configuration is built; if it builds, new
//!   connections use it, open ones keep theirs. If it does not (a half-written
//!   file, a key that does not match the certificate), the configuration in
//!   service stays and an error naming the file is logged, once per bad content.
//!
//! The handshake itself runs in the accept loop (`conn.rs`), concurrently per
//! connection, bounded by `limits.header_read_timeout_ms`.
//!
//! This module does not decide what an identity may do (the auth layers do), and
//! it does not check revocation (no CRL or OCSP): short-lived certificates
//! rotated by cert-manager are the revocation story.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig, ServerConnection, SupportedProtocolVersion,
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::config::ConfigError;

/// How often the certificate files are read again to notice a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// `[tls]` as configured (see `docs/config.reference.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    /// PEM file with the server's certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM file with the CA certificates client certificates must chain to; set,
    /// it makes client certificates (mTLS) mandatory.
    pub client_ca_file: Option<PathBuf>,
    /// Lowest TLS version accepted: `"1.3"` (default) or `"1.2"`.
    pub min_version: String,
    /// Serve plaintext: only behind a TLS-terminating sidecar or proxy.
    pub disable: bool,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            min_version: "1.3".to_owned(),
            disable: false,
        }
    }
}

/// Validated TLS settings: the server serves TLS with these files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// The server's certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; `None`:
    /// no client certificates are asked for.
    pub client_ca_file: Option<PathBuf>,
    /// The lowest TLS version accepted.
    pub min_version: TlsVersion,
    /// How often the files are read again to notice a change
    /// ([`RELOAD_INTERVAL`] from the configuration; tests use less).
    pub reload_interval: Duration,
}

/// The lowest TLS version the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only (the default).
    Tls13,
}

impl TlsParams {
    /// TLS with `cert_file` and `key_file`, TLS 1.3 only, no client
    /// certificates, the default reload interval.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            client_ca_file: None,
            min_version: TlsVersion::Tls13,
            reload_interval: RELOAD_INTERVAL,
        }
    }

    /// Validates `[tls]` for a server that is `dev` or not and listens on
    /// `listen`. `None` serves plaintext, allowed with `tls.disable = true`, or in
    /// dev mode on a loopback address. Files are read when the server starts, not
    /// here.
    pub fn from_raw(raw: &RawTls, dev: bool, listen: &str) -> Result<Option<Self>, ConfigError> {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        let (cert, key, ca) = (
            set(&raw.cert_file),
            set(&raw.key_file),
            set(&raw.client_ca_file),
        );
        let min_version = match raw.min_version.trim() {
            "1.3" => TlsVersion::Tls13,
            "1.2" => TlsVersion::Tls12,
            other => {
                return Err(ConfigError(format!(
                    "tls.min_version = {other:?}: expected \"1.3\" (the default) or \"1.2\""
                )));
            }
        };
        if raw.disable {
            if let Some(option) = [
                ("tls.cert_file", &cert),
                ("tls.key_file", &key),
                ("tls.client_ca_file", &ca),
            ]
            .into_iter()
            .find_map(|(name, value)| value.is_some().then_some(name))
            {
                return Err(ConfigError(format!(
                    "tls.disable = true and {option} are both set: remove {option} to serve \
                     plaintext behind a TLS-terminating sidecar, or tls.disable to serve TLS"
                )));
            }
            return Ok(None);
        }
        match (cert, key) {
            (Some(cert_file), Some(key_file)) => Ok(Some(Self {
                client_ca_file: ca,
                min_version,
                ..Self::new(cert_file, key_file)
            })),
            (Some(_), None) => Err(ConfigError(
                "tls.cert_file is set but tls.key_file is not: set both (PEM files)".into(),
            )),
            (None, Some(_)) => Err(ConfigError(
                "tls.key_file is set but tls.cert_file is not: set both (PEM files)".into(),
            )),
            (None, None) if ca.is_some() => Err(ConfigError(
                "tls.client_ca_file needs tls.cert_file and tls.key_file: mTLS is TLS first".into(),
            )),
            (None, None) => {
                let loopback = listen
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback());
                if dev && loopback {
                    return Ok(None);
                }
                let why = if dev {
                    format!(
                        "dev mode serves plaintext only on a loopback address, not listen = {listen:?}"
                    )
                } else {
                    "TLS is required outside dev mode".to_owned()
                };
                Err(ConfigError(format!(
                    "{why}: set tls.cert_file and tls.key_file (PEM files), or set \
                     tls.disable = true only when a TLS-terminating sidecar or proxy in front of \
                     cipherd encrypts every connection"
                )))
            }
        }
    }
}

/// TLS files that could not be used; the message names the option and the file.
#[derive(Debug, thiserror::Error)]
#[error("{option} ({}): {message}", path.display())]
pub struct TlsError {
    /// The option naming the file, e.g. `tls.cert_file`.
    pub option: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// What the handshake negotiated, for logs and audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
    /// The key exchange group, e.g. `X25519MLKEM768`.
    pub key_exchange: &'static str,
    /// The cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: &'static str,
}

/// The crypto provider of the listener: aws-lc-rs with its cipher suites, and
/// the key exchange groups in the order offered: X25519MLKEM768 first.
pub fn crypto_provider() -> CryptoProvider {
    let mut provider = aws_lc_rs::default_provider();
    provider.kx_groups = vec![
        aws_lc_rs::kx_group::X25519MLKEM768,
        aws_lc_rs::kx_group::X25519,
        aws_lc_rs::kx_group::SECP256R1,
    ];
    provider
}

/// The identity a client certificate (DER) names: its first URI SAN, else its
/// first DNS SAN, else its subject CN; `None` if it has none of them or does not
/// parse. The certificate has been verified by the handshake before this is asked.
pub fn peer_identity(cert_der: &[u8]) -> Option<String> {
    use x509_cert::{
        Certificate,
        der::Decode as _,
        ext::pkix::{SubjectAltName, name::GeneralName},
    };
    let cert = Certificate::from_der(cert_der).ok()?;
    let tbs = cert.tbs_certificate();
    if let Ok(Some((_, SubjectAltName(names)))) = tbs.get_extension::<SubjectAltName>() {
        let first = |want_uri: bool| {
            names.iter().find_map(|name| match name {
                GeneralName::UniformResourceIdentifier(uri) if want_uri => Some(uri.to_string()),
                GeneralName::DnsName(dns) if !want_uri => Some(dns.to_string()),
                _ => None,
            })
        };
        if let Some(id) = first(true)
            .or_else(|| first(false))
            .filter(|id| !id.is_empty())
        {
            return Some(id);
        }
    }
    let cn = tbs.subject().common_name().ok()??;
    Some(cn.value().into_owned()).filter(|cn| !cn.is_empty())
}

/// The certificates in service and the watcher's memory of the files.
pub(super) struct TlsState {
    params: TlsParams,
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<Seen>,
}

/// What the files held when last looked at.
#[derive(Default)]
struct Seen {
    /// Digest of the files in service.
    in_service: [u8; 32],
    /// Digest of the last contents that failed to build (already logged).
    failed: Option<[u8; 32]>,
    /// The last error reading the files (already logged).
    read_error: Option<String>,
}

/// The outcome of one look at the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reload {
    /// The files are as in service.
    Unchanged,
    /// New files are in service.
    Reloaded,
    /// The files changed but are unusable; the old ones stay in service.
    Failed,
}

impl TlsState {
    /// Reads the files and builds the first configuration.
    pub(super) fn load(params: &TlsParams) -> Result<Arc<Self>, TlsError> {
        let files = Files::read(params)?;
        let config = files.server_config(params)?;
        let state = Self {
            params: params.clone(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(Seen {
                in_service: files.digest(),
                ..Seen::default()
            }),
        };
        Ok(Arc::new(state))
    }

    /// The configuration new connections get.
    pub(super) fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Reads the files and, if they changed (or `force`, on SIGHUP), builds and
    /// installs a new configuration. Errors are logged here, once per content.
    pub(super) fn reload(&self, force: bool) -> Reload {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let files = match Files::read(&self.params) {
            Ok(files) => files,
            Err(e) => {
                let message = e.to_string();
                if force || seen.read_error.as_deref() != Some(&message) {
                    tracing::error!(
                        file = %e.path.display(),
                        error = %e,
                        "TLS reload failed: the certificates in service stay in service"
                    );
                }
                seen.read_error = Some(message);
                return Reload::Failed;
            }
        };
        seen.read_error = None;
        let mut files = files;
        let mut digest = files.digest();
        if !force && (digest == seen.in_service || seen.failed == Some(digest)) {
            return if digest == seen.in_service {
                Reload::Unchanged
            } else {
                Reload::Failed
            };
        }
        let mut read_again = true;
        loop {
            match files.server_config(&self.params) {
                Ok(config) => {
                    *self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                    let changed = digest != seen.in_service;
                    seen.in_service = digest;
                    seen.failed = None;
                    tracing::info!(
                        cert_file = %self.params.cert_file.display(),
                        changed,
                        "TLS certificates reloaded: new connections use them"
                    );
                    return Reload::Reloaded;
                }
                Err(e) => {
                    // A change read halfway (the certificate swapped, not yet
                    // the key) does not build: read once more before calling
                    // the files bad.
                    if std::mem::take(&mut read_again)
                        && let Ok(again) = Files::read(&self.params)
                        && again.digest() != digest
                    {
                        digest = again.digest();
                        files = again;
                        continue;
                    }
                    tracing::error!(
                        file = %e.path.display(),
                        error = %e,
                        "TLS reload failed: the certificates in service stay in service"
                    );
                    seen.failed = Some(digest);
                    return Reload::Failed;
                }
            }
        }
    }
}

/// Watches the files of `state` until the task is aborted: every
/// `reload_interval`, and on SIGHUP (forcing a rebuild).
pub(super) async fn watch(state: Arc<TlsState>) {
    let interval = state.params.reload_interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| {
            tracing::warn!(error = %e, "no SIGHUP handler: TLS files reload only when they change");
        });
    loop {
        #[cfg(unix)]
        let sighup = async {
            match &mut hangup {
                Ok(signal) => signal.recv().await,
                Err(()) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<Option<()>>();
        let force = tokio::select! {
            _ = tick.tick() => false,
            _ = sighup => {
                tracing::info!("SIGHUP: reloading the TLS files");
                true
            }
        };
        let state = Arc::clone(&state);
        // File reads and key parsing are blocking work.
        let _ = tokio::task::spawn_blocking(move || state.reload(force)).await;
    }
}

/// What the negotiated session is, and the peer's identity (mTLS), of a
/// completed handshake.
pub(super) fn session_info(conn: &ServerConnection) -> (TlsInfo, Option<Arc<str>>) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        Some(other) => other.as_str().unwrap_or("unknown"),
        None => "unknown",
    };
    let key_exchange = conn
        .negotiated_key_exchange_group()
        .and_then(|g| g.name().as_str())
        .unwrap_or("unknown");
    let cipher_suite = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    let identity = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| peer_identity(leaf))
        .map(Arc::from);
    (
        TlsInfo {
            version,
            key_exchange,
            cipher_suite,
        },
        identity,
    )
}

/// The contents of the configured files.
struct Files {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(params: &TlsParams) -> Result<Self, TlsError> {
        let read = |option, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError {
                option,
                path: path.to_owned(),
                message: format!("cannot read: {e}"),
            })
        };
        Ok(Self {
            cert: read("tls.cert_file", &params.cert_file)?,
            key: Zeroizing::new(read("tls.key_file", &params.key_file)?),
            client_ca: params
                .client_ca_file
                .as_deref()
                .map(|p| read("tls.client_ca_file", p))
                .transpose()?,
        })
    }

    /// A digest of all three files, to notice any change.
    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [
            Some(self.cert.as_slice()),
            Some(self.key.as_slice()),
            self.client_ca.as_deref(),
        ] {
            let part = part.unwrap_or_default();
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    fn server_config(&self, params: &TlsParams) -> Result<ServerConfig, TlsError> {
        let cert_err = |message: String| TlsError {
            option: "tls.cert_file",
            path: params.cert_file.clone(),
            message,
        };
        let key_err = |message: String| TlsError {
            option: "tls.key_file",
            path: params.key_file.clone(),
            message,
        };
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_err(format!("not PEM certificates: {e}")))?;
        if chain.is_empty() {
            return Err(cert_err("no PEM certificate in the file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| key_err(format!("no usable PEM private key: {e}")))?;

        let provider = Arc::new(crypto_provider());
        let versions: &[&SupportedProtocolVersion] = match params.min_version {
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(|e| cert_err(format!("TLS configuration: {e}")))?;
        let builder = match (&self.client_ca, &params.client_ca_file) {
            (Some(pem), Some(path)) => {
                let ca_err = |message: String| TlsError {
                    option: "tls.client_ca_file",
                    path: path.clone(),
                    message,
                };
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| ca_err(format!("not PEM certificates: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(ca_err("no PEM certificate in the file".into()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| ca_err(format!("client verifier: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => key_err(format!(
                "does not match the certificate in tls.cert_file ({})",
                params.cert_file.display()
            )),
            other => key_err(format!("unusable with the certificate: {other}")),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A CA and certificates it signs, generated for tests.
    pub(crate) struct TestCa {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        /// The CA certificate, PEM.
        pub pem: String,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// A leaf certificate and key (PEM) with these SANs (`spiffe://…` become
        /// URI SANs) and CN, for a server (`server`) or a client.
        pub(crate) fn leaf(
            &self,
            sans: &[&str],
            cn: Option<&str>,
            server: bool,
        ) -> (String, String) {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            for san in sans {
                params.subject_alt_names.push(if san.contains("://") {
                    rcgen::SanType::URI((*san).try_into().unwrap())
                } else {
                    rcgen::SanType::DnsName((*san).try_into().unwrap())
                });
            }
            params.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn);
            }
            params.extended_key_usages = vec![if server {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            }];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn identity_is_uri_san_then_dns_san_then_cn() {
        let ca = TestCa::new("test ca");
        for (sans, cn, expected) in [
            (
                &["api.ehr.svc", "spiffe://hospital/ns/ehr/sa/api"][..],
                Some("api"),
                Some("spiffe://hospital/ns/ehr/sa/api"),
            ),
            (
                &["api.ehr.svc", "b.ehr.svc"][..],
                Some("api"),
                Some("api.ehr.svc"),
            ),
            (&[][..], Some("batch-job"), Some("batch-job")),
            (&[][..], None, None),
        ] {
            let (cert, _) = ca.leaf(sans, cn, false);
            assert_eq!(
                peer_identity(&der(&cert)).as_deref(),
                expected,
                "{sans:?} {cn:?}"
            );
        }
        assert_eq!(peer_identity(b"not a certificate"), None);
    }

    fn raw(pairs: &[(&str, &str)]) -> RawTls {
        let mut raw = RawTls::default();
        for (k, v) in pairs {
            match *k {
                "cert_file" => raw.cert_file = Some(v.into()),
                "key_file" => raw.key_file = Some(v.into()),
                "client_ca_file" => raw.client_ca_file = Some(v.into()),
                "min_version" => raw.min_version = (*v).to_owned(),
                "disable" => raw.disable = *v == "true",
                other => panic!("{other}"),
            }
        }
        raw
    }

    #[test]
    fn from_raw_requires_tls_outside_dev_on_loopback_and_names_the_option() {
        let lo = "127.0.0.1:8210";
        let any = "0.0.0.0:8210";
        // Errors, each naming what to set.
        for (pairs, dev, listen, named) in [
            (&[][..], false, lo, "tls.disable = true"),
            (&[][..], false, any, "tls.cert_file"),
            (&[][..], true, any, "loopback"),
            (&[("cert_file", "c.pem")][..], false, lo, "tls.key_file"),
            (&[("key_file", "k.pem")][..], true, lo, "tls.cert_file"),
            (
                &[("client_ca_file", "ca.pem")][..],
                true,
                lo,
                "tls.client_ca_file",
            ),
            (
                &[
                    ("cert_file", "c"),
                    ("key_file", "k"),
                    ("min_version", "1.1"),
                ][..],
                false,
                lo,
                "tls.min_version",
            ),
            (
                &[("disable", "true"), ("cert_file", "c")][..],
                false,
                lo,
                "tls.cert_file",
            ),
        ] {
            let err = TlsParams::from_raw(&raw(pairs), dev, listen)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{pairs:?} dev={dev} {listen}: {err}");
        }
        // Plaintext: disabled explicitly, or dev on loopback.
        assert_eq!(
            TlsParams::from_raw(&raw(&[("disable", "true")]), false, any).unwrap(),
            None
        );
        assert_eq!(TlsParams::from_raw(&raw(&[]), true, lo).unwrap(), None);
        assert_eq!(
            TlsParams::from_raw(&raw(&[]), true, "[::1]:1").unwrap(),
            None
        );
        // TLS, with the options carried over.
        let p = TlsParams::from_raw(
            &raw(&[
                ("cert_file", "c.pem"),
                ("key_file", "k.pem"),
                ("client_ca_file", "ca.pem"),
                ("min_version", "1.2"),
            ]),
            false,
            any,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.cert_file, PathBuf::from("c.pem"));
        assert_eq!(p.client_ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(p.min_version, TlsVersion::Tls12);
        let p = TlsParams::from_raw(&raw(&[("cert_file", "c"), ("key_file", "k")]), true, any)
            .unwrap()
            .unwrap();
        assert_eq!((p.min_version, p.client_ca_file), (TlsVersion::Tls13, None));
    }

    #[test]
    fn config_layers_reach_tls_params() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nmin_version = \"1.2\"\n",
        )
        .unwrap();
        let raw = crate::config::RawConfig::load(Some(&path), &[]).unwrap();
        let p = TlsParams::from_raw(&raw.tls, raw.dev, &raw.listen)
            .unwrap()
            .unwrap();
        assert_eq!(p.min_version, TlsVersion::Tls12);
        let raw = crate::config::RawConfig::load(None, &[("tls.disable", "true".into())]).unwrap();
        assert!(raw.tls.disable);
        assert_eq!(
            TlsParams::from_raw(&raw.tls, raw.dev, &raw.listen).unwrap(),
            None
        );
        std::fs::write(&path, "[tls]\ncert_fil = \"/c.pem\"\n").unwrap();
        assert!(crate::config::RawConfig::load(Some(&path), &[]).is_err());
    }

    /// Writes a server certificate and key into `dir`; returns their params.
    pub(crate) fn write_server_files(dir: &Path, ca: &TestCa) -> TlsParams {
        let (cert, key) = ca.leaf(&["localhost"], Some("cipherd"), true);
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsParams::new(dir.join("cert.pem"), dir.join("key.pem"))
    }

    #[test]
    fn bad_files_name_the_option_and_a_bad_reload_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("ca");
        let params = write_server_files(dir.path(), &ca);
        let state = TlsState::load(&params).unwrap();
        let first = state.config();
        assert_eq!(state.reload(false), Reload::Unchanged);
        assert!(Arc::ptr_eq(&first, &state.config()));

        // A key that does not match the certificate.
        let (_, other_key) = ca.leaf(&["localhost"], None, true);
        std::fs::write(&params.key_file, &other_key).unwrap();
        assert_eq!(state.reload(false), Reload::Failed);
        assert_eq!(
            state.reload(false),
            Reload::Failed,
            "still bad, logged once"
        );
        assert!(Arc::ptr_eq(&first, &state.config()), "the old config stays");
        let err = TlsState::load(&params).err().unwrap().to_string();
        assert!(err.starts_with("tls.key_file ("), "{err}");
        assert!(err.contains("does not match"), "{err}");

        // Garbage certificate; a missing file.
        std::fs::write(&params.cert_file, "garbage").unwrap();
        let err = TlsState::load(&params).err().unwrap().to_string();
        assert!(err.starts_with("tls.cert_file ("), "{err}");
        std::fs::remove_file(&params.cert_file).unwrap();
        assert_eq!(state.reload(false), Reload::Failed);
        assert!(Arc::ptr_eq(&first, &state.config()));

        // A good new pair is picked up.
        let fresh = write_server_files(dir.path(), &ca);
        assert_eq!(state.reload(false), Reload::Reloaded);
        assert!(!Arc::ptr_eq(&first, &state.config()));
        assert_eq!(state.reload(false), Reload::Unchanged);
        assert_eq!(
            state.reload(true),
            Reload::Reloaded,
            "SIGHUP forces a rebuild"
        );

        // A CA file without certificates.
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, "").unwrap();
        let with_ca = TlsParams {
            client_ca_file: Some(ca_path.clone()),
            ..fresh
        };
        let err = TlsState::load(&with_ca).err().unwrap().to_string();
        assert!(err.starts_with("tls.client_ca_file ("), "{err}");
        std::fs::write(&ca_path, &ca.pem).unwrap();
        TlsState::load(&with_ca).unwrap();
    }

    #[test]
    fn the_provider_offers_x25519mlkem768_first_and_tls13_only_by_default() {
        let names: Vec<_> = crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            names,
            [
                rustls::NamedGroup::X25519MLKEM768,
                rustls::NamedGroup::X25519,
                rustls::NamedGroup::secp256r1
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let params = write_server_files(dir.path(), &TestCa::new("ca"));
        let config = TlsState::load(&params).unwrap().config();
        assert_eq!(config.alpn_protocols, [b"h2".to_vec()]);
    }
}
