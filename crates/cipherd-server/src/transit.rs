//! The `cipherd.v1.TransitService` service: encrypt, decrypt, rewrap (single,
//! batch and stream) and data keys.
//!
//! One request path per operation: every RPC of an operation goes through the
//! same `*_job` function, which checks what concerns the whole request (key name,
//! encoding, item count, the size of the reply), finds the key and reserves
//! encryptions, and returns a [`BatchJob`] whose per-item work does the crypto
//! through `cipherd-core`. A single call is a batch of one item whose failure is
//! the call's status; a stream chunk is a batch. Batch replies hold exactly one
//! result per item, in order; an item's failure is reported in its own result
//! (invariant 6).
//!
//! What this module does not do: choose status codes (`error.rs`), manage keys or
//! usage counters (`keys.rs`), or limit connections and request bytes (the edge
//! layers in front of it).

use std::{future::Future, slice, sync::Arc};

use bytes::Bytes;
use cipherd_core::{
    aead::{Opener, Sealer},
    ciphertext::{self, Ciphertext, Encoding},
    keyring::{KeyName, KeyVersion},
    secret::SecretBytes,
};
use cipherd_proto::v1::{
    self as pb, CiphertextEncoding, ciphertext_result, plaintext_result,
    transit_service_server::TransitService,
};
use rayon::iter::{IntoParallelIterator as _, ParallelIterator as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use zeroize::Zeroizing;

use crate::{
    access::{self, CallCtx},
    auth::{policy::Operation, state::AuthState},
    config::Limits,
    error::{Error, Result},
    keys::{KeyManager, LoadedKey},
    seal::Core,
};

/// The implementation of the `TransitService` gRPC service.
#[derive(Debug, Clone)]
pub struct TransitHandler {
    core: Arc<Core>,
}

impl TransitHandler {
    /// A service over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    fn limits(&self) -> &Limits {
        &self.core.params().limits
    }

    /// Everything an encryption of `items` needs before the per-item work: the key,
    /// the version with `items.len()` encryptions reserved under it, and the checks
    /// that concern the whole request. Single calls, batches, streams and data keys
    /// all come through here.
    #[allow(clippy::too_many_arguments)]
    async fn encrypt_job(
        &self,
        ctx: &CallCtx,
        access: (Operation, &str, &str),
        key: &str,
        key_version: Option<u32>,
        encoding: i32,
        items: &[pb::EncryptItem],
    ) -> Result<EncryptJob> {
        let unsealed = self.core.unsealed()?;
        let name = key_name(key)?;
        let (operation, purpose, reason) = access;
        ctx.authorize(operation, Some(name.as_str()), purpose, reason)?;
        note_inputs(
            ctx,
            &unsealed.auth,
            items.iter().map(|i| (i.reference.as_str(), &i.context[..])),
        );
        let encoding = parse_encoding(encoding)?;
        let limits = *self.limits();
        check_request(
            &limits,
            items
                .iter()
                .map(|i| (i.reference.len(), sealed_len(i.plaintext.len(), encoding))),
        )?;
        let requested = key_version
            .map(KeyVersion::new)
            .transpose()
            .map_err(Error::from)?;
        let (key, version) = unsealed
            .keys
            .reserve_encryptions(&name, requested, items.len() as u64)
            .await?;
        Ok(EncryptJob {
            key,
            version,
            encoding,
            limits,
        })
    }

    /// The source key of a decryption of `items`, reloaded once if any item names
    /// a version newer than the cached copy knows.
    async fn decrypt_job(
        &self,
        ctx: &CallCtx,
        (purpose, reason): (&str, &str),
        key: &str,
        items: &[pb::DecryptItem],
    ) -> Result<DecryptJob> {
        let unsealed = self.core.unsealed()?;
        let name = key_name(key)?;
        ctx.authorize(Operation::Decrypt, Some(name.as_str()), purpose, reason)?;
        note_inputs(
            ctx,
            &unsealed.auth,
            items.iter().map(|i| (i.reference.as_str(), &i.context[..])),
        );
        let limits = *self.limits();
        // A plaintext is never longer than its ciphertext.
        check_request(
            &limits,
            items
                .iter()
                .map(|i| (i.reference.len(), i.ciphertext.len())),
        )?;
        let key = source_key(
            &unsealed.keys,
            &name,
            items.iter().map(|i| i.ciphertext.as_ref()),
        )
        .await?;
        Ok(DecryptJob { key, limits })
    }

    /// The source key (as for decryption) and the destination key and version
    /// (as for encryption) of a rewrap of `items`.
    ///
    /// Needs `rewrap` on the source and, for another destination, `encrypt` on it;
    /// into an exportable destination also `decrypt` on the source (else rewrap
    /// would move data under material the caller can export).
    #[allow(clippy::too_many_arguments)]
    async fn rewrap_job(
        &self,
        ctx: &CallCtx,
        (purpose, reason): (&str, &str),
        key: &str,
        destination_key: &str,
        encoding: i32,
        items: &[pb::RewrapItem],
    ) -> Result<RewrapJob> {
        let unsealed = self.core.unsealed()?;
        let source_name = key_name(key)?;
        let dest_name = if destination_key.is_empty() {
            source_name.clone()
        } else {
            key_name(destination_key)?
        };
        ctx.authorize(
            Operation::Rewrap,
            Some(source_name.as_str()),
            purpose,
            reason,
        )?;
        if dest_name != source_name {
            ctx.authorize(Operation::Encrypt, Some(dest_name.as_str()), "", "")?;
        }
        note_inputs(
            ctx,
            &unsealed.auth,
            items.iter().map(|i| (i.reference.as_str(), &i.context[..])),
        );
        let encoding = parse_encoding(encoding)?;
        let limits = *self.limits();
        check_request(
            &limits,
            items
                .iter()
                .map(|i| (i.reference.len(), sealed_len(i.ciphertext.len(), encoding))),
        )?;
        let source = source_key(
            &unsealed.keys,
            &source_name,
            items.iter().map(|i| i.ciphertext.as_ref()),
        )
        .await?;
        let caller = ctx.caller()?;
        if dest_name != source_name
            && unsealed.keys.get(&dest_name).await?.key().exportable()
            && !caller.may_with(Operation::Decrypt, source_name.as_str(), purpose, reason)
        {
            tracing::warn!(
                principal = %caller.principal,
                source = %source_name,
                destination = %dest_name,
                "refused a rewrap into an exportable key without decrypt on the source"
            );
            return Err(Error::PermissionDenied);
        }
        // "Version below the minimum" is told only to callers who may decrypt.
        let may_decrypt =
            caller.may_with(Operation::Decrypt, source_name.as_str(), purpose, reason);
        let (dest, version) = unsealed
            .keys
            .reserve_encryptions(&dest_name, None, items.len() as u64)
            .await?;
        Ok(RewrapJob {
            source,
            dest,
            version,
            encoding,
            limits,
            may_decrypt,
        })
    }

    async fn batch_encrypt_chunk(
        &self,
        ctx: &CallCtx,
        r: pb::BatchEncryptRequest,
    ) -> Result<pb::BatchEncryptResponse> {
        let job = self
            .encrypt_job(
                ctx,
                (Operation::Encrypt, "", ""),
                &r.key,
                r.key_version,
                r.encoding,
                &r.items,
            )
            .await?;
        let results = map_items(job, r.items).await?;
        note_ciphertexts(ctx, &results);
        Ok(pb::BatchEncryptResponse { results })
    }

    async fn batch_decrypt_chunk(
        &self,
        ctx: &CallCtx,
        r: pb::BatchDecryptRequest,
    ) -> Result<pb::BatchDecryptResponse> {
        let job = self
            .decrypt_job(ctx, (&r.purpose, &r.reason), &r.key, &r.items)
            .await?;
        let results = map_items(job, r.items).await?;
        note_outputs(
            ctx,
            results.iter().map(|r| {
                (
                    matches!(r.result, Some(plaintext_result::Result::Plaintext(_))),
                    r.key_version,
                )
            }),
        );
        Ok(pb::BatchDecryptResponse { results })
    }

    async fn batch_rewrap_chunk(
        &self,
        ctx: &CallCtx,
        r: pb::BatchRewrapRequest,
    ) -> Result<pb::BatchRewrapResponse> {
        let job = self
            .rewrap_job(
                ctx,
                (&r.purpose, &r.reason),
                &r.key,
                &r.destination_key,
                r.encoding,
                &r.items,
            )
            .await?;
        let results = map_items(job, r.items).await?;
        note_ciphertexts(ctx, &results);
        Ok(pb::BatchRewrapResponse { results })
    }
}

