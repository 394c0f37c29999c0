//! Hand-written `Debug` impls for messages that carry plaintext, key material or
//! unseal shares: they print sizes, never contents (invariant 1). The bootstrap
//! test checks that the code generator emits no `Debug` of its own for these, and
//! that every message with such a field is listed. Messages that only nest these
//! (the batch and stream messages) keep their generated `Debug`, which prints the
//! nested messages through the impls below.

use std::fmt;

use crate::v1::{
    BackupKeyResponse, BackupResponse, CreateTokenResponse, DecryptResponse, EncryptItem,
    EncryptRequest, ExportKeyResponse, ExportedKeyVersion, GenerateDataKeyResponse, InitResponse,
    PlaintextResult, RekeyRequest, RekeyResponse, RestoreKeyRequest, RestoreRequest,
    RotateRootRequest, UnsealRequest, plaintext_result, rekey_request, rotate_root_request,
};

/// Formats a secret byte field as its length only.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted; {} bytes]", self.0)
    }
}

impl fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("key", &self.key)
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("associated_data", &Redacted(self.associated_data.len()))
            .field("context", &Redacted(self.context.len()))
            .field("key_version", &self.key_version)
            .field("encoding", &self.encoding)
            .finish()
    }
}

impl fmt::Debug for EncryptItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptItem")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("associated_data", &Redacted(self.associated_data.len()))
            .field("context", &Redacted(self.context.len()))
            .field("reference", &self.reference)
            .finish()
    }
}

impl fmt::Debug for BackupResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupResponse")
            .field("backup_chunk", &Redacted(self.backup_chunk.len()))
            .finish()
    }
}

impl fmt::Debug for BackupKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupKeyResponse")
            .field("key_backup", &Redacted(self.key_backup.len()))
            .finish()
    }
}

impl fmt::Debug for RestoreKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestoreKeyRequest")
            .field("key_backup", &Redacted(self.key_backup.len()))
            .finish()
    }
}

impl fmt::Debug for RestoreRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestoreRequest")
            .field("backup_chunk", &Redacted(self.backup_chunk.len()))
            .finish()
    }
}

impl fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for PlaintextResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let result: &dyn fmt::Debug = match &self.result {
            Some(plaintext_result::Result::Plaintext(p)) => &Redacted(p.len()),
            Some(plaintext_result::Result::Error(e)) => e,
            None => &None::<()>,
        };
        f.debug_struct("PlaintextResult")
            .field("reference", &self.reference)
            .field("result", result)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("plaintext", &Redacted(self.plaintext.len()))
            .field("ciphertext", &self.ciphertext)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for ExportKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportKeyResponse")
            .field("name", &self.name)
            .field("type", &self.r#type)
            .field("versions", &self.versions)
            .finish()
    }
}

impl fmt::Debug for ExportedKeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedKeyVersion")
            .field("version", &self.version)
            .field("material", &Redacted(self.material.len()))
            .finish()
    }
}

impl fmt::Debug for InitResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitResponse")
            .field("shares", &Redacted(self.shares.len()))
            .field("root_token", &Redacted(self.root_token.len()))
            .finish()
    }
}

impl fmt::Debug for CreateTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("token", &Redacted(self.token.len()))
            .field("info", &self.info)
            .finish()
    }
}

impl fmt::Debug for UnsealRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealRequest")
            .field("share", &Redacted(self.share.len()))
            .field("reset", &self.reset)
            .finish()
    }
}

impl fmt::Debug for RekeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RekeyRequest");
        match &self.action {
            Some(rekey_request::Action::Start(start)) => d.field("start", start),
            Some(rekey_request::Action::Share(share)) => d.field("share", &Redacted(share.len())),
            Some(rekey_request::Action::Cancel(cancel)) => d.field("cancel", cancel),
            None => d.field("action", &"none"),
        };
        d.field("nonce", &self.nonce).finish()
    }
}

impl fmt::Debug for RotateRootRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RotateRootRequest");
        match &self.action {
            Some(rotate_root_request::Action::Start(start)) => d.field("start", start),
            Some(rotate_root_request::Action::Share(share)) => {
                d.field("share", &Redacted(share.len()))
            }
            Some(rotate_root_request::Action::Cancel(cancel)) => d.field("cancel", cancel),
            None => d.field("action", &"none"),
        };
        d.field("nonce", &self.nonce).finish()
    }
}

impl fmt::Debug for RekeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RekeyResponse")
            .field("phase", &self.phase)
            .field("nonce", &self.nonce)
            .field("progress", &self.progress)
            .field("required", &self.required)
            .field("new_shares", &self.new_shares)
            .field("new_threshold", &self.new_threshold)
            .field("shares", &Redacted(self.shares.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"SSN 078-05-1120";

    #[test]
    fn secret_fields_never_print() {
        let dumps = [
            format!(
                "{:?}",
                EncryptRequest {
                    plaintext: SECRET.to_vec().into(),
                    associated_data: SECRET.to_vec().into(),
                    context: SECRET.to_vec().into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                EncryptItem {
                    plaintext: SECRET.to_vec().into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                DecryptResponse {
                    plaintext: SECRET.to_vec().into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                PlaintextResult {
                    result: Some(plaintext_result::Result::Plaintext(SECRET.to_vec().into())),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                GenerateDataKeyResponse {
                    plaintext: SECRET.to_vec().into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                ExportKeyResponse {
                    versions: vec![ExportedKeyVersion {
                        version: 1,
                        material: SECRET.to_vec().into()
                    }],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                InitResponse {
                    shares: vec![String::from_utf8_lossy(SECRET).into_owned()],
                    root_token: String::from_utf8_lossy(SECRET).into_owned(),
                }
            ),
            format!(
                "{:?}",
                CreateTokenResponse {
                    token: String::from_utf8_lossy(SECRET).into_owned(),
                    info: None,
                }
            ),
            format!(
                "{:?}",
                UnsealRequest {
                    share: String::from_utf8_lossy(SECRET).into_owned(),
                    reset: false
                }
            ),
            format!(
                "{:?}",
                BackupResponse {
                    backup_chunk: SECRET.to_vec().into(),
                }
            ),
            format!(
                "{:?}",
                RestoreRequest {
                    backup_chunk: SECRET.to_vec().into(),
                }
            ),
            format!(
                "{:?}",
                BackupKeyResponse {
                    key_backup: SECRET.to_vec().into(),
                }
            ),
            format!(
                "{:?}",
                RestoreKeyRequest {
                    key_backup: SECRET.to_vec().into(),
                }
            ),
            // Batch and stream messages nest the ones above.
            format!(
                "{:?}",
                crate::v1::EncryptStreamRequest {
                    items: vec![EncryptItem {
                        plaintext: SECRET.to_vec().into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                crate::v1::DecryptStreamResponse {
                    results: vec![PlaintextResult {
                        result: Some(plaintext_result::Result::Plaintext(SECRET.to_vec().into())),
                        ..Default::default()
                    }],
                }
            ),
            format!(
                "{:?}",
                crate::v1::BatchDecryptResponse {
                    results: vec![PlaintextResult {
                        result: Some(plaintext_result::Result::Plaintext(SECRET.to_vec().into())),
                        ..Default::default()
                    }],
                }
            ),
        ];
        for dump in dumps {
            assert!(!dump.contains("078-05"), "{dump}");
            assert!(!dump.contains("48, 55, 56"), "{dump}"); // the bytes' debug form
            assert!(dump.contains("redacted"), "{dump}");
        }
    }
}
