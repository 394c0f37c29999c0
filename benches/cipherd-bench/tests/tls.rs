//! The load generator over TLS (`--tls-ca`, and `--tls-cert`/`--tls-key` for a
//! server that requires client certificates) against an in-process cipherd
//! serving certificates generated in the test.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::time::Duration;

use cipherd_bench::Args;
use cipherd_server::{Params, tls::TlsParams};
use clap::Parser as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_stream_runs_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(
        d.join("ca.pem"),
        ca_params.self_signed(&ca_key).unwrap().pem(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    for (name, san) in [
        (
            "server",
            rcgen::SanType::DnsName("localhost".try_into().unwrap()),
        ),
        (
            "client",
            rcgen::SanType::URI("spiffe://bench/load".try_into().unwrap()),
        ),
    ] {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(d.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let mut params = Params::for_data_dir(d.join("data"), true);
    params.tls = Some(TlsParams {
        client_ca_file: Some(d.join("ca.pem")),
        ..TlsParams::new(d.join("server.pem"), d.join("server.key"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cipherd_server::run(listener, params, async {
        let _ = stopped.await;
    }));

    let path = |name: &str| d.join(name).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    // Dev mode writes the root token there at start; the generator reads it once
    // the server reports ready.
    let token = path("data/root-token.INSECURE");
    let args = |extra: &[&str]| {
        let mut argv = vec![
            "cipherd-bench",
            "--addr",
            &addr,
            "--duration",
            "0.3",
            "--warmup",
            "0.1",
            "--wait",
            "10",
            "--pool",
            "16",
            "--tls-ca",
            &ca,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--token-file",
            &token,
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    };
    // Readiness is polled by the generator itself (--wait).
    let setup = cipherd_bench::run(args(&["--create-keys", "--setup-only"]))
        .await
        .unwrap();
    assert!(setup.is_none());
    for shape in [
        &["--mode", "unary"][..],
        &["--mode", "batch", "--batch", "50"],
        &["--mode", "stream", "--batch", "50"],
    ] {
        let r = cipherd_bench::run(args(shape)).await.unwrap().unwrap();
        assert!(r.tls && r.items > 0, "{shape:?}: {r:?}");
        assert_eq!(r.errors.requests, 0, "{shape:?}: {:?}", r.errors.first);
    }
    // Without the client certificate the target is never ready.
    let mut argv = vec![
        "cipherd-bench",
        "--addr",
        &addr,
        "--wait",
        "0.2",
        "--tls-ca",
        &ca,
    ];
    argv.extend_from_slice(&["--setup-only"]);
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        cipherd_bench::run(Args::try_parse_from(argv).unwrap()),
    )
    .await
    .unwrap();
    assert!(refused.is_err());
}
