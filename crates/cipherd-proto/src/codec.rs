//! The gRPC codec of every cipherd service and client: prost's, except that a
//! message that is not valid protobuf is answered INVALID_ARGUMENT with a
//! `google.rpc.ErrorInfo` (domain [`ERROR_DOMAIN`], reason [`MALFORMED_MESSAGE`]),
//! where `tonic_prost::ProstCodec` answers INTERNAL without details.
//!
//! A malformed request is the client's fault, so it gets the code and the
//! machine-readable reason every other invalid input gets. The message is fixed and
//! names only the expected type: prost's decode error can quote values read from
//! the input (an invalid key is printed as a number), and the input may be
//! plaintext. Encoding is prost's, unchanged.
//!
//! The generated clients use this codec too, so a client that receives a reply it
//! cannot decode also sees INVALID_ARGUMENT / `MALFORMED_MESSAGE`, naming the reply
//! type. This module does not limit message sizes; tonic does that before decoding.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt as _};

/// The `ErrorInfo.domain` of every error cipherd reports.
pub const ERROR_DOMAIN: &str = "cipherd";

/// The `ErrorInfo.reason` of a message that is not a valid protobuf encoding of
/// the type its RPC expects.
pub const MALFORMED_MESSAGE: &str = "MALFORMED_MESSAGE";

/// A [`Codec`] encoding `T` and decoding `U` with prost, mapping decode failures to
/// INVALID_ARGUMENT / [`MALFORMED_MESSAGE`]. Named by the code generator
/// (`codec_path`) for every service and client.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder { _pd: PhantomData }
    }
}

/// The decoding half of [`ProtoCodec`].
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The decode error is dropped on purpose: its text can quote input values.
        U::decode(buf).map(Some).map_err(|_| malformed::<U>())
    }
}

/// The status for bytes that do not decode as a `U`.
fn malformed<U>() -> Status {
    let type_name = std::any::type_name::<U>();
    let short = type_name.rsplit("::").next().unwrap_or(type_name);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("malformed message: not a valid protobuf encoding of cipherd.v1.{short}"),
        ErrorDetails::with_error_info(
            MALFORMED_MESSAGE,
            ERROR_DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut as _, BytesMut};

    use super::*;
    use crate::v1::EncryptRequest;

    /// Decodes `body` as one gRPC message through the codec's decoder.
    async fn decode(body: &'static [u8]) -> Result<Option<EncryptRequest>, Status> {
        let mut frame = BytesMut::new();
        frame.put_u8(0);
        frame.put_u32(u32::try_from(body.len()).expect("small body"));
        frame.put_slice(body);
        let body = http_body_util::Full::new(frame.freeze());
        let mut stream = tonic::codec::Streaming::new_request(
            ProtoCodec::<EncryptRequest, EncryptRequest>::default().decoder(),
            body,
            None,
            None,
        );
        stream.message().await
    }

    #[tokio::test]
    async fn valid_messages_decode() {
        let msg = EncryptRequest {
            key: "k".into(),
            ..Default::default()
        };
        let bytes: &'static [u8] = msg.encode_to_vec().leak();
        assert_eq!(decode(bytes).await.expect("decodes"), Some(msg));
    }

    #[tokio::test]
    async fn malformed_messages_are_invalid_argument_with_a_reason() {
        // Field 2 (plaintext, length-delimited) declaring 100 bytes, then only 6
        // bytes of "secret", then a key varint that never ends.
        for body in [
            &b"\x12\x64secret"[..],
            &b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
        ] {
            let status = decode(body).await.expect_err("malformed");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, MALFORMED_MESSAGE);
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert!(status.message().contains("cipherd.v1.EncryptRequest"));
            assert!(!status.message().contains("secret"), "{status:?}");
        }
    }
}