#[tonic::async_trait]
impl TransitService for TransitHandler {
    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let item = pb::EncryptItem {
            plaintext: r.plaintext,
            associated_data: r.associated_data,
            context: r.context,
            reference: String::new(),
        };
        let job = self
            .encrypt_job(
                &ctx,
                (Operation::Encrypt, "", ""),
                &r.key,
                r.key_version,
                r.encoding,
                slice::from_ref(&item),
            )
            .await?;
        ctx.fields().versions.push(job.version.get());
        let ciphertext = job.run_one(item)?;
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: ciphertext.into(),
            key_version: job.version.get(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let item = pb::DecryptItem {
            ciphertext: r.ciphertext,
            associated_data: r.associated_data,
            context: r.context,
            reference: String::new(),
        };
        let job = self
            .decrypt_job(
                &ctx,
                (&r.purpose, &r.reason),
                &r.key,
                slice::from_ref(&item),
            )
            .await?;
        if let Some(v) = ciphertext::claimed_version(&item.ciphertext) {
            ctx.fields().versions.push(v.get());
        }
        let (plaintext, version) = job.run_one(item)?;
        Ok(Response::new(pb::DecryptResponse {
            plaintext,
            key_version: version.get(),
        }))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let item = pb::RewrapItem {
            ciphertext: r.ciphertext,
            associated_data: r.associated_data,
            context: r.context,
            reference: String::new(),
            destination_context: r.destination_context,
        };
        let job = self
            .rewrap_job(
                &ctx,
                (&r.purpose, &r.reason),
                &r.key,
                &r.destination_key,
                r.encoding,
                slice::from_ref(&item),
            )
            .await?;
        {
            let mut f = ctx.fields();
            f.versions
                .extend(ciphertext::claimed_version(&item.ciphertext).map(KeyVersion::get));
            f.versions.push(job.version.get());
        }
        let ciphertext = job.run_one(item)?;
        Ok(Response::new(pb::RewrapResponse {
            ciphertext: ciphertext.into(),
            key_version: job.version.get(),
        }))
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        Ok(Response::new(
            self.batch_encrypt_chunk(&ctx, request.into_inner()).await?,
        ))
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        Ok(Response::new(
            self.batch_decrypt_chunk(&ctx, request.into_inner()).await?,
        ))
    }

