//! The edge under abuse: every bound the edge keeps, attacked over real sockets.
//!
//! Declared-size floods (refused from the prefix, held to the buffer budget, and
//! survived by the real binary under a 2 GiB address-space cap), stream and
//! connection floods, slow and silent clients, unanswered keep-alive PINGs, load
//! shedding, request and per-message timeouts, and request ids. Edge failures
//! must carry the same `ErrorInfo` as every other error.
//!
//! Raw traffic comes from the `h2` crate (well-formed HTTP/2 that never finishes
//! its messages) or from hand-made frames (`cipherd_e2e::raw_h2`) where a real
//! client would refuse to misbehave. The paths used belong to gRPC health and
//! reflection, which every cipherd serves; the edge does not care which service
//! a request is for.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use bytes::Bytes;
use cipherd_e2e::{Client, Code, Params, TestServer, create_key, encrypt, pb, raw_h2};
use cipherd_server::config::Limits;
use h2::client::{ResponseFuture, SendRequest};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};
use tonic_types::StatusExt as _;

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/// A `ServerReflectionRequest { list_services: "" }`.
const LIST_SERVICES: &[u8] = &[0x3a, 0x00];
/// The path of a Transit method (whose messages may be `max_message_bytes` long).
fn transit(method: &str) -> String {
    format!("/{}/{method}", pb::transit_service_server::SERVICE_NAME)
}

/// Generous bound on anything that must happen "at once", so that a loaded
/// machine does not fail the test; what is asserted is that it happens at all.
const SOON: Duration = Duration::from_secs(10);

/// A dev server with `configure`d limits, and its data dir.
async fn server(configure: impl FnOnce(&mut Limits)) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    configure(&mut params.limits);
    (TestServer::start(params).await, dir)
}

/// A `grpc.health.v1` client on a new connection.
async fn health_client(
    server: &TestServer,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
}

/// The 5-byte gRPC prefix of a message declaring `len` bytes.
fn prefix(len: u32) -> Bytes {
    let mut p = vec![0];
    p.extend(len.to_be_bytes());
    Bytes::from(p)
}

/// A complete gRPC message: prefix and `message`.
fn grpc_message(message: &[u8]) -> Bytes {
    let mut m = prefix(u32::try_from(message.len()).unwrap()).to_vec();
    m.extend(message);
    Bytes::from(m)
}

/// An HTTP/2 connection from the `h2` crate, driven in the background.
struct H2 {
    send: SendRequest<Bytes>,
    ping: h2::PingPong,
    /// Sent as `authorization: Bearer`, so calls reach the edge's body limits.
    token: Option<String>,
}

impl H2 {
    async fn connect(
        addr: SocketAddr,
        token: Option<String>,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let tcp = TcpStream::connect(addr).await?;
        let (send, mut conn) = h2::client::handshake(tcp).await?;
        let ping = conn.ping_pong().unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut h2 = Self { send, ping, token };
        // A PING answered means the server took the connection.
        h2.sync().await?;
        Ok(h2)
    }

    /// Opens a gRPC call to `path` and sends `body` (ending the request if
    /// `end`); returns the response and the request stream.
    async fn call(
        &mut self,
        path: &str,
        body: Bytes,
        end: bool,
    ) -> (ResponseFuture, h2::SendStream<Bytes>) {
        let mut request = http::Request::post(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).unwrap();
        let mut send = self.send.clone().ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        stream.send_data(body, end).unwrap();
        (response, stream)
    }

    /// Returns once the server has read everything sent before (a PING round trip).
    async fn sync(&mut self) -> Result<(), h2::Error> {
        self.ping.ping(h2::Ping::opaque()).await.map(drop)
    }
}

/// The gRPC status a call ended with (from a trailers-only response or the
/// trailers), and how many response messages' bytes came before it.
async fn status_of(response: ResponseFuture) -> (tonic::Status, usize) {
    let response = response.await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return (status, 0);
    }
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        received += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    (
        tonic::Status::from_header_map(&trailers).expect("grpc-status"),
        received,
    )
}

