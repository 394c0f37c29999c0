//! The audit log's hash chain: building chained lines and verifying a log.
//!
//! Every audit line is one JSON object whose first two fields are `seq` (0, 1, 2, …
//! for each line of one chain) and `prev`, the lowercase hex SHA-256 of the
//! previous line's bytes without its newline (64 zeros on the first line of a
//! chain). Changing, removing or reordering any line breaks the link to the line
//! after it, which [`Verifier`] reports by file and line number.
//!
//! This module does no I/O: the server's sinks hand it record bodies and write the
//! bytes it appends ([`ChainHead::append`]); `cipherctl audit verify` hands it the
//! lines it reads ([`Verifier::line`]). It does not decide where a chain continues
//! after a restart (the server reads the file's last line and calls
//! [`ChainHead::after`]) and cannot detect lines cut from the end of a log: only a
//! copy of the last hash kept elsewhere ([`Summary::head`]) can.
//!
//! A *torn* line is what a crash in the middle of a write leaves: bytes after the
//! last newline that are not a whole record. The server terminates it with a
//! newline when it next opens the file and writes a record carrying
//! `torn_bytes` (the fragment's length) that links to the last whole line; the
//! verifier accepts a torn line only in that form, or as the very last,
//! unterminated line of the log (a write in progress or a crash not yet
//! recovered), and lists it in the summary.

use std::{borrow::Cow, fmt, ops::Range};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// A SHA-256 hash of one line.
pub type LineHash = [u8; 32];

/// `prev` of the first line of a chain: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a chain stands: the `seq` and `prev` its next line must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// `seq` of the next line.
    pub next_seq: u64,
    /// Hash of the last line (zeros before the first).
    pub prev: LineHash,
}

impl ChainHead {
    /// The head of a new chain: the next line is seq 0 with 64 zeros as `prev`.
    pub const GENESIS: ChainHead = ChainHead {
        next_seq: 0,
        prev: [0; 32],
    };

    /// The head after `line` (one line's bytes without its newline): its `seq` + 1
    /// and its hash. Fails when the line is not an audit record.
    pub fn after(line: &[u8]) -> Result<ChainHead, LineError> {
        let link = Link::parse(line)?;
        Ok(ChainHead {
            next_seq: link.seq.checked_add(1).ok_or(LineError::SeqOverflow)?,
            prev: line_hash(line),
        })
    }

    /// Appends one chained line to `buf` and advances the head past it.
    ///
    /// `body` is the record serialized as a JSON object (`{"time":…}`); the line
    /// is `{"seq":N,"prev":"<hex>",` followed by the body's fields, then `\n`.
    /// The body's bytes are copied as they are: it must be one JSON object.
    pub fn append(&mut self, buf: &mut Vec<u8>, body: &[u8]) {
        debug_assert!(
            body.first() == Some(&b'{') && body.last() == Some(&b'}'),
            "an audit record body is a JSON object"
        );
        let start = buf.len();
        buf.extend_from_slice(b"{\"seq\":");
        push_decimal(buf, self.next_seq);
        buf.extend_from_slice(b",\"prev\":\"");
        push_hex(buf, &self.prev);
        buf.push(b'"');
        let fields = body.get(1..).unwrap_or_default();
        if fields.first().is_some_and(|b| *b != b'}') {
            buf.push(b',');
        }
        buf.extend_from_slice(fields);
        self.prev = line_hash(&buf[start..]);
        // u64 seqs do not run out: at a million lines per second, 584,000 years.
        self.next_seq = self.next_seq.saturating_add(1);
        buf.push(b'\n');
    }
}

/// SHA-256 of one line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> LineHash {
    Sha256::digest(line).into()
}

/// Lowercase hex of a hash, as in `prev`.
pub fn to_hex(hash: &LineHash) -> String {
    let mut out = Vec::with_capacity(64);
    push_hex(&mut out, hash);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// The chain fields of one audit line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link<'a> {
    /// The line's `seq`.
    pub seq: u64,
    /// The line's `prev`, decoded.
    pub prev: LineHash,
    /// The record's `kind` (`call`, `start`, `stop`, …), if it has one.
    pub kind: Option<Cow<'a, str>>,
    /// On the record written after a torn line: the torn fragment's length.
    pub torn_bytes: Option<u64>,
}