    async fn batch_rewrap(
        &self,
        request: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        Ok(Response::new(
            self.batch_rewrap_chunk(&ctx, request.into_inner()).await?,
        ))
    }

    type EncryptStreamStream = ChunkStream<pb::EncryptStreamResponse>;
    type DecryptStreamStream = ChunkStream<pb::DecryptStreamResponse>;
    type RewrapStreamStream = ChunkStream<pb::RewrapStreamResponse>;

    async fn encrypt_stream(
        &self,
        request: Request<Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        // A chunk has the batch message's fields: one implementation for both.
        let ctx = CallCtx::of(&request)?;
        ctx.fields().operation = Operation::Encrypt.as_str();
        Ok(Response::new(serve_chunks(
            self.clone(),
            ctx,
            request.into_inner(),
            |svc, ctx, chunk| async move {
                svc.batch_encrypt_chunk(&ctx, chunk.into())
                    .await
                    .map(Into::into)
            },
        )))
    }

    async fn decrypt_stream(
        &self,
        request: Request<Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.fields().operation = Operation::Decrypt.as_str();
        Ok(Response::new(serve_chunks(
            self.clone(),
            ctx,
            request.into_inner(),
            |svc, ctx, chunk| async move {
                svc.batch_decrypt_chunk(&ctx, chunk.into())
                    .await
                    .map(Into::into)
            },
        )))
    }

