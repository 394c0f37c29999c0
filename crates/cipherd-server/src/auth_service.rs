//! The `cipherd.v1.AuthService`, `PolicyService` and `AuditService` services:
//! tokens, roles, policies, and the audit hash for investigators.
//!
//! Each RPC needs its administration operation (`token`, `role`, `policy`,
//! `audit`). A new token's policies must be among the caller's own unless the
//! caller may also administer policies (who could grant itself anything anyway),
//! so `token` alone never escalates; the same holds for roles.

use std::{sync::Arc, time::Duration};

use cipherd_proto::v1::{
    self as pb, audit_service_server::AuditService, auth_service_server::AuthService,
    policy_service_server::PolicyService,
};
use tonic::{Request, Response, Status};

use crate::{
    access::{CallCtx, Caller},
    auth::{
        policy::Operation,
        state::{self, RoleRecord, TokenEntry},
    },
    error::{Error, Result},
    seal::Core,
};

/// The implementation of `AuthService`, `PolicyService` and `AuditService`.
#[derive(Debug, Clone)]
pub struct AuthHandler {
    core: Arc<Core>,
}

impl AuthHandler {
    /// The services over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// The call's context after checking `operation` (no key).
    fn admit<T>(&self, request: &Request<T>, operation: Operation) -> Result<Arc<CallCtx>> {
        let ctx = CallCtx::of(request)?;
        ctx.authorize(operation, None, "", "")?;
        Ok(ctx)
    }
}

/// Refuses to hand out policies the caller does not hold itself, unless it may
/// administer policies.
fn check_grant(caller: &Caller, policies: &[String]) -> Result<()> {
    if caller.is_root() || caller.may(Operation::Policy, None) {
        return Ok(());
    }
    match policies.iter().find(|p| !caller.policy_names.contains(p)) {
        None => Ok(()),
        Some(p) => {
            tracing::warn!(principal = %caller.principal, policy = %p, "refused to grant a policy the caller does not hold");
            Err(Error::PermissionDenied)
        }
    }
}

fn token_info(entry: &TokenEntry) -> pb::TokenInfo {
    pb::TokenInfo {
        accessor: entry.accessor.clone(),
        display_name: entry.record.display_name.clone(),
        policies: entry.record.policies.clone(),
        created_unix: entry.record.created_unix,
        expires_unix: entry.record.expires_unix,
        created_by: entry.record.created_by.clone(),
    }
}

fn check_policy_names(policies: &[String]) -> Result<()> {
    if policies.is_empty() {
        return Err(Error::InvalidArgument("name at least one policy".into()));
    }
    match policies.iter().find(|p| !state::valid_name(p)) {
        Some(p) => Err(Error::InvalidArgument(format!("bad policy name {p:?}"))),
        None => Ok(()),
    }
}

