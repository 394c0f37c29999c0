//! The backup file format: a framed, checksummed stream of store records.
//!
//! A backup is every stored record exactly as stored (barrier ciphertext bound
//! to its path, and the seal record, which holds the root key sealed under the
//! unseal key), so the file needs no key of its own: it is as protected as the
//! store, and restoring it needs the original unseal shares. This module only
//! frames and checks bytes; it does no cryptography beyond the SHA-256 that
//! detects truncation and accidental or deliberate alteration of the framing
//! (a record altered together with a recomputed checksum still fails to open
//! under the barrier, or, for the seal record, fails the unseal).
//!
//! Layout, version 1 (integers big-endian; documented for operators in
//! `docs/operations.md`, "Backup file format"):
//!
//! ```text
//! magic        8 bytes  "CIPHERDB"
//! version      u16      1
//! header_len   u32      at most MAX_HEADER_BYTES
//! header       JSON     {"created_at", "source_backend", "record_count", "cipherd_version"}
//! record × record_count:
//!   path_len   u16      1..=512
//!   path       UTF-8
//!   value_len  u32      at most MAX_VALUE_BYTES
//!   value      bytes
//! end          8 bytes  "CIPHERDE"
//! sha256       32 bytes SHA-256 of every byte before it
//! ```
//!
//! Nothing may follow the checksum. [`Reader`] checks all of it; a restore
//! reads the whole file once to verify it before it writes anything.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// The first eight bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"CIPHERDB";

/// The end marker before the checksum.
pub const END: &[u8; 8] = b"CIPHERDE";

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// The largest header accepted.
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;

/// The largest record value accepted (records are far smaller; the bound only
/// keeps a corrupt length from allocating gigabytes).
pub const MAX_VALUE_BYTES: u32 = 64 << 20;

/// The size of the pieces a backup is streamed in.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// When the snapshot was taken, RFC 3339 UTC.
    pub created_at: String,
    /// The backend it was taken from (`sqlite`, `postgres`).
    pub source_backend: String,
    /// How many records follow, the seal record included.
    pub record_count: u64,
    /// The cipherd version that wrote it.
    pub cipherd_version: String,
}

/// Writes a backup into memory piece by piece; [`Writer::take_chunk`] hands
/// out what is ready to send, so at most about one chunk plus one record is
/// held at a time.
pub struct Writer {
    hash: Sha256,
    buf: Vec<u8>,
    expected: u64,
    written: u64,
}

impl Writer {
    /// A writer that starts with `header`.
    pub fn new(header: &Header) -> Result<Self> {
        let json = serde_json::to_vec(header).map_err(|e| Error::Internal(e.to_string()))?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|l| *l <= MAX_HEADER_BYTES)
            .ok_or_else(|| Error::Internal("backup header too large".into()))?;
        let mut w = Self {
            hash: Sha256::new(),
            buf: Vec::with_capacity(CHUNK_BYTES * 2),
            expected: header.record_count,
            written: 0,
        };
        w.put(MAGIC);
        w.put(&FORMAT_VERSION.to_be_bytes());
        w.put(&len.to_be_bytes());
        w.put(&json);
        Ok(w)
    }

    /// Appends one record.
    pub fn record(&mut self, path: &str, value: &[u8]) -> Result<()> {
        let path_len = u16::try_from(path.len())
            .ok()
            .filter(|l| (1..=cipherd_store::path::MAX_LEN as u16).contains(l))
            .ok_or_else(|| Error::Internal(format!("unexpected store path length {path:?}")))?;
        let value_len = u32::try_from(value.len())
            .ok()
            .filter(|l| *l <= MAX_VALUE_BYTES)
            .ok_or_else(|| Error::Internal(format!("record {path:?} is too large to back up")))?;
        if self.written == self.expected {
            return Err(Error::Internal(
                "the snapshot holds more records than it counted".into(),
            ));
        }
        self.put(&path_len.to_be_bytes());
        self.put(path.as_bytes());
        self.put(&value_len.to_be_bytes());
        self.put(value);
        self.written += 1;
        Ok(())
    }

    /// A full chunk, if one is ready.
    pub fn take_chunk(&mut self) -> Option<Vec<u8>> {
        if self.buf.len() < CHUNK_BYTES {
            return None;
        }
        let rest = self.buf.split_off(CHUNK_BYTES);
        Some(std::mem::replace(&mut self.buf, rest))
    }

    /// The rest of the file: what is buffered, the end marker and the checksum.
    /// Fails if fewer records were written than the header counts.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        if self.written != self.expected {
            return Err(Error::Internal(format!(
                "the snapshot counted {} records but yielded {}",
                self.expected, self.written
            )));
        }
        self.put(END);
        let digest = self.hash.finalize();
        self.buf.extend_from_slice(&digest);
        Ok(self.buf)
    }

    fn put(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.buf.extend_from_slice(bytes);
    }
}