    async fn rewrap_stream(
        &self,
        request: Request<Streaming<pb::RewrapStreamRequest>>,
    ) -> Result<Response<Self::RewrapStreamStream>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.fields().operation = Operation::Rewrap.as_str();
        Ok(Response::new(serve_chunks(
            self.clone(),
            ctx,
            request.into_inner(),
            |svc, ctx, chunk| async move {
                svc.batch_rewrap_chunk(&ctx, chunk.into())
                    .await
                    .map(Into::into)
            },
        )))
    }

    /// An encryption of a fresh random key: the same path as `Encrypt`, with the
    /// plaintext made here and, unless `wrapped_only`, returned.
    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let bytes = match r.bits {
            0 | 256 => 32,
            128 => 16,
            512 => 64,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "bits must be 128, 256 or 512 (got {other})"
                ))
                .into());
            }
        };
        let data_key = SecretBytes::random(bytes).map_err(Error::from)?;
        // Deliberate: the data key is the caller's to use; it is wiped from this
        // process's buffers once the reply is encoded (see `zeroizing_bytes`).
        let data_key = zeroizing_bytes(data_key.expose_secret().to_vec());
        let item = pb::EncryptItem {
            plaintext: data_key.clone(),
            associated_data: r.associated_data,
            context: r.context,
            reference: String::new(),
        };
        let job = self
            .encrypt_job(
                &ctx,
                (Operation::Datakey, &r.purpose, &r.reason),
                &r.key,
                None,
                r.encoding,
                slice::from_ref(&item),
            )
            .await?;
        ctx.fields().versions.push(job.version.get());
        let wrapped = job.run_one(item)?;
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext: if r.wrapped_only {
                Bytes::new()
            } else {
                data_key
            },
            ciphertext: wrapped.into(),
            key_version: job.version.get(),
        }))
    }
}

/// The response stream of a streaming RPC: one message per request chunk.
pub type ChunkStream<T> = ReceiverStream<Result<T, Status>>;

/// Chunks answered ahead of the client reading them; beyond this the server stops
/// reading requests, so HTTP/2 flow control pushes back on the client.
pub const STREAM_CHUNKS_IN_FLIGHT: usize = 4;

