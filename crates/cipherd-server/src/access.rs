//! The access layer: who is calling, whether the audit log can take the call's
//! record, and the record itself, written before the reply leaves.
//!
//! For every call except health checks and reflection (which reveal nothing and
//! must answer while the audit log is down), in this order:
//!
//! 1. **Fail closed.** If no audit sink accepts records ([`Auditor::ready`]), the
//!    call is refused UNAVAILABLE / `AUDIT_UNAVAILABLE` before it does anything.
//! 2. **Authenticate.** `authorization: Bearer <token>` (a cipherd token, or a JWT
//!    when `[jwt]` is configured), else the client certificate's identity under
//!    mTLS. A missing, malformed, expired, revoked or forged credential is
//!    UNAUTHENTICATED, one message for all (the detail is logged here). The
//!    lifecycle calls `Status`, `Init`, `Unseal` and `Restore` need no
//!    credential (`Restore`, like `Init`, only works on an uninitialized store).
//! 3. **Rate limit** per principal (`limits.principal_rate`).
//! 4. The call runs with its [`Caller`] and a [`CallCtx`] in the request
//!    extensions; services authorize it against the key it names
//!    ([`CallCtx::authorize`]) and note what it touched.
//! 5. **Audit.** The call's outcome (gRPC code and reason) and latency complete
//!    the record; the reply is held until the record is durable, and replaced by
//!    UNAVAILABLE / `AUDIT_UNAVAILABLE` if no sink took it.
//!
//! Stream calls are recorded when the stream is accepted or refused; each of
//! their chunks gets its own record from the transit service before that chunk's
//! reply is sent.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use tower::{Layer, Service};

use crate::{
    Error,
    audit::{AuditRecord, Auditor, ItemCounts, Outcome},
    auth::{
        jwt::JwtVerifier,
        policy::{self, Access, Decision, Operation, Policy},
        state::{self, AuthState},
    },
    edge::ConnInfo,
    seal::Core,
};

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A cipherd bearer token.
    Token,
    /// A JWT from the configured identity provider.
    Jwt,
    /// An mTLS client certificate.
    Mtls,
}

impl AuthMethod {
    /// The word in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Token => "token",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Mtls => "mtls",
        }
    }
}

/// An authenticated caller and the policies it holds for this call.
#[derive(Debug)]
pub struct Caller {
    /// Who: a token's display name, a JWT's principal claim, a certificate's
    /// identity.
    pub principal: String,
    /// How it was proved.
    pub method: AuthMethod,
    /// The token's accessor, for tokens.
    pub accessor: Option<String>,
    /// The names of the policies that apply.
    pub policy_names: Vec<String>,
    policies: Vec<Arc<Policy>>,
}

impl Caller {
    /// The policy decision for `access`.
    pub fn decide(&self, access: &Access<'_>) -> Decision {
        let refs: Vec<&Policy> = self.policies.iter().map(|p| &**p).collect();
        policy::decide(&refs, access)
    }

    /// Whether the caller may do `operation` on `key` (no purpose).
    pub fn may(&self, operation: Operation, key: Option<&str>) -> bool {
        matches!(
            self.decide(&Access {
                operation,
                key,
                purpose: None,
                reason: None,
            }),
            Decision::Allow { .. }
        )
    }

    /// Whether the caller may do `operation` on `key` with this purpose and
    /// reason (break-glass included).
    pub fn may_with(&self, operation: Operation, key: &str, purpose: &str, reason: &str) -> bool {
        matches!(
            self.decide(&Access {
                operation,
                key: Some(key),
                purpose: (!purpose.is_empty()).then_some(purpose),
                reason: (!reason.is_empty()).then_some(reason),
            }),
            Decision::Allow { .. }
        )
    }

    /// Whether the caller holds the built-in root policy.
    pub fn is_root(&self) -> bool {
        self.policy_names.iter().any(|p| p == state::ROOT_POLICY)
    }
}

/// What one call touched, for its audit record. Services fill it through the
/// [`CallCtx`] in the request's extensions.
#[derive(Debug, Default)]
pub struct CallFields {
    /// The policy operation.
    pub operation: &'static str,
    /// The key named.
    pub key: Option<String>,
    /// A rewrap's other key.
    pub destination_key: Option<String>,
    /// Versions used.
    pub versions: Vec<u32>,
    /// Batch item counts.
    pub items: Option<ItemCounts>,
    /// Declared purpose.
    pub purpose: Option<String>,
    /// Declared reason.
    pub reason: Option<String>,
    /// Allowed by break-glass only.
    pub break_glass: bool,
    /// HMACs of references.
    pub references: Vec<String>,
    /// HMACs of contexts.
    pub contexts: Vec<String>,
}

