//! Connections: the accept loop with its connection limit, and the IO type that
//! closes connections which deliver no request in time or sit idle.
//!
//! A connection's deadline depends on what it is doing, which the limits layer
//! reports through the connection's [`ConnInfo`] tracker:
//!
//! - before its first request has reached the server: `header_read_timeout`
//!   after it was accepted (slow clients, partial HTTP/2 prefaces, silence);
//! - with requests in flight: none (the request timeout and HTTP/2 keep-alive
//!   bound those);
//! - with none in flight: `idle_timeout` after the last one started or ended.
//!
//! Past its deadline the connection's next read fails, and hyper closes it. A
//! timer wakes an idle connection's read at its deadline, so a silent client is
//! cut off too. This does not send a GOAWAY first: a client that sends a request
//! at the very moment its idle connection is closed sees the connection fail.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::Shared;

/// The most connections refused in one poll of [`Incoming`] before it yields, so
/// that a flood of connections cannot keep the accept loop from everything else.
const MAX_REFUSALS_PER_POLL: usize = 64;

/// How often at most a refused connection is logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The connections accepted on a listener, at most `limits.max_connections` open
/// at once. A connection over the limit is accepted and closed at once (so the
/// flood cannot queue in the kernel's backlog) and logged, at most once a second.
/// Accepted connections get `TCP_NODELAY`: small replies must not wait ~40 ms for
/// the peer's delayed ACK.
pub struct Incoming {
    listener: TcpListener,
    shared: Arc<Shared>,
    refused_unlogged: u64,
    last_refusal_log: Option<Instant>,
}

impl Incoming {
    pub(super) fn new(listener: TcpListener, shared: Arc<Shared>) -> Self {
        Self {
            listener,
            shared,
            refused_unlogged: 0,
            last_refusal_log: None,
        }
    }

