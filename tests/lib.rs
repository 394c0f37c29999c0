//! Black-box end-to-end tests for cipherd, and the small helpers they share.
//!
//! The tests live in `tests/tests/*.rs` (this package's root is `tests/`), grouped by
//! theme:
//!
//! | file | proves |
//! | --- | --- |
//! | `transit.rs` | round trips for every key type and encoding, derived keys, rotation, rewrap, version policy, trim, export, and that each key type is the algorithm it claims |
//! | `batch.rs` | 1,000-item batches with bad items mixed in: one result per item, in order, references echoed, only bad items failing |
//! | `errors.rs` | the error contract: reasons, one opaque decryption error, size limits, garbage never crashing the server |
//! | `lifecycle.rs` | seal/unseal/init, health while sealed, restart keeping keys, concurrent rotations |
//! | `limits.rs` | usage limits of 96-bit-nonce key types: rotate or refuse at the limit, counters that survive restarts |
//! | `stream.rs` | the streaming RPCs: chunk and item order, per-item errors, chunk errors ending the stream, SEALED |
//! | `api.rs` | API conventions at the transport edge: reflection v1 and v1alpha, malformed protobuf answered INVALID_ARGUMENT / MALFORMED_MESSAGE (unary, batch, stream) |
//! | `process.rs` | the real `cipherd` binary as a child process: start, serve, SIGTERM, restart on the same data dir; the canary (no plaintext or token in any log line or audit record) |
//! | `hostile.rs` | the hostile catalogue (malformed, oversized, forged, misdirected requests) and its auth rows (credentials, policies, purposes, break-glass, policy documents) over TLS: each row's status and reason, storage unchanged after |
//! | `tls.rs` | TLS: X25519MLKEM768 negotiated, plaintext and untrusted clients refused, mTLS, certificate reloads |
//! | `audit.rs` | the audit log fails closed: with no writable sink every call is refused and nothing changes |
//! | `postgres.rs` | the PostgreSQL backend (needs PostgreSQL, see `scripts/ensure-postgres.sh`): keys survive a restart on the database; two replicas on one database see each other's rotations; a replica whose change feed was cut off reloads when it is back (a token revoked meanwhile is refused); on a private cluster (initdb/pg_ctl as `postgres`), the database stopped with `-m immediate` under load: cached keys keep encrypting and decrypting, a 96-bit-nonce key needing a new usage block and admin writes answer UNAVAILABLE, health NOT_SERVING, then everything recovers without a restart |
//! | `crash.rs` | crash safety (issue #8): the real binary SIGKILLed at random moments under concurrent key creations, rotations, config changes, deletions, token creations and encryptions, on SQLite and on PostgreSQL (`CIPHERD_CRASH_KILLS`, default 100 each; `make soak`: 1,000); after each restart and unseal every acknowledged key, version, material (canaries, exports), usage count and token is there; prints kills, restarts and losses |
//! | `backup.rs` | the restore drill: keys of every type and version with a canary corpus, backed up over `SystemService.Backup`, restored on SQLite and PostgreSQL (and back), unsealed with the original shares, every canary decrypted; tampered and truncated backups refused leaving the target uninitialized; restore into an initialized server and backup while sealed refused; per-key backups: no material in the clear, never overwriting, restorable after a delete, on a restore of the full backup and after a root rotation, refused on another instance |
//! | `edge.rs` | the edge under abuse: declared-size floods (also under a memory cap), stream and connection floods, slow and silent clients, keep-alive, load shedding, timeouts, request ids |
//!
//! Every test talks to a real server over a real socket on `127.0.0.1:0`, through
//! the public gRPC API only: in-process servers come from `cipherd-test-support`
//! (`cipherd_server::run`), the process tests spawn the binary. Readiness is always
//! polled, never slept for.
//!
//! # The binary under test
//!
//! `process.rs` and `crash.rs` run `cipherd-e2e-daemon` (through `tests/support/daemon.rs`, included by both), the
//! server's own `main.rs` built as a binary target of this package (see
//! `tests/Cargo.toml`): cargo builds a package's
//! binaries for its integration tests but never another package's, even under
//! `--workspace`, so `target/<profile>/cipherd` may be missing or stale when these
//! tests run. Set `CIPHERD_BIN=/path/to/cipherd` to test another build instead, e.g.
//! a release artifact: `CIPHERD_BIN=target/release/cipherd cargo test -p cipherd-e2e`.
//!
//! Run everything with `cargo test -p cipherd-e2e`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt::Debug;

