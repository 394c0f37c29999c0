//! API conventions at the transport edge: gRPC reflection answers in both its
//! versions, and bytes that are not valid protobuf are INVALID_ARGUMENT with reason
//! `MALFORMED_MESSAGE`, like every other invalid input, never INTERNAL.

use bytes::Bytes;
use cipherd_e2e::*;
use tokio_stream::StreamExt as _;
use tonic::{Request, codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_reflection::pb::{v1, v1alpha};

/// The services a reflection client must find.
const CIPHERD_SERVICES: [&str; 3] = [
    "cipherd.v1.TransitService",
    "cipherd.v1.KeyAdminService",
    "cipherd.v1.SystemService",
];

/// Reflection v1 (grpcurl, grpcui) and v1alpha (grpcio's reflection client, older
/// grpcurl, Postman) both list cipherd's services and serve their descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_in_v1_and_v1alpha() {
    let server = TestServer::dev().await;
    let channel = channel(&server).await;

    let (services, descriptor) = reflect_v1(channel.clone()).await;
    for name in CIPHERD_SERVICES {
        assert!(
            services.contains(&name.to_owned()),
            "v1 lists {name}: {services:?}"
        );
    }
    assert!(
        descriptor,
        "v1 serves the descriptor of cipherd.v1.TransitService"
    );

    let (services, descriptor) = reflect_v1alpha(channel).await;
    for name in CIPHERD_SERVICES {
        assert!(
            services.contains(&name.to_owned()),
            "v1alpha lists {name}: {services:?}"
        );
    }
    assert!(
        descriptor,
        "v1alpha serves the descriptor of cipherd.v1.TransitService"
    );
}

/// Lists services through `grpc.reflection.v1`, and asks for the file that
/// defines `cipherd.v1.TransitService`.
async fn reflect_v1(channel: Channel) -> (Vec<String>, bool) {
    use v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(CIPHERD_SERVICES[0].to_owned()),
    ]
    .map(|m| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap_or_else(|s| panic!("v1 reflection: {s:?}"))
        .into_inner();
    let mut services = Vec::new();
    let mut descriptor = false;
    while let Some(reply) = replies.next().await {
        match reply.expect("v1 reply").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                descriptor = !files.file_descriptor_proto.is_empty();
            }
            other => panic!("v1 reflection answered {other:?}"),
        }
    }
    (services, descriptor)
}

/// [`reflect_v1`] through `grpc.reflection.v1alpha`.
async fn reflect_v1alpha(channel: Channel) -> (Vec<String>, bool) {
    use v1alpha::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(CIPHERD_SERVICES[0].to_owned()),
    ]
    .map(|m| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap_or_else(|s| panic!("v1alpha reflection: {s:?}"))
        .into_inner();
    let mut services = Vec::new();
    let mut descriptor = false;
    while let Some(reply) = replies.next().await {
        match reply.expect("v1alpha reply").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                descriptor = !files.file_descriptor_proto.is_empty();
            }
            other => panic!("v1alpha reflection answered {other:?}"),
        }
    }
    (services, descriptor)
}

/// Message bodies that are not valid protobuf for any cipherd request. Each has
/// "secret" in it, which must not come back in the error message.
const MALFORMED: [(&str, &[u8]); 3] = [
    // Field 2 (plaintext / items) declares 100 bytes; 6 follow.
    ("truncated field", b"\x12\x64secret"),
    // Field 1 (key) is complete, then a field key whose varint never ends.
    (
        "invalid varint",
        b"\x0a\x06secret\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    ),
    // Wire type 7 does not exist.
    ("invalid wire type", b"\x0a\x06secret\x0f"),
];

/// Malformed Encrypt (unary) and BatchEncrypt (batch) requests are answered
/// INVALID_ARGUMENT / MALFORMED_MESSAGE without echoing input, and the server
/// goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument_with_a_reason() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let mut grpc = tonic::client::Grpc::new(client.transport());

    for rpc in ["Encrypt", "BatchEncrypt"] {
        for (what, body) in MALFORMED {
            grpc.ready().await.expect("channel ready");
            let path = format!("/cipherd.v1.TransitService/{rpc}");
            let status = grpc
                .unary(
                    Request::new(Bytes::from_static(body)),
                    PathAndQuery::try_from(path).expect("path"),
                    RawCodec,
                )
                .await
                .expect_err("malformed request fails");
            let message = expect_err::<()>(
                Err(Error::from(status)),
                Code::InvalidArgument,
                "MALFORMED_MESSAGE",
            );
            assert!(!message.contains("secret"), "{rpc}, {what}: {message}");
        }
    }

    // Still serving, and a well-formed request through the same raw path works.
    let ciphertext = encrypt(&client, "k", b"ok").await.ciphertext;
    assert_eq!(
        decrypt(&client, "k", &ciphertext).await.expect("decrypts"),
        Bytes::from_static(b"ok")
    );
    grpc.ready().await.expect("channel ready");
    let valid = Bytes::from_static(b"\x0a\x01k\x12\x02ok");
    grpc.unary(
        Request::new(valid),
        PathAndQuery::from_static("/cipherd.v1.TransitService/Encrypt"),
        RawCodec,
    )
    .await
    .expect("valid raw Encrypt succeeds");
}

/// A malformed chunk ends an EncryptStream with INVALID_ARGUMENT / MALFORMED_MESSAGE
/// after the valid chunks before it were answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_chunk_ends_the_stream_with_invalid_argument() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let mut grpc = tonic::client::Grpc::new(client.transport());
    grpc.ready().await.expect("channel ready");

    // key "k", one item with plaintext "ok"; then a malformed chunk.
    let valid = Bytes::from_static(b"\x0a\x01k\x12\x04\x0a\x02ok");
    let chunks = [valid, Bytes::from_static(MALFORMED[0].1)];
    let mut replies = grpc
        .streaming(
            Request::new(tokio_stream::iter(chunks)),
            PathAndQuery::from_static("/cipherd.v1.TransitService/EncryptStream"),
            RawCodec,
        )
        .await
        .expect("stream opens")
        .into_inner();
    replies
        .next()
        .await
        .expect("a reply to the valid chunk")
        .expect("valid chunk succeeds");
    let status = replies
        .next()
        .await
        .expect("the stream's end")
        .expect_err("malformed chunk");
    expect_err::<()>(
        Err(Error::from(status)),
        Code::InvalidArgument,
        "MALFORMED_MESSAGE",
    );
}

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}
