//! The request body wrapper: reads the gRPC message framing of a request as it
//! streams in, so that no message is buffered that the limits do not allow.
//!
//! Every gRPC message starts with a 5-byte prefix: a compressed flag and a
//! big-endian u32 length. tonic reserves the declared length as soon as it has
//! the prefix. This wrapper sees each prefix first, and holds back the DATA frame
//! that completes it until:
//!
//! - the length is at most `limits.max_message_bytes`, else the body fails with
//!   RESOURCE_EXHAUSTED / `MESSAGE_TOO_LARGE` and tonic never sees the prefix;
//! - the flag is 0 (cipherd accepts no compression, whose output would escape
//!   the budget), else INVALID_ARGUMENT;
//! - the length has been taken from the shared buffer budget
//!   (`limits.max_buffered_request_bytes`, one semaphore permit per byte). The
//!   previous message's share is given back first (so a stream never holds two
//!   and never waits while holding one); the last message's share is given back
//!   when the request ends (the request body and the response both gone), since
//!   a unary request's decoded fields point into the buffer until then.
//!
//! It also bounds time: whenever the body is polled and has nothing to give (the
//! client is slow, or the budget is spent), a timer runs, and a message not
//! complete `limits.request_timeout_ms` after the server began waiting for it
//! fails the body with DEADLINE_EXCEEDED / `REQUEST_TIMEOUT`. Time the server
//! spends not reading (busy, or held back by a client that does not read its
//! replies) does not count.
//!
//! tonic turns a body error that is a `tonic::Status` into that status, details
//! included: the unary call fails with it, a stream ends with it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, TryAcquireError},
    time::{Instant, Sleep},
};

use super::limits::RequestState;
use crate::Error;

/// Length of the gRPC message prefix (flag and length).
const PREFIX_LEN: usize = 5;

/// A wait for budget permits (allocated only when the budget is short).
type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project_lite::pin_project! {
    /// A request body checked against the message limit and the buffer budget
    /// (see the module docs). Its error is a `tonic::Status`.
    pub struct RequestBody<B> {
        #[pin]
        inner: B,
        state: Arc<RequestState>,
        framing: Framing,
        // A DATA frame held back until its prefixes have been checked, and how far.
        held: Option<Bytes>,
        scanned: usize,
        // A wait for budget, and the length it is for.
        acquire: Option<Acquire>,
        // The per-message timer, created the first time it is needed.
        #[pin]
        timer: Option<Sleep>,
        timer_armed: bool,
        failed: bool,
    }
}

/// Where the framing parser is.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Reading a prefix, `have` of its bytes so far.
    Prefix {
        bytes: [u8; PREFIX_LEN],
        have: usize,
    },
    /// A prefix declaring `len` bytes is complete and waits for its budget.
    Paying { len: usize },
    /// Inside a message, `remaining` bytes to go.
    Message { remaining: usize },
}

/// What scanning a held frame found.
enum Scan {
    /// Every prefix it completes is checked and paid for: hand it on.
    Done,
    /// A prefix declaring this many bytes needs budget first.
    NeedBudget(usize),
}

