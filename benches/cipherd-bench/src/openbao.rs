//! Driving OpenBao's (or Vault's) Transit engine: HTTP/1.1 + JSON on
//! `/v1/transit/{encrypt,decrypt,rewrap}/KEY`, with the token in `X-Vault-Token`.
//!
//! Unary sends `{"plaintext": B64}` or `{"ciphertext": "vault:v1:…"}`; batch sends
//! `{"batch_input": [...]}` (OpenBao caps a batch at about 1,000 items). Each
//! in-flight request has its own keep-alive connection, as HTTP/1.1 allows only one
//! request at a time per connection. Request items are JSON fragments prepared once;
//! a batch body is their concatenation. Replies are parsed borrowing from the body,
//! counting results and per-item errors without copying them.

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, StatusCode, Uri,
    client::conn::http1,
    header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::{
    args::{Args, Mode, Op},
    payload::{Pool, key_index, leak, map_concurrent, per_key, plaintexts},
    runner::{Caller, run_closed_loop},
    stats::{Outcome, Report, Timing},
};

/// Items per setup request when making the ciphertext pool (OpenBao's batch cap
/// is about 1,000).
const SETUP_CHUNK: usize = 500;
/// Setup requests in flight.
const SETUP_CONCURRENCY: usize = 16;
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-vault-token");

/// Runs `args` against OpenBao (see the module docs).
pub async fn run(args: &Args) -> anyhow::Result<Option<Report>> {
    let bao = Setup {
        addr: args.addr,
        token: token_header(&args.token)?,
        timeout: args.timeout(),
    };
    bao.wait_ready(args.wait()).await?;
    let keys = args.key_names();
    if args.create_keys {
        bao.create_keys(&keys, args.key_type.name()).await?;
    }
    if args.setup_only {
        return Ok(None);
    }
    if args.mode == Mode::Batch && args.batch > 1000 {
        eprintln!(
            "cipherd-bench: OpenBao caps batch_input at about 1,000 items; {} may be refused",
            args.batch
        );
    }
    let pool = build_pool(args, &bao, &keys).await?;
    let plan = Arc::new(Plan {
        mode: args.mode,
        batch: args.batch,
        uris: keys
            .iter()
            .map(|k| {
                format!("/v1/transit/{}/{k}", args.op.name())
                    .parse::<Uri>()
                    .with_context(|| format!("key name {k:?} does not fit in a URL path"))
            })
            .collect::<anyhow::Result<_>>()?,
        host: HeaderValue::from_str(&args.addr.to_string())?,
        token: bao.token.clone(),
        pool,
    });

    let mut probe = BaoCaller::new(args.addr, Arc::clone(&plan), args.timeout());
    if let Err(e) = probe.call(0).await {
        bail!("probe request failed: {e}");
    }
    drop(probe);

    let callers = (0..args.concurrency)
        .map(|_| BaoCaller::new(args.addr, Arc::clone(&plan), args.timeout()))
        .collect();
    let timing = Timing::starting_now(
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
    );
    let stats = run_closed_loop(
        callers,
        timing,
        args.rate,
        args.timeout() + Duration::from_secs(5),
    )
    .await;
    Ok(Some(stats.report(args, &timing)))
}

/// What every request of the run is made of.
#[derive(Debug)]
struct Plan {
    mode: Mode,
    batch: usize,
    /// `/v1/transit/OP/KEY` per key.
    uris: Vec<Uri>,
    host: HeaderValue,
    token: HeaderValue,
    /// JSON objects, one per item: `{"plaintext":"…"}` or `{"ciphertext":"…"}`.
    pool: Pool,
}

