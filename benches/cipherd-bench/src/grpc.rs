//! Driving cipherd (and `cipherd-echo`, which speaks the same API) through the
//! generated tonic clients.
//!
//! Setup waits for `grpc.health.v1` to report `cipherd.v1.TransitService` as SERVING,
//! creates keys through `KeyAdmin` if asked, and for decrypt and rewrap asks the
//! target to encrypt the payload pool once. Measuring then uses unary and batch
//! RPCs in a closed loop ([`crate::runner`]) or the bidirectional `*Stream` RPCs with
//! a bounded number of chunks in flight per stream.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cipherd_client::pb::{
    self, ciphertext_result, key_admin_service_client::KeyAdminServiceClient, plaintext_result,
    transit_service_client::TransitServiceClient,
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Response, Status, Streaming,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    args::{Args, KeyType, Mode, Op, Target},
    payload::{Pool, key_index, leak, map_concurrent, per_key, plaintexts},
    runner::{Caller, collect, run_closed_loop},
    stats::{Outcome, Report, Timing, WorkerStats},
};

/// Items per setup request when making the ciphertext pool.
const SETUP_CHUNK: usize = 1000;
/// Setup requests in flight (key creation, ciphertext pool).
const SETUP_CONCURRENCY: usize = 32;

/// Runs `args` against a cipherd or echo server (see the module docs).
pub async fn run(args: &Args) -> anyhow::Result<Option<Report>> {
    wait_ready(args).await?;
    let setup = connect(args, true).await?;
    let keys = args.key_names();
    if args.create_keys {
        if args.target == Target::Echo {
            eprintln!("cipherd-bench: echo has no keys to create; skipping --create-keys");
        } else {
            create_keys(&setup, &keys, args.key_type).await?;
        }
    }
    if args.setup_only {
        return Ok(None);
    }
    let pool = build_pool(args, &setup, &keys).await?;
    let plan = Arc::new(Plan {
        mode: args.mode,
        op: args.op,
        batch: args.batch,
        encoding: encoding(args.text),
        keys,
        pool,
    });

    let mut channels = Vec::with_capacity(args.connection_count());
    for _ in 0..args.connection_count() {
        // A per-request deadline would also cut streams short; streams rely on
        // the grace period after the end instead.
        let streaming = args.mode == Mode::Stream;
        channels.push(connect(args, !streaming).await?);
    }

    // One request before the clock starts, so a missing key or a bad flag is an
    // error message, not a run full of failures.
    let mut probe = GrpcCaller {
        client: transit(setup),
        plan: Arc::clone(&plan),
    };
    if let Err(e) = probe.call(0).await {
        bail!("probe request failed: {e}");
    }

    let grace = args.timeout() + Duration::from_secs(5);
    let timing = Timing::starting_now(
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
    );
    let stats = if args.mode == Mode::Stream {
        run_streams(args, &plan, &channels, timing, grace).await
    } else {
        let callers = (0..args.concurrency)
            .map(|i| GrpcCaller {
                client: transit(channels[i % channels.len()].clone()),
                plan: Arc::clone(&plan),
            })
            .collect();
        run_closed_loop(callers, timing, args.rate, grace).await
    };
    Ok(Some(stats.report(args, &timing)))
}

/// Polls the health service until `cipherd.v1.TransitService` is SERVING (unsealed).
pub async fn wait_ready(args: &Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.wait();
    loop {
        let last = match check_health(args).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "{} at {} not ready after {:?}: {last}",
                args.target.name(),
                args.addr,
                args.wait()
            );
        }
        // Poll interval between readiness checks, not a guess at start-up time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn check_health(args: &Args) -> Result<(), String> {
    let channel = endpoint(args, true)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "cipherd.v1.TransitService".into(),
        })
        .await
        .map_err(status_message)?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("health: {other:?}")),
    }
}

/// Creates `names` as keys of `key_type`; keys that exist already are kept.
pub async fn create_keys(
    channel: &Chan,
    names: &[String],
    key_type: KeyType,
) -> anyhow::Result<()> {
    let names: Arc<[String]> = names.into();
    let kind = match key_type {
        KeyType::Xaes256Gcm => pb::KeyType::Xaes256Gcm,
        KeyType::Aes256Gcm96 => pb::KeyType::Aes256Gcm96,
        KeyType::Chacha20Poly1305 => pb::KeyType::Chacha20Poly1305,
        KeyType::Xchacha20Poly1305 => pb::KeyType::Xchacha20Poly1305,
    };
    if names.len() > 1000 {
        eprintln!("cipherd-bench: creating {} keys", names.len());
    }
    map_concurrent(names.len(), SETUP_CONCURRENCY, |i| {
        let mut admin = KeyAdminServiceClient::new(channel.clone());
        let names = Arc::clone(&names);
        async move {
            let request = pb::CreateKeyRequest {
                name: names[i].clone(),
                r#type: kind as i32,
                ..Default::default()
            };
            match admin.create_key(request).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                Err(s) => bail!("creating key {}: {}", names[i], status_message(s)),
            }
        }
    })
    .await?;
    Ok(())
}