impl<'a> Link<'a> {
    /// Parses the chain fields of `line` (without its newline). Other fields are
    /// skipped, not checked.
    pub fn parse(line: &'a [u8]) -> Result<Link<'a>, LineError> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            seq: u64,
            #[serde(borrow)]
            prev: Cow<'a, str>,
            #[serde(borrow, default)]
            kind: Option<Cow<'a, str>>,
            #[serde(default)]
            torn_bytes: Option<u64>,
        }
        let raw: Raw<'a> =
            serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
        Ok(Link {
            seq: raw.seq,
            prev: parse_hex(&raw.prev).ok_or(LineError::Prev)?,
            kind: raw.kind,
            torn_bytes: raw.torn_bytes,
        })
    }
}

/// Why a line is not an audit record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// Not a JSON object with a numeric `seq` and a string `prev`.
    #[error("not a JSON object with seq and prev: {0}")]
    Json(String),
    /// `prev` is not 64 lowercase hex digits.
    #[error("prev is not 64 lowercase hex digits")]
    Prev,
    /// `seq` is `u64::MAX`; no line can follow it.
    #[error("seq is at its maximum")]
    SeqOverflow,
}

/// Checks a log line by line, across the files of a rotated series given oldest
/// first. Feed it with [`begin_file`](Self::begin_file) and [`line`](Self::line),
/// then [`finish`](Self::finish); memory stays constant however long the log.
#[derive(Debug, Default)]
pub struct Verifier {
    files: Vec<String>,
    line_no: u64,
    last: Option<(Pos, ChainHead)>,
    pending_torn: Vec<Torn>,
    suspect: Option<(ChainError, Range<u64>)>,
    error: Option<ChainError>,
    summary: Summary,
}

/// What a verified log holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Files read.
    pub files: usize,
    /// Records (lines that are part of the chain; torn lines not counted).
    pub lines: u64,
    /// `seq` of the first record.
    pub first_seq: Option<u64>,
    /// `seq` of the last record.
    pub last_seq: Option<u64>,
    /// The first record is not seq 0: the log begins mid-chain (the older lines
    /// are in an earlier, rotated file, or were removed; neither can be told
    /// from these files alone).
    pub starts_mid_chain: bool,
    /// Server starts recorded (`kind: "start"` records).
    pub starts: u64,
    /// Torn lines: crashes interrupted these writes.
    pub torn: Vec<Torn>,
    /// Hex SHA-256 of the last record: keep it elsewhere to detect later
    /// truncation of this log, which no chain can show.
    pub head: Option<String>,
}

/// A torn line: a fragment a crash left in the middle of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    /// The file.
    pub file: String,
    /// The line number (1-based).
    pub line: u64,
    /// The fragment's length in bytes.
    pub bytes: u64,
    /// Whether a newline ends it (the server terminated it on recovery).
    pub terminated: bool,
    /// Why it is not a record.
    pub why: String,
}

