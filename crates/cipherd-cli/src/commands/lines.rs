//! `--lines`: stream stdin through the batch RPCs, one output line per input line.
//!
//! Stdin is read in chunks (at most [`CHUNK_ITEMS`] lines or about [`CHUNK_BYTES`]
//! bytes), each chunk goes through the client's `batch_*` helper, and its results are
//! written and flushed in input order before the next chunk is read, so memory stays
//! bounded and the number of lines written is always the number of lines done.
//!
//! A failed item prints `error: <REASON>: <message>` on its own line and the others
//! carry on (invariant 6); the command then exits 1 after the last line. A failure
//! of a whole request (sealed, unknown key, lost connection) stops the run with an
//! error naming how many lines were written, so a job can resume from there.

use std::{
    future::Future,
    io::{BufWriter, Write as _},
};

use anyhow::Context as _;
use bytes::Bytes;
use cipherd_client::{DEFAULT_BATCH_CHUNK, ItemResult, pb};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};

use super::{Ctx, ciphertext_input, ciphertext_output, decode_base64_input, purpose};
use crate::{
    cli::{DecryptArgs, EncryptArgs, RewrapArgs},
    error::Failure,
    output::{LineValue, write_line},
};

/// Most lines sent per batch request (the client's own chunk size).
pub(super) const CHUNK_ITEMS: usize = DEFAULT_BATCH_CHUNK;
/// Input bytes after which a chunk is sent early, keeping requests well under the
/// server's message limit (64 MiB by default) even with long lines.
pub(super) const CHUNK_BYTES: usize = 4 << 20;

/// `encrypt --lines`: each line is one plaintext (or base64 of one, with --base64).
pub(super) async fn encrypt(ctx: &Ctx, args: EncryptArgs) -> anyhow::Result<()> {
    let associated_data = Bytes::from(args.binding.associated_data());
    let context = Bytes::from(args.binding.context());
    let (client, key, binary, base64) = (&ctx.client, args.key.as_str(), args.binary, args.base64);
    drive(
        ctx,
        false,
        |line| {
            let plaintext = if base64 {
                decode_base64_input(&line)?
            } else {
                line
            };
            Ok(pb::EncryptItem {
                plaintext: plaintext.into(),
                associated_data: associated_data.clone(),
                context: context.clone(),
                reference: String::new(),
            })
        },
        move |items| client.batch_encrypt(key, items, !binary),
        |c| ciphertext_output(&c, binary).map(LineValue::Ciphertext),
    )
    .await
}

/// `decrypt --lines`: each line is one ciphertext (text form or base64 of binary).
pub(super) async fn decrypt(ctx: &Ctx, args: DecryptArgs) -> anyhow::Result<()> {
    let associated_data = Bytes::from(args.binding.associated_data());
    let context = Bytes::from(args.binding.context());
    let client = ctx.client.with_purpose(purpose(&args.purpose));
    let (client, key) = (&client, args.key.as_str());
    drive(
        ctx,
        args.base64,
        |line| {
            Ok(pb::DecryptItem {
                ciphertext: ciphertext_input(&line).into(),
                associated_data: associated_data.clone(),
                context: context.clone(),
                reference: String::new(),
            })
        },
        move |items| client.batch_decrypt(key, items),
        |p| Ok(LineValue::Plaintext(p.to_vec())),
    )
    .await
}

/// `rewrap --lines`: each line is one ciphertext; the output is its replacement.
pub(super) async fn rewrap(ctx: &Ctx, args: RewrapArgs) -> anyhow::Result<()> {
    let associated_data = Bytes::from(args.binding.associated_data());
    let context = Bytes::from(args.binding.context());
    let destination_context = Bytes::from(args.dest_context());
    let client = ctx.client.with_purpose(purpose(&args.purpose));
    let (client, key, to, binary) = (&client, args.key.as_str(), args.to.as_deref(), args.binary);
    drive(
        ctx,
        false,
        |line| {
            Ok(pb::RewrapItem {
                ciphertext: ciphertext_input(&line).into(),
                associated_data: associated_data.clone(),
                context: context.clone(),
                reference: String::new(),
                destination_context: destination_context.clone(),
            })
        },
        move |items| client.batch_rewrap(key, to, items, !binary),
        |c| ciphertext_output(&c, binary).map(LineValue::Ciphertext),
    )
    .await
}