impl<B> RequestBody<B> {
    pub(super) fn new(inner: B, state: Arc<RequestState>) -> Self {
        Self {
            inner,
            state,
            framing: Framing::Prefix {
                bytes: [0; PREFIX_LEN],
                have: 0,
            },
            held: None,
            scanned: 0,
            acquire: None,
            timer: None,
            timer_armed: false,
            failed: false,
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        loop {
            if let Some(data) = this.held.as_ref() {
                let scan = scan(
                    data,
                    this.scanned,
                    this.framing,
                    this.timer_armed,
                    this.state.limits().max_message_bytes,
                );
                let waiting = match scan {
                    Err(err) => return fail(this.failed, err),
                    Ok(Scan::Done) => {
                        let data = this.held.take().unwrap_or_default();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Scan::NeedBudget(len)) => {
                        match poll_budget(this.state, this.acquire, len, cx) {
                            Poll::Ready(Ok(())) => {
                                *this.framing = Framing::Message { remaining: len };
                                continue;
                            }
                            Poll::Ready(Err(err)) => return fail(this.failed, err),
                            Poll::Pending => {
                                "request buffer space (limits.max_buffered_request_bytes)"
                            }
                        }
                    }
                };
                return poll_timer(
                    this.timer,
                    this.timer_armed,
                    this.state,
                    waiting,
                    this.failed,
                    cx,
                );
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        *this.held = Some(data);
                        *this.scanned = 0;
                    }
                    // Trailers pass as they are.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(err))) => {
                    return Poll::Ready(Some(Err(tonic::Status::from_error(err.into()))));
                }
                Poll::Ready(None) => {
                    *this.timer_armed = false;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    return poll_timer(
                        this.timer,
                        this.timer_armed,
                        this.state,
                        "the request message",
                        this.failed,
                        cx,
                    );
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.held.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Walks `data` from `*scanned`, through message bodies and prefixes, until it
/// ends or a complete prefix needs budget (the caller then moves `framing` from
/// `Paying` to `Message`). A completed message disarms the timer (the next one
/// gets its own time).
fn scan(
    data: &Bytes,
    scanned: &mut usize,
    framing: &mut Framing,
    timer_armed: &mut bool,
    max_message_bytes: usize,
) -> Result<Scan, Error> {
    loop {
        if let Framing::Paying { len } = *framing {
            return Ok(Scan::NeedBudget(len));
        }
        let Some(rest) = data.get(*scanned..).filter(|rest| !rest.is_empty()) else {
            return Ok(Scan::Done);
        };
        match framing {
            Framing::Paying { .. } => {}
            Framing::Message { remaining } => {
                let n = (*remaining).min(rest.len());
                *remaining -= n;
                *scanned += n;
                if *remaining == 0 {
                    *framing = Framing::Prefix {
                        bytes: [0; PREFIX_LEN],
                        have: 0,
                    };
                    *timer_armed = false;
                }
            }
            Framing::Prefix { bytes, have } => {
                let n = (PREFIX_LEN - *have).min(rest.len());
                bytes[*have..*have + n].copy_from_slice(&rest[..n]);
                *have += n;
                *scanned += n;
                if *have < PREFIX_LEN {
                    continue;
                }
                let [flag, length @ ..] = *bytes;
                if flag != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "gRPC message compressed flag {flag}: cipherd accepts no compression"
                    )));
                }
                let len = usize::try_from(u32::from_be_bytes(length)).unwrap_or(usize::MAX);
                if len > max_message_bytes {
                    return Err(Error::MessageTooLarge {
                        declared: len,
                        limit: max_message_bytes,
                    });
                }
                if len == 0 {
                    // An empty message is complete with its prefix.
                    *have = 0;
                    *timer_armed = false;
                    continue;
                }
                *framing = Framing::Paying { len };
            }
        }
    }
}