use bytes::Bytes;
pub use cipherd_client::{Client, EncryptOptions, Error, pb};
pub use cipherd_test_support::{Params, TestServer};
pub use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic_types::RpcStatusExt as _;

/// Every key type with a short label for assertion messages.
pub const ALL_KEY_TYPES: [(pb::KeyType, &str); 4] = [
    (pb::KeyType::Xaes256Gcm, "xaes-256-gcm"),
    (pb::KeyType::Aes256Gcm96, "aes256-gcm96"),
    (pb::KeyType::Chacha20Poly1305, "chacha20-poly1305"),
    (pb::KeyType::Xchacha20Poly1305, "xchacha20-poly1305"),
];

/// `key` without its per-version use statistics (counts and last use), which
/// change with every call: for comparing a key's metadata across a restart.
pub fn without_use(mut key: pb::Key) -> pb::Key {
    for v in &mut key.versions {
        v.encrypt_count = 0;
        v.decrypt_count = 0;
        v.last_used = None;
    }
    key
}

/// Nonce length of a key type's ciphertexts, in bytes (`docs/ciphertext-format.md`).
pub fn nonce_len(key_type: pb::KeyType) -> usize {
    match key_type {
        pb::KeyType::Aes256Gcm96 | pb::KeyType::Chacha20Poly1305 => 12,
        pb::KeyType::Unspecified | pb::KeyType::Xaes256Gcm | pb::KeyType::Xchacha20Poly1305 => 24,
    }
}

/// The AEAD tag length of every key type.
pub const TAG_LEN: usize = 16;

/// Length of the binary ciphertext header: format byte and big-endian key version.
pub const HEADER_LEN: usize = 5;

/// Turns a raw generated-client reply into the client's error type, so raw calls
/// and typed-helper calls are checked the same way.
pub fn reply<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Error> {
    result.map(tonic::Response::into_inner).map_err(Error::from)
}

/// Asserts that `result` failed with `code` and `reason`; returns the message.
#[track_caller]
pub fn expect_err<T: Debug>(result: Result<T, Error>, code: Code, reason: &str) -> String {
    expect_err_ref(&result, code, reason)
}

/// [`expect_err`] on a borrowed result (e.g. one item of a batch).
#[track_caller]
pub fn expect_err_ref<T: Debug>(result: &Result<T, Error>, code: Code, reason: &str) -> String {
    match result {
        Ok(v) => panic!("expected {code:?}/{reason}, got success: {v:?}"),
        Err(Error::Status {
            code: got_code,
            reason: got_reason,
            message,
        }) => {
            assert_eq!(
                (*got_code, got_reason.as_str()),
                (code, reason),
                "unexpected error (message: {message:?})"
            );
            message.clone()
        }
        Err(other) => panic!("expected {code:?}/{reason}, got {other:?}"),
    }
}

/// The code, `ErrorInfo` reason and message of one batch item's error.
pub fn item_error(status: &tonic_types::pb::Status) -> (Code, String, String) {
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default();
    (Code::from_i32(status.code), reason, status.message.clone())
}

/// One batch decrypt item's outcome: the plaintext, or code, reason and message.
/// (`PlaintextResult` has no `Debug`, so plaintexts cannot leak into logs; this is
/// the comparable form tests use.)
pub fn plaintext_item(result: &pb::PlaintextResult) -> Result<Bytes, (Code, String, String)> {
    match &result.result {
        Some(pb::plaintext_result::Result::Plaintext(p)) => Ok(p.clone()),
        Some(pb::plaintext_result::Result::Error(status)) => Err(item_error(status)),
        None => Err((Code::Unknown, "EMPTY_RESULT".into(), String::new())),
    }
}

