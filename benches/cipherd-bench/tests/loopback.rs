//! The load generator against real servers on 127.0.0.1:0: cipherd (in-process,
//! dev mode), the echo baseline, and a minimal fake of OpenBao's Transit HTTP API.
//! Every mode and operation must complete short runs with traffic and no errors.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use cipherd_bench::{Args, Report, echo};
use cipherd_test_support::TestServer;
use clap::Parser as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
};

fn args(addr: &str, extra: &[&str]) -> Args {
    let mut argv = vec![
        "cipherd-bench",
        "--addr",
        addr,
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--wait",
        "10",
        "--pool",
        "16",
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv).unwrap()
}

/// `extra` with `--token-file token` in front (a cipherd target's bearer token).
fn with_token<'a>(token: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["--token-file", token];
    argv.extend_from_slice(extra);
    argv
}

async fn run(addr: &str, extra: &[&str]) -> Report {
    cipherd_bench::run(args(addr, extra))
        .await
        .unwrap_or_else(|e| panic!("{extra:?}: {e:#}"))
        .expect("a report")
}

fn assert_clean(r: &Report, what: &str) {
    assert!(r.items > 0, "{what}: no items: {r:?}");
    assert_eq!(r.errors.requests, 0, "{what}: {:?}", r.errors.first);
    assert_eq!(r.errors.items, 0, "{what}");
    assert!(r.latency_us.p50 > 0 && r.latency_us.p50 <= r.latency_us.p999);
}

const SHAPES: [&[&str]; 9] = [
    &["--mode", "unary", "--op", "encrypt"],
    &["--mode", "unary", "--op", "decrypt"],
    &["--mode", "unary", "--op", "rewrap"],
    &["--mode", "batch", "--op", "encrypt", "--batch", "50"],
    &["--mode", "batch", "--op", "decrypt", "--batch", "50"],
    &["--mode", "batch", "--op", "rewrap", "--batch", "50"],
    &["--mode", "stream", "--op", "encrypt", "--batch", "50"],
    &["--mode", "stream", "--op", "decrypt", "--batch", "50"],
    &[
        "--mode", "stream", "--op", "rewrap", "--batch", "50", "-c", "2",
    ],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_and_op_runs_against_cipherd() {
    let server = TestServer::dev().await;
    let addr = server.addr.to_string();
    let token = server
        .data_dir
        .join(cipherd_server::DEV_ROOT_TOKEN_FILE)
        .display()
        .to_string();
    let token = token.as_str();
    // The probe names a missing key: a clear setup error, not a run of failures.
    let err = cipherd_bench::run(args(&addr, &with_token(token, &["--key", "missing"])))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("KEY_NOT_FOUND"), "{err:#}");

    let setup = cipherd_bench::run(args(
        &addr,
        &with_token(token, &["--create-keys", "--setup-only"]),
    ))
    .await
    .unwrap();
    assert!(setup.is_none());
    for shape in SHAPES {
        let mut extra = shape.to_vec();
        extra.extend_from_slice(&["--size", "100"]);
        let r = run(&addr, &with_token(token, &extra)).await;
        assert_clean(&r, &format!("{shape:?}"));
        assert_eq!(r.target, "cipherd");
    }
    // Many keys, each with its own ciphertexts, and a counted key type.
    let r = run(
        &addr,
        &with_token(
            token,
            &[
                "--keys",
                "20",
                "--key",
                "many",
                "--create-keys",
                "--op",
                "decrypt",
                "--mode",
                "batch",
                "--batch",
                "10",
            ],
        ),
    )
    .await;
    assert_clean(&r, "20 keys");
    let r = run(
        &addr,
        &with_token(
            token,
            &[
                "--key",
                "gcm",
                "--key-type",
                "aes256-gcm96",
                "--create-keys",
                "--op",
                "rewrap",
                "--text",
                "--rate",
                "200",
            ],
        ),
    )
    .await;
    assert_clean(&r, "aes256-gcm96, text, paced");
    assert!(r.requests_per_sec < 300.0, "{}", r.requests_per_sec);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_and_op_runs_against_echo() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(echo::serve(
        listener,
        echo::DEFAULT_MAX_MESSAGE_BYTES,
        async {
            let _ = stopped.await;
        },
    ));
    for shape in SHAPES {
        let mut extra = shape.to_vec();
        extra.extend_from_slice(&["--target", "echo"]);
        let r = run(&addr, &extra).await;
        assert_clean(&r, &format!("echo {shape:?}"));
        assert_eq!(r.target, "echo");
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_batch_run_against_a_transit_http_api() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(fake_openbao(listener));
    for shape in [
        &["--mode", "unary", "--op", "encrypt"][..],
        &["--mode", "batch", "--op", "decrypt", "--batch", "40"],
        &[
            "--mode", "batch", "--op", "rewrap", "--batch", "40", "--keys", "3",
        ],
    ] {
        let mut extra = shape.to_vec();
        extra.extend_from_slice(&[
            "--target",
            "openbao",
            "--key-type",
            "aes256-gcm96",
            "--create-keys",
            "-c",
            "4",
        ]);
        let r = run(&addr, &extra).await;
        assert_clean(&r, &format!("openbao {shape:?}"));
        assert_eq!(r.connections, 4);
    }
}

/// Just enough of OpenBao's HTTP API: health, key creation, and Transit encrypt /
/// decrypt / rewrap (unary and batch), on keep-alive HTTP/1.1 connections.
async fn fake_openbao(listener: TcpListener) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut read = BufReader::new(read);
            loop {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut length = 0;
                let mut token = false;
                loop {
                    let mut header = String::new();
                    read.read_line(&mut header).await.unwrap();
                    let header = header.trim_end().to_ascii_lowercase();
                    if header.is_empty() {
                        break;
                    }
                    if let Some(v) = header.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    token |= header == "x-vault-token: root";
                }
                let mut body = vec![0; length];
                read.read_exact(&mut body).await.unwrap();
                let (status, reply) = answer(&path, &body, token);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if write.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn answer(path: &str, body: &[u8], token: bool) -> (&'static str, String) {
    if path == "/v1/sys/health" {
        return ("200 OK", "{}".into());
    }
    if !token {
        return (
            "403 Forbidden",
            r#"{"errors":["permission denied"]}"#.into(),
        );
    }
    if path.starts_with("/v1/transit/keys/") {
        return ("204 No Content", String::new());
    }
    let request: serde_json::Value = serde_json::from_slice(body).unwrap();
    let field = if path.starts_with("/v1/transit/decrypt/") {
        "plaintext"
    } else {
        "ciphertext"
    };
    let value = if field == "plaintext" {
        "AAAA"
    } else {
        "vault:v1:AAAA"
    };
    let data = match request.get("batch_input").and_then(|b| b.as_array()) {
        Some(items) => {
            let results: Vec<_> = items
                .iter()
                .map(|_| serde_json::json!({ field: value }))
                .collect();
            serde_json::json!({ "batch_results": results })
        }
        None => serde_json::json!({ field: value }),
    };
    ("200 OK", serde_json::json!({ "data": data }).to_string())
}