impl Plan {
    fn request(&self, seq: u64) -> Request<Full<Bytes>> {
        let k = key_index(seq, self.uris.len());
        let body = match self.mode {
            Mode::Unary => self.pool.item(k, seq, 1, 0).clone(),
            Mode::Batch | Mode::Stream => {
                let first = self.pool.item(k, seq, self.batch, 0).len();
                let mut body = Vec::with_capacity(32 + self.batch * (first + 1));
                body.extend_from_slice(b"{\"batch_input\":[");
                for j in 0..self.batch {
                    if j > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(self.pool.item(k, seq, self.batch, j));
                }
                body.extend_from_slice(b"]}");
                Bytes::from(body)
            }
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uris[k].clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(TOKEN_HEADER, self.token.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }
}

/// One keep-alive connection with one request in flight; reconnects after a
/// failure.
struct BaoCaller {
    addr: SocketAddr,
    connection: Option<http1::SendRequest<Full<Bytes>>>,
    plan: Arc<Plan>,
    timeout: Duration,
}

impl BaoCaller {
    fn new(addr: SocketAddr, plan: Arc<Plan>, timeout: Duration) -> Self {
        Self {
            addr,
            connection: None,
            plan,
            timeout,
        }
    }

    async fn exchange(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), String> {
        if self.connection.as_ref().is_none_or(|c| c.is_closed()) {
            self.connection = Some(connect(self.addr).await?);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err("no connection".into());
        };
        connection
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = connection
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading reply: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

impl Caller for BaoCaller {
    async fn call(&mut self, seq: u64) -> Result<Outcome, String> {
        let request = self.plan.request(seq);
        let exchanged = tokio::time::timeout(self.timeout, self.exchange(request)).await;
        let (status, body) = match exchanged {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                self.connection = None;
                return Err(e);
            }
            Err(_) => {
                self.connection = None;
                return Err(format!("no reply within {:?}", self.timeout));
            }
        };
        if !status.is_success() {
            return Err(http_error(status, &body));
        }
        let reply: Reply<'_> =
            serde_json::from_slice(&body).map_err(|e| format!("reply is not Transit JSON: {e}"))?;
        let data = reply.data.ok_or("reply without data")?;
        match self.plan.mode {
            Mode::Unary => {
                if data.ciphertext.is_some() || data.plaintext.is_some() {
                    Ok(Outcome::ONE)
                } else {
                    Err("reply without a result".into())
                }
            }
            Mode::Batch | Mode::Stream => {
                let results = data.batch_results.ok_or("reply without batch_results")?;
                let expected = self.plan.batch;
                if results.len() != expected {
                    return Err(format!(
                        "{expected} items answered with {} results",
                        results.len()
                    ));
                }
                let mut first_error = None;
                let errors = results
                    .iter()
                    .filter(|r| match r.error.as_ref().map(Text::as_str) {
                        Some(e) if !e.is_empty() => {
                            first_error.get_or_insert_with(|| e.to_owned());
                            true
                        }
                        _ => false,
                    })
                    .count();
                if errors == expected {
                    return Err(format!(
                        "every item failed: {}",
                        first_error.unwrap_or_default()
                    ));
                }
                Ok(Outcome {
                    items: (expected - errors) as u64,
                    item_errors: errors as u64,
                })
            }
        }
    }
}

/// The parts of a Transit reply the generator looks at.
#[derive(Debug, Deserialize)]
struct Reply<'a> {
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
}

#[derive(Debug, Deserialize)]
struct Data<'a> {
    #[serde(borrow, default)]
    ciphertext: Option<Text<'a>>,
    #[serde(borrow, default)]
    plaintext: Option<Text<'a>>,
    #[serde(borrow, default)]
    batch_results: Option<Vec<Item<'a>>>,
}

#[derive(Debug, Deserialize)]
struct Item<'a> {
    #[serde(borrow, default)]
    ciphertext: Option<Text<'a>>,
    #[serde(borrow, default)]
    error: Option<Text<'a>>,
}

/// A JSON string, borrowed from the body unless it has escapes. (serde borrows a
/// `Cow` only when it is the field's whole type, not inside an `Option`, hence the
/// newtype.)
#[derive(Debug, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// Setup calls: one fresh connection each, not timed.
struct Setup {
    addr: SocketAddr,
    token: HeaderValue,
    timeout: Duration,
}

impl Setup {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = path.parse()?;
        let headers = request.headers_mut();
        headers.insert(HOST, HeaderValue::from_str(&self.addr.to_string())?);
        headers.insert(TOKEN_HEADER, self.token.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let exchange = async {
            let mut connection = connect(self.addr).await.map_err(anyhow::Error::msg)?;
            let response = connection.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .with_context(|| format!("{path}: no reply within {:?}", self.timeout))?
    }

    /// Polls `/v1/sys/health` until it answers 200 (initialized, unsealed, active).
    async fn wait_ready(&self, wait: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let last = match self.call(Method::GET, "/v1/sys/health", Bytes::new()).await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                Ok((status, _)) => format!("health: HTTP {status}"),
                Err(e) => format!("{e:#}"),
            };
            if std::time::Instant::now() >= deadline {
                bail!("OpenBao at {} not ready after {wait:?}: {last}", self.addr);
            }
            // Poll interval between readiness checks, not a guess at start-up time.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn create_keys(&self, names: &[String], key_type: &str) -> anyhow::Result<()> {
        let body = Bytes::from(serde_json::to_vec(
            &serde_json::json!({ "type": key_type }),
        )?);
        for name in names {
            let (status, reply) = self
                .call(
                    Method::POST,
                    &format!("/v1/transit/keys/{name}"),
                    body.clone(),
                )
                .await?;
            if !status.is_success() {
                bail!("creating key {name}: {}", http_error(status, &reply));
            }
        }
        Ok(())
    }
}

