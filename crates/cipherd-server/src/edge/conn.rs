//! Connections: the accept loop with its connection limit and TLS handshakes,
//! and the IO type that closes connections which deliver no request in time or
//! sit idle.
//!
//! With TLS on, each accepted connection's handshake runs in its own task, so a
//! slow or silent client never holds up accepting the next one. The handshake
//! counts against `limits.max_connections` from the moment the connection is
//! accepted and must finish within `limits.header_read_timeout_ms`; a connection
//! whose handshake fails or times out is closed and logged (at most one warning
//! every few seconds, with a count).
//!
//! A connection's deadline depends on what it is doing, which the limits layer
//! reports through the connection's [`ConnInfo`] tracker:
//!
//! - before its first request has reached the server: `header_read_timeout`
//!   after it was accepted (the TLS handshake included; slow clients, partial
//!   HTTP/2 prefaces, silence);
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
    task::{AbortHandle, JoinSet},
    time::{Instant, Sleep},
};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::{
    Shared,
    tls::{self, TlsInfo, TlsState},
};

/// The most connections refused in one poll of [`Incoming`] before it yields, so
/// that a flood of connections cannot keep the accept loop from everything else.
const MAX_REFUSALS_PER_POLL: usize = 64;

/// How often at most a refused connection is logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How often at most a failed TLS handshake is logged as a warning.
const HANDSHAKE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connections accepted on a listener, at most `limits.max_connections` open
/// (or handshaking) at once. A connection over the limit is accepted and closed
/// at once (so the flood cannot queue in the kernel's backlog) and logged, at
/// most once a second. Accepted connections get `TCP_NODELAY`: small replies
/// must not wait ~40 ms for the peer's delayed ACK. With TLS, connections are
/// yielded once their handshake completes (see the module docs).
pub struct Incoming {
    listener: TcpListener,
    shared: Arc<Shared>,
    refused_unlogged: u64,
    last_refusal_log: Option<Instant>,
    /// TLS handshakes in progress.
    handshakes: JoinSet<Result<EdgeIo, HandshakeError>>,
    failed_unlogged: u64,
    last_failure_log: Option<Instant>,
    /// The task reloading the TLS files, ended with the listener.
    _watcher: Option<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a TLS handshake did not complete.
struct HandshakeError {
    peer: SocketAddr,
    error: io::Error,
    timed_out: bool,
}

impl Incoming {
    pub(super) fn new(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let watcher = shared
            .tls
            .as_ref()
            .map(|state| AbortOnDrop(tokio::spawn(tls::watch(Arc::clone(state))).abort_handle()));
        Self {
            listener,
            shared,
            refused_unlogged: 0,
            last_refusal_log: None,
            handshakes: JoinSet::new(),
            failed_unlogged: 0,
            last_failure_log: None,
            _watcher: watcher,
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

    /// Logs a failed handshake: a connection closed before sending anything
    /// (a TCP health probe) at debug level, others as a warning at most every
    /// [`HANDSHAKE_LOG_INTERVAL`], with the number since the last one.
    fn handshake_failed(&mut self, failure: HandshakeError) {
        let HandshakeError {
            peer,
            error,
            timed_out,
        } = failure;
        if error.kind() == io::ErrorKind::UnexpectedEof {
            tracing::debug!(%peer, error = %error, "TLS handshake: client closed the connection");
            return;
        }
        self.failed_unlogged += 1;
        let now = Instant::now();
        if self
            .last_failure_log
            .is_none_or(|last| now.duration_since(last) >= HANDSHAKE_LOG_INTERVAL)
        {
            let setting = if timed_out {
                " (limits.header_read_timeout_ms)"
            } else {
                ""
            };
            tracing::warn!(
                %peer,
                error = %error,
                failed = self.failed_unlogged,
                "TLS handshake failed{setting}; connection closed"
            );
            self.failed_unlogged = 0;
            self.last_failure_log = Some(now);
        } else {
            tracing::debug!(%peer, error = %error, "TLS handshake failed; connection closed");
        }
    }

    /// Starts the handshake of an accepted connection in its own task.
    fn start_handshake(
        &mut self,
        state: &TlsState,
        slot: ConnSlot,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(state.config());
        let accepted = Instant::now();
        let deadline = accepted + self.shared.limits.header_read_timeout;
        let shared = Arc::clone(&self.shared);
        self.handshakes.spawn(async move {
            let failed = |error, timed_out| HandshakeError {
                peer,
                error,
                timed_out,
            };
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return Err(failed(e, false)),
                Err(_) => {
                    return Err(failed(
                        io::Error::new(io::ErrorKind::TimedOut, "handshake not complete in time"),
                        true,
                    ));
                }
            };
            let (info, identity) = tls::session_info(tls.get_ref().1);
            tracing::trace!(%peer, version = info.version, kx = info.key_exchange, "TLS handshake complete");
            Ok(EdgeIo::new(
                Transport::Tls(Box::new(tls)),
                peer,
                accepted,
                Some(info),
                identity,
                slot,
                &shared,
            ))
        });
    }
}

impl Stream for Incoming {
    type Item = io::Result<EdgeIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        for _ in 0..MAX_REFUSALS_PER_POLL {
            // Completed handshakes first: they are connections already paid for.
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(io)))) => return Poll::Ready(Some(Ok(io))),
                Poll::Ready(Some(Ok(Err(failure)))) => {
                    this.handshake_failed(failure);
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    if e.is_panic() {
                        tracing::error!(error = %e, "TLS handshake task panicked");
                    }
                    continue;
                }
                Poll::Ready(None) | Poll::Pending => {}
            }
            let (stream, peer) = match this.listener.poll_accept(cx) {
                Poll::Ready(Ok(accepted)) => accepted,
                // tonic logs it and polls again.
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                // Both the listener and the handshakes will wake this task.
                Poll::Pending => return Poll::Pending,
            };
            let Some(slot) = ConnSlot::take(&this.shared) else {
                drop(stream);
                this.refuse(peer);
                continue;
            };
            // Best effort: a socket that refuses the option still works.
            let _ = stream.set_nodelay(true);
            match this.shared.tls.clone() {
                Some(state) => this.start_handshake(&state, slot, stream, peer),
                None => {
                    return Poll::Ready(Some(Ok(EdgeIo::new(
                        Transport::Plain(stream),
                        peer,
                        Instant::now(),
                        None,
                        None,
                        slot,
                        &this.shared,
                    ))));
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A connection's place in `limits.max_connections`, given back when dropped
/// (with the connection, or with a failed handshake).
struct ConnSlot(Arc<Shared>);

impl ConnSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        shared
            .try_add_connection()
            .then(|| Self(Arc::clone(shared)))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.remove_connection();
    }
}