/// The loop shared by the three commands: `prepare` turns a line into a request
/// item (or a local failure for that line), `send` runs one batch, `value` turns a
/// successful result into what is printed.
async fn drive<I, Fut>(
    ctx: &Ctx,
    plaintext_base64: bool,
    prepare: impl Fn(Vec<u8>) -> Result<I, Failure>,
    mut send: impl FnMut(Vec<I>) -> Fut,
    value: impl Fn(Bytes) -> Result<LineValue, Failure>,
) -> anyhow::Result<()>
where
    Fut: Future<Output = cipherd_client::Result<Vec<ItemResult>>>,
{
    let mut reader = LineReader::new(tokio::io::stdin());
    let (mut done, mut failed) = (0_u64, 0_u64);
    loop {
        let chunk = reader
            .next_chunk(CHUNK_ITEMS, CHUNK_BYTES)
            .await
            .context("reading stdin")?;
        if chunk.is_empty() {
            break;
        }
        let (items, slots) = split(chunk.into_iter().map(&prepare));
        let results = if items.is_empty() {
            Vec::new()
        } else {
            send(items).await.map_err(|e| interrupted(&e, done))?
        };
        let outcomes = merge(slots, results).map_err(|f| interrupted_failure(f, done))?;
        let mut out = BufWriter::new(std::io::stdout().lock());
        for outcome in outcomes {
            done += 1;
            if !write_line(
                ctx.format,
                done,
                outcome.and_then(&value),
                plaintext_base64,
                &mut out,
            )
            .context("writing to stdout")?
            {
                failed += 1;
            }
        }
        out.flush().context("writing to stdout")?;
    }
    if failed > 0 {
        return Err(Failure::new(
            "ITEMS_FAILED",
            format!("{failed} of {done} lines failed; see the error lines in the output"),
        )
        .into());
    }
    Ok(())
}

/// Separates prepared lines into the items to send and, per line, `Some(failure)`
/// for lines that failed before sending (`None`: sent, result to come).
fn split<I>(prepared: impl Iterator<Item = Result<I, Failure>>) -> (Vec<I>, Vec<Option<Failure>>) {
    let mut items = Vec::new();
    let mut slots = Vec::new();
    for p in prepared {
        match p {
            Ok(item) => {
                items.push(item);
                slots.push(None);
            }
            Err(f) => slots.push(Some(f)),
        }
    }
    (items, slots)
}

/// Puts the server's results back between the local failures, in input order.
/// Refuses a reply with more or fewer results than items sent.
fn merge(
    slots: Vec<Option<Failure>>,
    results: Vec<ItemResult>,
) -> Result<Vec<Result<Bytes, Failure>>, Failure> {
    let sent = slots.iter().filter(|s| s.is_none()).count();
    if sent != results.len() {
        return Err(Failure::new(
            "PROTOCOL",
            format!("{sent} items sent but {} results received", results.len()),
        ));
    }
    let mut results = results.into_iter();
    Ok(slots
        .into_iter()
        .map(|slot| match slot {
            Some(local) => Err(local),
            None => match results.next() {
                Some(r) => r.map_err(|e| Failure::from_client(&e)),
                // Unreachable after the count check; kept total rather than panicking.
                None => Err(Failure::new("PROTOCOL", "missing result")),
            },
        })
        .collect())
}

fn interrupted(err: &cipherd_client::Error, done: u64) -> Failure {
    interrupted_failure(Failure::from_client(err), done)
}