/// The first bad line of a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {problem}")]
pub struct ChainError {
    /// The file.
    pub file: String,
    /// The line number (1-based).
    pub line: u64,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The line is not an audit record (and not a recovered torn line).
    NotARecord(String),
    /// `seq` jumps forward: lines were removed before this one.
    Removed {
        /// The seq the chain expected.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// `seq` is out of order: lines were moved (or copied).
    Reordered {
        /// The seq the chain expected.
        expected: u64,
        /// The seq found.
        found: u64,
        /// Where the expected seq appears instead, if it does later in the log.
        expected_at: Option<(String, u64)>,
        /// Whether this is the first line of a file after the first (files in the
        /// wrong order look like this).
        file_start: bool,
    },
    /// The line's bytes changed: its hash is not the next line's `prev`.
    Edited {
        /// The file of the next line.
        next_file: String,
        /// The next line's number.
        next_line: u64,
    },
    /// The line's `seq` changed: it links to the line before it, but with a seq
    /// out of sequence.
    SeqEdited {
        /// The seq the chain expected.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// A new chain (seq 0) starts in the middle of the log.
    NewChain {
        /// The seq the chain expected.
        expected: u64,
        /// Whether this is the first line of a file after the first.
        file_start: bool,
    },
    /// A first line (seq 0) whose `prev` is not zeros, or a later line whose
    /// `prev` is zeros.
    BadGenesis,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ORDER_HINT: &str = " (are the files given oldest first?)";
        match self {
            Problem::NotARecord(why) => write!(f, "not an audit record: {why}"),
            Problem::Removed { expected, found } => write!(
                f,
                "line(s) removed before this line: seq {found} where {expected} was expected ({} missing)",
                found - expected
            ),
            Problem::Reordered {
                expected,
                found,
                expected_at,
                file_start,
            } => {
                write!(f, "reordered: seq {found} where {expected} was expected")?;
                if let Some((file, line)) = expected_at {
                    write!(f, "; seq {expected} appears later, at {file}:{line}")?;
                }
                if *file_start {
                    f.write_str(ORDER_HINT)?;
                }
                Ok(())
            }
            Problem::Edited {
                next_file,
                next_line,
            } => write!(
                f,
                "edited: its SHA-256 is not the prev recorded by the next line ({next_file}:{next_line})"
            ),
            Problem::SeqEdited { expected, found } => write!(
                f,
                "edited: seq {found} where {expected} was expected, though it links to the line before"
            ),
            Problem::NewChain {
                expected,
                file_start,
            } => {
                write!(
                    f,
                    "a new chain (seq 0) starts where seq {expected} was expected: the lines before it are not continued here"
                )?;
                if *file_start {
                    f.write_str(ORDER_HINT)?;
                }
                Ok(())
            }
            Problem::BadGenesis => {
                f.write_str("bad chain start: seq 0 must have prev 000…0, and only seq 0 may")
            }
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => write!(f, "{} lines, seq {a}..{b}, chain intact", self.lines)?,
            _ => write!(f, "0 lines, chain intact")?,
        }
        if self.starts_mid_chain {
            write!(
                f,
                "; begins mid-chain (earlier lines are in an older file or were removed)"
            )?;
        }
        for t in &self.torn {
            write!(
                f,
                "; torn line (a crash interrupted a write) at {}:{}, {} bytes",
                t.file, t.line, t.bytes
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    file: usize,
    line: u64,
}

impl Verifier {
    /// A verifier with nothing read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the next file of the series (its lines are numbered from 1).
    pub fn begin_file(&mut self, name: impl Into<String>) {
        self.files.push(name.into());
        self.summary.files = self.files.len();
        self.line_no = 0;
    }

    /// Whether an error is already certain (reading further cannot change it).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Checks the next line: its bytes without the newline, and whether a newline
    /// ended it (only the last line of a file may lack one).
    pub fn line(&mut self, line: &[u8], terminated: bool) {
        if self.files.is_empty() {
            self.begin_file("-");
        }
        self.line_no += 1;
        if self.error.is_some() {
            return;
        }
        let pos = Pos {
            file: self.files.len() - 1,
            line: self.line_no,
        };
        let parsed = Link::parse(line);

        // After a forward jump in seq: look for the missing seqs further on, to
        // tell a moved line from a removed one.
        if let Some((err, gap)) = &self.suspect {
            if let Ok(link) = &parsed
                && gap.contains(&link.seq)
            {
                let mut err = err.clone();
                if let Problem::Removed { expected, found } = err.problem {
                    err.problem = Problem::Reordered {
                        expected,
                        found,
                        expected_at: Some((self.files[pos.file].clone(), pos.line)),
                        file_start: false,
                    };
                }
                self.error = Some(err);
                self.suspect = None;
            }
            return;
        }

        // Torn lines (a write that failed part way may leave one after another)
        // must be followed by a record declaring the last one's length.
        if let (Some(last), Ok(link)) = (self.pending_torn.last(), &parsed) {
            if link.torn_bytes != Some(last.bytes) {
                let torn = self.pending_torn.swap_remove(0);
                self.error = Some(ChainError {
                    file: torn.file,
                    line: torn.line,
                    problem: Problem::NotARecord(torn.why),
                });
                return;
            }
            self.summary.torn.append(&mut self.pending_torn);
        }

        let link = match parsed {
            Ok(link) => link,
            Err(e) => {
                self.pending_torn.push(Torn {
                    file: self.files[pos.file].clone(),
                    line: pos.line,
                    bytes: line.len() as u64,
                    terminated,
                    why: e.to_string(),
                });
                return;
            }
        };
        let Some(next_seq) = link.seq.checked_add(1) else {
            self.fail(pos, Problem::NotARecord(LineError::SeqOverflow.to_string()));
            return;
        };
        let file_start = pos.line == 1 && pos.file > 0;
        match self.last {
            None => {
                let genesis = link.prev == [0; 32];
                if (link.seq == 0) != genesis {
                    self.fail(pos, Problem::BadGenesis);
                    return;
                }
                self.summary.starts_mid_chain = link.seq != 0;
            }
            Some((last_pos, head)) => {
                if link.seq == head.next_seq {
                    if link.prev != head.prev {
                        self.error = Some(ChainError {
                            file: self.files[last_pos.file].clone(),
                            line: last_pos.line,
                            problem: Problem::Edited {
                                next_file: self.files[pos.file].clone(),
                                next_line: pos.line,
                            },
                        });
                        return;
                    }
                } else if link.seq == 0 && link.prev == [0; 32] {
                    let expected = head.next_seq;
                    self.fail(
                        pos,
                        Problem::NewChain {
                            expected,
                            file_start,
                        },
                    );
                    return;
                } else if link.prev == head.prev {
                    let expected = head.next_seq;
                    self.fail(
                        pos,
                        Problem::SeqEdited {
                            expected,
                            found: link.seq,
                        },
                    );
                    return;
                } else if link.seq > head.next_seq {
                    let err = self.error_at(
                        pos,
                        Problem::Removed {
                            expected: head.next_seq,
                            found: link.seq,
                        },
                    );
                    self.suspect = Some((err, head.next_seq..link.seq));
                    return;
                } else {
                    let expected = head.next_seq;
                    self.fail(
                        pos,
                        Problem::Reordered {
                            expected,
                            found: link.seq,
                            expected_at: None,
                            file_start,
                        },
                    );
                    return;
                }
            }
        }
        let s = &mut self.summary;
        s.lines += 1;
        s.first_seq.get_or_insert(link.seq);
        s.last_seq = Some(link.seq);
        if link.kind.as_deref() == Some("start") {
            s.starts += 1;
        }
        self.last = Some((
            pos,
            ChainHead {
                next_seq,
                prev: line_hash(line),
            },
        ));
    }

    /// The verdict: the summary, or the first bad line.
    pub fn finish(mut self) -> Result<Summary, ChainError> {
        if let Some(err) = self.error {
            return Err(err);
        }
        if let Some((err, _)) = self.suspect {
            return Err(err);
        }
        if let Some(last) = self.pending_torn.pop() {
            // Only the log's very last line may be torn without a recovery
            // record after it: a write in progress, or a crash not yet recovered.
            let last_line_of_last_file =
                last.file == self.files[self.files.len() - 1] && last.line == self.line_no;
            if last.terminated || !last_line_of_last_file {
                let torn = self.pending_torn.first().cloned().unwrap_or(last);
                return Err(ChainError {
                    file: torn.file,
                    line: torn.line,
                    problem: Problem::NotARecord(torn.why),
                });
            }
            self.summary.torn.append(&mut self.pending_torn);
            self.summary.torn.push(last);
        }
        self.summary.head = self.last.map(|(_, head)| to_hex(&head.prev));
        Ok(self.summary)
    }

    fn error_at(&self, pos: Pos, problem: Problem) -> ChainError {
        ChainError {
            file: self.files[pos.file].clone(),
            line: pos.line,
            problem,
        }
    }

    fn fail(&mut self, pos: Pos, problem: Problem) {
        self.error = Some(self.error_at(pos, problem));
    }
}

/// Verifies whole files given in order (oldest first), each as its name and
/// bytes. Convenient for small logs and tests; `cipherctl audit verify` streams
/// lines into a [`Verifier`] instead.
pub fn verify<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Summary, ChainError> {
    let mut v = Verifier::new();
    for (name, bytes) in files {
        v.begin_file(name);
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    v.line(&rest[..i], true);
                    rest = &rest[i + 1..];
                }
                None => {
                    v.line(rest, false);
                    rest = &[];
                }
            }
            if v.failed() {
                break;
            }
        }
    }
    v.finish()
}

fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn push_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        buf.push(DIGITS[usize::from(b >> 4)]);
        buf.push(DIGITS[usize::from(b & 0x0f)]);
    }
}