/// What a request knows about its connection (through tonic's request
/// extensions): the peer's address and, over TLS, what the handshake negotiated
/// and the identity of the peer's client certificate; and the tracker the limits
/// layer reports the connection's requests to.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address (for logs and audit records).
    pub remote_addr: SocketAddr,
    /// The identity in the peer's verified client certificate (mTLS): its first
    /// URI SAN (`spiffe://hospital/ns/ehr/sa/api`), else its first DNS SAN, else
    /// its subject CN. `None` without a client certificate.
    pub peer_identity: Option<Arc<str>>,
    /// The TLS version, key exchange and cipher suite; `None` over plaintext.
    pub tls: Option<TlsInfo>,
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

/// An accepted connection (plain TCP or TLS) whose reads fail once the
/// connection has passed its deadline (see the module docs), and which gives its
/// slot back to the connection limit when dropped.
pub struct EdgeIo {
    stream: Transport,
    info: ConnInfo,
    timer: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    _slot: ConnSlot,
}

/// The byte stream under a connection.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl EdgeIo {
    fn new(
        stream: Transport,
        remote_addr: SocketAddr,
        accepted: Instant,
        tls: Option<TlsInfo>,
        peer_identity: Option<Arc<str>>,
        slot: ConnSlot,
        shared: &Shared,
    ) -> Self {
        let limits = &shared.limits;
        let header_timeout = limits.header_read_timeout;
        Self {
            info: ConnInfo {
                remote_addr,
                peer_identity,
                tls,
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
            _slot: slot,
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

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    use tokio::io::AsyncWriteExt as _;
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::{
        config::Limits,
        edge::{
            Edge,
            tls::{TlsParams, tests::TestCa, tests::write_server_files},
        },
    };

    /// A rustls client trusting `ca`, presenting `identity` (cert, key PEM) if any.
    fn client_config(
        ca: &TestCa,
        identity: Option<&(String, String)>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    async fn tls_connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    async fn tls_incoming(params: &TlsParams, limits: &Limits) -> (Incoming, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let edge = Edge::new(limits, Some(params)).unwrap();
        (edge.incoming(listener), addr)
    }

    #[tokio::test]
    async fn tls_connections_carry_the_session_and_the_client_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("ca");
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        let params = TlsParams {
            client_ca_file: Some(dir.path().join("ca.pem")),
            ..write_server_files(dir.path(), &ca)
        };
        let (mut incoming, addr) = tls_incoming(&params, &Limits::DEFAULT).await;
        let identity = ca.leaf(&["spiffe://hospital/ns/ehr/sa/api"], Some("api"), false);

        // A silent client that never starts its handshake holds up nobody.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let client = tokio::spawn(tls_connect(
            addr,
            client_config(&ca, Some(&identity), &[&rustls::version::TLS13]),
        ));
        let io = incoming.next().await.unwrap().unwrap();
        let info = io.connect_info();
        assert_eq!(
            info.peer_identity.as_deref(),
            Some("spiffe://hospital/ns/ehr/sa/api")
        );
        let tls = info.tls.unwrap();
        assert_eq!(
            (tls.version, tls.key_exchange),
            ("TLSv1.3", "X25519MLKEM768")
        );
        let client = client.await.unwrap().unwrap();
        assert_eq!(
            client
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .unwrap()
                .name(),
            rustls::NamedGroup::X25519MLKEM768
        );
        drop(io);
        drop(client);

        // A client without a certificate, or with one from another CA, gets no
        // connection; nor does a TLS 1.2-only client; the slots come back.
        let other = TestCa::new("other");
        let stranger = other.leaf(&["spiffe://elsewhere/x"], None, false);
        for (config, what) in [
            (
                client_config(&ca, None, &[&rustls::version::TLS13]),
                "no certificate",
            ),
            (
                client_config(&ca, Some(&stranger), &[&rustls::version::TLS13]),
                "another CA",
            ),
            (
                client_config(&ca, Some(&identity), &[&rustls::version::TLS12]),
                "TLS 1.2",
            ),
        ] {
            let attempt = tokio::spawn(async move {
                let mut stream = tls_connect(addr, config).await?;
                // TLS 1.3 clients learn of a refused certificate on first use.
                stream.write_all(b"x").await?;
                stream.flush().await?;
                let mut buf = [0; 1];
                tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await
            });
            let next = tokio::time::timeout(Duration::from_millis(500), incoming.next()).await;
            assert!(next.is_err(), "{what}: a connection was yielded");
            assert!(
                !matches!(attempt.await.unwrap(), Ok(n) if n > 0),
                "{what}: the client got data"
            );
        }
        // The silent client still holds its slot; all others were given back.
        assert_eq!(incoming.shared.connections.load(Ordering::Acquire), 1);
    }

    #[tokio::test]
    async fn tls_handshakes_time_out_with_the_header_read_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let params = write_server_files(dir.path(), &TestCa::new("ca"));
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::DEFAULT
        };
        let (mut incoming, addr) = tls_incoming(&params, &limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let poll = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
            incoming
        });
        let started = Instant::now();
        let mut buf = [0; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
        )
        .await
        .expect("the server closes the silent connection");
        assert!(!matches!(read, Ok(n) if n > 0));
        assert!(started.elapsed() >= Duration::from_millis(150));
        poll.abort();
    }

    #[tokio::test]
    async fn plaintext_clients_are_refused_by_a_tls_listener() {
        let dir = tempfile::tempdir().unwrap();
        let params = write_server_files(dir.path(), &TestCa::new("ca"));
        let (mut incoming, addr) = tls_incoming(&params, &Limits::DEFAULT).await;
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
            let mut reply = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut reply).await;
            reply
        });
        let next = tokio::time::timeout(Duration::from_millis(500), incoming.next()).await;
        assert!(next.is_err(), "a plaintext connection was yielded");
        let reply = client.await.unwrap();
        // At most a TLS alert record (type 21), never an HTTP/2 frame.
        assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    }

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