/// Asserts an edge error: code, `ErrorInfo` reason and the `setting` it names
/// (in the metadata and the message).
#[track_caller]
fn assert_edge_error(status: &tonic::Status, code: Code, reason: &str, setting: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        (reason, "cipherd")
    );
    assert_eq!(
        info.metadata.get("setting").map(String::as_str),
        Some(setting),
        "{info:?}"
    );
    assert!(status.message().contains(setting), "{status:?}");
}

/// Reads frames until the server closes the connection; returns when that was
/// (measured from `since`) and the frames seen. Panics if it stays open past
/// `within`.
async fn wait_closed(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    since: Instant,
    within: Duration,
) -> (Duration, Vec<raw_h2::Frame>) {
    let mut frames = Vec::new();
    let read_all = async {
        while let Some(frame) = raw_h2::read_frame(io).await {
            frames.push(frame);
        }
    };
    if tokio::time::timeout(within, read_all).await.is_err() {
        panic!(
            "the connection was still open after {within:?}; frames: {:?}",
            frames.iter().map(|f| f.kind).collect::<Vec<_>>()
        );
    }
    (since.elapsed(), frames)
}

/// Messages declaring more than `limits.max_message_bytes` are refused from their
/// 5-byte prefix, on 120 streams at once, with RESOURCE_EXHAUSTED / MESSAGE_TOO_LARGE naming the limit; the server still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversized_messages_are_refused_from_the_prefix() {
    let (server, _dir) = server(|_| {}).await;
    assert_eq!(Limits::DEFAULT.max_message_bytes, 16 << 20);
    let mut calls = Vec::new();
    for _ in 0..3 {
        let mut h2 = H2::connect(server.addr, server.root_token()).await.unwrap();
        for i in 0..40 {
            // 64 MiB declared, 5 bytes sent, to Transit and (its own decoder has a
            // smaller limit) to health alike.
            let path = if i % 2 == 0 {
                transit("Encrypt")
            } else {
                HEALTH_CHECK.into()
            };
            calls.push(h2.call(&path, prefix(64 << 20), false).await);
        }
    }
    for (response, _stream) in calls {
        let (status, _) = tokio::time::timeout(SOON, status_of(response))
            .await
            .expect("refused at once, without waiting for the message");
        assert_edge_error(
            &status,
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
            "limits.max_message_bytes",
        );
        assert!(status.message().contains("67108864"), "{status:?}");
    }
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    encrypt(&client, "k", b"still serving").await;
}

/// An oversized request message through the typed client (unary) and in a stream is RESOURCE_EXHAUSTED / MESSAGE_TOO_LARGE, naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted_naming_the_limit() {
    let (server, _dir) = server(|l| l.max_message_bytes = 64 << 10).await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let big = vec![7u8; 100 << 10]; // under max_plaintext_bytes, over the message limit
    let err = client
        .encrypt("k", big, &cipherd_e2e::EncryptOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.reason()),
        (Some(Code::ResourceExhausted), Some("MESSAGE_TOO_LARGE")),
        "{err}"
    );
    assert!(
        err.to_string().contains("limits.max_message_bytes"),
        "{err}"
    );

    // In a stream: the first chunk is served, the oversized one ends the stream.
    let chunk = |plaintext: Vec<u8>| pb::EncryptStreamRequest {
        key: "k".into(),
        items: vec![pb::EncryptItem {
            plaintext: plaintext.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (send, requests) = tokio::sync::mpsc::channel(1);
    send.send(chunk(b"small".to_vec())).await.unwrap();
    let mut replies = client
        .transit()
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().results.len(), 1);
    send.send(chunk(vec![7u8; 100 << 10])).await.unwrap();
    let status = replies.message().await.unwrap_err();
    assert_edge_error(
        &status,
        Code::ResourceExhausted,
        "MESSAGE_TOO_LARGE",
        "limits.max_message_bytes",
    );
}

/// Declared messages within the limit take their length from the buffer budget: with two 1 MiB declarations holding a 2 MiB budget, a small request waits until they go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_budget_holds_declared_messages_to_its_size() {
    let (server, _dir) = server(|l| {
        l.max_message_bytes = 1 << 20;
        l.max_buffered_request_bytes = 2 << 20;
        l.request_timeout = Duration::from_secs(60);
    })
    .await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    encrypt(&client, "k", b"before").await;

    let mut holders = H2::connect(server.addr, server.root_token()).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        // Exactly the message limit declared, nothing more sent.
        held.push(holders.call(HEALTH_CHECK, prefix(1 << 20), false).await);
    }
    holders.sync().await.unwrap();

    // The holders' request tasks take the budget a moment after the server has
    // read their frames; a probe in that moment is still served. After that,
    // probes wait.
    let mut served = 0;
    loop {
        let probe = tokio::time::timeout(
            Duration::from_millis(500),
            client.encrypt("k", &b"a few bytes"[..], &Default::default()),
        )
        .await;
        match probe {
            Err(_) => break,
            Ok(reply) => {
                reply.unwrap();
                served += 1;
                assert!(
                    served < 20,
                    "{served} requests served while two declared messages hold the whole budget"
                );
            }
        }
    }

    // The holders give up (their streams are reset): the budget comes back.
    drop(held);
    drop(holders);
    let served = tokio::time::timeout(SOON, encrypt(&client, "k", b"after")).await;
    assert!(served.is_ok(), "not served after the budget was released");
}

