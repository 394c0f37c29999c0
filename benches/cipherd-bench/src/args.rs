//! Command-line flags of `cipherd-bench` and their validation.
//!
//! Parsing only: nothing here talks to a server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, ensure};
use clap::{Parser, ValueEnum};

/// Flags of `cipherd-bench`. Every flag has a default, so `cipherd-bench` alone
/// runs 10 s of single 64-byte encryptions against a cipherd on 127.0.0.1:8210.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// What to measure: cipherd, OpenBao's Transit engine, or cipherd-echo.
    #[arg(long, value_enum, default_value_t = Target::Cipherd)]
    pub target: Target,
    /// Server address, `HOST:PORT` (an `http://` prefix is accepted).
    #[arg(long, default_value = "127.0.0.1:8210", value_parser = parse_addr)]
    pub addr: SocketAddr,
    /// unary: one item per request; batch: `--batch` items per request; stream:
    /// bidirectional streams whose messages carry `--batch` items each.
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    pub mode: Mode,
    /// The operation. decrypt and rewrap use ciphertexts the target makes during
    /// setup.
    #[arg(long, value_enum, default_value_t = Op::Encrypt)]
    pub op: Op,
    /// Plaintext bytes per item.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Items per request (batch) or per stream message (stream); ignored for unary.
    #[arg(long, default_value_t = 400)]
    pub batch: usize,
    /// Requests in flight at once (unary, batch), or concurrent streams (stream).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// HTTP/2 connections the in-flight requests are spread over (default:
    /// min(concurrency, 4)). OpenBao (HTTP/1.1) always uses one per request in flight.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Stream messages in flight per stream before waiting for a reply.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts (not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Target rate in requests/s over all workers (0: as fast as replies come).
    /// Latency is then measured from each request's scheduled time, so a server
    /// falling behind shows up in the percentiles.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Key name; with `--keys N` > 1 the keys are NAME-0 … NAME-(N-1).
    #[arg(long, default_value = "bench")]
    pub key: String,
    /// Key type, used by `--create-keys`.
    #[arg(long, value_enum, default_value_t = KeyType::Xaes256Gcm)]
    pub key_type: KeyType,
    /// Spread requests uniformly at random over this many keys.
    #[arg(long, default_value_t = 1)]
    pub keys: usize,
    /// Create the key(s) first (existing ones are kept as they are).
    #[arg(long)]
    pub create_keys: bool,
    /// Wait for readiness and create keys, then exit without measuring.
    #[arg(long)]
    pub setup_only: bool,
    /// Distinct payloads to cycle through (for decrypt and rewrap, shared out over
    /// the keys, at least one ciphertext per key).
    #[arg(long, default_value_t = 256)]
    pub pool: usize,
    /// Ask cipherd for the text ciphertext form `cipherd:v<N>:<base64>` instead of
    /// binary (closer to what OpenBao returns).
    #[arg(long)]
    pub text: bool,
    /// OpenBao token (sent as X-Vault-Token).
    #[arg(
        long,
        env = "BAO_TOKEN",
        default_value = "root",
        hide_env_values = true
    )]
    pub token: String,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Per-request deadline in seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Seconds to wait for the target to report ready (polled, not slept).
    #[arg(long, default_value_t = 30.0)]
    pub wait: f64,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
    /// PEM CA certificate of the target's TLS certificate: connect over TLS
    /// (the cipherd target), as a production deployment does.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a target that requires one (mTLS).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the target's certificate must carry (with --tls-ca).
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub tls_server_name: String,
    /// Bearer token for a cipherd target (its `authorization` metadata).
    #[arg(
        long,
        env = "CIPHERD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub cipherd_token: Option<String>,
    /// Read the bearer token from FILE (e.g. a dev server's root-token.INSECURE):
    /// its first line that is neither blank nor a `#` comment.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl Args {
    /// The cipherd bearer token from `--token-file` or `--cipherd-token`, if any.
    pub fn token(&self) -> anyhow::Result<Option<cipherd_client::Token>> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --token-file {}: {e}", path.display()))?;
            let line = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .ok_or_else(|| anyhow::anyhow!("--token-file {} holds no token", path.display()))?;
            return Ok(Some(cipherd_client::Token::from(line)));
        }
        Ok(self
            .cipherd_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(cipherd_client::Token::from))
    }
}

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// cipherd's gRPC API.
    Cipherd,
    /// OpenBao's (or Vault's) Transit engine over HTTP/1.1 + JSON.
    Openbao,
    /// `cipherd-echo`: cipherd's API, no crypto.
    Echo,
}

/// How items are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One item per request.
    Unary,
    /// `--batch` items per request.
    Batch,
    /// Bidirectional streams, `--batch` items per message.
    Stream,
}

/// The operation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    /// Plaintext in, ciphertext out.
    Encrypt,
    /// Ciphertext in, plaintext out.
    Decrypt,
    /// Ciphertext in, ciphertext under the latest key version out.
    Rewrap,
}

/// Key types `--create-keys` can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    /// XAES-256-GCM (cipherd's default).
    #[value(name = "xaes-256-gcm")]
    Xaes256Gcm,
    /// AES-256-GCM with 96-bit nonces (cipherd and OpenBao).
    #[value(name = "aes256-gcm96")]
    Aes256Gcm96,
    /// ChaCha20-Poly1305 (cipherd and OpenBao).
    #[value(name = "chacha20-poly1305")]
    Chacha20Poly1305,
    /// XChaCha20-Poly1305 (cipherd).
    #[value(name = "xchacha20-poly1305")]
    Xchacha20Poly1305,
}