/// Plaintexts for encrypt (shared by every key); for decrypt and rewrap,
/// ciphertexts made by the target under each key.
async fn build_pool(args: &Args, channel: &Chan, keys: &[String]) -> anyhow::Result<Pool> {
    if args.op == Op::Encrypt {
        return Pool::new(vec![plaintexts(args.pool, args.size)]);
    }
    let each = per_key(args.pool, keys.len());
    eprintln!(
        "cipherd-bench: encrypting {each} payload(s) of {} B under each of {} key(s) for {}",
        args.size,
        keys.len(),
        args.op.name()
    );
    let sources: Arc<[bytes::Bytes]> = plaintexts(each, args.size).into();
    let keys: Arc<[String]> = keys.into();
    let encoding = encoding(args.text);
    let lists = map_concurrent(keys.len(), SETUP_CONCURRENCY, |k| {
        let mut client = transit(channel.clone());
        let sources = Arc::clone(&sources);
        let keys = Arc::clone(&keys);
        async move {
            let mut out = Vec::with_capacity(sources.len());
            for chunk in sources.chunks(SETUP_CHUNK) {
                let request = pb::BatchEncryptRequest {
                    key: keys[k].clone(),
                    items: chunk
                        .iter()
                        .map(|p| pb::EncryptItem {
                            plaintext: p.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    key_version: None,
                    encoding,
                };
                let reply = client
                    .batch_encrypt(request)
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!(
                            "encrypting the pool under {}: {}",
                            keys[k],
                            status_message(s)
                        )
                    })?
                    .into_inner();
                anyhow::ensure!(
                    reply.results.len() == chunk.len(),
                    "pool: wrong result count"
                );
                for r in reply.results {
                    match r.result {
                        Some(ciphertext_result::Result::Ciphertext(c)) => {
                            out.push(leak(c.to_vec()))
                        }
                        Some(ciphertext_result::Result::Error(e)) => {
                            bail!("encrypting the pool under {}: {}", keys[k], e.message)
                        }
                        None => bail!("encrypting the pool: empty result"),
                    }
                }
            }
            Ok(out)
        }
    })
    .await?;
    Pool::new(lists)
}

/// What every request of the run is made of.
#[derive(Debug)]
struct Plan {
    mode: Mode,
    op: Op,
    batch: usize,
    encoding: i32,
    keys: Vec<String>,
    pool: Pool,
}

impl Plan {
    fn key(&self, seq: u64) -> (usize, String) {
        let k = key_index(seq, self.keys.len());
        (k, self.keys[k].clone())
    }

    fn payload(&self, k: usize, seq: u64, j: usize) -> bytes::Bytes {
        self.pool.item(k, seq, self.batch, j).clone()
    }

    fn encrypt(&self, seq: u64) -> pb::EncryptRequest {
        let (k, key) = self.key(seq);
        pb::EncryptRequest {
            key,
            plaintext: self.payload(k, seq, 0),
            encoding: self.encoding,
            ..Default::default()
        }
    }

    fn decrypt(&self, seq: u64) -> pb::DecryptRequest {
        let (k, key) = self.key(seq);
        pb::DecryptRequest {
            key,
            ciphertext: self.payload(k, seq, 0),
            ..Default::default()
        }
    }

    fn rewrap(&self, seq: u64) -> pb::RewrapRequest {
        let (k, key) = self.key(seq);
        pb::RewrapRequest {
            key,
            ciphertext: self.payload(k, seq, 0),
            encoding: self.encoding,
            ..Default::default()
        }
    }

    fn batch_encrypt(&self, seq: u64) -> pb::BatchEncryptRequest {
        let (k, key) = self.key(seq);
        pb::BatchEncryptRequest {
            key,
            items: (0..self.batch)
                .map(|j| pb::EncryptItem {
                    plaintext: self.payload(k, seq, j),
                    ..Default::default()
                })
                .collect(),
            key_version: None,
            encoding: self.encoding,
        }
    }