/// Processes a request stream chunk by chunk, in order, answering each chunk with
/// one response. A chunk-level error ends the stream with that status.
///
/// Each chunk is authorized and audited on its own (a `chunk` record, written
/// before the chunk's reply is sent); a chunk whose record no sink takes ends the
/// stream with UNAVAILABLE / `AUDIT_UNAVAILABLE`.
fn serve_chunks<Req, Resp, F, Fut>(
    service: TransitHandler,
    call: Arc<CallCtx>,
    mut requests: Streaming<Req>,
    handle: F,
) -> ChunkStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(TransitHandler, Arc<CallCtx>, Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp>> + Send,
{
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS_IN_FLIGHT);
    // The reader outlives this call: it carries the request's span (and with it
    // the request id) along.
    let task = async move {
        loop {
            let chunk = match requests.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let ctx = Arc::new(call.child());
            let reply = match ctx.auditor().ready() {
                Ok(()) => handle(service.clone(), Arc::clone(&ctx), chunk).await,
                Err(e) => Err(e),
            };
            let outcome = match &reply {
                Ok(_) => access::OK,
                Err(e) => access::outcome_of(e),
            };
            let reply = match ctx.auditor().record(ctx.record("chunk", outcome)).await {
                Ok(()) => reply.map_err(Status::from),
                Err(e) => Err(Status::from(e)),
            };
            let failed = reply.is_err();
            if tx.send(reply).await.is_err() || failed {
                return;
            }
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    ReceiverStream::new(rx)
}

/// Refuses a request whose items are more than `limits.max_batch_items`, or whose
/// reply could exceed `limits.max_message_bytes`, before any work is done, so that
/// a batch is never computed and then lost on the size of its own reply. `items`
/// yields each item's reference length and the largest value (ciphertext or
/// plaintext) its result can carry; an error result is bounded by
/// [`ITEM_ERROR_BOUND`].
fn check_request(
    limits: &Limits,
    items: impl ExactSizeIterator<Item = (usize, usize)>,
) -> Result<()> {
    if items.len() > limits.max_batch_items {
        return Err(Error::TooLarge {
            what: "batch",
            actual: items.len(),
            limit: limits.max_batch_items,
            unit: "items",
            setting: "limits.max_batch_items",
        });
    }
    let bound = items.fold(GRPC_FRAME_PREFIX, |total, (reference, value)| {
        total.saturating_add(
            reference
                .saturating_add(value.max(ITEM_ERROR_BOUND))
                .saturating_add(RESULT_FRAMING),
        )
    });
    if bound > limits.max_message_bytes {
        return Err(Error::TooLarge {
            what: "the largest possible reply",
            actual: bound,
            limit: limits.max_message_bytes,
            unit: "bytes",
            setting: "limits.max_message_bytes",
        });
    }
    Ok(())
}

/// The gRPC message prefix (compressed flag and length).
const GRPC_FRAME_PREFIX: usize = 5;

/// Protobuf framing of one batch result beyond its payloads: the repeated field's
/// tag and length, the reference's and the value's tags and lengths, and the key
/// version field (each at most one tag byte and a five-byte varint).
const RESULT_FRAMING: usize = 4 * 6;

/// The largest encoded `google.rpc.Status` of a failed item: item messages are cut
/// to [`crate::error::MAX_ITEM_MESSAGE`] bytes, and the rest (code, ErrorInfo with its
/// reason, domain and metadata) is far below the remaining room.
const ITEM_ERROR_BOUND: usize = 2 * crate::error::MAX_ITEM_MESSAGE;

/// The longest ciphertext a plaintext (or body) of `len` bytes can seal to under
/// any key type, in `encoding`.
fn sealed_len(len: usize, encoding: Encoding) -> usize {
    let body = len.saturating_add(MAX_NONCE_LEN + TAG_LEN);
    match encoding {
        Encoding::Binary => body.saturating_add(ciphertext::HEADER_LEN),
        // `cipherd:v` + up to 10 version digits + `:` + padded base64 of the body.
        Encoding::Text => body.div_ceil(3).saturating_mul(4).saturating_add(20),
    }
}

/// The longest nonce and the tag of every key type.
const MAX_NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The key to decrypt `ciphertexts` with: the cached copy, reloaded once if one of
/// them names a version newer than it knows (another replica may have rotated).
async fn source_key<'a>(
    keys: &KeyManager,
    name: &KeyName,
    ciphertexts: impl Iterator<Item = &'a [u8]>,
) -> Result<Arc<LoadedKey>> {
    let key = keys.get(name).await?;
    let key = match ciphertexts.filter_map(ciphertext::claimed_version).max() {
        Some(newest) => keys.reload_for_version(name, key, newest).await?,
        None => key,
    };
    key.check_usable()?;
    Ok(key)
}

/// Plaintext bytes for a reply that are zeroized when the last reference to them
/// drops, i.e. once tonic has encoded the reply. (tonic's own encode buffer is a
/// copy this process does not control; see docs/threat-model.md.)
fn zeroizing_bytes(plaintext: Vec<u8>) -> Bytes {
    Bytes::from_owner(Zeroizing::new(plaintext))
}

/// Batches whose items carry at least this many bytes are split across cores.
/// Below it, handing the batch to the rayon pool and back costs more than the
/// crypto saves (measured: 400 × 64 B ran faster inline on 2 cores).
const PARALLEL_MIN_BYTES: usize = 128 << 10;

/// The per-item work of one operation (encrypt, decrypt, rewrap), shared by the
/// single, batch and stream RPCs: [`BatchJob::run_one`] for a single call,
/// [`map_items`] for a batch or a stream chunk.
///
/// Each worker (one per rayon task, or one for an inline batch) gets its own
/// state, a [`Sealer`]/[`Opener`], so the XAES and XChaCha subkey derivation is
/// shared by the items a worker handles.
trait BatchJob: Send + Sync + 'static {
    /// One request item.
    type Item: Send + 'static;
    /// What a successful item produces.
    type Value;
    /// An item's entry in a batch reply.
    type Output: Send + 'static;
    /// State one worker keeps across its items.
    type Worker<'a>;

    /// Fresh state for a worker.
    fn worker(&self) -> Self::Worker<'_>;

    /// The payload size of an item (decides whether the batch is split).
    fn item_bytes(item: &Self::Item) -> usize;

    /// Processes one item.
    fn process<'a>(
        &'a self,
        worker: &mut Self::Worker<'a>,
        item: &Self::Item,
    ) -> Result<Self::Value>;

    /// The batch-reply entry of `item`, whose processing gave `outcome`; a failure
    /// becomes that item's own status and never fails the batch (invariant 6).
    fn output(&self, item: Self::Item, outcome: Result<Self::Value>) -> Self::Output;

    /// Processes the one item of a single (non-batch) call.
    fn run_one(&self, item: Self::Item) -> Result<Self::Value> {
        let mut worker = self.worker();
        self.process(&mut worker, &item)
    }
}