    fn refuse(&mut self, peer: SocketAddr) {
        self.refused_unlogged += 1;
        let now = Instant::now();
        if self
            .last_refusal_log
            .is_none_or(|last| now.duration_since(last) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                %peer,
                limit = self.shared.limits.max_connections,
                refused = self.refused_unlogged,
                "closed new connections: limits.max_connections reached"
            );
            self.refused_unlogged = 0;
            self.last_refusal_log = Some(now);
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<EdgeIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..MAX_REFUSALS_PER_POLL {
            let (stream, peer) = match ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                // tonic logs it and polls again.
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            if !this.shared.try_add_connection() {
                drop(stream);
                this.refuse(peer);
                continue;
            }
            // Best effort: a socket that refuses the option still works.
            let _ = stream.set_nodelay(true);
            return Poll::Ready(Some(Ok(EdgeIo::new(
                stream,
                peer,
                Arc::clone(&this.shared),
            ))));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// What a request knows about its connection (through tonic's request
/// extensions): the addresses, and the tracker the limits layer reports the
/// connection's requests to.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address (for logs now, for audit records later).
    pub remote_addr: SocketAddr,
    /// The identity in the client's TLS certificate (mTLS), if one was presented.
    pub peer_identity: Option<Arc<str>>,
    pub(super) tracker: Arc<ConnTracker>,
}

/// Requests in flight on one connection and when it was last active.
#[derive(Debug)]
pub(super) struct ConnTracker {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `accepted` of the last request start or end, plus one;
    /// 0 until the first request.
    last_activity: AtomicU64,
}

impl ConnTracker {
    /// A request on this connection reached the server.
    pub(super) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    /// A request's response ended (or was dropped).
    pub(super) fn request_finished(&self) {
        // Activity first, so the connection never looks idle since long ago.
        self.touch();
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn touch(&self) {
        let ms = u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_activity.store(ms + 1, Ordering::Release);
    }

    /// When the connection is to be closed as things stand, or `None` while it has
    /// requests in flight. `false` in the second field: it has had no request yet.
    fn deadline(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<(Instant, bool)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.last_activity.load(Ordering::Acquire) {
            0 => Some((self.accepted + header_timeout, false)),
            ms => Some((
                self.accepted + Duration::from_millis(ms - 1) + idle_timeout,
                true,
            )),
        }
    }
}

/// An accepted connection: a `TcpStream` whose reads fail once the connection
/// has passed its deadline (see the module docs), and which gives its slot back
/// to the connection limit when dropped.
pub struct EdgeIo {
    stream: TcpStream,
    info: ConnInfo,
    timer: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    shared: Arc<Shared>,
}

impl EdgeIo {
    fn new(stream: TcpStream, remote_addr: SocketAddr, shared: Arc<Shared>) -> Self {
        let accepted = Instant::now();
        let limits = &shared.limits;
        let header_timeout = limits.header_read_timeout;
        Self {
            info: ConnInfo {
                remote_addr,
                peer_identity: None,
                tracker: Arc::new(ConnTracker {
                    accepted,
                    in_flight: AtomicUsize::new(0),
                    last_activity: AtomicU64::new(0),
                }),
            },
            stream,
            timer: Box::pin(tokio::time::sleep_until(accepted + header_timeout)),
            header_timeout,
            idle_timeout: limits.idle_timeout,
            shared,
        }
    }

    fn deadline(&self) -> Option<(Instant, bool)> {
        self.info
            .tracker
            .deadline(self.header_timeout, self.idle_timeout)
    }

    /// The read error that closes the connection, logged.
    fn expired(&self, had_request: bool) -> io::Error {
        let (why, setting) = if had_request {
            ("idle", "limits.idle_timeout_ms")
        } else {
            ("no request", "limits.header_read_timeout_ms")
        };
        tracing::debug!(peer = %self.info.remote_addr, why, "closing connection ({setting})");
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection closed: {why} ({setting})"),
        )
    }

    /// With nothing to read: waits for the connection's deadline, failing once it
    /// has passed. While requests are in flight the timer only wakes the read now
    /// and then to notice when the connection falls idle.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.deadline() {
                Some((deadline, _)) => {
                    // Only ever bring the timer forward: a later deadline (the
                    // usual case, after each request) is noticed when the earlier
                    // one fires, so a busy connection does not re-arm a timer per
                    // request.
                    if self.timer.is_elapsed() || deadline < self.timer.deadline() {
                        self.timer.as_mut().reset(deadline);
                    }
                }
                None => {
                    if self.timer.is_elapsed() {
                        self.timer
                            .as_mut()
                            .reset(Instant::now() + self.idle_timeout);
                    }
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if let Some((deadline, had_request)) = self.deadline()
                && Instant::now() >= deadline
            {
                return Poll::Ready(Err(self.expired(had_request)));
            }
        }
    }
}

impl Drop for EdgeIo {
    fn drop(&mut self) {
        self.shared.remove_connection();
    }
}

impl Connected for EdgeIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.poll_deadline(cx),
            // Bytes arrived, but a client trickling them must still be cut off at
            // its deadline.
            Poll::Ready(Ok(())) if buf.filled().len() > before => match this.deadline() {
                Some((deadline, had_request)) if Instant::now() >= deadline => {
                    Poll::Ready(Err(this.expired(had_request)))
                }
                _ => Poll::Ready(Ok(())),
            },
            eof_or_error => eof_or_error,
        }
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> ConnTracker {
        ConnTracker {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_activity: AtomicU64::new(0),
        }
    }

    #[test]
    fn deadline_follows_the_connections_requests() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(300);
        let t = tracker();
        assert_eq!(t.deadline(header, idle), Some((t.accepted + header, false)));

        t.request_started();
        assert_eq!(t.deadline(header, idle), None, "busy: no deadline");
        t.request_started();
        t.request_finished();
        assert_eq!(t.deadline(header, idle), None, "one still in flight");
        t.request_finished();
        let (deadline, had_request) = t.deadline(header, idle).unwrap();
        assert!(had_request, "the header deadline no longer applies");
        let since = deadline.duration_since(t.accepted);
        assert!(
            since >= idle && since < idle + Duration::from_secs(5),
            "{since:?}"
        );
    }

    #[test]
    fn idle_deadline_counts_from_the_last_request() {
        let idle = Duration::from_secs(300);
        let mut t = tracker();
        // A connection accepted 100 s ago whose request has just ended.
        t.accepted -= Duration::from_secs(100);
        t.request_started();
        t.request_finished();
        let (deadline, _) = t.deadline(Duration::from_secs(10), idle).unwrap();
        let since = deadline.duration_since(t.accepted);
        assert!(
            since >= Duration::from_secs(400) && since < Duration::from_secs(405),
            "{since:?}"
        );
    }
}