    fn batch_decrypt(&self, seq: u64) -> pb::BatchDecryptRequest {
        let (k, key) = self.key(seq);
        pb::BatchDecryptRequest {
            key,
            items: (0..self.batch)
                .map(|j| pb::DecryptItem {
                    ciphertext: self.payload(k, seq, j),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn batch_rewrap(&self, seq: u64) -> pb::BatchRewrapRequest {
        let (k, key) = self.key(seq);
        pb::BatchRewrapRequest {
            key,
            items: (0..self.batch)
                .map(|j| pb::RewrapItem {
                    ciphertext: self.payload(k, seq, j),
                    ..Default::default()
                })
                .collect(),
            destination_key: String::new(),
            encoding: self.encoding,
            ..Default::default()
        }
    }
}

/// One in-flight unary or batch request at a time on a shared connection.
struct GrpcCaller {
    client: TransitServiceClient<Chan>,
    plan: Arc<Plan>,
}

impl Caller for GrpcCaller {
    async fn call(&mut self, seq: u64) -> Result<Outcome, String> {
        let plan = &*self.plan;
        let client = &mut self.client;
        match (plan.mode, plan.op) {
            (Mode::Unary, Op::Encrypt) => client
                .encrypt(plan.encrypt(seq))
                .await
                .map(|_| Outcome::ONE)
                .map_err(status_message),
            (Mode::Unary, Op::Decrypt) => client
                .decrypt(plan.decrypt(seq))
                .await
                .map(|_| Outcome::ONE)
                .map_err(status_message),
            (Mode::Unary, Op::Rewrap) => client
                .rewrap(plan.rewrap(seq))
                .await
                .map(|_| Outcome::ONE)
                .map_err(status_message),
            // Batch mode, and the probe of stream mode.
            (_, Op::Encrypt) => {
                let reply = client
                    .batch_encrypt(plan.batch_encrypt(seq))
                    .await
                    .map_err(status_message)?;
                count_ciphertexts(&reply.into_inner().results, plan.batch)
            }
            (_, Op::Decrypt) => {
                let reply = client
                    .batch_decrypt(plan.batch_decrypt(seq))
                    .await
                    .map_err(status_message)?;
                count_plaintexts(&reply.into_inner().results, plan.batch)
            }
            (_, Op::Rewrap) => {
                let reply = client
                    .batch_rewrap(plan.batch_rewrap(seq))
                    .await
                    .map_err(status_message)?;
                count_ciphertexts(&reply.into_inner().results, plan.batch)
            }
        }
    }
}

/// `concurrency` streams spread over the connections, each keeping up to
/// `window` chunks in flight.
async fn run_streams(
    args: &Args,
    plan: &Arc<Plan>,
    channels: &[Chan],
    timing: Timing,
    grace: Duration,
) -> WorkerStats {
    let streams = args.concurrency as u64;
    let mut set = JoinSet::new();
    for i in 0..args.concurrency {
        let mut client = transit(channels[i % channels.len()].clone());
        let plan = Arc::clone(plan);
        let window = args.window;
        let first = i as u64;
        set.spawn(async move {
            let shape = StreamShape {
                first,
                step: streams,
                window,
                timing,
            };
            match plan.op {
                Op::Encrypt => {
                    stream_worker(
                        plan,
                        shape,
                        |s| async move { client.encrypt_stream(s).await },
                        |p, seq| p.batch_encrypt(seq).into(),
                        |r: &pb::EncryptStreamResponse, n| count_ciphertexts(&r.results, n),
                    )
                    .await
                }
                Op::Decrypt => {
                    stream_worker(
                        plan,
                        shape,
                        |s| async move { client.decrypt_stream(s).await },
                        |p, seq| p.batch_decrypt(seq).into(),
                        |r: &pb::DecryptStreamResponse, n| count_plaintexts(&r.results, n),
                    )
                    .await
                }
                Op::Rewrap => {
                    stream_worker(
                        plan,
                        shape,
                        |s| async move { client.rewrap_stream(s).await },
                        |p, seq| p.batch_rewrap(seq).into(),
                        |r: &pb::RewrapStreamResponse, n| count_ciphertexts(&r.results, n),
                    )
                    .await
                }
            }
        });
    }
    collect(set, timing, grace).await
}

/// Where one stream's sequence numbers start and how many chunks it keeps in
/// flight.
#[derive(Debug, Clone, Copy)]
struct StreamShape {
    first: u64,
    step: u64,
    window: usize,
    timing: Timing,
}

/// One bidirectional stream: a sender task pushes chunks while fewer than
/// `window` are unanswered; this task reads replies (in order) and times each
/// chunk from hand-off to reply. The sender stops at the end of the run, which
/// ends the request stream; the server then finishes and closes.
async fn stream_worker<Req, Resp, Open, OpenFut>(
    plan: Arc<Plan>,
    shape: StreamShape,
    open: Open,
    build: fn(&Plan, u64) -> Req,
    count: fn(&Resp, usize) -> Result<Outcome, String>,
) -> WorkerStats
where
    Req: Send + 'static,
    Resp: Send + 'static,
    Open: FnOnce(ReceiverStream<Req>) -> OpenFut,
    OpenFut: Future<Output = Result<Response<Streaming<Resp>>, Status>>,
{
    let timing = shape.timing;
    let mut stats = WorkerStats::new();
    let (request_tx, request_rx) = mpsc::channel::<Req>(shape.window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(Instant, OwnedSemaphorePermit)>();
    let permits = Arc::new(Semaphore::new(shape.window));
    let sender = {
        let permits = Arc::clone(&permits);
        let plan = Arc::clone(&plan);
        tokio::spawn(async move {
            let mut seq = shape.first;
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    break;
                };
                if Instant::now() >= timing.end {
                    break;
                }
                let request = build(&plan, seq);
                seq += shape.step;
                if sent_tx.send((Instant::now(), permit)).is_err()
                    || request_tx.send(request).await.is_err()
                {
                    break;
                }
            }
        })
    };
    let mut replies = match open(ReceiverStream::new(request_rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            stats.record_error(status_message(s));
            permits.close();
            sender.abort();
            return stats;
        }
    };
    loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let Some((t0, permit)) = sent_rx.recv().await else {
                    stats.record_error("a stream reply without a request".into());
                    break;
                };
                stats.record(&timing, t0, Instant::now(), count(&reply, plan.batch));
                drop(permit);
            }
            Ok(None) => break,
            Err(s) => {
                stats.record_error(status_message(s));
                break;
            }
        }
    }
    permits.close();
    sender.abort();
    stats
}