/// Gives back the previous message's share of the budget and takes `len` bytes
/// for the new one, waiting if the budget is short.
fn poll_budget(
    state: &RequestState,
    acquire: &mut Option<Acquire>,
    len: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>> {
    // `len` came from a u32 and is at most max_message_bytes.
    let permits = u32::try_from(len).unwrap_or(u32::MAX);
    if acquire.is_none() {
        state.release_budget();
        match state.budget().try_acquire_many(permits) {
            Ok(permit) => {
                permit.forget();
                state.hold_budget(len);
                return Poll::Ready(Ok(()));
            }
            Err(TryAcquireError::NoPermits) => {
                *acquire = Some(Box::pin(
                    Arc::clone(state.budget()).acquire_many_owned(permits),
                ));
            }
            Err(TryAcquireError::Closed) => return Poll::Ready(Err(budget_closed())),
        }
    }
    let Some(wait) = acquire.as_mut() else {
        return Poll::Ready(Err(budget_closed()));
    };
    let acquired = ready!(wait.as_mut().poll(cx));
    *acquire = None;
    match acquired {
        Ok(permit) => {
            permit.forget();
            state.hold_budget(len);
            Poll::Ready(Ok(()))
        }
        Err(_) => Poll::Ready(Err(budget_closed())),
    }
}

fn budget_closed() -> Error {
    Error::Internal("the request buffer budget was closed".into())
}

/// The body has nothing to give: runs the message timer (arming it if this wait
/// is a new one) and fails the body when it fires.
fn poll_timer(
    mut timer: Pin<&mut Option<Sleep>>,
    armed: &mut bool,
    state: &RequestState,
    waiting_for: &'static str,
    failed: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
    let timeout = state.limits().request_timeout;
    if !*armed {
        let deadline = Instant::now() + timeout;
        match timer.as_mut().as_pin_mut() {
            Some(sleep) => sleep.reset(deadline),
            None => timer.set(Some(tokio::time::sleep_until(deadline))),
        }
        *armed = true;
    }
    let Some(sleep) = timer.as_pin_mut() else {
        return Poll::Pending;
    };
    ready!(sleep.poll(cx));
    fail(
        failed,
        Error::RequestTimeout {
            waiting_for,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        },
    )
}

fn fail(failed: &mut bool, err: Error) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
    *failed = true;
    Poll::Ready(Some(Err(err.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `frames` in order, paying every prefix at once; returns the declared
    /// lengths in order, or the first error.
    fn lengths(frames: &[&[u8]], max: usize) -> Result<Vec<usize>, Error> {
        let mut framing = Framing::Prefix {
            bytes: [0; PREFIX_LEN],
            have: 0,
        };
        let mut armed = true;
        let mut found = Vec::new();
        for frame in frames {
            let data = Bytes::copy_from_slice(frame);
            let mut scanned = 0;
            loop {
                match scan(&data, &mut scanned, &mut framing, &mut armed, max)? {
                    Scan::Done => break,
                    Scan::NeedBudget(len) => {
                        found.push(len);
                        framing = Framing::Message { remaining: len };
                    }
                }
            }
        }
        Ok(found)
    }

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.resize(PREFIX_LEN + len as usize, 7);
        m
    }

    #[test]
    fn finds_every_prefix_across_and_within_frames() {
        let mut all = message(3);
        all.extend(message(0));
        all.extend(message(300));
        all.extend(message(1));
        // One frame, and the same bytes cut at every position into two frames.
        assert_eq!(lengths(&[&all], 1000).unwrap(), [3, 300, 1]);
        for cut in 0..all.len() {
            let (a, b) = all.split_at(cut);
            assert_eq!(lengths(&[a, b], 1000).unwrap(), [3, 300, 1], "cut at {cut}");
        }
        // A byte at a time.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(lengths(&bytes, 1000).unwrap(), [3, 300, 1]);
    }

    #[test]
    fn a_prefix_at_the_end_of_a_frame_still_waits_for_its_budget() {
        // Scanning again after a wait for budget must not hand the frame on.
        let data = Bytes::from_static(&[0, 0, 0, 0, 9]);
        let mut framing = Framing::Prefix {
            bytes: [0; PREFIX_LEN],
            have: 0,
        };
        let (mut scanned, mut armed) = (0, true);
        for _ in 0..2 {
            let found = scan(&data, &mut scanned, &mut framing, &mut armed, 100).unwrap();
            assert!(matches!(found, Scan::NeedBudget(9)));
        }
        framing = Framing::Message { remaining: 9 };
        let found = scan(&data, &mut scanned, &mut framing, &mut armed, 100).unwrap();
        assert!(matches!(found, Scan::Done));
        assert!(armed, "the message is not complete yet");
        let rest = Bytes::from_static(&[1; 9]);
        scanned = 0;
        scan(&rest, &mut scanned, &mut framing, &mut armed, 100).unwrap();
        assert!(!armed, "a complete message disarms the timer");
    }

    #[test]
    fn refuses_over_limit_lengths_and_compression_from_the_prefix_alone() {
        let prefix = [0, 0x04, 0, 0, 0]; // 64 MiB declared, nothing sent
        let err = lengths(&[&prefix], 16 << 20).unwrap_err();
        assert!(
            matches!(err, Error::MessageTooLarge { declared, limit } if declared == 64 << 20 && limit == 16 << 20),
            "{err:?}"
        );
        assert!(
            lengths(&[&[0, 0, 0, 0, 10]], 10).is_ok(),
            "the limit itself is allowed"
        );
        let err = lengths(&[&[1, 0, 0, 0, 1, 0]], 10).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
}
