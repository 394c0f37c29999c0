//! The limits layer: load shedding at `limits.max_concurrent_requests`, the
//! request timeout, and the per-request state behind the body wrapper's buffer
//! budget and the connection's in-flight count.
//!
//! Per request it allocates one [`RequestState`] (shared by the request body and
//! the response body) and creates one timer, and it never queues: a request over
//! the concurrency limit is answered RESOURCE_EXHAUSTED / `OVERLOADED` at once.
//! `grpc.health.v1` calls are not counted against the limit, so probes still get
//! an answer from a loaded server; they are bounded like any other request
//! otherwise.
//!
//! The timeout bounds the wait for the response to start: for a unary call that
//! is the whole call (reading the request, waiting for budget, the work), for a
//! streaming call only until the stream is accepted (`Restore`, whose reply
//! follows the whole upload and import, is exempt: see [`RESTORE_PATH`]). Each message of a stream is
//! then bounded by the body wrapper (see [`RequestBody`]), so a long ETL stream
//! is never cut off while it keeps sending.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::{sync::Semaphore, time::Sleep};
use tower::{Layer, Service};

use super::{RequestBody, Shared, conn::ConnInfo, conn::ConnTracker};
use crate::{Error, config::Limits};

/// Path prefix of the gRPC health service, exempt from load shedding.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// `SystemService.Restore`, exempt from the wait for the response: it is a
/// client stream whose one reply comes only after the whole backup has been
/// received, verified and imported, which for a large store takes longer than
/// any request timeout. Each of its messages is still bounded by the body
/// wrapper, so it cannot stall; and it is only ever served by an uninitialized
/// server (an initialized one refuses it before reading).
const RESTORE_PATH: &str = "/cipherd.v1.SystemService/Restore";

/// The [`LimitsService`] layer (see the module docs).
#[derive(Clone)]
pub struct LimitsLayer {
    shared: Arc<Shared>,
}

impl LimitsLayer {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitsService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Sheds requests over the concurrency limit, times out slow ones, and wraps
/// request and response bodies (see the module docs).
#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, ResBody> Service<http::Request<B>> for LimitsService<S>
where
    S: Service<http::Request<RequestBody<B>>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = LimitsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let counted = !request.uri().path().starts_with(HEALTH_PREFIX);
        let timed = request.uri().path() != RESTORE_PATH;
        if counted && !self.shared.try_start_request() {
            return LimitsFuture::refused(Error::Overloaded {
                limit: self.shared.limits.max_concurrent_requests,
            });
        }
        let conn = request
            .extensions()
            .get::<ConnInfo>()
            .map(|info| Arc::clone(&info.tracker));
        if let Some(conn) = &conn {
            conn.request_started();
        }
        let state = Arc::new(RequestState {
            shared: Arc::clone(&self.shared),
            held: AtomicUsize::new(0),
        });
        let guard = InFlight {
            state: Arc::clone(&state),
            counted,
            conn,
        };
        let request = request.map(|body| RequestBody::new(body, state));
        LimitsFuture {
            inner: Some(self.inner.call(request)),
            timer: None,
            timed,
            guard: Some(guard),
            refused: None,
        }
    }
}

/// What one request holds: its share of the buffer budget. Shared by the request
/// body (which takes and swaps the share) and the response (through its
/// [`InFlight`] guard); the share is given back when both are gone.
pub(crate) struct RequestState {
    shared: Arc<Shared>,
    /// Budget permits held for the current message.
    held: AtomicUsize,
}

impl RequestState {
    pub(super) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub(super) fn budget(&self) -> &Arc<Semaphore> {
        &self.shared.budget
    }

    /// Records `len` permits taken (and forgotten) from the budget.
    pub(super) fn hold_budget(&self, len: usize) {
        self.held.fetch_add(len, Ordering::AcqRel);
    }

    /// Gives every held permit back to the budget.
    pub(super) fn release_budget(&self) {
        let held = self.held.swap(0, Ordering::AcqRel);
        if held > 0 {
            self.shared.budget.add_permits(held);
        }
    }
}

impl Drop for RequestState {
    fn drop(&mut self) {
        self.release_budget();
    }
}

/// A request in flight until its response ends: its concurrency slot (unless
/// exempt) and its count on the connection.
struct InFlight {
    state: Arc<RequestState>,
    counted: bool,
    conn: Option<Arc<ConnTracker>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.counted {
            self.state.shared.end_request();
        }
        if let Some(conn) = &self.conn {
            conn.request_finished();
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`LimitsService`].
    pub struct LimitsFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        timer: Option<Sleep>,
        // Whether the wait for the response is bounded (all but Restore).
        timed: bool,
        guard: Option<InFlight>,
        refused: Option<Error>,
    }
}

impl<F> LimitsFuture<F> {
    fn refused(err: Error) -> Self {
        Self {
            inner: None,
            timer: None,
            timed: true,
            guard: None,
            refused: Some(err),
        }
    }
}

impl<F, ResBody, E> Future for LimitsFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = this.refused.take().unwrap_or(Error::Internal(
                "limits future polled after completion".into(),
            ));
            return Poll::Ready(Ok(error_response(err)));
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            let guard = this.guard.take();
            return Poll::Ready(result.map(|response| {
                response.map(|body| ResponseBody {
                    inner: Some(body),
                    guard,
                })
            }));
        }
        if !*this.timed {
            return Poll::Pending;
        }
        let timeout = this
            .guard
            .as_ref()
            .map(|g| g.state.shared.limits.request_timeout)
            .unwrap_or_default();
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(timeout)));
        }
        let Some(timer) = this.timer.as_pin_mut() else {
            return Poll::Pending;
        };
        ready!(timer.poll(cx));
        // The inner future (and the request it holds) is dropped with this one.
        *this.guard = None;
        Poll::Ready(Ok(error_response(Error::RequestTimeout {
            waiting_for: "the response",
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })))
    }
}

/// A trailers-only gRPC response carrying `err`, mapped by `Error::classify`.
fn error_response<B>(err: Error) -> http::Response<ResponseBody<B>> {
    tonic::Status::from(err)
        .into_http::<()>()
        .map(|()| ResponseBody {
            inner: None,
            guard: None,
        })
}

pin_project_lite::pin_project! {
    /// A response body that ends its request's [`InFlight`] guard when it ends.
    /// Empty for the edge's own error responses.
    pub struct ResponseBody<B> {
        #[pin]
        inner: Option<B>,
        guard: Option<InFlight>,
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(inner.poll_frame(cx));
        if frame.is_none() {
            *this.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
