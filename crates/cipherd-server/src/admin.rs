//! The `cipherd.v1.KeyAdminService` service: the key-management plane.
//!
//! Every call is authorized against the key it names (`key.create`, `key.read`,
//! `key.rotate`, `key.config`, `key.trim`, `key.delete`, `key.export`) before the
//! key is looked up, so a denied call on a missing key looks exactly like one on an
//! existing key. Setting `deletion_allowed` needs `key.delete` as well as
//! `key.config` (or `key.create`); creating an exportable key needs `key.export`.
//! `ListKeys` lists only the names the caller may `key.read`.
//!
//! `DeleteKey` schedules the destruction after a waiting period and
//! `CancelKeyDeletion` (also `key.delete`) takes it back; a key pending deletion
//! answers every other call but `GetKey` and `ListKeys` with
//! `KEY_PENDING_DELETION`. A waiting period of zero (only if
//! `keys.deletion_waiting_period_s = 0`) destroys the key in the call.
//!
//! Metadata only, except `ExportKey`, which returns material for keys created
//! exportable and nothing else. Exportability is fixed at creation:
//! `UpdateKeyConfig` can neither turn it on nor off (`FAILED_PRECONDITION`).
//!
//! `ExportKey` builds each version's material as `Bytes` over a zeroizing buffer,
//! so our copy is wiped when the response is dropped; the copy tonic makes while
//! encoding the reply into its HTTP/2 buffers is outside this crate's control.

use std::sync::Arc;

use bytes::Bytes;
use cipherd_core::{
    KeyType,
    keyring::{ConfigUpdate, CreateOptions, KeyVersion},
};
use cipherd_proto::v1::{self as pb, key_admin_service_server::KeyAdminService};
use prost_types::{Duration as ProtoDuration, Timestamp};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::{
    access::CallCtx,
    auth::policy::Operation,
    error::{Error, Result},
    keys::{KeyManager, LoadedKey, refuse_pending},
    seal::Core,
    transit::key_name,
};

/// Default and maximum page sizes of `ListKeys`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The implementation of the `KeyAdminService` gRPC service.
#[derive(Debug, Clone)]
pub struct KeyAdminHandler {
    core: Arc<Core>,
}