/// One call's identity and audit state, shared by the access layer and the service.
#[derive(Debug)]
pub struct CallCtx {
    caller: Option<Arc<Caller>>,
    time: SystemTime,
    started: Instant,
    request_id: String,
    rpc: String,
    peer: Option<SocketAddr>,
    peer_certificate: Option<Arc<str>>,
    fields: Mutex<CallFields>,
    auditor: Auditor,
}

impl CallCtx {
    /// The context of `request`, put there by the access layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Arc<CallCtx>, Error> {
        request
            .extensions()
            .get::<Arc<CallCtx>>()
            .cloned()
            .ok_or_else(|| Error::Internal("call without an access context".into()))
    }

    /// The authenticated caller; `Unauthenticated` for the lifecycle calls that
    /// need none.
    pub fn caller(&self) -> Result<&Arc<Caller>, Error> {
        self.caller
            .as_ref()
            .ok_or(Error::Unauthenticated("this call needs a token"))
    }

    /// Records `operation` on `key` and checks the caller's policies: default
    /// deny, PERMISSION_DENIED, the same whether the key exists or not. Returns
    /// whether only a break-glass rule allowed it.
    pub fn authorize(
        &self,
        operation: Operation,
        key: Option<&str>,
        purpose: &str,
        reason: &str,
    ) -> Result<bool, Error> {
        let purpose = (!purpose.is_empty()).then_some(purpose);
        let reason = (!reason.is_empty()).then_some(reason);
        {
            let mut f = self.fields();
            if f.operation.is_empty() {
                f.operation = operation.as_str();
                f.key = key.map(str::to_owned);
            } else if key != f.key.as_deref() {
                f.destination_key = key.map(str::to_owned);
            }
            if purpose.is_some() {
                f.purpose = purpose.map(str::to_owned);
            }
            if reason.is_some() {
                f.reason = reason.map(|r| truncate(r, MAX_REASON).to_owned());
            }
        }
        let caller = self.caller()?;
        match caller.decide(&Access {
            operation,
            key,
            purpose,
            reason,
        }) {
            Decision::Allow { break_glass } => {
                if break_glass {
                    self.fields().break_glass = true;
                    tracing::warn!(
                        principal = %caller.principal,
                        operation = operation.as_str(),
                        key,
                        "break-glass access"
                    );
                }
                Ok(break_glass)
            }
            Decision::Deny => Err(Error::PermissionDenied),
        }
    }

    /// A context for one chunk of this stream call: the same caller and call,
    /// its own fields and clock.
    pub fn child(&self) -> CallCtx {
        CallCtx {
            caller: self.caller.clone(),
            time: SystemTime::now(),
            started: Instant::now(),
            request_id: self.request_id.clone(),
            rpc: self.rpc.clone(),
            peer: self.peer,
            peer_certificate: self.peer_certificate.clone(),
            fields: Mutex::new(CallFields::default()),
            auditor: self.auditor.clone(),
        }
    }

    /// The record's fields, to fill.
    pub fn fields(&self) -> std::sync::MutexGuard<'_, CallFields> {
        // Only plain data is changed under this lock; recover from poisoning.
        self.fields.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The audit log, for the records of stream chunks.
    pub fn auditor(&self) -> &Auditor {
        &self.auditor
    }

    /// A record of this call with `outcome`, and the fields taken so far.
    pub fn record(&self, kind: &'static str, outcome: Outcome) -> AuditRecord {
        let f = std::mem::take(&mut *self.fields());
        let caller = self.caller.as_deref();
        AuditRecord {
            time: self.time,
            kind,
            request_id: self.request_id.clone(),
            rpc: self.rpc.clone(),
            principal: caller.map(|c| c.principal.clone()),
            auth_method: Some(caller.map_or("none", |c| c.method.as_str())),
            token_accessor: caller.and_then(|c| c.accessor.clone()),
            policies: caller.map(|c| c.policy_names.clone()).unwrap_or_default(),
            peer: self.peer,
            peer_certificate: self.peer_certificate.as_deref().map(str::to_owned),
            operation: f.operation,
            key: f.key,
            destination_key: f.destination_key,
            versions: f.versions,
            items: f.items,
            purpose: f.purpose,
            reason: f.reason,
            break_glass: f.break_glass,
            references: f.references,
            contexts: f.contexts,
            outcome,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// The longest reason kept in an audit record, in bytes.
const MAX_REASON: usize = 1024;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The outcome of a failed call.
pub fn outcome_of(err: &Error) -> Outcome {
    let c = err.classify();
    Outcome {
        code: code_name(c.code),
        reason: Some(c.reason.to_owned()),
    }
}

/// The successful outcome.
pub const OK: Outcome = Outcome {
    code: "OK",
    reason: None,
};

/// The [`AccessService`] layer.
#[derive(Clone)]
pub struct AccessLayer {
    shared: Arc<Shared>,
}

struct Shared {
    core: Arc<Core>,
    auditor: Auditor,
    jwt: Option<Arc<JwtVerifier>>,
    limiter: Option<Arc<crate::auth::rate::PrincipalLimiter>>,
}

impl AccessLayer {
    /// The layer over `core`, recording into `auditor`, accepting JWTs with `jwt`.
    pub fn new(
        core: Arc<Core>,
        auditor: Auditor,
        jwt: Option<Arc<JwtVerifier>>,
        limiter: Option<Arc<crate::auth::rate::PrincipalLimiter>>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                core,
                auditor,
                jwt,
                limiter,
            }),
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct AccessService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Calls that are neither authenticated nor audited.
fn unaudited(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// Calls that need no credential (audited all the same).
fn public(path: &str) -> bool {
    matches!(
        path,
        "/cipherd.v1.SystemService/Status"
            | "/cipherd.v1.SystemService/Init"
            | "/cipherd.v1.SystemService/Unseal"
            | "/cipherd.v1.SystemService/Restore"
    )
}

impl<S, B, ResBody> Service<http::Request<B>> for AccessService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<AccessBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is ready (tower's usual swap): drive the one polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if unaudited(path) {
            return Box::pin(async move { Ok(inner.call(request).await?.map(AccessBody::wrap)) });
        }
        let shared = Arc::clone(&self.shared);
        let conn = request.extensions().get::<ConnInfo>();
        let ctx = CallCtx {
            caller: None,
            time: SystemTime::now(),
            started: Instant::now(),
            request_id: request
                .headers()
                .get(crate::edge::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            rpc: path.to_owned(),
            peer: conn.map(|c| c.remote_addr),
            peer_certificate: conn.and_then(|c| c.peer_identity.clone()),
            fields: Mutex::new(CallFields::default()),
            auditor: shared.auditor.clone(),
        };
        let is_public = public(path);
        let authenticated = if shared.auditor.ready().is_err() {
            Err((Error::AuditUnavailable, None))
        } else if is_public {
            Ok(None)
        } else {
            let header = request.headers_mut().remove(http::header::AUTHORIZATION);
            match shared.authenticate(header.as_ref(), ctx.peer_certificate.as_deref()) {
                Ok(caller) => Ok(Some(caller)),
                // Perhaps created through another replica a moment ago: look
                // in storage before refusing (below, asynchronously).
                Err(err) => Err((err, header.filter(|h| shared.unknown_token(h)))),
            }
        };
        Box::pin(async move {
            let mut ctx = ctx;
            let caller = match authenticated {
                Ok(caller) => caller,
                Err((err, Some(header))) => {
                    match shared.authenticate_after_refresh(&header, &ctx).await {
                        Some(caller) => Some(caller),
                        None => return Ok(refuse(&ctx, err).await),
                    }
                }
                Err((err, None)) => return Ok(refuse(&ctx, err).await),
            };
            if let (Some(limiter), Some(caller)) = (&shared.limiter, &caller)
                && let Err(err) = limiter.check(&caller.principal)
            {
                ctx.caller = Some(Arc::clone(caller));
                return Ok(refuse(&ctx, err).await);
            }
            ctx.caller = caller;
            let ctx = Arc::new(ctx);
            request.extensions_mut().insert(Arc::clone(&ctx));
            let response = inner.call(request).await?;
            let outcome = response_outcome(&response);
            match ctx.auditor.record(ctx.record("call", outcome)).await {
                Ok(()) => Ok(response.map(AccessBody::wrap)),
                Err(err) => Ok(error_response(err)),
            }
        })
    }
}

impl Shared {
    /// Whether `header` is a bearer cipherd token this replica does not know.
    fn unknown_token(&self, header: &HeaderValue) -> bool {
        let Ok(unsealed) = self.core.unsealed() else {
            return false;
        };
        bearer(header).is_some_and(|t| unsealed.auth.is_unknown_token(t))
    }

    /// Authenticates `header` again after reading its token from storage
    /// ([`AuthState::refresh_token`](crate::auth::state::AuthState::refresh_token));
    /// `None` if the token is still unknown or refused.
    async fn authenticate_after_refresh(
        &self,
        header: &HeaderValue,
        ctx: &CallCtx,
    ) -> Option<Arc<Caller>> {
        let unsealed = self.core.unsealed().ok()?;
        let token = bearer(header)?;
        if !unsealed.auth.refresh_token(token).await {
            return None;
        }
        tracing::debug!("token found in storage before its change notification");
        self.authenticate(Some(header), ctx.peer_certificate.as_deref())
            .ok()
    }

    /// The caller behind `header` (or the client certificate).
    fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        certificate: Option<&str>,
    ) -> Result<Arc<Caller>, Error> {
        let unsealed = self.core.unsealed()?;
        let auth = &unsealed.auth;
        let Some(header) = header else {
            return match certificate {
                Some(identity) => Ok(self.role_caller(auth, identity, &[], AuthMethod::Mtls)),
                None => Err(refused("no credential")),
            };
        };
        let value = header
            .to_str()
            .map_err(|_| refused("malformed authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| refused("authorization is not a Bearer credential"))?;
        if state::looks_like_token(token) {
            let entry = auth
                .authenticate(token)
                .map_err(|why| refused(why.as_str()))?;
            let names = entry.record.policies.clone();
            let display = if entry.record.display_name.is_empty() {
                format!("token:{}", entry.accessor)
            } else {
                entry.record.display_name.clone()
            };
            return Ok(Arc::new(Caller {
                principal: display,
                method: AuthMethod::Token,
                accessor: Some(entry.accessor.clone()),
                policies: auth.policies(&names),
                policy_names: names,
            }));
        }
        let Some(jwt) = &self.jwt else {
            return Err(refused("not a cipherd token, and JWTs are not configured"));
        };
        let identity = jwt.verify(token).map_err(|e| {
            tracing::info!(error = %e, "JWT refused");
            Error::Unauthenticated(UNAUTHENTICATED)
        })?;
        Ok(self.role_caller(auth, &identity.subject, &identity.groups, AuthMethod::Jwt))
    }

    fn role_caller(
        &self,
        auth: &AuthState,
        principal: &str,
        groups: &[String],
        method: AuthMethod,
    ) -> Arc<Caller> {
        let names = auth.role_policies(principal, groups);
        Arc::new(Caller {
            principal: principal.to_owned(),
            method,
            accessor: None,
            policies: auth.policies(&names),
            policy_names: names,
        })
    }
}

/// The one message every refused credential gets.
const UNAUTHENTICATED: &str = "missing, malformed, expired, revoked or invalid credential";

/// The token of a `Bearer` authorization header.
fn bearer(header: &HeaderValue) -> Option<&str> {
    let value = header.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

fn refused(why: &'static str) -> Error {
    tracing::info!(why, "credential refused");
    Error::Unauthenticated(UNAUTHENTICATED)
}

/// Answers `err` after trying to record it; the record attempt is also what
/// brings a recovered audit sink back into service.
async fn refuse<B>(ctx: &CallCtx, err: Error) -> http::Response<AccessBody<B>> {
    let record = ctx.record("call", outcome_of(&err));
    match ctx.auditor.record(record).await {
        Ok(()) => error_response(err),
        Err(audit) => error_response(audit),
    }
}

/// The gRPC outcome of a response: trailers-only responses carry the status in
/// their headers; others succeeded as far as the service is concerned.
fn response_outcome<B>(response: &http::Response<B>) -> Outcome {
    let headers = response.headers();
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return OK;
    };
    let code = tonic::Code::from_i32(code);
    if code == tonic::Code::Ok {
        return OK;
    }
    let reason = headers
        .get("grpc-status-details-bin")
        .and_then(|v| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(
                    v.as_bytes()
                        .trim_ascii_end()
                        .strip_suffix(b"==")
                        .unwrap_or(v.as_bytes()),
                )
                .ok()
        })
        .and_then(|bytes| tonic_types::pb::Status::decode(&bytes[..]).ok())
        .and_then(|status| {
            status.details.iter().find_map(|any| {
                (any.type_url == tonic_types::ErrorInfo::TYPE_URL)
                    .then(|| tonic_types::pb::ErrorInfo::decode(&any.value[..]).ok())
                    .flatten()
                    .map(|info| info.reason)
            })
        });
    Outcome {
        code: code_name(code),
        reason,
    }
}

/// The canonical gRPC code name, e.g. `PERMISSION_DENIED`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn error_response<B>(err: Error) -> http::Response<AccessBody<B>> {
    tonic::Status::from(err)
        .into_http::<()>()
        .map(|()| AccessBody { inner: None })
}

pin_project_lite::pin_project! {
    /// The response body: the service's, or empty for this layer's refusals.
    pub struct AccessBody<B> {
        #[pin]
        inner: Option<B>,
    }
}

impl<B> AccessBody<B> {
    fn wrap(body: B) -> Self {
        Self { inner: Some(body) }
    }
}

impl<B: Body<Data = Bytes>> Body for AccessBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.as_pin_mut() {
            Some(inner) => inner.poll_frame(cx),
            None => Poll::Ready(None),
        }
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