/// Runs `job` over every item, in order. Large batches run on the rayon pool (all
/// cores, order preserved by the indexed collect) so that the async workers stay
/// free for network I/O; small ones run inline, where a thread hand-off would cost
/// more than the crypto.
async fn map_items<J: BatchJob>(job: J, items: Vec<J::Item>) -> Result<Vec<J::Output>> {
    let bytes: usize = items.iter().map(J::item_bytes).sum();
    if items.len() < 2 || bytes < PARALLEL_MIN_BYTES {
        let mut worker = job.worker();
        return Ok(items
            .into_iter()
            .map(|item| {
                let outcome = job.process(&mut worker, &item);
                job.output(item, outcome)
            })
            .collect());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let results: Vec<J::Output> = items
            .into_par_iter()
            .map_init(
                || job.worker(),
                |worker, item| {
                    let outcome = job.process(worker, &item);
                    job.output(item, outcome)
                },
            )
            .collect();
        let _ = tx.send(results);
    });
    // The sender is dropped without sending only if the job panicked.
    rx.await
        .map_err(|_| Error::Internal("batch worker panicked".into()))
}

struct EncryptJob {
    key: Arc<LoadedKey>,
    version: KeyVersion,
    encoding: Encoding,
    limits: Limits,
}

impl BatchJob for EncryptJob {
    type Item = pb::EncryptItem;
    type Value = Vec<u8>;
    type Output = pb::CiphertextResult;
    type Worker<'a> = Option<Sealer<'a>>;

    fn worker(&self) -> Option<Sealer<'_>> {
        batch_sealer(&self.key, self.version)
    }

    fn item_bytes(item: &pb::EncryptItem) -> usize {
        item.plaintext.len()
    }

    fn process<'a>(
        &'a self,
        sealer: &mut Option<Sealer<'a>>,
        item: &pb::EncryptItem,
    ) -> Result<Vec<u8>> {
        self.limits
            .check_item(&item.plaintext, &item.associated_data, &item.context)?;
        seal_item(
            sealer,
            &self.key,
            self.version,
            &item.context,
            &item.associated_data,
            &item.plaintext,
            self.encoding,
        )
    }

    fn output(&self, item: pb::EncryptItem, outcome: Result<Vec<u8>>) -> pb::CiphertextResult {
        ciphertext_result(item.reference, outcome, self.version)
    }
}

struct DecryptJob {
    key: Arc<LoadedKey>,
    limits: Limits,
}

impl BatchJob for DecryptJob {
    type Item = pb::DecryptItem;
    type Value = (Bytes, KeyVersion);
    type Output = pb::PlaintextResult;
    type Worker<'a> = Openers<'a>;

    fn worker(&self) -> Openers<'_> {
        Openers::default()
    }

    fn item_bytes(item: &pb::DecryptItem) -> usize {
        item.ciphertext.len()
    }

    fn process<'a>(
        &'a self,
        openers: &mut Openers<'a>,
        item: &pb::DecryptItem,
    ) -> Result<(Bytes, KeyVersion)> {
        self.limits
            .check_item(b"", &item.associated_data, &item.context)?;
        let ct = Ciphertext::parse(&item.ciphertext).map_err(Error::from)?;
        let plaintext = openers.open(&self.key, &ct, &item.context, &item.associated_data)?;
        Ok((zeroizing_bytes(plaintext), ct.version()))
    }

    fn output(
        &self,
        item: pb::DecryptItem,
        outcome: Result<(Bytes, KeyVersion)>,
    ) -> pb::PlaintextResult {
        let (result, key_version) = match outcome {
            Ok((plaintext, version)) => (
                plaintext_result::Result::Plaintext(plaintext),
                version.get(),
            ),
            Err(e) => (
                plaintext_result::Result::Error(e.to_rpc_status()),
                // The version the ciphertext claims, when it parses: it tells an
                // operator which version a failing row names.
                ciphertext::claimed_version(&item.ciphertext).map_or(0, KeyVersion::get),
            ),
        };
        pb::PlaintextResult {
            reference: item.reference,
            result: Some(result),
            key_version,
        }
    }
}

struct RewrapJob {
    source: Arc<LoadedKey>,
    dest: Arc<LoadedKey>,
    version: KeyVersion,
    encoding: Encoding,
    limits: Limits,
    /// Whether the caller may decrypt with the source key: if not, an item under
    /// a version below the minimum is PERMISSION_DENIED like any denied call.
    may_decrypt: bool,
}