#[tonic::async_trait]
impl AuthService for AuthHandler {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let ctx = self.admit(&request, Operation::Token)?;
        let caller = Arc::clone(ctx.caller()?);
        let r = request.into_inner();
        let mut policies = r.policies;
        policies.sort();
        policies.dedup();
        check_policy_names(&policies)?;
        check_grant(&caller, &policies)?;
        let params = self.core.params().auth;
        let ttl = match r.ttl_seconds {
            0 => params.default_token_ttl,
            s => Duration::from_secs(s),
        };
        if ttl > params.max_token_ttl {
            return Err(Error::InvalidArgument(format!(
                "ttl of {} s exceeds auth.max_token_ttl_s = {}",
                ttl.as_secs(),
                params.max_token_ttl.as_secs()
            ))
            .into());
        }
        if r.display_name.len() > 128 || r.display_name.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(
                "display_name: at most 128 bytes, no control characters".into(),
            )
            .into());
        }
        let unsealed = self.core.unsealed()?;
        let (token, entry) = unsealed
            .auth
            .create_token(
                policies,
                Some(ttl),
                r.display_name,
                caller.principal.clone(),
            )
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.as_str().to_owned(),
            info: Some(token_info(&entry)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.admit(&request, Operation::Token)?;
        let unsealed = self.core.unsealed()?;
        let tokens = unsealed
            .auth
            .tokens()
            .iter()
            .map(|e| token_info(e))
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn lookup_token(
        &self,
        request: Request<pb::LookupTokenRequest>,
    ) -> Result<Response<pb::LookupTokenResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let caller = Arc::clone(ctx.caller()?);
        let accessor = request.into_inner().accessor;
        // Any token may look itself up; others need `token`.
        let own = accessor.is_empty() || caller.accessor.as_deref() == Some(accessor.as_str());
        if own {
            ctx.fields().operation = Operation::Token.as_str();
        } else {
            ctx.authorize(Operation::Token, None, "", "")?;
        }
        let accessor = if accessor.is_empty() {
            caller.accessor.clone().ok_or_else(|| {
                Error::InvalidArgument(
                    "this call was not made with a token; name an accessor".into(),
                )
            })?
        } else {
            accessor
        };
        let unsealed = self.core.unsealed()?;
        let entry = unsealed
            .auth
            .token(&accessor)
            .ok_or_else(|| Error::NotFound("token".into()))?;
        Ok(Response::new(pb::LookupTokenResponse {
            token: Some(token_info(&entry)),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let caller = Arc::clone(ctx.caller()?);
        let accessor = request.into_inner().accessor;
        // A token may revoke itself (log out); others need `token`.
        if caller.accessor.as_deref() == Some(accessor.as_str()) {
            ctx.fields().operation = Operation::Token.as_str();
        } else {
            ctx.authorize(Operation::Token, None, "", "")?;
        }
        let unsealed = self.core.unsealed()?;
        unsealed.auth.revoke_token(&accessor).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn write_role(
        &self,
        request: Request<pb::WriteRoleRequest>,
    ) -> Result<Response<pb::WriteRoleResponse>, Status> {
        let ctx = self.admit(&request, Operation::Role)?;
        let caller = Arc::clone(ctx.caller()?);
        let role = request
            .into_inner()
            .role
            .ok_or_else(|| Error::InvalidArgument("role is required".into()))?;
        let mut policies = role.policies;
        policies.sort();
        policies.dedup();
        check_policy_names(&policies)?;
        check_grant(&caller, &policies)?;
        let unsealed = self.core.unsealed()?;
        unsealed
            .auth
            .write_role(
                &role.name,
                RoleRecord {
                    principals: role.principals,
                    groups: role.groups,
                    policies,
                },
            )
            .await?;
        Ok(Response::new(pb::WriteRoleResponse {}))
    }

    async fn read_role(
        &self,
        request: Request<pb::ReadRoleRequest>,
    ) -> Result<Response<pb::ReadRoleResponse>, Status> {
        self.admit(&request, Operation::Role)?;
        let name = request.into_inner().name;
        let unsealed = self.core.unsealed()?;
        let role = unsealed
            .auth
            .role(&name)
            .ok_or_else(|| Error::NotFound(format!("role {name:?}")))?;
        Ok(Response::new(pb::ReadRoleResponse {
            role: Some(role_to_proto(&role.name, &role.record)),
        }))
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        self.admit(&request, Operation::Role)?;
        let unsealed = self.core.unsealed()?;
        let roles = unsealed
            .auth
            .roles()
            .iter()
            .map(|r| role_to_proto(&r.name, &r.record))
            .collect();
        Ok(Response::new(pb::ListRolesResponse { roles }))
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        self.admit(&request, Operation::Role)?;
        let name = request.into_inner().name;
        let unsealed = self.core.unsealed()?;
        unsealed.auth.delete_role(&name).await?;
        Ok(Response::new(pb::DeleteRoleResponse {}))
    }
}

fn role_to_proto(name: &str, record: &RoleRecord) -> pb::Role {
    pb::Role {
        name: name.to_owned(),
        principals: record.principals.clone(),
        groups: record.groups.clone(),
        policies: record.policies.clone(),
    }
}

#[tonic::async_trait]
impl PolicyService for AuthHandler {
    async fn write_policy(
        &self,
        request: Request<pb::WritePolicyRequest>,
    ) -> Result<Response<pb::WritePolicyResponse>, Status> {
        self.admit(&request, Operation::Policy)?;
        let r = request.into_inner();
        if !state::valid_name(&r.name) {
            return Err(Error::InvalidPolicy(format!(
                "name {:?}: use 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
                r.name
            ))
            .into());
        }
        if r.document.len() > MAX_POLICY_DOCUMENT {
            return Err(Error::InvalidPolicy(format!(
                "the document is {} bytes; the limit is {MAX_POLICY_DOCUMENT}",
                r.document.len()
            ))
            .into());
        }
        let unsealed = self.core.unsealed()?;
        unsealed.auth.write_policy(&r.name, &r.document).await?;
        Ok(Response::new(pb::WritePolicyResponse {}))
    }

    async fn read_policy(
        &self,
        request: Request<pb::ReadPolicyRequest>,
    ) -> Result<Response<pb::ReadPolicyResponse>, Status> {
        self.admit(&request, Operation::Policy)?;
        let name = request.into_inner().name;
        if name == state::ROOT_POLICY {
            return Ok(Response::new(pb::ReadPolicyResponse {
                name,
                document: ROOT_POLICY_DOCUMENT.to_owned(),
            }));
        }
        let unsealed = self.core.unsealed()?;
        let policy = unsealed
            .auth
            .policy(&name)
            .ok_or_else(|| Error::NotFound(format!("policy {name:?}")))?;
        Ok(Response::new(pb::ReadPolicyResponse {
            name,
            document: policy.document.clone(),
        }))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.admit(&request, Operation::Policy)?;
        let unsealed = self.core.unsealed()?;
        Ok(Response::new(pb::ListPoliciesResponse {
            names: unsealed.auth.policy_names(),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        self.admit(&request, Operation::Policy)?;
        let name = request.into_inner().name;
        let unsealed = self.core.unsealed()?;
        unsealed.auth.delete_policy(&name).await?;
        Ok(Response::new(pb::DeletePolicyResponse {}))
    }
}

/// The largest policy document accepted, in bytes.
const MAX_POLICY_DOCUMENT: usize = 64 << 10;

/// What `ReadPolicy("root")` shows: the built-in policy is not a document.
const ROOT_POLICY_DOCUMENT: &str =
    "# built in: every operation on every key, and all administration\n";

#[tonic::async_trait]
impl AuditService for AuthHandler {
    async fn hash(
        &self,
        request: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.admit(&request, Operation::Audit)?;
        let value = request.into_inner().value;
        let unsealed = self.core.unsealed()?;
        Ok(Response::new(pb::HashResponse {
            hmac: unsealed.auth.audit_hash(&value),
        }))
    }
}