fn parse_hex(s: &str) -> Option<LineHash> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` chained lines of a fresh chain, as one file's bytes.
    fn chain(from: ChainHead, n: u64) -> (Vec<u8>, ChainHead) {
        let mut head = from;
        let mut buf = Vec::new();
        for i in 0..n {
            let body = format!(r#"{{"time":"t","kind":"call","key":"k{i}"}}"#);
            head.append(&mut buf, body.as_bytes());
        }
        (buf, head)
    }

    fn lines(buf: &[u8]) -> Vec<Vec<u8>> {
        buf.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        out
    }

    fn problem(r: Result<Summary, ChainError>) -> (u64, Problem) {
        let e = r.expect_err("verification fails");
        (e.line, e.problem)
    }

    #[test]
    fn appended_lines_put_seq_and_prev_first_and_chain_by_sha256() {
        let mut head = ChainHead::GENESIS;
        let mut buf = Vec::new();
        head.append(&mut buf, br#"{"kind":"start"}"#);
        head.append(&mut buf, br#"{"kind":"call"}"#);
        let text = String::from_utf8(buf.clone()).expect("utf-8");
        let l: Vec<&str> = text.lines().collect();
        assert_eq!(
            l[0],
            format!(r#"{{"seq":0,"prev":"{GENESIS_PREV}","kind":"start"}}"#)
        );
        let h0 = to_hex(&Sha256::digest(l[0].as_bytes()).into());
        assert_eq!(l[1], format!(r#"{{"seq":1,"prev":"{h0}","kind":"call"}}"#));
        assert_eq!(head.next_seq, 2);
        assert_eq!(head.prev, line_hash(l[1].as_bytes()));
        assert_eq!(ChainHead::after(l[1].as_bytes()), Ok(head));
        // Every line is valid JSON.
        for line in l {
            serde_json::from_str::<serde_json::Value>(line).expect("JSON");
        }
        // An empty object still gives valid JSON.
        let mut buf = Vec::new();
        let mut genesis = ChainHead::GENESIS;
        genesis.append(&mut buf, b"{}");
        serde_json::from_slice::<serde_json::Value>(&buf).expect("JSON");
    }

    #[test]
    fn decimal_and_hex_helpers() {
        for n in [0, 7, 10, 12345, u64::MAX] {
            let mut b = Vec::new();
            push_decimal(&mut b, n);
            assert_eq!(b, n.to_string().as_bytes());
        }
        let h: LineHash = std::array::from_fn(|i| (i * 9) as u8);
        assert_eq!(parse_hex(&to_hex(&h)), Some(h));
        assert_eq!(parse_hex(&to_hex(&h).to_uppercase()), None);
        assert_eq!(parse_hex("00"), None);
    }

    #[test]
    fn an_intact_chain_verifies_with_a_summary() {
        let (buf, head) = chain(ChainHead::GENESIS, 5);
        let s = verify([("audit.log", &buf[..])]).expect("intact");
        assert_eq!((s.lines, s.first_seq, s.last_seq), (5, Some(0), Some(4)));
        assert!(!s.starts_mid_chain);
        assert_eq!(s.head, Some(to_hex(&head.prev)));
        assert_eq!(s.to_string(), "5 lines, seq 0..4, chain intact");
        let empty = verify([("audit.log", &b""[..])]).expect("empty log");
        assert_eq!(empty.lines, 0);
    }

    #[test]
    fn a_rotated_series_verifies_and_may_begin_mid_chain() {
        let (old, head) = chain(ChainHead::GENESIS, 3);
        let (mid, head) = chain(head, 4);
        let (new, _) = chain(head, 2);
        let s = verify([
            ("audit.log.2", &old[..]),
            ("audit.log.1", &mid[..]),
            ("audit.log", &new[..]),
        ])
        .expect("series");
        assert_eq!((s.files, s.lines, s.last_seq), (3, 9, Some(8)));
        // The oldest file deleted (expired by logrotate): still intact, but said.
        let s = verify([("audit.log.1", &mid[..]), ("audit.log", &new[..])]).expect("tail");
        assert!(s.starts_mid_chain);
        assert_eq!(s.first_seq, Some(3));
        assert!(s.to_string().contains("begins mid-chain"), "{s}");
        // Files in the wrong order.
        let (line, p) = problem(verify([("audit.log", &new[..]), ("audit.log.1", &mid[..])]));
        assert_eq!(line, 1);
        assert!(
            matches!(
                p,
                Problem::Reordered {
                    file_start: true,
                    ..
                }
            ),
            "{p:?}"
        );
        assert!(p.to_string().contains("oldest first"));
    }

    #[test]
    fn a_removed_line_is_named() {
        let (buf, _) = chain(ChainHead::GENESIS, 6);
        let mut l = lines(&buf);
        l.remove(3);
        let err = verify([("audit.log", &join(&l)[..])]).expect_err("removed");
        assert_eq!(err.line, 4);
        assert_eq!(
            err.problem,
            Problem::Removed {
                expected: 3,
                found: 4
            }
        );
        assert!(
            err.to_string().starts_with("audit.log:4: line(s) removed"),
            "{err}"
        );
        // Several removed, including across a file boundary.
        let (a, head) = chain(ChainHead::GENESIS, 3);
        let (b, _) = chain(head, 3);
        let mut lb = lines(&b);
        lb.drain(..2);
        let err = verify([("a", &a[..]), ("b", &join(&lb)[..])]).expect_err("removed");
        assert_eq!((err.file.as_str(), err.line), ("b", 1));
        assert_eq!(
            err.problem,
            Problem::Removed {
                expected: 3,
                found: 5
            }
        );
    }

    #[test]
    fn a_reordered_line_is_named() {
        let (buf, _) = chain(ChainHead::GENESIS, 8);
        // Two neighbours swapped.
        let mut l = lines(&buf);
        l.swap(3, 4);
        let (line, p) = problem(verify([("audit.log", &join(&l)[..])]));
        assert_eq!(line, 4);
        assert!(
            matches!(
                p,
                Problem::Reordered {
                    expected: 3,
                    found: 4,
                    expected_at: Some((_, 5)),
                    ..
                }
            ),
            "{p:?}"
        );
        // A line moved back in time.
        let mut l = lines(&buf);
        let moved = l.remove(6);
        l.insert(2, moved);
        let (line, p) = problem(verify([("audit.log", &join(&l)[..])]));
        assert_eq!(line, 3);
        assert!(matches!(p, Problem::Reordered { found: 6, .. }), "{p:?}");
        // A line moved later.
        let mut l = lines(&buf);
        let moved = l.remove(2);
        l.insert(6, moved);
        let (line, p) = problem(verify([("audit.log", &join(&l)[..])]));
        assert_eq!(line, 3);
        assert!(
            matches!(
                p,
                Problem::Reordered {
                    expected: 2,
                    expected_at: Some((_, 7)),
                    ..
                }
            ),
            "{p:?}"
        );
        // A line duplicated.
        let mut l = lines(&buf);
        let copy = l[4].clone();
        l.insert(5, copy);
        let (line, p) = problem(verify([("audit.log", &join(&l)[..])]));
        assert_eq!(line, 6);
        assert!(matches!(p, Problem::Reordered { found: 4, .. }), "{p:?}");
    }

    #[test]
    fn an_edited_line_is_named() {
        let (buf, _) = chain(ChainHead::GENESIS, 6);
        let text = String::from_utf8(buf).expect("utf-8");
        let edited = text.replace(r#""key":"k2""#, r#""key":"kX""#);
        assert_ne!(edited, text);
        let err = verify([("audit.log", edited.as_bytes())]).expect_err("edited");
        assert_eq!(err.line, 3);
        assert_eq!(
            err.problem,
            Problem::Edited {
                next_file: "audit.log".into(),
                next_line: 4
            }
        );
        assert!(err.to_string().contains("edited"), "{err}");
        // Its seq edited (it still links to the line before).
        let edited = text.replacen(r#"{"seq":2,"#, r#"{"seq":9,"#, 1);
        let (line, p) = problem(verify([("audit.log", edited.as_bytes())]));
        assert_eq!(line, 3);
        assert_eq!(
            p,
            Problem::SeqEdited {
                expected: 2,
                found: 9
            }
        );
        // Garbage in place of a line.
        let mut l = lines(text.as_bytes());
        l[1] = b"hello".to_vec();
        let (line, p) = problem(verify([("audit.log", &join(&l)[..])]));
        assert_eq!(line, 2);
        assert!(matches!(p, Problem::NotARecord(_)), "{p:?}");
        // A bad genesis line.
        let edited = text.replacen(GENESIS_PREV, &"1".repeat(64), 1);
        assert_eq!(
            problem(verify([("audit.log", edited.as_bytes())])),
            (1, Problem::BadGenesis)
        );
    }

    #[test]
    fn a_new_chain_in_the_middle_fails() {
        let (a, _) = chain(ChainHead::GENESIS, 3);
        let (b, _) = chain(ChainHead::GENESIS, 3);
        let (line, p) = problem(verify([("a", &a[..]), ("b", &b[..])]));
        assert_eq!(line, 1);
        assert_eq!(
            p,
            Problem::NewChain {
                expected: 3,
                file_start: true
            }
        );
    }

    #[test]
    fn torn_lines_pass_only_when_recovered_or_last() {
        let (mut buf, head) = chain(ChainHead::GENESIS, 3);
        let fragment = br#"{"seq":3,"prev":"ab"#;
        // Unterminated at the very end: a crash not yet recovered.
        let mut torn = buf.clone();
        torn.extend_from_slice(fragment);
        let s = verify([("audit.log", &torn[..])]).expect("torn tail");
        assert_eq!(s.lines, 3);
        assert_eq!(s.torn.len(), 1);
        assert_eq!(
            (s.torn[0].line, s.torn[0].bytes),
            (4, fragment.len() as u64)
        );
        assert!(s.to_string().contains("torn line"), "{s}");
        // Recovered: terminated, then a record with torn_bytes linking to line 3.
        buf.extend_from_slice(fragment);
        buf.push(b'\n');
        let mut head2 = head;
        let start = format!(r#"{{"kind":"start","torn_bytes":{}}}"#, fragment.len());
        head2.append(&mut buf, start.as_bytes());
        let s = verify([("audit.log", &buf[..])]).expect("recovered");
        assert_eq!((s.lines, s.last_seq, s.starts), (4, Some(3), 1));
        assert_eq!(s.torn.len(), 1);
        // The next record's torn_bytes must match the fragment.
        let mut bad = Vec::new();
        bad.extend_from_slice(&chain(ChainHead::GENESIS, 3).0);
        bad.extend_from_slice(fragment);
        bad.push(b'\n');
        let mut h = head;
        h.append(&mut bad, br#"{"kind":"start","torn_bytes":1}"#);
        assert!(matches!(
            problem(verify([("audit.log", &bad[..])])),
            (4, Problem::NotARecord(_))
        ));
        // A terminated fragment at the end is not a crash's leftover.
        let mut end = chain(ChainHead::GENESIS, 2).0;
        end.extend_from_slice(b"junk\n");
        assert!(matches!(
            problem(verify([("audit.log", &end[..])])),
            (3, Problem::NotARecord(_))
        ));
    }

    #[test]
    fn a_complete_last_line_without_newline_counts() {
        let (buf, head) = chain(ChainHead::GENESIS, 3);
        let s = verify([("audit.log", &buf[..buf.len() - 1])]).expect("no final newline");
        assert_eq!(s.lines, 3);
        assert!(s.torn.is_empty());
        assert_eq!(s.head, Some(to_hex(&head.prev)));
    }
}
