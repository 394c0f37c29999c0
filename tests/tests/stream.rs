//! The streaming RPCs for ETL: `EncryptStream`, `DecryptStream`, `RewrapStream`.
//! Each request message is a chunk of items; each response carries that chunk's
//! results, one per item, in order, and chunks are answered in the order sent.

use bytes::Bytes;
use cipherd_e2e::*;
use tokio_stream::StreamExt as _;

const CHUNKS: usize = 12;
const PER_CHUNK: usize = 150;

fn plaintext(chunk: usize, i: usize) -> Bytes {
    Bytes::from(format!("patient {chunk}/{i}: {}", "x".repeat(i % 97)))
}

/// Encrypting, rotating, rewrapping and decrypting 1,800 records through the three
/// streams keeps every chunk and item in order, moves all records to v2 without
/// the client ever seeing plaintext, and decrypts to the original values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etl_round_trip_through_streams_keeps_order() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "etl", pb::KeyType::Xaes256Gcm).await;

    let requests = tokio_stream::iter((0..CHUNKS).map(|c| {
        pb::EncryptStreamRequest {
            key: "etl".into(),
            items: (0..PER_CHUNK)
                .map(|i| pb::EncryptItem {
                    plaintext: plaintext(c, i),
                    associated_data: Bytes::from(format!("row:{c}:{i}")),
                    reference: format!("{c}/{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }));
    let mut replies = client
        .transit()
        .encrypt_stream(requests)
        .await
        .expect("stream opens")
        .into_inner();
    let mut ciphertexts = Vec::new();
    while let Some(reply) = replies.next().await {
        let reply = reply.expect("chunk succeeds");
        assert_eq!(reply.results.len(), PER_CHUNK);
        let c = ciphertexts.len() / PER_CHUNK;
        for (i, r) in reply.results.into_iter().enumerate() {
            assert_eq!(r.reference, format!("{c}/{i}"), "order of results");
            assert_eq!(r.key_version, 1);
            match r.result {
                Some(pb::ciphertext_result::Result::Ciphertext(ct)) => ciphertexts.push(ct),
                other => panic!("item {c}/{i} failed: {other:?}"),
            }
        }
    }
    assert_eq!(ciphertexts.len(), CHUNKS * PER_CHUNK, "one reply per chunk");

    rotate(&client, "etl").await;
    let rewrap_requests: Vec<pb::RewrapStreamRequest> = ciphertexts
        .chunks(PER_CHUNK)
        .enumerate()
        .map(|(c, chunk)| pb::RewrapStreamRequest {
            key: "etl".into(),
            items: chunk
                .iter()
                .enumerate()
                .map(|(i, ct)| pb::RewrapItem {
                    ciphertext: ct.clone(),
                    associated_data: Bytes::from(format!("row:{c}:{i}")),
                    reference: format!("{c}/{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let mut replies = client
        .transit()
        .rewrap_stream(tokio_stream::iter(rewrap_requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut rewrapped = Vec::new();
    while let Some(reply) = replies.next().await {
        for r in reply.expect("chunk succeeds").results {
            assert_eq!(r.key_version, 2);
            match r.result {
                Some(pb::ciphertext_result::Result::Ciphertext(ct)) => {
                    assert_eq!(binary_version(&ct), 2);
                    rewrapped.push(ct);
                }
                other => panic!("rewrap failed: {other:?}"),
            }
        }
    }
    assert_eq!(rewrapped.len(), CHUNKS * PER_CHUNK);

    let decrypt_requests: Vec<pb::DecryptStreamRequest> = rewrapped
        .chunks(PER_CHUNK)
        .enumerate()
        .map(|(c, chunk)| pb::DecryptStreamRequest {
            key: "etl".into(),
            items: chunk
                .iter()
                .enumerate()
                .map(|(i, ct)| pb::DecryptItem {
                    ciphertext: ct.clone(),
                    associated_data: Bytes::from(format!("row:{c}:{i}")),
                    reference: format!("{c}/{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let mut replies = client
        .transit()
        .decrypt_stream(tokio_stream::iter(decrypt_requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut c = 0;
    while let Some(reply) = replies.next().await {
        for (i, r) in reply.expect("chunk succeeds").results.iter().enumerate() {
            assert_eq!(r.reference, format!("{c}/{i}"));
            assert_eq!(plaintext_item(r).expect("decrypts"), plaintext(c, i));
        }
        c += 1;
    }
    assert_eq!(c, CHUNKS);
}

/// A bad item inside a chunk fails alone; a chunk naming an unknown key ends the
/// stream with NOT_FOUND after the earlier chunks were answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_errors_stay_in_their_item_and_chunk_errors_end_the_stream() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "etl", pb::KeyType::Aes256Gcm96).await;
    let good = encrypt(&client, "etl", b"ok").await.ciphertext;
    let mut tampered = good.to_vec();
    *tampered.last_mut().expect("non-empty") ^= 1;

    let chunk = |key: &str| pb::DecryptStreamRequest {
        key: key.into(),
        items: vec![
            pb::DecryptItem {
                ciphertext: good.clone(),
                ..Default::default()
            },
            pb::DecryptItem {
                ciphertext: Bytes::from(tampered.clone()),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let requests = vec![chunk("etl"), chunk("no-such-key"), chunk("etl")];
    let mut replies = client
        .transit()
        .decrypt_stream(tokio_stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();

    let first = replies.next().await.expect("first reply").expect("ok");
    assert_eq!(plaintext_item(&first.results[0]).expect("good item"), "ok");
    let (code, reason, _) = plaintext_item(&first.results[1]).expect_err("tampered item");
    assert_eq!(
        (code, reason.as_str()),
        (Code::InvalidArgument, "DECRYPTION_FAILED")
    );

    let err = Error::from(
        replies
            .next()
            .await
            .expect("second reply")
            .expect_err("unknown key"),
    );
    expect_err::<()>(Err(err), Code::NotFound, "KEY_NOT_FOUND");
    assert!(
        replies.next().await.is_none(),
        "the stream ends after a chunk error"
    );
}

/// Streams answer SEALED like every data-plane call: a sealed server cannot check
/// the caller's token, so the stream is refused as it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_server_ends_streams_with_sealed() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "etl", pb::KeyType::Xaes256Gcm).await;
    reply(client.system().seal(pb::SealRequest {}).await).expect("seal");
    let opened = client
        .transit()
        .encrypt_stream(tokio_stream::iter(vec![pb::EncryptStreamRequest {
            key: "etl".into(),
            items: vec![pb::EncryptItem::default()],
            ..Default::default()
        }]))
        .await;
    let err = match opened {
        Err(status) => Error::from(status),
        Ok(replies) => {
            let mut replies = replies.into_inner();
            Error::from(replies.next().await.expect("a reply").expect_err("sealed"))
        }
    };
    expect_err::<()>(Err(err), Code::Unavailable, "SEALED");
}