impl BatchJob for RewrapJob {
    type Item = pb::RewrapItem;
    type Value = Vec<u8>;
    type Output = pb::CiphertextResult;
    type Worker<'a> = (Openers<'a>, Option<Sealer<'a>>);

    fn worker(&self) -> (Openers<'_>, Option<Sealer<'_>>) {
        (Openers::default(), batch_sealer(&self.dest, self.version))
    }

    fn item_bytes(item: &pb::RewrapItem) -> usize {
        // Rewrap does two AEAD passes per byte.
        2 * item.ciphertext.len()
    }

    fn process<'a>(
        &'a self,
        (openers, sealer): &mut (Openers<'a>, Option<Sealer<'a>>),
        item: &pb::RewrapItem,
    ) -> Result<Vec<u8>> {
        self.limits
            .check_item(b"", &item.associated_data, &item.context)?;
        self.limits.check_context(item.destination_context.len())?;
        let ct = Ciphertext::parse(&item.ciphertext).map_err(Error::from)?;
        let plain = SecretBytes::new(
            openers
                .open(&self.source, &ct, &item.context, &item.associated_data)
                .map_err(|e| match e {
                    Error::FailedPrecondition(_) if !self.may_decrypt => Error::PermissionDenied,
                    e => e,
                })?,
        );
        let context = if item.destination_context.is_empty() {
            &item.context
        } else {
            &item.destination_context
        };
        seal_item(
            sealer,
            &self.dest,
            self.version,
            context,
            &item.associated_data,
            plain.expose_secret(),
            self.encoding,
        )
    }

    fn output(&self, item: pb::RewrapItem, outcome: Result<Vec<u8>>) -> pb::CiphertextResult {
        ciphertext_result(item.reference, outcome, self.version)
    }
}

/// A batch sealer for a non-derived key's version (derived keys seal per item:
/// each item's context gives it its own key).
fn batch_sealer(key: &LoadedKey, version: KeyVersion) -> Option<Sealer<'_>> {
    key.prepared(version).and_then(|aead| aead.sealer().ok())
}

/// Seals one item with the worker's sealer when it applies (non-derived key, no
/// context), else per item (derived keys; and a context on a non-derived key, which
/// `seal` rejects with the right error).
fn seal_item(
    sealer: &mut Option<Sealer<'_>>,
    key: &LoadedKey,
    version: KeyVersion,
    context: &[u8],
    associated_data: &[u8],
    plaintext: &[u8],
    encoding: Encoding,
) -> Result<Vec<u8>> {
    match sealer {
        Some(sealer) if context.is_empty() => Ok(ciphertext::seal_with(
            sealer,
            version,
            associated_data,
            plaintext,
            encoding,
        )?),
        _ => seal(key, version, context, associated_data, plaintext, encoding),
    }
}

/// One [`Opener`] per key version seen by a worker (usually one), for non-derived
/// keys; derived keys open per item. Counts the worker's successful decryptions
/// per version and adds them to the key's use statistics when dropped (one lock
/// per worker, not per item).
#[derive(Default)]
struct Openers<'a> {
    by_version: Vec<(KeyVersion, Opener<'a>)>,
    opened: Vec<(KeyVersion, u64)>,
    key: Option<&'a LoadedKey>,
}

impl Drop for Openers<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            for &(version, n) in &self.opened {
                key.uses().note(version, 0, n);
            }
        }
    }
}

impl<'a> Openers<'a> {
    fn open(
        &mut self,
        key: &'a LoadedKey,
        ct: &Ciphertext<'_>,
        context: &[u8],
        associated_data: &[u8],
    ) -> Result<Vec<u8>> {
        let version = ct.version();
        let plaintext = match key.prepared(version) {
            Some(prepared) if context.is_empty() => {
                key.key()
                    .check_decryption_version(version)
                    .map_err(opaque_version)?;
                let at = match self.by_version.iter().position(|(v, _)| *v == version) {
                    Some(at) => at,
                    None => {
                        self.by_version.push((version, prepared.opener()));
                        self.by_version.len() - 1
                    }
                };
                let opener = &mut self.by_version[at].1;
                ciphertext::open_with(opener, ct, associated_data).map_err(opaque_version)?
            }
            _ => open(key, ct, context, associated_data)?,
        };
        self.key = Some(key);
        match self.opened.iter_mut().find(|(v, _)| *v == version) {
            Some((_, n)) => *n += 1,
            None => self.opened.push((version, 1)),
        }
        Ok(plaintext)
    }
}