impl KeyAdminHandler {
    /// A service over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl KeyAdminService for KeyAdminHandler {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let unsealed = self.core.unsealed()?;
        let name = key_name(&r.name)?;
        ctx.authorize(Operation::KeyCreate, Some(name.as_str()), "", "")?;
        if r.deletion_allowed {
            ctx.authorize(Operation::KeyDelete, Some(name.as_str()), "", "")?;
        }
        if r.exportable {
            ctx.authorize(Operation::KeyExport, Some(name.as_str()), "", "")?;
        }
        let opts = CreateOptions {
            key_type: key_type_from_proto(r.r#type)?,
            derived: r.derived,
            exportable: r.exportable,
            deletion_allowed: r.deletion_allowed,
            auto_rotate_period_s: self.auto_rotate_period(r.auto_rotate_period)?.unwrap_or(0),
        };
        let key = unsealed.keys.create(&name, opts).await?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let name = key_name(&request.into_inner().name)?;
        ctx.authorize(Operation::KeyRead, Some(name.as_str()), "", "")?;
        let key = unsealed.keys.reload(&name).await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let caller = Arc::clone(ctx.caller()?);
        ctx.fields().operation = Operation::KeyRead.as_str();
        let r = request.into_inner();
        let unsealed = self.core.unsealed()?;
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        // The page token is the last name of the previous page. Names the caller
        // may not read are skipped, so a page scans on until it is full.
        let mut after = (!r.page_token.is_empty()).then(|| r.page_token.clone());
        let mut names = Vec::with_capacity(size + 1);
        loop {
            let page = unsealed.keys.list(after.as_deref(), size + 1).await?;
            let exhausted = page.len() <= size;
            after = page.last().cloned();
            names.extend(
                page.into_iter()
                    .filter(|n| caller.may(Operation::KeyRead, Some(n))),
            );
            if names.len() > size || exhausted {
                break;
            }
        }
        let next_page_token = if names.len() > size {
            names.truncate(size);
            names.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListKeysResponse {
            names,
            next_page_token,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let name = key_name(&request.into_inner().name)?;
        ctx.authorize(Operation::KeyRotate, Some(name.as_str()), "", "")?;
        let now = crate::keys::now_ms();
        let key = unsealed
            .keys
            .update(&name, |k| {
                refuse_pending(k)?;
                k.rotate(now).map(|_| true).map_err(Error::from)
            })
            .await?;
        tracing::info!(key = %name, version = %key.key().latest_version(), "key rotated");
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn update_key_config(
        &self,
        request: Request<pb::UpdateKeyConfigRequest>,
    ) -> Result<Response<pb::UpdateKeyConfigResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let unsealed = self.core.unsealed()?;
        let name = key_name(&r.name)?;
        ctx.authorize(Operation::KeyConfig, Some(name.as_str()), "", "")?;
        if r.deletion_allowed == Some(true) {
            ctx.authorize(Operation::KeyDelete, Some(name.as_str()), "", "")?;
        }
        let min_decryption_version = r
            .min_decryption_version
            .map(KeyVersion::new)
            .transpose()
            .map_err(Error::from)?;
        let period = self.auto_rotate_period(r.auto_rotate_period)?;
        let key = unsealed
            .keys
            .update(&name, |k| {
                refuse_pending(k)?;
                if let Some(period) = period {
                    k.set_auto_rotate_period_s(period);
                }
                k.update_config(ConfigUpdate {
                    min_decryption_version,
                    min_encryption_version: r.min_encryption_version,
                    deletion_allowed: r.deletion_allowed,
                    exportable: r.exportable,
                })?;
                Ok(true)
            })
            .await?;
        tracing::info!(key = %name, "key config updated");
        Ok(Response::new(pb::UpdateKeyConfigResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn trim_key(
        &self,
        request: Request<pb::TrimKeyRequest>,
    ) -> Result<Response<pb::TrimKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let unsealed = self.core.unsealed()?;
        let name = key_name(&r.name)?;
        ctx.authorize(Operation::KeyTrim, Some(name.as_str()), "", "")?;
        let floor = KeyVersion::new(r.min_available_version).map_err(Error::from)?;
        let key = unsealed
            .keys
            .update(&name, |k| {
                refuse_pending(k)?;
                k.trim(floor)?;
                Ok(true)
            })
            .await?;
        tracing::info!(key = %name, min_available_version = %floor, "key trimmed");
        Ok(Response::new(pb::TrimKeyResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let r = request.into_inner();
        let name = key_name(&r.name)?;
        ctx.authorize(Operation::KeyDelete, Some(name.as_str()), "", "")?;
        let lifecycle = self.core.params().lifecycle;
        let floor = lifecycle.deletion_waiting_period;
        let wait = match r.waiting_period {
            None => floor,
            Some(d) => {
                let wait = std::time::Duration::from_secs(duration_seconds(d, "waiting_period")?);
                if wait < floor
                    || wait > crate::config::LifecycleParams::MAX_DELETION_WAITING_PERIOD
                {
                    return Err(Error::InvalidArgument(format!(
                        "waiting_period must be between {} s (keys.deletion_waiting_period_s) and {} s",
                        floor.as_secs(),
                        crate::config::LifecycleParams::MAX_DELETION_WAITING_PERIOD.as_secs()
                    ))
                    .into());
                }
                wait
            }
        };
        let now = crate::keys::now_ms();
        let at = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        let key = unsealed.keys.schedule_deletion(&name, at).await?;
        let key = if wait.is_zero() {
            unsealed.keys.destroy_if_due(&name, at).await?;
            None
        } else {
            Some(key_to_proto(&unsealed.keys, &key).await?)
        };
        Ok(Response::new(pb::DeleteKeyResponse {
            deletion_time: Some(timestamp(at)),
            key,
        }))
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<pb::CancelKeyDeletionRequest>,
    ) -> Result<Response<pb::CancelKeyDeletionResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let name = key_name(&request.into_inner().name)?;
        ctx.authorize(Operation::KeyDelete, Some(name.as_str()), "", "")?;
        let key = unsealed.keys.cancel_deletion(&name).await?;
        Ok(Response::new(pb::CancelKeyDeletionResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn backup_key(
        &self,
        request: Request<pb::BackupKeyRequest>,
    ) -> Result<Response<pb::BackupKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let name = key_name(&request.into_inner().name)?;
        ctx.authorize(Operation::KeyBackup, Some(name.as_str()), "", "")?;
        let key_backup = unsealed.keys.backup_key(&name).await?;
        Ok(Response::new(pb::BackupKeyResponse {
            key_backup: key_backup.into(),
        }))
    }

    async fn restore_key(
        &self,
        request: Request<pb::RestoreKeyRequest>,
    ) -> Result<Response<pb::RestoreKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let unsealed = self.core.unsealed()?;
        let r = request.into_inner();
        // The name is in the backup's clear header: authorize before opening it.
        let name = unsealed.keys.key_backup_name(&r.key_backup)?;
        ctx.authorize(Operation::KeyBackup, Some(name.as_str()), "", "")?;
        let key = unsealed.keys.restore_key(&r.key_backup).await?;
        Ok(Response::new(pb::RestoreKeyResponse {
            key: Some(key_to_proto(&unsealed.keys, &key).await?),
        }))
    }

    async fn export_key(
        &self,
        request: Request<pb::ExportKeyRequest>,
    ) -> Result<Response<pb::ExportKeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        let r = request.into_inner();
        let unsealed = self.core.unsealed()?;
        let name = key_name(&r.name)?;
        ctx.authorize(Operation::KeyExport, Some(name.as_str()), "", "")?;
        let loaded = unsealed.keys.reload(&name).await?;
        loaded.check_usable()?;
        let key = loaded.key();
        if !key.exportable() {
            return Err(Error::FailedPrecondition(format!(
                "key \"{name}\" was not created exportable"
            ))
            .into());
        }
        let wanted = r
            .version
            .map(KeyVersion::new)
            .transpose()
            .map_err(Error::from)?;
        let mut versions = Vec::new();
        for (version, _) in key.versions() {
            if wanted.is_some_and(|w| w != version) {
                continue;
            }
            // Deliberate plaintext export: the key was created exportable and the
            // caller asked for it. This is the only path that returns material.
            // `Bytes::from_owner` keeps the zeroizing buffer as the owner, so the
            // bytes are wiped when the last reference (the encoded reply) drops.
            let material = Bytes::from_owner(Zeroizing::new(
                key.material(version)
                    .map_err(Error::from)?
                    .expose_secret()
                    .to_vec(),
            ));
            versions.push(pb::ExportedKeyVersion {
                version: version.get(),
                material,
            });
        }
        if let (Some(w), true) = (wanted, versions.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "key \"{name}\" has no version {w} available"
            ))
            .into());
        }
        if key.derived() {
            tracing::warn!(
                key = %name,
                versions = versions.len(),
                "key material exported; this is a derived key, so the export is its base \
                 material and opens the data of every context"
            );
        } else {
            tracing::warn!(key = %name, versions = versions.len(), "key material exported");
        }
        Ok(Response::new(pb::ExportKeyResponse {
            name: name.to_string(),
            r#type: key_type_to_proto(key.key_type()) as i32,
            versions,
        }))
    }
}

impl KeyAdminHandler {
    /// A requested `auto_rotate_period` in seconds: `None` if unset, 0 to turn
    /// rotation off, else at least `keys.min_auto_rotate_period_s`.
    fn auto_rotate_period(&self, period: Option<ProtoDuration>) -> Result<Option<u64>> {
        let Some(period) = period else {
            return Ok(None);
        };
        let seconds = duration_seconds(period, "auto_rotate_period")?;
        let min = self
            .core
            .params()
            .lifecycle
            .min_auto_rotate_period
            .as_secs();
        if seconds != 0 && seconds < min {
            return Err(Error::InvalidArgument(format!(
                "auto_rotate_period must be 0 (off) or at least {min} s (keys.min_auto_rotate_period_s)"
            )));
        }
        Ok(Some(seconds))
    }
}

/// Whole seconds of a non-negative duration field (nanos must be zero).
fn duration_seconds(d: ProtoDuration, field: &str) -> Result<u64> {
    match (u64::try_from(d.seconds), d.nanos) {
        (Ok(s), 0) => Ok(s),
        _ => Err(Error::InvalidArgument(format!(
            "{field} must be a non-negative whole number of seconds"
        ))),
    }
}

/// Maps the proto key type; unspecified means the default, xaes-256-gcm.
fn key_type_from_proto(value: i32) -> Result<KeyType> {
    match pb::KeyType::try_from(value) {
        Ok(pb::KeyType::Unspecified | pb::KeyType::Xaes256Gcm) => Ok(KeyType::Xaes256Gcm),
        Ok(pb::KeyType::Aes256Gcm96) => Ok(KeyType::Aes256Gcm96),
        Ok(pb::KeyType::Chacha20Poly1305) => Ok(KeyType::ChaCha20Poly1305),
        Ok(pb::KeyType::Xchacha20Poly1305) => Ok(KeyType::XChaCha20Poly1305),
        Err(_) => Err(Error::InvalidArgument(format!("unknown key type {value}"))),
    }
}

fn key_type_to_proto(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Xaes256Gcm => pb::KeyType::Xaes256Gcm,
        KeyType::Aes256Gcm96 => pb::KeyType::Aes256Gcm96,
        KeyType::ChaCha20Poly1305 => pb::KeyType::Chacha20Poly1305,
        KeyType::XChaCha20Poly1305 => pb::KeyType::Xchacha20Poly1305,
    }
}

fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

async fn key_to_proto(keys: &KeyManager, loaded: &LoadedKey) -> Result<pb::Key> {
    let key = loaded.key();
    let counted = key.key_type().usage_limit().is_some();
    let limit = if counted {
        keys.usage_policy().limit
    } else {
        0
    };
    let uses = keys.version_uses(loaded).await?;
    let mut versions = Vec::new();
    for (version, created_at_ms) in key.versions() {
        let used = uses
            .iter()
            .find(|u| u.version == version.get())
            .copied()
            .unwrap_or_default();
        let encryptions = if counted {
            match keys.reserved_encryptions(key, version).await {
                Ok(n) => n,
                // The version's usage record is gone or corrupt (the ledger logs
                // which): encryption under it is refused. Show it as used up, the
                // only bound left, so that the key can still be read, rotated and
                // trimmed.
                Err(Error::Corrupt(_)) => limit,
                Err(e) => return Err(e),
            }
        } else {
            0
        };
        versions.push(pb::KeyVersionInfo {
            version: version.get(),
            created_at: Some(timestamp(created_at_ms)),
            encryptions,
            encryption_limit: limit,
            encrypt_count: used.encryptions,
            decrypt_count: used.decryptions,
            last_used: (used.last_used_ms != 0).then(|| timestamp(used.last_used_ms)),
        });
    }
    Ok(pb::Key {
        name: key.name().to_string(),
        r#type: key_type_to_proto(key.key_type()) as i32,
        derived: key.derived(),
        exportable: key.exportable(),
        deletion_allowed: key.deletion_allowed(),
        latest_version: key.latest_version().get(),
        min_decryption_version: key.min_decryption_version().get(),
        min_encryption_version: key.min_encryption_version(),
        min_available_version: key.min_available_version().get(),
        versions,
        created_at: Some(timestamp(key.created_at_ms())),
        deletion_time: key.deletion_time_ms().map(timestamp),
        auto_rotate_period: (key.auto_rotate_period_s() != 0).then(|| ProtoDuration {
            seconds: i64::try_from(key.auto_rotate_period_s()).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        id: key.id().map(|id| id.to_string()).unwrap_or_default(),
    })
}