/// The real binary under a 2 GiB address-space cap (prlimit --as) survives 200 streams declaring 16 MiB each plus 40 declaring 64 MiB, and serves throughout and afterwards.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_a_declared_message_flood_under_a_memory_cap() {
    const CAP: u64 = 2 << 30;
    let dir = tempfile::tempdir().unwrap();
    let daemon = CappedDaemon::start(dir.path(), CAP).await;
    let token = std::fs::read_to_string(
        dir.path()
            .join("data")
            .join(cipherd_server::DEV_ROOT_TOKEN_FILE),
    )
    .unwrap()
    .trim()
    .to_owned();
    let client = Client::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap()
        .with_token(&cipherd_client::Token::from(token.as_str()))
        .unwrap();
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;

    let mut connections = Vec::new();
    let mut calls = Vec::new();
    for c in 0..5 {
        let mut h2 = match H2::connect(daemon.addr, Some(token.clone())).await {
            Ok(h2) => h2,
            Err(e) => panic!(
                "connection {c} of the flood failed ({e}); alive: {}\n{}",
                daemon.alive(),
                daemon.log().await
            ),
        };
        for _ in 0..40 {
            calls.push(h2.call(&transit("Encrypt"), prefix(16 << 20), false).await);
        }
        if c == 0 {
            for _ in 0..40 {
                calls.push(h2.call(&transit("Encrypt"), prefix(64 << 20), false).await);
            }
        }
        if let Err(e) = h2.sync().await {
            panic!(
                "connection {c} of the flood failed ({e}); alive: {}\n{}",
                daemon.alive(),
                daemon.log().await
            );
        }
        connections.push(h2);
    }
    // 3.2 GB declared within the limit (the budget admits 256 MiB of it) and
    // 2.5 GiB over it: without the edge, tonic reserves it all and aborts.
    let status = tokio::time::timeout(SOON, client.status()).await;
    assert!(
        matches!(status, Ok(Ok(_))),
        "not serving during the flood: {status:?}\n{}",
        daemon.log().await
    );
    assert!(daemon.alive(), "cipherd died:\n{}", daemon.log().await);

    drop(calls);
    drop(connections);
    let served = tokio::time::timeout(SOON, encrypt(&client, "k", b"after the flood")).await;
    assert!(served.is_ok(), "not serving after the flood");
    assert!(daemon.alive(), "cipherd died:\n{}", daemon.log().await);
}

/// A client opening 12 streams on a connection limited to 4 gets REFUSED_STREAM for the 8 excess ones; the server then serves a normal client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_refused_beyond_the_per_connection_limit() {
    let (server, _dir) = server(|l| {
        l.max_concurrent_streams = 4;
        l.request_timeout = Duration::from_secs(60);
    })
    .await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut flood = raw_h2::handshake();
    for i in 0..12 {
        // Requests whose bodies never come: each stream stays open.
        flood.extend(raw_h2::grpc_headers(1 + 2 * i, HEALTH_CHECK, false));
    }
    tcp.write_all(&flood).await.unwrap();

    let mut refused = Vec::new();
    let count = async {
        while refused.len() < 8 {
            let frame = raw_h2::read_frame(&mut tcp).await.expect("connection open");
            if frame.rst_code() == Some(raw_h2::REFUSED_STREAM) {
                refused.push(frame.stream);
            }
        }
    };
    tokio::time::timeout(SOON, count)
        .await
        .unwrap_or_else(|_| panic!("only {} streams refused", refused.len()));
    refused.sort_unstable();
    assert_eq!(refused, (4..12).map(|i| 1 + 2 * i).collect::<Vec<u32>>());

    let client = server.client().await;
    client.status().await.unwrap();
}