/// Parses a key name from a request field.
pub(crate) fn key_name(name: &str) -> Result<KeyName> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("key name is required".into()));
    }
    Ok(KeyName::new(name)?)
}

fn parse_encoding(value: i32) -> Result<Encoding> {
    match CiphertextEncoding::try_from(value) {
        Ok(CiphertextEncoding::Unspecified | CiphertextEncoding::Binary) => Ok(Encoding::Binary),
        Ok(CiphertextEncoding::Text) => Ok(Encoding::Text),
        Err(_) => Err(Error::InvalidArgument(format!(
            "unknown ciphertext encoding {value}"
        ))),
    }
}

fn seal(
    key: &LoadedKey,
    version: KeyVersion,
    context: &[u8],
    associated_data: &[u8],
    plaintext: &[u8],
    encoding: Encoding,
) -> Result<Vec<u8>> {
    let aead = key.working_key(version, context)?;
    Ok(ciphertext::seal(
        &aead,
        version,
        associated_data,
        plaintext,
        encoding,
    )?)
}

fn open(
    key: &LoadedKey,
    ct: &Ciphertext<'_>,
    context: &[u8],
    associated_data: &[u8],
) -> Result<Vec<u8>> {
    key.key()
        .check_decryption_version(ct.version())
        .map_err(opaque_version)?;
    let aead = key.working_key(ct.version(), context)?;
    ciphertext::open(&aead, ct, associated_data).map_err(opaque_version)
}

/// A ciphertext naming a version this key does not have is indistinguishable from
/// a forged one: the same opaque error as a bad tag.
fn opaque_version(e: cipherd_core::Error) -> Error {
    match e {
        cipherd_core::Error::VersionNotFound(_) => Error::DecryptionFailed,
        e => e.into(),
    }
}

fn ciphertext_result(
    reference: String,
    outcome: Result<Vec<u8>>,
    version: KeyVersion,
) -> pb::CiphertextResult {
    match outcome {
        Ok(ct) => pb::CiphertextResult {
            reference,
            result: Some(ciphertext_result::Result::Ciphertext(ct.into())),
            key_version: version.get(),
        },
        Err(e) => pb::CiphertextResult {
            reference,
            result: Some(ciphertext_result::Result::Error(e.to_rpc_status())),
            key_version: 0,
        },
    }
}

/// Records the HMACs of a request's non-empty references (in item order) and of
/// its distinct non-empty derivation contexts.
fn note_inputs<'a>(
    ctx: &CallCtx,
    auth: &AuthState,
    items: impl Iterator<Item = (&'a str, &'a [u8])>,
) {
    let mut references = Vec::new();
    let mut contexts: Vec<&[u8]> = Vec::new();
    for (reference, context) in items {
        if !reference.is_empty() {
            references.push(auth.audit_hash(reference.as_bytes()));
        }
        if !context.is_empty() && !contexts.contains(&context) {
            contexts.push(context);
        }
    }
    if references.is_empty() && contexts.is_empty() {
        return;
    }
    let contexts = contexts.into_iter().map(|c| auth.audit_hash(c)).collect();
    let mut f = ctx.fields();
    f.references = references;
    f.contexts = contexts;
}

/// Records a batch's item counts and the distinct versions of its good items.
fn note_outputs(ctx: &CallCtx, results: impl ExactSizeIterator<Item = (bool, u32)>) {
    let total = results.len() as u64;
    let mut ok = 0;
    let mut versions: Vec<u32> = Vec::new();
    for (good, version) in results {
        if good {
            ok += 1;
            if !versions.contains(&version) {
                versions.push(version);
            }
        }
    }
    versions.sort_unstable();
    let mut f = ctx.fields();
    f.items = Some(crate::audit::ItemCounts {
        total,
        ok,
        failed: total - ok,
    });
    f.versions = versions;
}

fn note_ciphertexts(ctx: &CallCtx, results: &[pb::CiphertextResult]) {
    note_outputs(
        ctx,
        results.iter().map(|r| {
            (
                matches!(r.result, Some(ciphertext_result::Result::Ciphertext(_))),
                r.key_version,
            )
        }),
    );
}