impl Args {
    /// Checks the combination of flags and fills in derived defaults.
    pub fn validated(mut self) -> anyhow::Result<Self> {
        ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        ensure!(self.keys > 0, "--keys must be at least 1");
        ensure!(self.workers > 0, "--workers must be at least 1");
        ensure!(self.window > 0, "--window must be at least 1");
        ensure!(self.pool > 0, "--pool must be at least 1");
        ensure!(
            self.duration.is_finite() && self.duration > 0.0,
            "--duration must be positive"
        );
        ensure!(
            self.warmup.is_finite() && self.warmup >= 0.0,
            "--warmup must not be negative"
        );
        ensure!(
            self.timeout.is_finite() && self.timeout > 0.0,
            "--timeout must be positive"
        );
        ensure!(
            self.wait.is_finite() && self.wait >= 0.0,
            "--wait must not be negative"
        );
        ensure!(
            self.rate.is_finite() && self.rate >= 0.0,
            "--rate must not be negative"
        );
        ensure!(!self.key.is_empty(), "--key must not be empty");
        if self.mode == Mode::Unary {
            self.batch = 1;
        }
        ensure!(self.batch > 0, "--batch must be at least 1");
        if self.mode == Mode::Stream {
            if self.target == Target::Openbao {
                bail!("OpenBao has no streaming API: use --mode batch");
            }
            ensure!(self.rate == 0.0, "--rate applies to unary and batch modes");
        }
        if self.target == Target::Openbao {
            if !matches!(
                self.key_type,
                KeyType::Aes256Gcm96 | KeyType::Chacha20Poly1305
            ) {
                bail!("OpenBao key types here: aes256-gcm96, chacha20-poly1305");
            }
            ensure!(
                self.tls_ca.is_none(),
                "--tls-ca applies to cipherd (OpenBao is driven over plain HTTP/1.1)"
            );
            // HTTP/1.1 has one request in flight per connection.
            self.connections = Some(self.concurrency);
            if self.text {
                bail!("--text is a cipherd option (OpenBao always answers in text)");
            }
        }
        let connections = self.connections.unwrap_or(self.concurrency.min(4));
        ensure!(connections > 0, "--connections must be at least 1");
        self.connections = Some(connections.min(self.concurrency));
        Ok(self)
    }

    /// Connections to open (after [`Args::validated`]).
    pub fn connection_count(&self) -> usize {
        self.connections.unwrap_or(1).max(1)
    }

    /// The key names requests are spread over.
    pub fn key_names(&self) -> Vec<String> {
        if self.keys == 1 {
            vec![self.key.clone()]
        } else {
            (0..self.keys)
                .map(|i| format!("{}-{i}", self.key))
                .collect()
        }
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }

    /// The readiness deadline.
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(self.wait)
    }
}

impl Target {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Cipherd => "cipherd",
            Target::Openbao => "openbao",
            Target::Echo => "echo",
        }
    }
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Unary => "unary",
            Mode::Batch => "batch",
            Mode::Stream => "stream",
        }
    }
}

impl Op {
    /// The name used in reports and in OpenBao's URL paths.
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
        }
    }
}

impl KeyType {
    /// The name both servers use.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Xaes256Gcm => "xaes-256-gcm",
            KeyType::Aes256Gcm96 => "aes256-gcm96",
            KeyType::Chacha20Poly1305 => "chacha20-poly1305",
            KeyType::Xchacha20Poly1305 => "xchacha20-poly1305",
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let bare = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s)
        .trim_end_matches('/');
    bare.parse()
        .map_err(|e| format!("{s:?}: expected HOST:PORT with a numeric IP ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> anyhow::Result<Args> {
        let mut argv = vec!["cipherd-bench"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)?.validated()
    }

    #[test]
    fn defaults_are_a_valid_unary_run() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.mode, Mode::Unary);
        assert_eq!(a.batch, 1, "unary sends one item per request");
        assert_eq!(a.connection_count(), 4);
        assert_eq!(a.key_names(), vec!["bench".to_owned()]);
    }

    #[test]
    fn openbao_uses_one_connection_per_request_and_refuses_streams() {
        let a = parse(&[
            "--target",
            "openbao",
            "--key-type",
            "aes256-gcm96",
            "-c",
            "32",
        ])
        .unwrap();
        assert_eq!(a.connection_count(), 32);
        let err = parse(&[
            "--target",
            "openbao",
            "--key-type",
            "aes256-gcm96",
            "--mode",
            "stream",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("streaming"), "{err}");
        assert!(
            parse(&["--target", "openbao"]).is_err(),
            "xaes is cipherd-only"
        );
    }

    #[test]
    fn many_keys_are_numbered_and_addresses_accept_a_scheme() {
        let a = parse(&["--keys", "3", "--key", "k", "--addr", "http://127.0.0.1:9/"]).unwrap();
        assert_eq!(a.key_names(), vec!["k-0", "k-1", "k-2"]);
        assert_eq!(a.addr.port(), 9);
        assert!(parse(&["--addr", "localhost:9"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--mode", "batch", "--batch", "0"]).is_err());
    }
}