/// Creates a key with the given type and flags; returns its metadata.
pub async fn create_key_with(client: &Client, request: pb::CreateKeyRequest) -> pb::Key {
    let name = request.name.clone();
    reply(client.admin().create_key(request).await)
        .unwrap_or_else(|e| panic!("CreateKey {name:?}: {e}"))
        .key
        .expect("CreateKey returns the key")
}

/// Creates a plain (not derived, not exportable) key of `key_type`.
pub async fn create_key(client: &Client, name: &str, key_type: pb::KeyType) -> pb::Key {
    create_key_with(
        client,
        pb::CreateKeyRequest {
            name: name.to_owned(),
            r#type: key_type as i32,
            ..Default::default()
        },
    )
    .await
}

/// The key's metadata from `GetKey`.
pub async fn get_key(client: &Client, name: &str) -> pb::Key {
    reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: name.to_owned(),
            })
            .await,
    )
    .unwrap_or_else(|e| panic!("GetKey {name:?}: {e}"))
    .key
    .expect("GetKey returns the key")
}

/// Rotates the key; returns its metadata after the rotation.
pub async fn rotate(client: &Client, name: &str) -> pb::Key {
    reply(
        client
            .admin()
            .rotate_key(pb::RotateKeyRequest {
                name: name.to_owned(),
            })
            .await,
    )
    .unwrap_or_else(|e| panic!("RotateKey {name:?}: {e}"))
    .key
    .expect("RotateKey returns the key")
}

/// Encrypts `plaintext` under the latest version with no AAD or context, binary.
pub async fn encrypt(client: &Client, key: &str, plaintext: &[u8]) -> pb::EncryptResponse {
    client
        .encrypt(
            key,
            Bytes::copy_from_slice(plaintext),
            &EncryptOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("Encrypt under {key:?}: {e}"))
}

/// Decrypts with no AAD or context.
pub async fn decrypt(client: &Client, key: &str, ciphertext: &Bytes) -> Result<Bytes, Error> {
    client
        .decrypt(key, ciphertext.clone(), Bytes::new(), Bytes::new())
        .await
        .map(|r| r.plaintext)
}

/// The key version in a binary ciphertext's header (asserting the format byte).
#[track_caller]
pub fn binary_version(ciphertext: &[u8]) -> u32 {
    assert!(
        ciphertext.len() > HEADER_LEN,
        "ciphertext too short: {ciphertext:?}"
    );
    assert_eq!(ciphertext[0], 0x01, "binary ciphertexts start with 0x01");
    u32::from_be_bytes([ciphertext[1], ciphertext[2], ciphertext[3], ciphertext[4]])
}

/// The key version in a text ciphertext `cipherd:v<N>:<base64>`.
#[track_caller]
pub fn text_version(ciphertext: &[u8]) -> u32 {
    let text = std::str::from_utf8(ciphertext).expect("text ciphertexts are UTF-8");
    let rest = text
        .strip_prefix("cipherd:v")
        .unwrap_or_else(|| panic!("not a text ciphertext: {text:?}"));
    let (digits, body) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("no second colon: {text:?}"));
    assert!(!body.is_empty(), "empty body: {text:?}");
    digits
        .parse()
        .unwrap_or_else(|e| panic!("bad version in {text:?}: {e}"))
}

/// `bytes` with bit 0 of byte `index` flipped.
pub fn flip(bytes: &[u8], index: usize) -> Bytes {
    let mut v = bytes.to_vec();
    v[index] ^= 1;
    Bytes::from(v)
}

/// A small deterministic generator (xorshift64*), so "random" inputs are the same on
/// every run and a failure can be reproduced. Not for anything secret.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// A codec that sends and receives message bodies as raw bytes, so a test can put
/// on the wire what no generated client would.
#[derive(Debug, Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len)))
    }
}

/// Sends `body` as the raw request message of the unary RPC at `path` (e.g.
/// `/cipherd.v1.TransitService/Encrypt`) and returns the raw reply message.
pub async fn raw_unary(
    channel: cipherd_client::AuthChannel,
    path: &'static str,
    body: Bytes,
) -> Result<Bytes, Error> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Error::Protocol(format!("channel not ready: {e}")))?;
    let path = PathAndQuery::from_static(path);
    reply(grpc.unary(tonic::Request::new(body), path, RawCodec).await)
}