/// JSON items: plaintexts for encrypt (shared by every key); for decrypt and
/// rewrap, ciphertexts made by OpenBao under each key.
async fn build_pool(args: &Args, bao: &Setup, keys: &[String]) -> anyhow::Result<Pool> {
    let as_item =
        |field: &str, value: &str| leak(format!("{{\"{field}\":\"{value}\"}}").into_bytes());
    let sources = plaintexts(per_key(args.pool, keys.len()), args.size);
    let encoded: Vec<String> = sources.iter().map(|p| STANDARD.encode(p)).collect();
    if args.op == Op::Encrypt {
        let all = plaintexts(args.pool, args.size);
        return Pool::new(vec![
            all.iter()
                .map(|p| as_item("plaintext", &STANDARD.encode(p)))
                .collect(),
        ]);
    }
    eprintln!(
        "cipherd-bench: encrypting {} payload(s) of {} B under each of {} key(s) for {}",
        encoded.len(),
        args.size,
        keys.len(),
        args.op.name()
    );
    let encoded: Arc<[String]> = encoded.into();
    let keys: Arc<[String]> = keys.into();
    let setup = Arc::new(Setup {
        addr: bao.addr,
        token: bao.token.clone(),
        timeout: bao.timeout,
    });
    let lists = map_concurrent(keys.len(), SETUP_CONCURRENCY, |k| {
        let encoded = Arc::clone(&encoded);
        let keys = Arc::clone(&keys);
        let setup = Arc::clone(&setup);
        async move {
            let mut out = Vec::with_capacity(encoded.len());
            for chunk in encoded.chunks(SETUP_CHUNK) {
                let items: Vec<_> = chunk
                    .iter()
                    .map(|p| serde_json::json!({ "plaintext": p }))
                    .collect();
                let body = serde_json::to_vec(&serde_json::json!({ "batch_input": items }))?;
                let (status, reply) = setup
                    .call(
                        Method::POST,
                        &format!("/v1/transit/encrypt/{}", keys[k]),
                        Bytes::from(body),
                    )
                    .await?;
                if !status.is_success() {
                    bail!("encrypting the pool: {}", http_error(status, &reply));
                }
                let reply: Reply<'_> = serde_json::from_slice(&reply)?;
                let results = reply
                    .data
                    .and_then(|d| d.batch_results)
                    .context("pool: reply without batch_results")?;
                anyhow::ensure!(results.len() == chunk.len(), "pool: wrong result count");
                for r in results {
                    match (r.ciphertext, r.error) {
                        (_, Some(e)) if !e.as_str().is_empty() => {
                            bail!("encrypting the pool: {}", e.as_str())
                        }
                        (Some(c), _) => out.push(c.0.into_owned()),
                        _ => bail!("pool: result without ciphertext"),
                    }
                }
            }
            Ok(out)
        }
    })
    .await?;
    Pool::new(
        lists
            .into_iter()
            .map(|list| list.iter().map(|c| as_item("ciphertext", c)).collect())
            .collect(),
    )
}

async fn connect(addr: SocketAddr) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
    // The connection task ends when the sender is dropped or the server closes.
    tokio::spawn(connection);
    Ok(sender)
}

fn token_header(token: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(token).context("token is not a valid header value")?;
    value.set_sensitive(true);
    Ok(value)
}

/// An HTTP error with OpenBao's `errors` list, if the body has one.
fn http_error(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => format!("HTTP {status}: {}", e.errors.join("; ")),
        _ => format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_counted_without_copying() {
        let body =
            br#"{"data":{"batch_results":[{"ciphertext":"vault:v1:AA=="},{"error":"bad \"x\""}]}}"#;
        let reply: Reply<'_> = serde_json::from_slice(body).unwrap();
        let results = reply.data.unwrap().batch_results.unwrap();
        assert!(matches!(
            results[0].ciphertext,
            Some(Text(Cow::Borrowed(_)))
        ));
        assert_eq!(
            results[1].error.as_ref().map(Text::as_str),
            Some("bad \"x\"")
        );
        assert_eq!(
            http_error(StatusCode::BAD_REQUEST, br#"{"errors":["no key"]}"#),
            "HTTP 400 Bad Request: no key"
        );
    }

    #[test]
    fn batch_bodies_are_json() {
        let items = vec![
            leak(br#"{"plaintext":"AA=="}"#.to_vec()),
            leak(br#"{"plaintext":"AQ=="}"#.to_vec()),
        ];
        let plan = Plan {
            mode: Mode::Batch,
            batch: 3,
            uris: vec!["/v1/transit/encrypt/k".parse().unwrap()],
            host: HeaderValue::from_static("127.0.0.1:1"),
            token: HeaderValue::from_static("root"),
            pool: Pool::new(vec![items]).unwrap(),
        };
        let request = plan.request(0);
        assert_eq!(request.uri().path(), "/v1/transit/encrypt/k");
        let body = futures_body(request);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["batch_input"].as_array().unwrap().len(), 3);
    }

    fn futures_body(request: Request<Full<Bytes>>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { request.into_body().collect().await.unwrap().to_bytes() })
    }
}
