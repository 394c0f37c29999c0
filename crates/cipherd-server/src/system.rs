//! The `cipherd.v1.SystemService` service: status, init, unseal, seal.

use std::sync::Arc;

use cipherd_proto::v1::{self as pb, system_service_server::SystemService};
use tonic::{Request, Response, Status};

use crate::seal::{Core, SealStatus};

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
            storage: "sqlite".to_owned(),
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
        let shares = self.core.init(r.shares, r.threshold).await?;
        Ok(Response::new(pb::InitResponse {
            shares,
            root_token: String::new(),
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
        _request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        self.core.seal().await?;
        Ok(Response::new(pb::SealResponse {}))
    }
}