/// With four connections open under a limit of 4, six more are closed at once; once one of the four goes away, a new client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_closed_at_once_beyond_the_limit() {
    let (server, _dir) = server(|l| {
        l.max_connections = 4;
        l.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    // Start-up's own connections may still hold slots for a moment: retry until
    // four of ours are served.
    let mut open = Vec::new();
    while open.len() < 4 {
        if let Ok(h2) = H2::connect(server.addr, server.root_token()).await {
            open.push(h2);
        }
    }
    for i in 0..6 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let _ = tcp.write_all(&raw_h2::handshake()).await;
        let (after, _) = wait_closed(&mut tcp, Instant::now(), SOON).await;
        assert!(after < SOON, "connection {i} beyond the limit");
    }
    for h2 in &mut open {
        h2.sync()
            .await
            .expect("the four within the limit stay served");
    }

    drop(open.pop());
    let deadline = Instant::now() + SOON;
    loop {
        match Client::connect(server.endpoint()).await {
            Ok(client) if client.status().await.is_ok() => break,
            _ if Instant::now() < deadline => tokio::task::yield_now().await,
            other => panic!("no slot came free: {:?}", other.err()),
        }
    }
}

/// A client trickling a valid request one byte per 10 ms is disconnected by the 300 ms header-read timeout, before its request is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_by_the_header_read_timeout() {
    let timeout = Duration::from_millis(300);
    let (server, _dir) = server(|l| l.header_read_timeout = timeout).await;
    let mut request = raw_h2::handshake();
    request.extend(raw_h2::grpc_headers(1, HEALTH_CHECK, false));
    request.extend(raw_h2::grpc_message(1, &[], true));
    let trickle_time = Duration::from_millis(10) * u32::try_from(request.len()).unwrap();

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    let (mut read, mut write) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        for byte in request {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let (after, frames) = wait_closed(&mut read, start, Duration::from_secs(20)).await;
    trickle.abort();
    assert!(
        after >= timeout - Duration::from_millis(50),
        "closed after {after:?}"
    );
    assert!(
        after < trickle_time,
        "closed after {after:?}, when the whole request ({trickle_time:?}) was in"
    );
    assert!(
        frames.iter().all(|f| f.kind != raw_h2::HEADERS),
        "the trickled request was answered: {frames:?}"
    );
}

/// A connection that sends only part of the HTTP/2 preface and then nothing is closed by the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_preface_is_cut_off_by_the_header_read_timeout() {
    let (server, _dir) = server(|l| l.header_read_timeout = Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(&raw_h2::PREFACE[..10]).await.unwrap();
    let (after, _) = wait_closed(&mut tcp, start, Duration::from_secs(20)).await;
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );
}

/// A connection whose request has been answered and that then sends nothing is closed by the 300 ms idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_by_the_idle_timeout() {
    let idle = Duration::from_millis(300);
    let (server, _dir) = server(|l| l.idle_timeout = idle).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut request = raw_h2::handshake();
    request.extend(raw_h2::grpc_headers(1, HEALTH_CHECK, false));
    request.extend(raw_h2::grpc_message(1, &[], true));
    tcp.write_all(&request).await.unwrap();
    // Read until the response to stream 1 ends.
    loop {
        let frame = raw_h2::read_frame(&mut tcp).await.expect("served");
        if frame.stream == 1 && frame.flags & raw_h2::END_STREAM != 0 {
            break;
        }
    }
    let answered = Instant::now();
    let (after, _) = wait_closed(&mut tcp, answered, Duration::from_secs(20)).await;
    // The server's idle clock started as it sent the reply, a little earlier.
    assert!(after >= idle / 2, "closed after {after:?}");
}