/// Raw HTTP/2 frames over a plain `TcpStream`, for the edge tests that must break
/// the protocol's etiquette (open more streams than allowed, trickle bytes, leave
/// PINGs unanswered), which a real HTTP/2 client will not do. Header blocks are
/// HPACK literals without indexing or Huffman coding; what the server sends back
/// is read as frames, not decoded.
pub mod raw_h2 {
    use tokio::io::{AsyncRead, AsyncReadExt as _};

    /// The client connection preface.
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// Frame type DATA.
    pub const DATA: u8 = 0x0;
    /// Frame type HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// Frame type RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// Frame type SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// Frame type PING.
    pub const PING: u8 = 0x6;
    /// Frame type GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// Flag END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// Flag ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// Flag END_HEADERS (HEADERS).
    pub const END_HEADERS: u8 = 0x4;
    /// RST_STREAM error code REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 0x7;

    /// One frame: 9-byte header and payload.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("small frame");
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// The preface followed by an empty SETTINGS frame: a complete client handshake.
    pub fn handshake() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }

    /// A HEADERS frame opening a gRPC call to `path` on `stream` (odd, increasing).
    pub fn grpc_headers(stream: u32, path: &str, end_stream: bool) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            // Literal header field without indexing, new name, no Huffman coding.
            block.push(0x00);
            for text in [name, value] {
                block.push(
                    u8::try_from(text.len())
                        .ok()
                        .filter(|n| *n < 0x7f)
                        .expect("short header"),
                );
                block.extend(text.as_bytes());
            }
        }
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        frame(HEADERS, flags, stream, &block)
    }

    /// A DATA frame carrying one gRPC message (5-byte prefix and `message`).
    pub fn grpc_message(stream: u32, message: &[u8], end_stream: bool) -> Vec<u8> {
        let mut payload = vec![0];
        payload.extend(u32::try_from(message.len()).expect("small").to_be_bytes());
        payload.extend(message);
        frame(
            DATA,
            if end_stream { END_STREAM } else { 0 },
            stream,
            &payload,
        )
    }

    /// A frame as read: type, flags, stream id, payload.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Frame {
        /// The frame type.
        pub kind: u8,
        /// Its flags.
        pub flags: u8,
        /// Its stream (0: the connection).
        pub stream: u32,
        /// Its payload.
        pub payload: Vec<u8>,
    }

    impl Frame {
        /// The error code of a RST_STREAM frame.
        pub fn rst_code(&self) -> Option<u32> {
            (self.kind == RST_STREAM && self.payload.len() == 4)
                .then(|| u32::from_be_bytes(self.payload[..4].try_into().expect("4 bytes")))
        }
    }

    /// Reads the next frame; `None` once the server has closed the connection
    /// (cleanly, or by resetting it).
    pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
        let mut header = [0u8; 9];
        io.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; len];
        io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff,
            payload,
        })
    }
}

/// SHA-256 over every stored record (path, revision and sealed value), read
/// through a second handle on the server's SQLite file at `db`: equal before and
/// after a run of refused calls means none of them changed storage. Asserts that
/// at least `min_records` records were read, so an empty digest cannot pass.
pub async fn storage_digest(db: &std::path::Path, min_records: usize) -> String {
    use cipherd_store::Store as _;
    use sha2::{Digest as _, Sha256};
    let store = cipherd_store::SqliteStore::open(db)
        .await
        .expect("open the server's database");
    let mut hash = Sha256::new();
    let mut after: Option<String> = None;
    let mut count = 0;
    loop {
        let page = store
            .scan("", after.as_deref(), 100)
            .await
            .expect("scan the store");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (path, record) in &page {
            hash.update((path.len() as u64).to_be_bytes());
            hash.update(path.as_bytes());
            hash.update(record.revision.to_be_bytes());
            hash.update((record.value.len() as u64).to_be_bytes());
            hash.update(&record.value);
            count += 1;
        }
    }
    store.close().await;
    assert!(
        count >= min_records,
        "{count} records; expected at least {min_records}"
    );
    hex::encode(hash.finalize())
}
