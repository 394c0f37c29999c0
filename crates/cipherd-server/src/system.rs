//! The `cipherd.v1.SystemService` service: status, init, unseal, seal.
//!
//! `Status`, `Init` and `Unseal` need no credential (a sealed server cannot check
//! one, and `Init` creates the first); they are audited like every call. `Seal`
//! and `Rekey` need the `system` operation (and `Rekey` then the shares).

use std::sync::Arc;

use cipherd_proto::v1::{self as pb, system_service_server::SystemService};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::{
    access::CallCtx,
    auth::policy::Operation,
    seal::{Core, RekeyAction, RekeyPhase, RotateAction, RotatePhase, SealStatus},
};

/// The implementation of the `SystemService` gRPC service.
#[derive(Debug, Clone)]
pub struct SystemHandler {
    core: Arc<Core>,
}

impl SystemHandler {
    /// A service over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    fn status_reply(&self, s: SealStatus) -> pb::StatusResponse {
        pb::StatusResponse {
            initialized: s.initialized,
            sealed: s.sealed,
            threshold: s.threshold.into(),
            shares: s.shares.into(),
            progress: s.progress.into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage: self.core.params().storage.backend().to_owned(),
            dev_mode: self.core.params().dev,
        }
    }
}

#[tonic::async_trait]
impl SystemService for SystemHandler {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.core.status().await?;
        Ok(Response::new(self.status_reply(s)))
    }

    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let r = request.into_inner();
        let (shares, root_token) = self.core.init(r.shares, r.threshold).await?;
        Ok(Response::new(pb::InitResponse {
            shares,
            // The reply is the one copy handed out; ours is wiped on drop.
            root_token: root_token.as_str().to_owned(),
        }))
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        let r = request.into_inner();
        let s = self.core.unseal(r.share, r.reset).await?;
        Ok(Response::new(pb::UnsealResponse {
            sealed: s.sealed,
            threshold: s.threshold.into(),
            progress: s.progress.into(),
        }))
    }

    async fn seal(
        &self,
        request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        self.core.seal().await?;
        Ok(Response::new(pb::SealResponse {}))
    }

    async fn rotate_root(
        &self,
        request: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        let r = request.into_inner();
        let action = match r.action {
            None => RotateAction::Status,
            Some(pb::rotate_root_request::Action::Start(_)) => RotateAction::Start,
            Some(pb::rotate_root_request::Action::Share(share)) => RotateAction::Share {
                text: Zeroizing::new(share),
                nonce: r.nonce,
            },
            Some(pb::rotate_root_request::Action::Cancel(_)) => RotateAction::Cancel,
        };
        let s = self.core.rotate_root(action).await?;
        Ok(Response::new(pb::RotateRootResponse {
            phase: match s.phase {
                RotatePhase::None => pb::RotateRootPhase::None,
                RotatePhase::Collecting => pb::RotateRootPhase::Collecting,
                RotatePhase::Resealing => pb::RotateRootPhase::Resealing,
                RotatePhase::Done => pb::RotateRootPhase::Done,
                RotatePhase::Stopped => pb::RotateRootPhase::Stopped,
            } as i32,
            nonce: s.nonce,
            progress: s.progress.into(),
            required: s.required.into(),
            root_generation: s.root_generation,
            resealed: s.resealed,
            error: s.error,
        }))
    }

    async fn rekey(
        &self,
        request: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::RekeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        let r = request.into_inner();
        let action = match r.action {
            None => RekeyAction::Status,
            Some(pb::rekey_request::Action::Start(start)) => RekeyAction::Start {
                shares: start.shares,
                threshold: start.threshold,
            },
            Some(pb::rekey_request::Action::Share(share)) => RekeyAction::Share {
                text: Zeroizing::new(share),
                nonce: r.nonce,
            },
            Some(pb::rekey_request::Action::Cancel(_)) => RekeyAction::Cancel,
        };
        let s = self.core.rekey(action).await?;
        Ok(Response::new(pb::RekeyResponse {
            phase: match s.phase {
                RekeyPhase::None => pb::RekeyPhase::None,
                RekeyPhase::Collecting => pb::RekeyPhase::Collecting,
                RekeyPhase::Verifying => pb::RekeyPhase::Verifying,
                RekeyPhase::Done => pb::RekeyPhase::Done,
            } as i32,
            nonce: s.nonce,
            progress: s.progress.into(),
            required: s.required.into(),
            new_shares: s.new_shares.into(),
            new_threshold: s.new_threshold.into(),
            // The reply is the one copy handed out.
            shares: s.shares,
        }))
    }
}