fn count_ciphertexts(results: &[pb::CiphertextResult], expected: usize) -> Result<Outcome, String> {
    check_count(results.len(), expected)?;
    let mut first_error = None;
    let errors = results
        .iter()
        .filter(|r| match &r.result {
            Some(ciphertext_result::Result::Ciphertext(_)) => false,
            Some(ciphertext_result::Result::Error(e)) => {
                first_error.get_or_insert_with(|| e.message.clone());
                true
            }
            None => true,
        })
        .count();
    outcome(expected, errors, first_error)
}

fn count_plaintexts(results: &[pb::PlaintextResult], expected: usize) -> Result<Outcome, String> {
    check_count(results.len(), expected)?;
    let mut first_error = None;
    let errors = results
        .iter()
        .filter(|r| match &r.result {
            Some(plaintext_result::Result::Plaintext(_)) => false,
            Some(plaintext_result::Result::Error(e)) => {
                first_error.get_or_insert_with(|| e.message.clone());
                true
            }
            None => true,
        })
        .count();
    outcome(expected, errors, first_error)
}

fn check_count(got: usize, expected: usize) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!("{expected} items answered with {got} results"))
    }
}

/// A batch whose every item failed is a failed request (with the first item's
/// message); a partly failed one counts its item errors.
fn outcome(expected: usize, errors: usize, first_error: Option<String>) -> Result<Outcome, String> {
    if errors == expected && expected > 0 {
        return Err(format!(
            "every item failed: {}",
            first_error.unwrap_or_else(|| "empty result".into())
        ));
    }
    Ok(Outcome {
        items: (expected - errors) as u64,
        item_errors: errors as u64,
    })
}

fn endpoint(args: &Args, with_deadline: bool) -> anyhow::Result<Endpoint> {
    // The same HTTP/2 settings (and TLS, on the same provider) as
    // `cipherd_client::Client`.
    let scheme = if args.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut e = Endpoint::from_shared(format!("{scheme}://{}", args.addr))?;
    if let Some(ca) = &args.tls_ca {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?))
            .domain_name(args.tls_server_name.clone());
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        e = e.tls_config(tls)?;
    }
    let mut e = e
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20);
    if with_deadline {
        e = e.timeout(args.timeout());
    }
    Ok(e)
}

/// A connection to the target carrying the bearer token (if any) on every call.
type Chan = cipherd_client::AuthChannel;

async fn connect(args: &Args, with_deadline: bool) -> anyhow::Result<Chan> {
    let credentials = match args.token()? {
        Some(token) => cipherd_client::Credentials::bearer(&token)?,
        None => cipherd_client::Credentials::none(),
    };
    let channel = endpoint(args, with_deadline)?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        credentials,
    ))
}

fn transit(channel: Chan) -> TransitServiceClient<Chan> {
    TransitServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

fn encoding(text: bool) -> i32 {
    if text {
        pb::CiphertextEncoding::Text as i32
    } else {
        pb::CiphertextEncoding::Binary as i32
    }
}

fn status_message(status: Status) -> String {
    cipherd_client::Error::from(status).to_string()
}
