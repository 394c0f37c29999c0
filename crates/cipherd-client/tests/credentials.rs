//! The client's credentials and purpose of use on the wire, against a fake cipherd
//! in this process (port 0) that records what each call carried: the
//! `authorization` metadata on calls of every service accessor, the purpose and
//! reason fields of the decrypt helper, and a per-client override.

use std::sync::{Arc, Mutex};

use cipherd_client::{Client, ClientOptions, Purpose, Token, pb};
use pb::{
    system_service_server::{SystemService, SystemServiceServer},
    transit_service_server::{TransitService, TransitServiceServer},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What the fake saw: one `(rpc, authorization, purpose, reason)` per call.
type Seen = Arc<Mutex<Vec<(String, Option<String>, String, String)>>>;

#[derive(Clone, Default)]
struct Fake {
    seen: Seen,
}

impl Fake {
    fn record<T>(&self, rpc: &str, request: &Request<T>, purpose: &str, reason: &str) {
        let auth = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().expect("ascii").to_owned());
        self.seen.lock().expect("lock").push((
            rpc.to_owned(),
            auth,
            purpose.to_owned(),
            reason.to_owned(),
        ));
    }
}

#[tonic::async_trait]
impl SystemService for Fake {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.record("Status", &request, "", "");
        Ok(Response::new(pb::StatusResponse::default()))
    }
    async fn init(
        &self,
        _: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn unseal(
        &self,
        _: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn seal(
        &self,
        _: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn rekey(
        &self,
        _: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::RekeyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn rotate_root(
        &self,
        _: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type BackupStream = Stream<pb::BackupResponse>;
    async fn backup(
        &self,
        _: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn restore(
        &self,
        _: Request<tonic::Streaming<pb::RestoreRequest>>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl TransitService for Fake {
    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let (p, r) = (
            request.get_ref().purpose.clone(),
            request.get_ref().reason.clone(),
        );
        self.record("Decrypt", &request, &p, &r);
        Ok(Response::new(pb::DecryptResponse::default()))
    }
    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let (p, r) = (
            request.get_ref().purpose.clone(),
            request.get_ref().reason.clone(),
        );
        self.record("BatchDecrypt", &request, &p, &r);
        let results = request
            .get_ref()
            .items
            .iter()
            .map(|_| pb::PlaintextResult {
                result: Some(pb::plaintext_result::Result::Plaintext(Default::default())),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::BatchDecryptResponse { results }))
    }
    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let (p, r) = (
            request.get_ref().purpose.clone(),
            request.get_ref().reason.clone(),
        );
        self.record("GenerateDataKey", &request, &p, &r);
        Ok(Response::new(pb::GenerateDataKeyResponse::default()))
    }
    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let (p, r) = (
            request.get_ref().purpose.clone(),
            request.get_ref().reason.clone(),
        );
        self.record("Rewrap", &request, &p, &r);
        Ok(Response::new(pb::RewrapResponse::default()))
    }
    async fn encrypt(
        &self,
        _: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn batch_encrypt(
        &self,
        _: Request<pb::BatchEncryptRequest>,
    ) -> Result<Response<pb::BatchEncryptResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn batch_rewrap(
        &self,
        _: Request<pb::BatchRewrapRequest>,
    ) -> Result<Response<pb::BatchRewrapResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type EncryptStreamStream = Stream<pb::EncryptStreamResponse>;
    async fn encrypt_stream(
        &self,
        _: Request<tonic::Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type DecryptStreamStream = Stream<pb::DecryptStreamResponse>;
    async fn decrypt_stream(
        &self,
        _: Request<tonic::Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type RewrapStreamStream = Stream<pb::RewrapStreamResponse>;
    async fn rewrap_stream(
        &self,
        _: Request<tonic::Streaming<pb::RewrapStreamRequest>>,
    ) -> Result<Response<Self::RewrapStreamStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Starts the fake on 127.0.0.1:0; returns its endpoint and what it records.
async fn fake() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = Fake::default();
    let seen = fake.seen.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SystemServiceServer::new(fake.clone()))
            .add_service(TransitServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), seen)
}

fn taken(seen: &Seen) -> Vec<(String, Option<String>, String, String)> {
    std::mem::take(&mut *seen.lock().expect("lock"))
}

#[tokio::test]
async fn every_call_carries_the_token_and_helpers_carry_the_purpose() {
    let (endpoint, seen) = fake().await;
    let options = ClientOptions::default()
        .with_token(Token::from("s.wire-token"))
        .with_purpose(Purpose::new("research"));
    let client = Client::connect_with(endpoint, options)
        .await
        .expect("connect");

    client.status().await.expect("helper");
    client
        .system()
        .status(pb::StatusRequest {})
        .await
        .expect("generated client");
    client
        .decrypt("k", bytes::Bytes::new(), "", "")
        .await
        .expect("decrypt");
    client
        .batch_decrypt("k", vec![pb::DecryptItem::default(); 3])
        .await
        .expect("batch decrypt");
    client
        .generate_data_key("k", &Default::default())
        .await
        .expect("datakey");
    let bearer = Some("Bearer s.wire-token".to_owned());
    let research = ("research".to_owned(), String::new());
    assert_eq!(
        taken(&seen),
        [
            (
                "Status".into(),
                bearer.clone(),
                String::new(),
                String::new()
            ),
            (
                "Status".into(),
                bearer.clone(),
                String::new(),
                String::new()
            ),
            (
                "Decrypt".into(),
                bearer.clone(),
                research.0.clone(),
                research.1.clone()
            ),
            (
                "BatchDecrypt".into(),
                bearer.clone(),
                research.0.clone(),
                research.1.clone()
            ),
            (
                "GenerateDataKey".into(),
                bearer.clone(),
                research.0,
                research.1
            ),
        ]
    );

    // Per request: another purpose, and another identity, on the same connection.
    let er = client.with_purpose(Purpose::emergency("ER bed 4"));
    er.rewrap("k", bytes::Bytes::new(), &Default::default())
        .await
        .expect("rewrap");
    let anonymous = client
        .with_token(None)
        .expect("no token")
        .with_purpose(None);
    anonymous
        .decrypt("k", bytes::Bytes::new(), "", "")
        .await
        .expect("decrypt");
    let other = client
        .with_token(&Token::from("s.other"))
        .expect("valid token");
    other.status().await.expect("status");
    assert_eq!(
        taken(&seen),
        [
            (
                "Rewrap".into(),
                bearer,
                "emergency".into(),
                "ER bed 4".into()
            ),
            ("Decrypt".into(), None, String::new(), String::new()),
            (
                "Status".into(),
                Some("Bearer s.other".into()),
                String::new(),
                String::new()
            ),
        ]
    );
}

#[tokio::test]
async fn a_token_a_header_cannot_carry_is_refused_before_connecting() {
    // Nothing listens here; the token is refused before any connection attempt.
    let options = ClientOptions::default().with_token(Token::from("s.bad token\n"));
    let err = Client::connect_with("http://127.0.0.1:9", options)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, cipherd_client::Error::Credentials(_)),
        "{err}"
    );
    assert!(!err.to_string().contains("s.bad"), "{err}");
}
