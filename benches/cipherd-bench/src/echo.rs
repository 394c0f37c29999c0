//! `cipherd-echo`: the `cipherd.v1.TransitService` service with the crypto taken out.
//!
//! Every RPC answers with its input moved across: plaintext becomes "ciphertext",
//! ciphertext becomes "plaintext", batches keep their item count and order, and
//! streams answer chunk by chunk with the same in-flight bound as cipherd. The
//! server is built like cipherd's (tonic, the same message size limits, HTTP/2
//! windows and frame size, TCP_NODELAY, a health service), so `cipherd-bench --target echo` measures what moving the bytes
//! through gRPC costs on this machine; cipherd's throughput divided by echo's is the
//! share of the transport it keeps while doing the work.
//!
//! It is a benchmark baseline, not a product: no keys, no validation, no auth.

use std::future::Future;

use bytes::Bytes;
use cipherd_proto::v1::{
    self as pb, ciphertext_result, plaintext_result,
    transit_service_server::{TransitService, TransitServiceServer},
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};

// cipherd's own transport settings (HTTP/2 windows, frame size, default message
// limit, stream chunks in flight), so the baseline moves bytes exactly as cipherd does.
pub use cipherd_server::DEFAULT_MAX_MESSAGE_BYTES;
use cipherd_server::{CONNECTION_WINDOW, MAX_FRAME, STREAM_CHUNKS_IN_FLIGHT, STREAM_WINDOW};

/// The key version every echoed result claims.
const VERSION: u32 = 1;

/// Serves the echo service (and `grpc.health.v1`) on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    max_message_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TransitServiceServer<EchoService>>()
        .await;
    let transit = TransitServiceServer::new(EchoService)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(health_service)
        .add_service(transit)
        // `Server::tcp_nodelay` is ignored for a caller-supplied listener, so the
        // accepted sockets get TCP_NODELAY here. Without it, Nagle's algorithm and
        // the peer's delayed ACK hold the end of every multi-write response for
        // ~40 ms (a batch reply: 44 ms p50 instead of 0.4 ms).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// The no-crypto Transit service.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoService;

/// The response stream of the echo's streaming RPCs.
pub type EchoStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl TransitService for EchoService {
    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: r.plaintext,
            key_version: VERSION,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::DecryptResponse {
            plaintext: r.ciphertext,
            key_version: VERSION,
        }))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::RewrapResponse {
            ciphertext: r.ciphertext,
            key_version: VERSION,
        }))
    }

    async fn batch_encrypt(
        &self,
        request: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        Ok(Response::new(echo_encrypt(request.into_inner())))
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        Ok(Response::new(echo_decrypt(request.into_inner())))
    }

    async fn batch_rewrap(
        &self,
        request: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        Ok(Response::new(echo_rewrap(request.into_inner())))
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let bits = request.into_inner().bits;
        let len = if bits == 0 { 32 } else { (bits / 8) as usize };
        // Not a key: a fixed pattern of the right length, echoed in both fields.
        let data = Bytes::from(vec![0x42; len]);
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext: data.clone(),
            ciphertext: data,
            key_version: VERSION,
        }))
    }

    type EncryptStreamStream = EchoStream<pb::EncryptStreamResponse>;
    type DecryptStreamStream = EchoStream<pb::DecryptStreamResponse>;
    type RewrapStreamStream = EchoStream<pb::RewrapStreamResponse>;

    async fn encrypt_stream(
        &self,
        request: Request<Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        // Converted to and from the batch messages, as cipherd does.
        Ok(Response::new(echo_chunks(request.into_inner(), |r| {
            echo_encrypt(r.into()).into()
        })))
    }

    async fn decrypt_stream(
        &self,
        request: Request<Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        Ok(Response::new(echo_chunks(request.into_inner(), |r| {
            echo_decrypt(r.into()).into()
        })))
    }

    async fn rewrap_stream(
        &self,
        request: Request<Streaming<pb::RewrapStreamRequest>>,
    ) -> Result<Response<Self::RewrapStreamStream>, Status> {
        Ok(Response::new(echo_chunks(request.into_inner(), |r| {
            echo_rewrap(r.into()).into()
        })))
    }
}

fn echo_encrypt(r: pb::BatchEncryptRequest) -> pb::BatchEncryptResponse {
    pb::BatchEncryptResponse {
        results: r
            .items
            .into_iter()
            .map(|i| ciphertext(i.reference, i.plaintext))
            .collect(),
    }
}

fn echo_decrypt(r: pb::BatchDecryptRequest) -> pb::BatchDecryptResponse {
    pb::BatchDecryptResponse {
        results: r
            .items
            .into_iter()
            .map(|i| pb::PlaintextResult {
                reference: i.reference,
                result: Some(plaintext_result::Result::Plaintext(i.ciphertext)),
                key_version: VERSION,
            })
            .collect(),
    }
}

fn echo_rewrap(r: pb::BatchRewrapRequest) -> pb::BatchRewrapResponse {
    pb::BatchRewrapResponse {
        results: r
            .items
            .into_iter()
            .map(|i| ciphertext(i.reference, i.ciphertext))
            .collect(),
    }
}

fn ciphertext(reference: String, bytes: Bytes) -> pb::CiphertextResult {
    pb::CiphertextResult {
        reference,
        result: Some(ciphertext_result::Result::Ciphertext(bytes)),
        key_version: VERSION,
    }
}

/// Answers each request chunk with `echo(chunk)`, in order, at most
/// [`STREAM_CHUNKS_IN_FLIGHT`] ahead of the client, as cipherd does.
fn echo_chunks<Req, Resp>(mut requests: Streaming<Req>, echo: fn(Req) -> Resp) -> EchoStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            match requests.message().await {
                Ok(Some(chunk)) => {
                    if tx.send(Ok(echo(chunk))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_count_order_and_bytes() {
        let request = pb::BatchEncryptRequest {
            key: "k".into(),
            items: (0..3u8)
                .map(|i| pb::EncryptItem {
                    plaintext: Bytes::from(vec![i; 5]),
                    reference: format!("r{i}"),
                    ..Default::default()
                })
                .collect(),
            key_version: None,
            encoding: 0,
        };
        let reply = echo_encrypt(request);
        assert_eq!(reply.results.len(), 3);
        for (i, r) in reply.results.iter().enumerate() {
            assert_eq!(r.reference, format!("r{i}"));
            assert_eq!(
                r.result,
                Some(ciphertext_result::Result::Ciphertext(Bytes::from(vec![
                    i as u8;
                    5
                ])))
            );
        }
    }
}
