//! Conversions between a stream RPC's chunk messages and the batch messages with
//! the same fields, so that the server runs one implementation for batch and stream
//! calls and clients can build either from the other. Field for field, nothing else.

use crate::v1::{
    BatchDecryptRequest, BatchDecryptResponse, BatchEncryptRequest, BatchEncryptResponse,
    BatchRewrapRequest, BatchRewrapResponse, DecryptStreamRequest, DecryptStreamResponse,
    EncryptStreamRequest, EncryptStreamResponse, RewrapStreamRequest, RewrapStreamResponse,
};

impl From<EncryptStreamRequest> for BatchEncryptRequest {
    fn from(r: EncryptStreamRequest) -> Self {
        let EncryptStreamRequest {
            key,
            items,
            key_version,
            encoding,
        } = r;
        Self {
            key,
            items,
            key_version,
            encoding,
        }
    }
}

impl From<BatchEncryptRequest> for EncryptStreamRequest {
    fn from(r: BatchEncryptRequest) -> Self {
        let BatchEncryptRequest {
            key,
            items,
            key_version,
            encoding,
        } = r;
        Self {
            key,
            items,
            key_version,
            encoding,
        }
    }
}

impl From<BatchEncryptResponse> for EncryptStreamResponse {
    fn from(r: BatchEncryptResponse) -> Self {
        Self { results: r.results }
    }
}

impl From<EncryptStreamResponse> for BatchEncryptResponse {
    fn from(r: EncryptStreamResponse) -> Self {
        Self { results: r.results }
    }
}

impl From<DecryptStreamRequest> for BatchDecryptRequest {
    fn from(r: DecryptStreamRequest) -> Self {
        let DecryptStreamRequest {
            key,
            items,
            purpose,
            reason,
        } = r;
        Self {
            key,
            items,
            purpose,
            reason,
        }
    }
}

impl From<BatchDecryptRequest> for DecryptStreamRequest {
    fn from(r: BatchDecryptRequest) -> Self {
        let BatchDecryptRequest {
            key,
            items,
            purpose,
            reason,
        } = r;
        Self {
            key,
            items,
            purpose,
            reason,
        }
    }
}

impl From<BatchDecryptResponse> for DecryptStreamResponse {
    fn from(r: BatchDecryptResponse) -> Self {
        Self { results: r.results }
    }
}

impl From<DecryptStreamResponse> for BatchDecryptResponse {
    fn from(r: DecryptStreamResponse) -> Self {
        Self { results: r.results }
    }
}

impl From<RewrapStreamRequest> for BatchRewrapRequest {
    fn from(r: RewrapStreamRequest) -> Self {
        let RewrapStreamRequest {
            key,
            items,
            destination_key,
            encoding,
            purpose,
            reason,
        } = r;
        Self {
            key,
            items,
            destination_key,
            encoding,
            purpose,
            reason,
        }
    }
}

impl From<BatchRewrapRequest> for RewrapStreamRequest {
    fn from(r: BatchRewrapRequest) -> Self {
        let BatchRewrapRequest {
            key,
            items,
            destination_key,
            encoding,
            purpose,
            reason,
        } = r;
        Self {
            key,
            items,
            destination_key,
            encoding,
            purpose,
            reason,
        }
    }
}

impl From<BatchRewrapResponse> for RewrapStreamResponse {
    fn from(r: BatchRewrapResponse) -> Self {
        Self { results: r.results }
    }
}

impl From<RewrapStreamResponse> for BatchRewrapResponse {
    fn from(r: RewrapStreamResponse) -> Self {
        Self { results: r.results }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::v1::{CiphertextEncoding, EncryptItem};

    /// The stream messages are wire-compatible with the batch ones: the conversion
    /// keeps every field, and the encodings are byte for byte the same.
    #[test]
    fn stream_and_batch_messages_carry_the_same_fields() {
        let batch = BatchEncryptRequest {
            key: "k".into(),
            items: vec![EncryptItem {
                plaintext: b"p".to_vec().into(),
                associated_data: b"a".to_vec().into(),
                context: b"c".to_vec().into(),
                reference: "r".into(),
            }],
            key_version: Some(3),
            encoding: CiphertextEncoding::Text.into(),
        };
        let stream = EncryptStreamRequest::from(batch.clone());
        assert_eq!(stream.encode_to_vec(), batch.encode_to_vec());
        assert_eq!(BatchEncryptRequest::from(stream), batch);

        let rewrap = BatchRewrapRequest {
            key: "k".into(),
            destination_key: "d".into(),
            encoding: CiphertextEncoding::Text.into(),
            purpose: "treatment".into(),
            reason: "r".into(),
            ..Default::default()
        };
        let stream = RewrapStreamRequest::from(rewrap.clone());
        assert_eq!(stream.encode_to_vec(), rewrap.encode_to_vec());
        assert_eq!(BatchRewrapRequest::from(stream), rewrap);
    }
}