fn interrupted_failure(f: Failure, done: u64) -> Failure {
    Failure {
        message: format!(
            "{} ({done} lines were done and written; resume from input line {})",
            f.message,
            done + 1
        ),
        ..f
    }
}

/// Reads byte lines (without `\n` or `\r\n`) in bounded chunks.
struct LineReader<R> {
    inner: BufReader<R>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner: BufReader::new(inner),
            eof: false,
        }
    }

    /// Up to `max_items` lines, stopping early once `max_bytes` are read; empty at
    /// the end of input. A last line without a final newline still counts.
    async fn next_chunk(
        &mut self,
        max_items: usize,
        max_bytes: usize,
    ) -> std::io::Result<Vec<Vec<u8>>> {
        let mut lines = Vec::new();
        let mut bytes = 0;
        while !self.eof && lines.len() < max_items && bytes < max_bytes {
            let mut line = Vec::new();
            if self.inner.read_until(b'\n', &mut line).await? == 0 {
                self.eof = true;
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            bytes += line.len();
            lines.push(line);
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn chunks(input: &[u8], items: usize, bytes: usize) -> Vec<Vec<Vec<u8>>> {
        let mut reader = LineReader::new(input);
        let mut out = Vec::new();
        loop {
            let chunk = reader.next_chunk(items, bytes).await.expect("read");
            if chunk.is_empty() {
                return out;
            }
            out.push(chunk);
        }
    }

    #[tokio::test]
    async fn lines_are_split_on_lf_and_crlf_and_keep_empty_lines() {
        let got = chunks(b"a\r\n\nb\nlast", 10, 1 << 20).await;
        assert_eq!(
            got,
            vec![vec![b"a".to_vec(), vec![], b"b".to_vec(), b"last".to_vec()]]
        );
        assert!(chunks(b"", 10, 100).await.is_empty());
        assert_eq!(chunks(b"\n", 10, 100).await, vec![vec![Vec::<u8>::new()]]);
    }

    #[tokio::test]
    async fn chunks_are_bounded_by_items_and_bytes() {
        let got = chunks(b"1\n2\n3\n4\n5\n", 2, 1 << 20).await;
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let got = chunks(b"aaaa\nbbbb\ncc\n", 100, 4).await;
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 1]);
    }

    #[test]
    fn local_failures_keep_their_place() {
        let prepared = vec![Ok(1), Err(Failure::new("INVALID_INPUT", "bad")), Ok(3)];
        let (items, slots) = split(prepared.into_iter());
        assert_eq!(items, [1, 3]);
        let results = vec![
            Ok(Bytes::from_static(b"one")),
            Err(cipherd_client::Error::Status {
                code: tonic::Code::InvalidArgument,
                reason: "DECRYPTION_FAILED".into(),
                message: "decryption failed".into(),
            }),
        ];
        let merged = merge(slots, results).expect("counts match");
        assert_eq!(merged[0].as_ref().expect("ok"), &Bytes::from_static(b"one"));
        assert_eq!(
            merged[1].as_ref().expect_err("local").reason,
            "INVALID_INPUT"
        );
        assert_eq!(
            merged[2].as_ref().expect_err("server").reason,
            "DECRYPTION_FAILED"
        );
    }

    #[test]
    fn a_reply_with_the_wrong_count_is_refused() {
        let (_, slots) = split(vec![Ok::<_, Failure>(1), Ok(2)].into_iter());
        let err = merge(slots, vec![Ok(Bytes::new())]).expect_err("short reply");
        assert_eq!(err.reason, "PROTOCOL");
    }

    #[test]
    fn interruption_says_where_to_resume() {
        let f = interrupted_failure(Failure::new("SEALED", "cipherd is sealed"), 2000);
        assert_eq!(f.reason, "SEALED");
        assert!(f.message.contains("2000 lines were done") && f.message.contains("line 2001"));
    }
}