/// A connection with a request in flight that leaves the server's keep-alive PINGs unanswered is closed after interval plus timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_keepalive_pings_close_the_connection() {
    let (server, _dir) = server(|l| {
        l.keepalive_interval = Duration::from_millis(200);
        l.keepalive_timeout = Duration::from_millis(300);
        l.request_timeout = Duration::from_secs(60);
    })
    .await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut request = raw_h2::handshake();
    // A request whose body never comes keeps the connection busy (not idle).
    request.extend(raw_h2::grpc_headers(1, HEALTH_CHECK, false));
    tcp.write_all(&request).await.unwrap();
    let start = Instant::now();
    let (after, frames) = wait_closed(&mut tcp, start, Duration::from_secs(20)).await;
    assert!(
        frames
            .iter()
            .any(|f| f.kind == raw_h2::PING && f.flags & raw_h2::ACK == 0),
        "the server never pinged: {frames:?}"
    );
    assert!(
        after >= Duration::from_millis(400),
        "closed after {after:?}"
    );
}

/// With `max_concurrent_requests` = 2 and two streams held open, the next request is RESOURCE_EXHAUSTED / OVERLOADED at once (health checks still answered); when the streams end it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_sheds_load_at_once() {
    let (server, _dir) = server(|l| {
        l.max_concurrent_requests = 2;
        l.request_timeout = Duration::from_secs(60);
    })
    .await;
    let client = server.client().await;
    client.status().await.unwrap();

    let mut h2 = H2::connect(server.addr, server.root_token()).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (response, stream) = h2
            .call(REFLECTION, grpc_message(LIST_SERVICES), false)
            .await;
        // The stream is accepted (response headers) and stays open.
        let response = tokio::time::timeout(SOON, response).await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
        streams.push((response, stream));
    }

    let shed = tokio::time::timeout(SOON, client.status())
        .await
        .expect("shed at once, not queued");
    let err = shed.unwrap_err();
    assert_eq!(
        (err.code(), err.reason()),
        (Some(Code::ResourceExhausted), Some("OVERLOADED")),
        "{err}"
    );
    assert!(
        err.to_string().contains("limits.max_concurrent_requests"),
        "{err}"
    );
    let mut health = health_client(&server).await;
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(serving.is_ok(), "probes are not shed: {serving:?}");

    drop(streams);
    drop(h2);
    let deadline = Instant::now() + SOON;
    while client.status().await.is_err() {
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::task::yield_now().await;
    }
}

/// A unary request whose body never completes is answered DEADLINE_EXCEEDED / REQUEST_TIMEOUT, with ErrorInfo naming the limit, after `request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_completes_times_out() {
    let timeout = Duration::from_millis(300);
    let (server, _dir) = server(|l| l.request_timeout = timeout).await;
    let mut h2 = H2::connect(server.addr, server.root_token()).await.unwrap();
    let mut partial = prefix(10).to_vec();
    partial.extend([0x0a, 0x08]); // two of the ten bytes
    let start = Instant::now();
    let (response, _stream) = h2.call(HEALTH_CHECK, Bytes::from(partial), false).await;
    let (status, _) = tokio::time::timeout(SOON, status_of(response))
        .await
        .expect("answered");
    assert_edge_error(
        &status,
        Code::DeadlineExceeded,
        "REQUEST_TIMEOUT",
        "limits.request_timeout_ms",
    );
    assert!(start.elapsed() >= timeout - Duration::from_millis(50));
}