/// Reads and checks a backup from any [`Read`]: first the header
/// ([`Reader::new`]), then each record ([`Reader::next_record`]), whose final
/// `None` comes only after the end marker, the checksum and the end of the
/// input have all been checked. Any error means the file is not a complete,
/// unaltered backup (`INVALID_ARGUMENT`).
pub struct Reader<R> {
    input: R,
    hash: Sha256,
    header: Header,
    read: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the magic, version and header.
    pub fn new(mut input: R) -> Result<Self> {
        let mut hash = Sha256::new();
        let mut magic = [0u8; 8];
        read_hashed(&mut input, &mut hash, &mut magic)?;
        if &magic != MAGIC {
            return Err(invalid("not a cipherd backup (bad magic)"));
        }
        let mut version = [0u8; 2];
        read_hashed(&mut input, &mut hash, &mut version)?;
        let version = u16::from_be_bytes(version);
        if version != FORMAT_VERSION {
            return Err(invalid(&format!(
                "backup format version {version} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let len = read_u32(&mut input, &mut hash)?;
        if len > MAX_HEADER_BYTES {
            return Err(invalid("backup header too large"));
        }
        let mut json = vec![0u8; len as usize];
        read_hashed(&mut input, &mut hash, &mut json)?;
        let header: Header =
            serde_json::from_slice(&json).map_err(|_| invalid("backup header is not valid"))?;
        Ok(Self {
            input,
            hash,
            header,
            read: 0,
            done: false,
        })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record, or `None` once every record has been read and the
    /// trailer checked.
    pub fn next_record(&mut self) -> Result<Option<(String, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        if self.read == self.header.record_count {
            self.check_trailer()?;
            self.done = true;
            return Ok(None);
        }
        let mut len = [0u8; 2];
        read_hashed(&mut self.input, &mut self.hash, &mut len)?;
        let path_len = usize::from(u16::from_be_bytes(len));
        if path_len == 0 || path_len > cipherd_store::path::MAX_LEN {
            return Err(invalid("a record path has an impossible length"));
        }
        let mut path = vec![0u8; path_len];
        read_hashed(&mut self.input, &mut self.hash, &mut path)?;
        let path = String::from_utf8(path).map_err(|_| invalid("a record path is not UTF-8"))?;
        let value_len = read_u32(&mut self.input, &mut self.hash)?;
        if value_len > MAX_VALUE_BYTES {
            return Err(invalid("a record value has an impossible length"));
        }
        let mut value = vec![0u8; value_len as usize];
        read_hashed(&mut self.input, &mut self.hash, &mut value)?;
        self.read += 1;
        Ok(Some((path, value)))
    }

    fn check_trailer(&mut self) -> Result<()> {
        let mut end = [0u8; 8];
        read_hashed(&mut self.input, &mut self.hash, &mut end)?;
        if &end != END {
            return Err(invalid(
                "the backup does not end after the records its header counts",
            ));
        }
        let expected = std::mem::take(&mut self.hash).finalize();
        let mut digest = [0u8; 32];
        read_exact(&mut self.input, &mut digest)?;
        if digest[..] != expected[..] {
            return Err(invalid(
                "the backup checksum does not match: altered or corrupt",
            ));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(invalid("bytes follow the backup checksum")),
            Err(e) => Err(Error::Internal(format!("reading the backup: {e}"))),
        }
    }
}

fn invalid(why: &str) -> Error {
    Error::InvalidArgument(format!("invalid backup: {why}"))
}

fn read_exact(input: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => invalid("the backup is truncated"),
        _ => Error::Internal(format!("reading the backup: {e}")),
    })
}

fn read_hashed(input: &mut impl Read, hash: &mut Sha256, buf: &mut [u8]) -> Result<()> {
    read_exact(input, buf)?;
    hash.update(&*buf);
    Ok(())
}

fn read_u32(input: &mut impl Read, hash: &mut Sha256) -> Result<u32> {
    let mut b = [0u8; 4];
    read_hashed(input, hash, &mut b)?;
    Ok(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(count: u64) -> Header {
        Header {
            created_at: "2026-12-01T15:00:00Z".into(),
            source_backend: "sqlite".into(),
            record_count: count,
            cipherd_version: "0.1.0".into(),
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(&header(3)).unwrap();
        let mut out = Vec::new();
        w.record("keys/a", b"one").unwrap();
        w.record("sys/seal", &vec![7u8; CHUNK_BYTES + 10]).unwrap();
        while let Some(chunk) = w.take_chunk() {
            assert_eq!(chunk.len(), CHUNK_BYTES);
            out.extend(chunk);
        }
        w.record("z", b"").unwrap();
        out.extend(w.finish().unwrap());
        out
    }

    type Records = Vec<(String, Vec<u8>)>;

    fn read_all(bytes: &[u8]) -> Result<(Header, Records)> {
        let mut r = Reader::new(bytes)?;
        let mut records = Vec::new();
        while let Some(rec) = r.next_record()? {
            records.push(rec);
        }
        Ok((r.header().clone(), records))
    }

    #[test]
    fn round_trips() {
        let (h, records) = read_all(&sample()).unwrap();
        assert_eq!(h, header(3));
        let paths: Vec<_> = records.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["keys/a", "sys/seal", "z"]);
        assert_eq!(records[0].1, b"one");
        assert_eq!(records[1].1.len(), CHUNK_BYTES + 10);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for cut in (0..bytes.len())
            .step_by(997)
            .chain(bytes.len() - 40..bytes.len())
        {
            let err = read_all(&bytes[..cut]).expect_err("truncated");
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "cut {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let bytes = sample();
        for at in (0..bytes.len())
            .step_by(4099)
            .chain([0, 9, 20, bytes.len() - 1])
        {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(read_all(&bad).is_err(), "flip at {at} accepted");
        }
    }

    #[test]
    fn trailing_bytes_and_miscounts_are_refused() {
        let mut bytes = sample();
        bytes.push(0);
        assert!(read_all(&bytes).is_err());

        let mut w = Writer::new(&header(2)).unwrap();
        w.record("a", b"1").unwrap();
        assert!(w.finish().is_err(), "fewer records than counted");
        let mut w = Writer::new(&header(1)).unwrap();
        w.record("a", b"1").unwrap();
        assert!(w.record("b", b"2").is_err(), "more records than counted");
    }
}