/// A stream that keeps sending runs three times longer than `request_timeout`, every chunk answered; once it stops sending, it ends DEADLINE_EXCEEDED / REQUEST_TIMEOUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_timeout_bounds_each_message_not_the_stream() {
    let timeout = Duration::from_millis(400);
    let (server, _dir) = server(|l| l.request_timeout = timeout).await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let chunk = || pb::EncryptStreamRequest {
        key: "k".into(),
        items: vec![pb::EncryptItem {
            plaintext: Bytes::from_static(b"row"),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (send, requests) = tokio::sync::mpsc::channel(1);
    send.send(chunk()).await.unwrap();
    let mut replies = client
        .transit()
        .encrypt_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    let mut answered = 0;
    while start.elapsed() < timeout * 3 {
        let reply = tokio::time::timeout(SOON, replies.message()).await.unwrap();
        assert_eq!(reply.unwrap().expect("the stream goes on").results.len(), 1);
        answered += 1;
        tokio::time::sleep(timeout / 4).await;
        send.send(chunk()).await.unwrap();
    }
    assert!(answered >= 6, "{answered} answers");
    let reply = tokio::time::timeout(SOON, replies.message()).await.unwrap();
    assert_eq!(reply.unwrap().unwrap().results.len(), 1);

    // Silence (the request stream stays open): the next chunk never comes.
    let silent = Instant::now();
    let status = tokio::time::timeout(SOON, replies.message())
        .await
        .expect("ended")
        .unwrap_err();
    assert_edge_error(
        &status,
        Code::DeadlineExceeded,
        "REQUEST_TIMEOUT",
        "limits.request_timeout_ms",
    );
    // The server began waiting as it sent the last reply, a little earlier.
    assert!(silent.elapsed() >= timeout / 2, "{:?}", silent.elapsed());
    drop(send);
}

/// Every response carries an `x-request-id`: a fresh 16-hex-digit one per call, or the client's own if it is short and plain; error responses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_a_request_id_and_a_clients_own_is_echoed() {
    let (server, _dir) = server(|_| {}).await;
    let mut health = health_client(&server).await;
    let check = tonic_health::pb::HealthCheckRequest::default;
    let id_of = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let first = health.check(check()).await.unwrap();
    let second = health.check(check()).await.unwrap();
    let (a, b) = (
        id_of(first.metadata()).unwrap(),
        id_of(second.metadata()).unwrap(),
    );
    assert_ne!(a, b);
    for id in [&a, &b] {
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }

    let mut own = tonic::Request::new(check());
    own.metadata_mut().insert(
        "x-request-id",
        "0f8fad5b-d9cb-469f-a165-70867728950e".parse().unwrap(),
    );
    let echoed = health.check(own).await.unwrap();
    assert_eq!(
        id_of(echoed.metadata()).as_deref(),
        Some("0f8fad5b-d9cb-469f-a165-70867728950e")
    );

    let mut bad = tonic::Request::new(check());
    bad.metadata_mut()
        .insert("x-request-id", "x".repeat(65).parse().unwrap());
    let replaced = id_of(health.check(bad).await.unwrap().metadata()).unwrap();
    assert_eq!(replaced.len(), 16, "an overlong id is replaced: {replaced}");

    // Errors carry it too (an unknown service is NOT_FOUND).
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(id_of(err.metadata()).is_some(), "{err:?}");
}

/// The real binary under `prlimit --as=CAP`, on 127.0.0.1:0 in dev mode.
#[cfg(target_os = "linux")]
struct CappedDaemon {
    child: tokio::process::Child,
    addr: SocketAddr,
    log: std::sync::Arc<tokio::sync::Mutex<String>>,
}

#[cfg(target_os = "linux")]
impl CappedDaemon {
    async fn start(dir: &Path, cap: u64) -> Self {
        let binary = std::env::var_os("CIPHERD_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_cipherd-e2e-daemon").into());
        let config = dir.join("cipherd.toml");
        std::fs::write(&config, "[log]\nformat = \"json\"\n").unwrap();
        let mut child = tokio::process::Command::new("prlimit")
            .arg(format!("--as={cap}"))
            .arg("--")
            .arg(&binary)
            .args(["--dev", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning prlimit (util-linux) with {binary:?}: {e}"));
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(String::new()));
        let (found, listening) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn({
            let log = std::sync::Arc::clone(&log);
            async move {
                let mut found = Some(found);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(addr) = listening_addr(&line)
                        && let Some(found) = found.take()
                    {
                        let _ = found.send(addr);
                    }
                    let mut log = log.lock().await;
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(60), listening).await {
            Ok(Ok(addr)) => addr,
            _ => panic!("cipherd did not start:\n{}", log.lock().await),
        };
        let daemon = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(client) = Client::connect(format!("http://{addr}")).await
                && client.status().await.is_ok()
            {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "never ready:\n{}",
                daemon.log().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(&self) -> bool {
        let pid = self.child.id().expect("not reaped");
        // Not `try_wait`: that needs `&mut` and would reap the process.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    }

    async fn log(&self) -> String {
        self.log.lock().await.clone()
    }
}

/// The address in the "cipherd listening" JSON log line.
#[cfg(target_os = "linux")]
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "cipherd listening" {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}
