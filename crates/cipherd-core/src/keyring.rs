//! Named keys and their versions: the rules that make key versions safe to rely on.
//!
//! A [`NamedKey`] is a name, a key type, some policy (derived, exportable, deletion
//! allowed, minimum versions) and an append-only list of versions, each holding 256
//! bits of random material. This module enforces the keyring invariants:
//!
//! - version numbers start at 1, only ever grow, and are never reused;
//! - a version's material never changes once created;
//! - `min_available_version ≤ min_decryption_version ≤ latest_version`, and a
//!   nonzero `min_encryption_version` lies in `[min_decryption_version, latest_version]`;
//! - trimmed versions (below `min_available_version`) are gone for good;
//! - `exportable` is fixed at creation: it can never be turned on later (the key
//!   was not born exportable, so its material must never leave), and turning it
//!   off would pretend that already-exported material is safe.
//!
//! Derived keys record per version how the working key is derived
//! ([`Derivation`]): versions created by this code use [`Derivation::V2`]; a
//! version whose record has no `derivation` field predates it and keeps
//! [`Derivation::V1`], so its ciphertexts still open. Rotating such a key adds V2
//! versions.
//!
//! It also serializes a key to and from its storage record, validating every invariant
//! on load so that a corrupted record is refused rather than silently repaired.
//!
//! Each version also records whether encryptions under it have ever been counted
//! ([`NamedKey::usage_reserved`]): the server counts the encryptions of 96-bit-nonce
//! versions in separate usage records, and this flag, set once and never cleared,
//! lets it tell "never used" from "used, but the usage record has gone" (which must
//! fail closed, not restart the count at zero). Records of versions without the
//! flag stay as they were (the field is written only when set).
//!
//! This module does not do I/O, does not encrypt records (that is the
//! [`barrier`](crate::barrier)), and does not count encryptions per version (the
//! server does, durably). It knows nothing about time except the `now_ms` values
//! callers pass in.

use std::{collections::BTreeMap, fmt};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::{Derivation, KEY_LEN, KeyMaterial, SecretBytes};
use crate::{Error, KeyType, Result};

/// HKDF label for derived (per-context) keys: the working key of a derived key is
/// `material.derive(derivation, DERIVED_KEY_LABEL, context)` with the version's
/// [`Derivation`] (see [`KeyMaterial::derive`]).
pub const DERIVED_KEY_LABEL: &[u8] = b"cipherd/derived-key/v1";

/// The storage record format written by [`NamedKey::to_record`].
pub const RECORD_FORMAT: u32 = 1;

/// Longest accepted key name, in bytes (names are ASCII, so also in characters).
pub const MAX_KEY_NAME_LEN: usize = 128;

/// The name of a key: 1 to 128 characters of `[A-Za-z0-9_.-]`, not starting with
/// `.` or `-`.
///
/// The character set keeps names safe inside storage paths, URLs, metrics labels
/// and shell commands; the first-character rule rules out `.`/`..` path tricks and
/// names that look like command-line flags.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyName(String);

impl KeyName {
    /// Validates `name` against the naming rules.
    pub fn new(name: &str) -> Result<Self> {
        if name.is_empty() || name.len() > MAX_KEY_NAME_LEN {
            return Err(Error::InvalidKeyName(format!(
                "must be 1 to {MAX_KEY_NAME_LEN} characters long"
            )));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(Error::InvalidKeyName(
                "may only contain A-Z, a-z, 0-9, '_', '.' and '-'".into(),
            ));
        }
        if name.starts_with(['.', '-']) {
            return Err(Error::InvalidKeyName(
                "must not start with '.' or '-'".into(),
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for KeyName {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        Self::new(&name)
    }
}

impl From<KeyName> for String {
    fn from(name: KeyName) -> Self {
        name.0
    }
}

/// A key version number: 1, 2, 3, … (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct KeyVersion(u32);

impl KeyVersion {
    /// The version every key starts with.
    pub const FIRST: Self = Self(1);

    /// Wraps `version`; fails for 0, which is not a version.
    pub fn new(version: u32) -> Result<Self> {
        match version {
            0 => Err(Error::InvalidArgument("key versions start at 1".into())),
            v => Ok(Self(v)),
        }
    }

    /// The version number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The version after this one, or `None` at `u32::MAX`.
    fn checked_next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl TryFrom<u32> for KeyVersion {
    type Error = Error;

    fn try_from(version: u32) -> Result<Self> {
        Self::new(version)
    }
}

impl From<KeyVersion> for u32 {
    fn from(version: KeyVersion) -> Self {
        version.0
    }
}

/// How to create a key. `Default` is a non-derived, non-exportable,
/// non-deletable `xaes-256-gcm` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// The AEAD every version of the key uses.
    pub key_type: KeyType,
    /// Whether every operation derives a working key from a caller context.
    pub derived: bool,
    /// Whether the key material may ever be exported. Fixed at creation: it can
    /// be neither turned on nor off later.
    pub exportable: bool,
    /// Whether the key may be deleted.
    pub deletion_allowed: bool,
    /// Seconds between automatic rotations; 0: never.
    pub auto_rotate_period_s: u64,
}

/// A change to a key's policy; `None` fields are left as they are.
///
/// Applied by [`NamedKey::update_config`] all at once or not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// New minimum version accepted for decryption.
    pub min_decryption_version: Option<KeyVersion>,
    /// New minimum version for encryption; 0 means "always the latest".
    pub min_encryption_version: Option<u32>,
    /// Whether the key may be deleted.
    pub deletion_allowed: Option<bool>,
    /// Whether the key may be exported. Exportability is fixed at creation, so
    /// only the current value is accepted (a no-op); any change fails.
    pub exportable: Option<bool>,
}

/// A named key with its policy and its versions' material.
///
/// Fields are private so that the invariants listed in the [module docs](self) hold
/// for every value: the only ways to get a `NamedKey` are [`NamedKey::create`] and
/// [`NamedKey::from_record`], and every mutation checks them.
pub struct NamedKey {
    name: KeyName,
    key_type: KeyType,
    derived: bool,
    exportable: bool,
    deletion_allowed: bool,
    created_at_ms: u64,
    latest_version: KeyVersion,
    min_decryption_version: KeyVersion,
    min_encryption_version: u32,
    min_available_version: KeyVersion,
    versions: BTreeMap<KeyVersion, VersionEntry>,
    /// Random identity of this key, fixed at creation: a key deleted and created
    /// again under the same name is another key (its usage counters and
    /// statistics start afresh). `None` for keys created before ids existed.
    id: Option<KeyId>,
    /// Bumped by every stored write of the record ([`NamedKey::next_generation`]):
    /// a replica that has seen generation `n` refuses a record of the same key
    /// with a lower one (an older sealed copy put back). 0 in older records.
    generation: u64,
    /// When the key's material is to be destroyed (scheduled deletion), in ms
    /// since the epoch; `None` if no deletion is scheduled.
    deletion_time_ms: Option<u64>,
    /// Seconds between automatic rotations (counted from the latest version's
    /// creation); 0: never.
    auto_rotate_period_s: u64,
}

/// The random identity of a key (128 bits, shown as 32 hex digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// A fresh random id.
    pub fn generate() -> Result<Self> {
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::Provider)?;
        Ok(Self(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("a key id is 32 lowercase hex digits");
        if text.len() != 32 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(id))
    }
}

impl NamedKey {
    /// Creates a key with version 1 holding fresh random material.
    pub fn create(name: KeyName, opts: CreateOptions, now_ms: u64) -> Result<Self> {
        let mut versions = BTreeMap::new();
        versions.insert(KeyVersion::FIRST, VersionEntry::generate(now_ms)?);
        Ok(Self {
            name,
            key_type: opts.key_type,
            derived: opts.derived,
            exportable: opts.exportable,
            deletion_allowed: opts.deletion_allowed,
            created_at_ms: now_ms,
            latest_version: KeyVersion::FIRST,
            min_decryption_version: KeyVersion::FIRST,
            min_encryption_version: 0,
            min_available_version: KeyVersion::FIRST,
            versions,
            id: Some(KeyId::generate()?),
            generation: 0,
            deletion_time_ms: None,
            auto_rotate_period_s: opts.auto_rotate_period_s,
        })
    }

    /// The key's random identity (`None` for keys created before ids existed).
    pub fn id(&self) -> Option<KeyId> {
        self.id
    }

    /// The generation of the stored record this copy was read from (or is about
    /// to be written as); see [`NamedKey::next_generation`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Advances the generation; the key store calls this before every write of
    /// the record, so stored generations of one key only ever grow.
    pub fn next_generation(&mut self) {
        self.generation = self.generation.saturating_add(1);
    }

    /// When the key's material will be destroyed, if a deletion is scheduled.
    pub fn deletion_time_ms(&self) -> Option<u64> {
        self.deletion_time_ms
    }

    /// Schedules the destruction of every version at `at_ms`. Only for keys whose
    /// config allows deletion; a key already scheduled keeps its time.
    pub fn schedule_deletion(&mut self, at_ms: u64) -> Result<()> {
        if !self.deletion_allowed {
            return Err(Error::Precondition(format!(
                "key \"{}\" does not allow deletion; set deletion_allowed first",
                self.name
            )));
        }
        if let Some(at) = self.deletion_time_ms {
            return Err(Error::Precondition(format!(
                "key \"{}\" is already scheduled for deletion (at {at} ms since the epoch); \
                 cancel it first to change the time",
                self.name
            )));
        }
        self.deletion_time_ms = Some(at_ms);
        Ok(())
    }

    /// Cancels a scheduled deletion; returns whether one was scheduled.
    pub fn cancel_deletion(&mut self) -> bool {
        self.deletion_time_ms.take().is_some()
    }

    /// Seconds between automatic rotations; 0: never.
    pub fn auto_rotate_period_s(&self) -> u64 {
        self.auto_rotate_period_s
    }

    /// Sets the automatic rotation period in seconds (0 turns it off).
    pub fn set_auto_rotate_period_s(&mut self, period_s: u64) {
        self.auto_rotate_period_s = period_s;
    }

    /// Whether an automatic rotation is due at `now_ms`: a period is set and the
    /// latest version is at least that old. Once rotated, the new latest version
    /// is fresh, so a second replica deciding on the stored record rotates only
    /// after another full period: one rotation per period.
    pub fn rotation_due(&self, now_ms: u64) -> bool {
        if self.auto_rotate_period_s == 0 || self.deletion_time_ms.is_some() {
            return false;
        }
        let latest = self
            .versions
            .get(&self.latest_version)
            .map_or(0, |e| e.created_at_ms);
        now_ms.saturating_sub(latest) >= self.auto_rotate_period_s.saturating_mul(1000)
    }

    /// The key's name.
    pub fn name(&self) -> &KeyName {
        &self.name
    }

    /// The AEAD all versions use.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// Whether operations derive a working key from a caller-supplied context.
    pub fn derived(&self) -> bool {
        self.derived
    }

    /// Whether the material may be exported.
    pub fn exportable(&self) -> bool {
        self.exportable
    }

    /// Whether the key may be deleted.
    pub fn deletion_allowed(&self) -> bool {
        self.deletion_allowed
    }

    /// When the key was created (Unix milliseconds, as passed to [`NamedKey::create`]).
    pub fn created_at_ms(&self) -> u64 {
        self.created_at_ms
    }

    /// The newest version; new encryptions use it unless told otherwise.
    pub fn latest_version(&self) -> KeyVersion {
        self.latest_version
    }

    /// Versions below this one are refused for decryption (and encryption).
    pub fn min_decryption_version(&self) -> KeyVersion {
        self.min_decryption_version
    }

    /// Versions below this one are refused for encryption; 0 means no floor other
    /// than `min_decryption_version`.
    pub fn min_encryption_version(&self) -> u32 {
        self.min_encryption_version
    }

    /// The oldest version whose material is still held (everything below was trimmed).
    pub fn min_available_version(&self) -> KeyVersion {
        self.min_available_version
    }

    /// The versions still held, oldest first, as `(version, created_at_ms)`.
    /// Metadata only: no material.
    pub fn versions(&self) -> impl Iterator<Item = (KeyVersion, u64)> + '_ {
        self.versions.iter().map(|(v, e)| (*v, e.created_at_ms))
    }

    /// Whether encryptions under `v` have been counted in storage (see the module
    /// docs); `VersionNotFound` for a version the key does not hold.
    pub fn usage_reserved(&self, v: KeyVersion) -> Result<bool> {
        self.versions
            .get(&v)
            .map(|e| e.usage_reserved)
            .ok_or(Error::VersionNotFound(v.get()))
    }

    /// Records that encryptions under `v` are counted in storage from now on.
    /// Returns whether this changed anything (false if it was already recorded).
    /// The flag is never cleared.
    pub fn mark_usage_reserved(&mut self, v: KeyVersion) -> Result<bool> {
        let entry = self
            .versions
            .get_mut(&v)
            .ok_or(Error::VersionNotFound(v.get()))?;
        let changed = !entry.usage_reserved;
        entry.usage_reserved = true;
        Ok(changed)
    }

    /// Adds a version with fresh material and makes it the latest.
    ///
    /// Existing versions and their material are untouched; the new number is one
    /// more than the previous latest, so numbers are never reused.
    pub fn rotate(&mut self, now_ms: u64) -> Result<KeyVersion> {
        let next = self.latest_version.checked_next().ok_or_else(|| {
            Error::Precondition("the key has reached the largest possible version".into())
        })?;
        self.versions.insert(next, VersionEntry::generate(now_ms)?);
        self.latest_version = next;
        Ok(next)
    }

    /// The version an encryption should use: the latest when `requested` is `None`,
    /// otherwise `requested` after checking it exists and policy allows it.
    pub fn encryption_version(&self, requested: Option<KeyVersion>) -> Result<KeyVersion> {
        let Some(v) = requested else {
            return Ok(self.latest_version);
        };
        if v > self.latest_version {
            return Err(Error::VersionNotFound(v.get()));
        }
        let minimum = self
            .min_encryption_version
            .max(self.min_decryption_version.get());
        if v.get() < minimum {
            return Err(Error::VersionBelowMinimum {
                version: v.get(),
                minimum,
                operation: "encryption",
            });
        }
        if !self.versions.contains_key(&v) {
            return Err(Error::VersionNotFound(v.get()));
        }
        Ok(v)
    }

    /// Checks that ciphertext written under version `v` may be decrypted.
    pub fn check_decryption_version(&self, v: KeyVersion) -> Result<()> {
        if v < self.min_decryption_version {
            return Err(Error::VersionBelowMinimum {
                version: v.get(),
                minimum: self.min_decryption_version.get(),
                operation: "decryption",
            });
        }
        if v > self.latest_version || !self.versions.contains_key(&v) {
            return Err(Error::VersionNotFound(v.get()));
        }
        Ok(())
    }

    /// The raw material of version `v`.
    ///
    /// This checks only that the version is held, not policy: callers check
    /// [`encryption_version`](Self::encryption_version) or
    /// [`check_decryption_version`](Self::check_decryption_version) first.
    pub fn material(&self, v: KeyVersion) -> Result<&KeyMaterial> {
        self.versions
            .get(&v)
            .map(|e| &e.material)
            .ok_or(Error::VersionNotFound(v.get()))
    }

    /// How version `v`'s working keys are derived from its material (meaningful
    /// for derived keys only).
    pub fn derivation(&self, v: KeyVersion) -> Result<Derivation> {
        self.versions
            .get(&v)
            .map(|e| e.derivation)
            .ok_or(Error::VersionNotFound(v.get()))
    }

    /// The key that actually encrypts for version `v` and `context`.
    ///
    /// For a derived key this is `material.derive(derivation, DERIVED_KEY_LABEL,
    /// context)` with the version's [`derivation`](Self::derivation), and the
    /// context must be non-empty; for any other key the context must be empty and
    /// the result is a copy of the material. Like [`material`](Self::material), this
    /// does not check version policy.
    pub fn working_material(&self, v: KeyVersion, context: &[u8]) -> Result<KeyMaterial> {
        let entry = self
            .versions
            .get(&v)
            .ok_or(Error::VersionNotFound(v.get()))?;
        let material = &entry.material;
        match (self.derived, context.is_empty()) {
            (true, false) => material.derive(entry.derivation, DERIVED_KEY_LABEL, context),
            (true, true) => Err(Error::Context("a derived key requires a non-empty context")),
            (false, false) => Err(Error::Context("context is only accepted for derived keys")),
            (false, true) => Ok(material.duplicate()),
        }
    }

    /// Applies `update` if the resulting policy satisfies every invariant; otherwise
    /// changes nothing and says which rule was broken.
    pub fn update_config(&mut self, update: ConfigUpdate) -> Result<()> {
        let min_dec = update
            .min_decryption_version
            .unwrap_or(self.min_decryption_version);
        let min_enc = update
            .min_encryption_version
            .unwrap_or(self.min_encryption_version);
        let exportable = update.exportable.unwrap_or(self.exportable);
        let deletion_allowed = update.deletion_allowed.unwrap_or(self.deletion_allowed);

        if min_dec < self.min_available_version {
            return Err(Error::Precondition(format!(
                "min_decryption_version {min_dec} is below min_available_version {}; \
                 trimmed versions cannot be restored",
                self.min_available_version
            )));
        }
        if min_dec > self.latest_version {
            return Err(Error::Precondition(format!(
                "min_decryption_version {min_dec} is above the latest version {}",
                self.latest_version
            )));
        }
        if min_enc != 0 && (min_enc < min_dec.get() || min_enc > self.latest_version.get()) {
            return Err(Error::Precondition(format!(
                "min_encryption_version {min_enc} must be 0 or between \
                 min_decryption_version {min_dec} and the latest version {}",
                self.latest_version
            )));
        }
        if self.exportable && !exportable {
            return Err(Error::Precondition(
                "exportable cannot be turned off once enabled: the material may already \
                 have been exported"
                    .into(),
            ));
        }
        if !self.exportable && exportable {
            return Err(Error::Precondition(
                "exportable is fixed at creation: a key created non-exportable can never \
                 be exported; create a new exportable key instead"
                    .into(),
            ));
        }

        self.min_decryption_version = min_dec;
        self.min_encryption_version = min_enc;
        self.exportable = exportable;
        self.deletion_allowed = deletion_allowed;
        Ok(())
    }

    /// Permanently destroys the material of every version below `min_available`.
    ///
    /// `min_available` may not exceed `min_decryption_version` (nor a nonzero
    /// `min_encryption_version`), so policy must first stop using a version before
    /// it can be trimmed. Lowering the floor fails (trimmed material is gone);
    /// trimming to the current floor does nothing.
    pub fn trim(&mut self, min_available: KeyVersion) -> Result<()> {
        if min_available < self.min_available_version {
            return Err(Error::Precondition(format!(
                "versions below {} are already trimmed and cannot be restored",
                self.min_available_version
            )));
        }
        if min_available == self.min_available_version {
            return Ok(());
        }
        if min_available > self.min_decryption_version {
            return Err(Error::Precondition(format!(
                "cannot trim to {min_available}: above min_decryption_version {}",
                self.min_decryption_version
            )));
        }
        if self.min_encryption_version != 0 && min_available.get() > self.min_encryption_version {
            return Err(Error::Precondition(format!(
                "cannot trim to {min_available}: above min_encryption_version {}",
                self.min_encryption_version
            )));
        }
        // Dropping the split-off entries zeroizes their material (`KeyMaterial` is
        // `ZeroizeOnDrop`, and keeps its bytes on the heap so they never moved).
        let kept = self.versions.split_off(&min_available);
        drop(std::mem::replace(&mut self.versions, kept));
        self.min_available_version = min_available;
        Ok(())
    }

    /// Serializes the key, material included, for storage behind the barrier.
    ///
    /// The result is JSON with a `"format": 1` field and each version's material in
    /// standard base64. Every intermediate buffer that holds material is zeroized.
    pub fn to_record(&self) -> SecretBytes {
        let record = RecordRef {
            format: RECORD_FORMAT,
            name: &self.name,
            key_type: self.key_type,
            derived: self.derived,
            exportable: self.exportable,
            deletion_allowed: self.deletion_allowed,
            created_at_ms: self.created_at_ms,
            latest_version: self.latest_version,
            min_decryption_version: self.min_decryption_version,
            min_encryption_version: self.min_encryption_version,
            min_available_version: self.min_available_version,
            versions: self
                .versions
                .iter()
                .map(|(version, entry)| VersionRecordRef {
                    version: *version,
                    created_at_ms: entry.created_at_ms,
                    material: MaterialB64Ref(&entry.material),
                    // Recorded where it means something (derived keys), and absent
                    // for V1, so records of older versions stay as they were.
                    derivation: (self.derived && entry.derivation != Derivation::V1)
                        .then(|| entry.derivation.number()),
                    usage_reserved: entry.usage_reserved,
                })
                .collect(),
            id: self.id,
            generation: self.generation,
            deletion_time_ms: self.deletion_time_ms,
            auto_rotate_period_s: self.auto_rotate_period_s,
        };
        // Size the buffer up front so serde_json never reallocates it: a reallocation
        // would leave a copy of the material in freed memory. The worst case (a
        // 128-character name, every number at its maximum, an id, a deletion time
        // and a rotation period) is under 640 bytes of metadata and 130 bytes per version; `record_buffer_never_reallocates`
        // checks that.
        let capacity = RECORD_BASE_CAPACITY + RECORD_PER_VERSION_CAPACITY * self.versions.len();
        let mut buf = Zeroizing::new(Vec::with_capacity(capacity));
        // Invariant: serializing plain structs of strings, numbers and booleans into a
        // Vec cannot fail (no maps with non-string keys, no I/O errors).
        serde_json::to_writer(&mut *buf, &record).expect("key record serialization cannot fail");
        debug_assert_eq!(buf.capacity(), capacity, "key record buffer reallocated");
        SecretBytes::new(std::mem::take(&mut *buf))
    }

    /// Loads a key from a record written by [`to_record`](Self::to_record).
    ///
    /// Every invariant is checked; a record that breaks one is refused with
    /// [`Error::Precondition`] ("corrupt key record: …"), never repaired.
    pub fn from_record(record: &[u8]) -> Result<Self> {
        let r: RecordOwned = serde_json::from_slice(record).map_err(|e| {
            // serde_json's messages can quote input (which holds material), so only
            // the category and position are reported.
            corrupt(format!(
                "undecodable ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if r.format != RECORD_FORMAT {
            return Err(corrupt(format!("unsupported format {}", r.format)));
        }
        if r.min_available_version > r.min_decryption_version
            || r.min_decryption_version > r.latest_version
        {
            return Err(corrupt(format!(
                "inconsistent versions: min_available {} / min_decryption {} / latest {}",
                r.min_available_version, r.min_decryption_version, r.latest_version
            )));
        }
        if r.min_encryption_version != 0
            && (r.min_encryption_version < r.min_decryption_version.get()
                || r.min_encryption_version > r.latest_version.get())
        {
            return Err(corrupt(format!(
                "min_encryption_version {} outside [min_decryption {}, latest {}]",
                r.min_encryption_version, r.min_decryption_version, r.latest_version
            )));
        }
        let expected = r.latest_version.get() - r.min_available_version.get() + 1;
        if r.versions.len() as u64 != u64::from(expected) {
            return Err(corrupt(format!(
                "holds {} versions, expected {expected} (versions {} to {})",
                r.versions.len(),
                r.min_available_version,
                r.latest_version
            )));
        }
        let mut versions = BTreeMap::new();
        for (i, v) in r.versions.into_iter().enumerate() {
            let want = u64::from(r.min_available_version.get()) + i as u64;
            if u64::from(v.version.get()) != want {
                return Err(corrupt(format!(
                    "version {} found where version {want} was expected",
                    v.version
                )));
            }
            let derivation = match v.derivation {
                None => Derivation::V1,
                Some(n) => Derivation::from_number(n).ok_or_else(|| {
                    corrupt(format!("version {} has unknown derivation {n}", v.version))
                })?,
            };
            versions.insert(
                v.version,
                VersionEntry {
                    material: v.material.0,
                    created_at_ms: v.created_at_ms,
                    derivation,
                    usage_reserved: v.usage_reserved,
                },
            );
        }
        Ok(Self {
            name: r.name,
            key_type: r.key_type,
            derived: r.derived,
            exportable: r.exportable,
            deletion_allowed: r.deletion_allowed,
            created_at_ms: r.created_at_ms,
            latest_version: r.latest_version,
            min_decryption_version: r.min_decryption_version,
            min_encryption_version: r.min_encryption_version,
            min_available_version: r.min_available_version,
            versions,
            id: r.id,
            generation: r.generation,
            deletion_time_ms: r.deletion_time_ms,
            auto_rotate_period_s: r.auto_rotate_period_s,
        })
    }
}

impl fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedKey")
            .field("name", &self.name)
            .field("key_type", &self.key_type)
            .field("derived", &self.derived)
            .field("exportable", &self.exportable)
            .field("deletion_allowed", &self.deletion_allowed)
            .field("latest_version", &self.latest_version)
            .field("min_decryption_version", &self.min_decryption_version)
            .field("min_encryption_version", &self.min_encryption_version)
            .field("min_available_version", &self.min_available_version)
            .field("generation", &self.generation)
            .field("deletion_time_ms", &self.deletion_time_ms)
            .finish_non_exhaustive()
    }
}

/// Bytes reserved in [`NamedKey::to_record`] for everything but the versions.
const RECORD_BASE_CAPACITY: usize = 800;

/// Bytes reserved in [`NamedKey::to_record`] per version.
const RECORD_PER_VERSION_CAPACITY: usize = 160;

/// One version's material, creation time and derivation.
struct VersionEntry {
    /// Its bytes stay at one heap address while the map reorganises itself
    /// (`KeyMaterial` is a box), so no unzeroized copies are left behind.
    material: KeyMaterial,
    created_at_ms: u64,
    /// How working keys of a derived key are derived from `material`.
    derivation: Derivation,
    /// Whether encryptions under this version are counted in storage.
    usage_reserved: bool,
}

impl VersionEntry {
    fn generate(now_ms: u64) -> Result<Self> {
        Ok(Self {
            material: KeyMaterial::generate()?,
            created_at_ms: now_ms,
            derivation: Derivation::V2,
            usage_reserved: false,
        })
    }
}

fn corrupt(detail: String) -> Error {
    Error::Precondition(format!("corrupt key record: {detail}"))
}

/// The record as written (borrows from the key to avoid copying material).
#[derive(Serialize)]
struct RecordRef<'a> {
    format: u32,
    name: &'a KeyName,
    key_type: KeyType,
    derived: bool,
    exportable: bool,
    deletion_allowed: bool,
    created_at_ms: u64,
    latest_version: KeyVersion,
    min_decryption_version: KeyVersion,
    min_encryption_version: u32,
    min_available_version: KeyVersion,
    versions: Vec<VersionRecordRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<KeyId>,
    #[serde(skip_serializing_if = "is_zero")]
    generation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    deletion_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "is_zero")]
    auto_rotate_period_s: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct VersionRecordRef<'a> {
    version: KeyVersion,
    created_at_ms: u64,
    material: MaterialB64Ref<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    derivation: Option<u32>,
    /// Written only when set, so records of versions never counted are unchanged.
    #[serde(skip_serializing_if = "is_false")]
    usage_reserved: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The record as read. Unknown fields are refused: a record this code does not
/// fully understand is not one it should serve keys from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordOwned {
    format: u32,
    name: KeyName,
    key_type: KeyType,
    derived: bool,
    exportable: bool,
    deletion_allowed: bool,
    created_at_ms: u64,
    latest_version: KeyVersion,
    min_decryption_version: KeyVersion,
    min_encryption_version: u32,
    min_available_version: KeyVersion,
    versions: Vec<VersionRecordOwned>,
    /// The fields below are absent in records written before they existed.
    #[serde(default)]
    id: Option<KeyId>,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    deletion_time_ms: Option<u64>,
    #[serde(default)]
    auto_rotate_period_s: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRecordOwned {
    version: KeyVersion,
    created_at_ms: u64,
    material: MaterialB64,
    /// Absent in records written before derivations were versioned: V1.
    #[serde(default)]
    derivation: Option<u32>,
    /// Absent for versions whose encryptions were never counted.
    #[serde(default)]
    usage_reserved: bool,
}

/// Base64 length of [`KEY_LEN`] bytes with padding.
const MATERIAL_B64_LEN: usize = 44;

/// Serializes material as base64 through a stack buffer that is zeroized afterwards.
struct MaterialB64Ref<'a>(&'a KeyMaterial);

impl Serialize for MaterialB64Ref<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = Zeroizing::new([0u8; MATERIAL_B64_LEN]);
        let n = BASE64
            .encode_slice(self.0.expose_secret(), &mut buf[..])
            .map_err(serde::ser::Error::custom)?;
        let text = std::str::from_utf8(&buf[..n]).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

/// Decodes base64 material into a [`KeyMaterial`] (whose bytes live on the heap),
/// zeroizing the decode buffer.
struct MaterialB64(KeyMaterial);

impl<'de> Deserialize<'de> for MaterialB64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(MaterialVisitor)
    }
}

struct MaterialVisitor;

impl serde::de::Visitor<'_> for MaterialVisitor {
    type Value = MaterialB64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{KEY_LEN} bytes of key material in standard base64")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // Room for one extra byte so over-long input is detected rather than truncated.
        let mut buf = Zeroizing::new([0u8; KEY_LEN + 3]);
        match BASE64.decode_slice(v, &mut buf[..]) {
            Ok(KEY_LEN) => {}
            _ => return Err(E::custom("key material is not 32 bytes of base64")),
        }
        KeyMaterial::from_slice(&buf[..KEY_LEN])
            .map(MaterialB64)
            .map_err(|_| E::custom("key material is not 32 bytes"))
    }

    fn visit_string<E: serde::de::Error>(self, mut v: String) -> Result<Self::Value, E> {
        let result = self.visit_str(&v);
        v.zeroize();
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn v(n: u32) -> KeyVersion {
        KeyVersion::new(n).unwrap()
    }

    fn key(opts: CreateOptions) -> NamedKey {
        NamedKey::create(KeyName::new("patients").unwrap(), opts, 1_000).unwrap()
    }

    fn key_with_versions(n: u32) -> NamedKey {
        let mut k = key(CreateOptions::default());
        for i in 1..n {
            assert_eq!(k.rotate(1_000 + u64::from(i)).unwrap(), v(i + 1));
        }
        k
    }

    fn record_json(k: &NamedKey) -> serde_json::Value {
        serde_json::from_slice(k.to_record().expose_secret()).unwrap()
    }

    fn load(value: &serde_json::Value) -> Result<NamedKey> {
        NamedKey::from_record(&serde_json::to_vec(value).unwrap())
    }

    fn assert_corrupt(result: Result<NamedKey>) {
        match result {
            Err(Error::Precondition(msg)) => {
                assert!(msg.starts_with("corrupt key record"), "{msg}")
            }
            other => panic!(
                "expected a corrupt-record error, got {:?}",
                other.map(|_| ())
            ),
        }
    }

    #[test]
    fn key_name_rules() {
        for ok in ["a", "patients", "A-b_c.d", "0day", "x".repeat(128).as_str()] {
            assert_eq!(KeyName::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "..",
            "a/b",
            "a b",
            "é",
            "a\0",
            "x".repeat(129).as_str(),
        ] {
            assert!(
                matches!(KeyName::new(bad), Err(Error::InvalidKeyName(_))),
                "{bad:?}"
            );
        }
        let name = KeyName::new("p.1").unwrap();
        assert_eq!(name.to_string(), "p.1");
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"p.1\"");
        assert_eq!(serde_json::from_str::<KeyName>("\"p.1\"").unwrap(), name);
        assert!(serde_json::from_str::<KeyName>("\"../etc\"").is_err());
    }

    #[test]
    fn key_version_rules() {
        assert!(KeyVersion::new(0).is_err());
        assert_eq!(KeyVersion::FIRST.get(), 1);
        assert_eq!(v(7).to_string(), "7");
        assert!(v(2) > v(1));
        assert_eq!(serde_json::to_string(&v(3)).unwrap(), "3");
        assert_eq!(serde_json::from_str::<KeyVersion>("3").unwrap(), v(3));
        assert!(serde_json::from_str::<KeyVersion>("0").is_err());
        assert_eq!(v(u32::MAX).checked_next(), None);
    }

    #[test]
    fn create_defaults() {
        let k = key(CreateOptions::default());
        assert_eq!(k.name().as_str(), "patients");
        assert_eq!(k.key_type(), KeyType::Xaes256Gcm);
        assert!(!k.derived() && !k.exportable() && !k.deletion_allowed());
        assert_eq!(k.created_at_ms(), 1_000);
        assert_eq!(k.latest_version(), KeyVersion::FIRST);
        assert_eq!(k.min_decryption_version(), KeyVersion::FIRST);
        assert_eq!(k.min_encryption_version(), 0);
        assert_eq!(k.min_available_version(), KeyVersion::FIRST);
        assert_eq!(k.versions().collect::<Vec<_>>(), vec![(v(1), 1_000)]);
        let dbg = format!("{k:?}");
        assert!(
            dbg.contains("patients") && !dbg.contains("material"),
            "{dbg}"
        );
    }

    #[test]
    fn rotate_appends_and_keeps_material() {
        let mut k = key(CreateOptions::default());
        let m1 = *k.material(v(1)).unwrap().expose_secret();
        assert_eq!(k.rotate(2_000).unwrap(), v(2));
        assert_eq!(k.rotate(3_000).unwrap(), v(3));
        assert_eq!(k.latest_version(), v(3));
        assert_eq!(*k.material(v(1)).unwrap().expose_secret(), m1);
        assert_ne!(k.material(v(2)).unwrap().expose_secret(), &m1);
        assert_ne!(
            k.material(v(2)).unwrap().expose_secret(),
            k.material(v(3)).unwrap().expose_secret()
        );
        assert_eq!(
            k.versions().collect::<Vec<_>>(),
            vec![(v(1), 1_000), (v(2), 2_000), (v(3), 3_000)]
        );
        assert_eq!(k.material(v(4)).unwrap_err(), Error::VersionNotFound(4));
    }

    #[test]
    fn encryption_version_rules() {
        let mut k = key_with_versions(5);
        assert_eq!(k.encryption_version(None).unwrap(), v(5));
        assert_eq!(k.encryption_version(Some(v(2))).unwrap(), v(2));
        assert_eq!(
            k.encryption_version(Some(v(6))),
            Err(Error::VersionNotFound(6))
        );
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(2)),
            min_encryption_version: Some(4),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(k.encryption_version(Some(v(4))).unwrap(), v(4));
        assert_eq!(
            k.encryption_version(Some(v(3))),
            Err(Error::VersionBelowMinimum {
                version: 3,
                minimum: 4,
                operation: "encryption"
            })
        );
        k.update_config(ConfigUpdate {
            min_encryption_version: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(k.encryption_version(Some(v(2))).unwrap(), v(2));
        assert_eq!(
            k.encryption_version(Some(v(1))),
            Err(Error::VersionBelowMinimum {
                version: 1,
                minimum: 2,
                operation: "encryption"
            })
        );
        assert_eq!(k.encryption_version(None).unwrap(), v(5));
    }

    #[test]
    fn decryption_version_rules() {
        let mut k = key_with_versions(4);
        for i in 1..=4 {
            k.check_decryption_version(v(i)).unwrap();
        }
        assert_eq!(
            k.check_decryption_version(v(5)),
            Err(Error::VersionNotFound(5))
        );
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(3)),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            k.check_decryption_version(v(2)),
            Err(Error::VersionBelowMinimum {
                version: 2,
                minimum: 3,
                operation: "decryption"
            })
        );
        k.check_decryption_version(v(3)).unwrap();
        k.trim(v(3)).unwrap();
        assert!(matches!(
            k.check_decryption_version(v(1)),
            Err(Error::VersionBelowMinimum { .. })
        ));
    }

    #[test]
    fn working_material_rules() {
        let plain = key(CreateOptions::default());
        assert_eq!(
            plain.working_material(v(1), b"").unwrap().expose_secret(),
            plain.material(v(1)).unwrap().expose_secret()
        );
        assert_eq!(
            plain.working_material(v(1), b"tenant-1").unwrap_err(),
            Error::Context("context is only accepted for derived keys")
        );

        let derived = key(CreateOptions {
            derived: true,
            ..Default::default()
        });
        assert!(matches!(
            derived.working_material(v(1), b""),
            Err(Error::Context(_))
        ));
        let a = derived.working_material(v(1), b"tenant-1").unwrap();
        let b = derived.working_material(v(1), b"tenant-2").unwrap();
        let m = derived.material(v(1)).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), m.expose_secret());
        assert_eq!(derived.derivation(v(1)).unwrap(), Derivation::V2);
        assert_eq!(
            a.expose_secret(),
            m.derive(Derivation::V2, DERIVED_KEY_LABEL, b"tenant-1")
                .unwrap()
                .expose_secret()
        );
        assert_eq!(
            derived.working_material(v(2), b"x").unwrap_err(),
            Error::VersionNotFound(2)
        );
    }

    #[test]
    fn update_config_validates_ranges() {
        let mut k = key_with_versions(5);
        let bad = [
            ConfigUpdate {
                min_decryption_version: Some(v(6)),
                ..Default::default()
            },
            ConfigUpdate {
                min_encryption_version: Some(6),
                ..Default::default()
            },
            ConfigUpdate {
                min_decryption_version: Some(v(3)),
                min_encryption_version: Some(2),
                ..Default::default()
            },
        ];
        for update in bad {
            assert!(
                matches!(k.update_config(update), Err(Error::Precondition(_))),
                "{update:?}"
            );
        }
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(2)),
            min_encryption_version: Some(3),
            ..Default::default()
        })
        .unwrap();
        // Raising min_decryption above the existing min_encryption breaks the pair.
        assert!(
            k.update_config(ConfigUpdate {
                min_decryption_version: Some(v(4)),
                ..Default::default()
            })
            .is_err()
        );
        k.trim(v(2)).unwrap();
        assert!(
            k.update_config(ConfigUpdate {
                min_decryption_version: Some(v(1)),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(k.min_decryption_version(), v(2));
        assert_eq!(k.min_encryption_version(), 3);
    }

    #[test]
    fn update_config_is_all_or_nothing() {
        let mut k = key_with_versions(3);
        let err = k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(2)),
            min_encryption_version: Some(9),
            deletion_allowed: Some(true),
            exportable: Some(true),
        });
        assert!(matches!(err, Err(Error::Precondition(_))));
        assert_eq!(k.min_decryption_version(), v(1));
        assert_eq!(k.min_encryption_version(), 0);
        assert!(!k.deletion_allowed());
        assert!(!k.exportable());
    }

    /// Exportability is fixed at creation. Before the fix a key created
    /// non-exportable could be switched on and then exported.
    #[test]
    fn exportable_is_fixed_at_creation() {
        let mut k = key(CreateOptions::default());
        // Restating the current value is a no-op.
        k.update_config(ConfigUpdate {
            exportable: Some(false),
            ..Default::default()
        })
        .unwrap();
        let before = k.to_record();
        let err = k.update_config(ConfigUpdate {
            exportable: Some(true),
            deletion_allowed: Some(true),
            ..Default::default()
        });
        match err {
            Err(Error::Precondition(m)) => assert!(m.contains("fixed at creation"), "{m}"),
            other => panic!("turning exportable on was not refused: {other:?}"),
        }
        assert!(!k.exportable() && !k.deletion_allowed());
        assert_eq!(k.to_record().expose_secret(), before.expose_secret());

        let mut born = key(CreateOptions {
            exportable: true,
            ..Default::default()
        });
        born.update_config(ConfigUpdate {
            exportable: Some(true),
            deletion_allowed: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert!(born.exportable() && born.deletion_allowed());
        assert!(matches!(
            born.update_config(ConfigUpdate {
                exportable: Some(false),
                ..Default::default()
            }),
            Err(Error::Precondition(_))
        ));
        assert!(born.exportable());
        born.update_config(ConfigUpdate {
            deletion_allowed: Some(false),
            ..Default::default()
        })
        .unwrap();
        assert!(!born.deletion_allowed());
    }

    /// A derived key's version recorded before derivations were versioned (no
    /// `derivation` field) keeps deriving with V1, so its ciphertexts still open;
    /// new versions, and the new keys, use V2 and say so in the record.
    #[test]
    fn legacy_derived_versions_keep_v1_and_new_ones_use_v2() {
        let material = [0x5C; KEY_LEN];
        let legacy = serde_json::json!({
            "format": 1,
            "name": "tenants",
            "key_type": "xaes-256-gcm",
            "derived": true,
            "exportable": false,
            "deletion_allowed": false,
            "created_at_ms": 0,
            "latest_version": 1,
            "min_decryption_version": 1,
            "min_encryption_version": 0,
            "min_available_version": 1,
            "versions": [{
                "version": 1,
                "created_at_ms": 0,
                "material": BASE64.encode(material),
            }],
        });
        let record = serde_json::to_vec(&legacy).unwrap();
        let mut k = NamedKey::from_record(&record).unwrap();
        assert_eq!(k.derivation(v(1)).unwrap(), Derivation::V1);
        let m = KeyMaterial::from_slice(&material).unwrap();
        let v1 = m.derive(Derivation::V1, DERIVED_KEY_LABEL, b"t-1").unwrap();
        assert_eq!(
            k.working_material(v(1), b"t-1").unwrap().expose_secret(),
            v1.expose_secret()
        );
        // Unchanged, it serializes back exactly as it was stored.
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(k.to_record().expose_secret()).unwrap(),
            legacy
        );

        k.rotate(1).unwrap();
        assert_eq!(k.derivation(v(1)).unwrap(), Derivation::V1);
        assert_eq!(k.derivation(v(2)).unwrap(), Derivation::V2);
        let json = record_json(&k);
        assert!(json["versions"][0].get("derivation").is_none());
        assert_eq!(json["versions"][1]["derivation"], 2);
        let back = NamedKey::from_record(k.to_record().expose_secret()).unwrap();
        assert_eq!(back.derivation(v(1)).unwrap(), Derivation::V1);
        assert_eq!(back.derivation(v(2)).unwrap(), Derivation::V2);
        let m2 = back.material(v(2)).unwrap();
        assert_eq!(
            back.working_material(v(2), b"t-1").unwrap().expose_secret(),
            m2.derive(Derivation::V2, DERIVED_KEY_LABEL, b"t-1")
                .unwrap()
                .expose_secret()
        );

        // A fresh derived key is V2 from version 1; a non-derived key records nothing.
        let fresh = key(CreateOptions {
            derived: true,
            ..Default::default()
        });
        assert_eq!(record_json(&fresh)["versions"][0]["derivation"], 2);
        let plain = key(CreateOptions::default());
        assert!(
            record_json(&plain)["versions"][0]
                .get("derivation")
                .is_none()
        );

        // An unknown derivation is refused, not guessed.
        let mut unknown = legacy.clone();
        unknown["versions"][0]["derivation"] = 3.into();
        assert_corrupt(NamedKey::from_record(
            &serde_json::to_vec(&unknown).unwrap(),
        ));
    }

    #[test]
    fn trim_rules() {
        let mut k = key_with_versions(5);
        // Above min_decryption_version (1).
        assert!(matches!(k.trim(v(2)), Err(Error::Precondition(_))));
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(4)),
            min_encryption_version: Some(4),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(k.trim(v(5)), Err(Error::Precondition(_))));
        let m4 = *k.material(v(4)).unwrap().expose_secret();
        k.trim(v(3)).unwrap();
        assert_eq!(k.min_available_version(), v(3));
        assert_eq!(
            k.versions().map(|(ver, _)| ver.get()).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(k.material(v(2)).unwrap_err(), Error::VersionNotFound(2));
        assert_eq!(*k.material(v(4)).unwrap().expose_secret(), m4);
        // Equal is a no-op; lower is refused.
        k.trim(v(3)).unwrap();
        assert!(matches!(k.trim(v(2)), Err(Error::Precondition(_))));
        k.trim(v(4)).unwrap();
        assert_eq!(k.min_available_version(), v(4));
        // Rotation after a trim continues the numbering.
        assert_eq!(k.rotate(9_000).unwrap(), v(6));
    }

    #[test]
    fn trim_respects_nonzero_min_encryption() {
        let mut k = key_with_versions(5);
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(3)),
            min_encryption_version: Some(3),
            ..Default::default()
        })
        .unwrap();
        k.trim(v(3)).unwrap();
        assert_eq!(k.min_available_version(), v(3));
    }

    #[test]
    fn record_round_trip() {
        let mut k = key(CreateOptions {
            key_type: KeyType::ChaCha20Poly1305,
            derived: true,
            exportable: true,
            deletion_allowed: true,
            auto_rotate_period_s: 0,
        });
        k.rotate(2_000).unwrap();
        k.rotate(3_000).unwrap();
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(2)),
            min_encryption_version: Some(3),
            ..Default::default()
        })
        .unwrap();
        k.trim(v(2)).unwrap();
        let record = k.to_record();
        let json = record_json(&k);
        assert_eq!(json["format"], 1);
        assert_eq!(json["key_type"], "chacha20-poly1305");
        let back = NamedKey::from_record(record.expose_secret()).unwrap();
        assert_eq!(back.to_record().expose_secret(), record.expose_secret());
        assert_eq!(back.name(), k.name());
        assert_eq!(back.min_available_version(), v(2));
        assert_eq!(
            back.versions().collect::<Vec<_>>(),
            k.versions().collect::<Vec<_>>()
        );
        for ver in [v(2), v(3)] {
            assert_eq!(
                back.material(ver).unwrap().expose_secret(),
                k.material(ver).unwrap().expose_secret()
            );
        }
    }

    #[test]
    fn from_record_refuses_corruption() {
        let mut k = key_with_versions(3);
        k.update_config(ConfigUpdate {
            min_decryption_version: Some(v(2)),
            ..Default::default()
        })
        .unwrap();
        k.trim(v(2)).unwrap();
        let good = record_json(&k);
        load(&good).unwrap();

        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            ("format", Box::new(|j| j["format"] = 2.into())),
            (
                "latest beyond versions",
                Box::new(|j| j["latest_version"] = 4.into()),
            ),
            ("latest zero", Box::new(|j| j["latest_version"] = 0.into())),
            (
                "min_dec above latest",
                Box::new(|j| j["min_decryption_version"] = 4.into()),
            ),
            (
                "min_dec below available",
                Box::new(|j| j["min_decryption_version"] = 1.into()),
            ),
            (
                "min_enc below min_dec",
                Box::new(|j| j["min_encryption_version"] = 1.into()),
            ),
            (
                "min_enc above latest",
                Box::new(|j| j["min_encryption_version"] = 4.into()),
            ),
            (
                "floor moved",
                Box::new(|j| j["min_available_version"] = 1.into()),
            ),
            ("bad name", Box::new(|j| j["name"] = "../x".into())),
            (
                "bad key type",
                Box::new(|j| j["key_type"] = "aes128".into()),
            ),
            ("unknown field", Box::new(|j| j["extra"] = true.into())),
            (
                "missing field",
                Box::new(|j| {
                    j.as_object_mut().unwrap().remove("derived");
                }),
            ),
            ("gap", Box::new(|j| j["versions"][1]["version"] = 4.into())),
            (
                "duplicate",
                Box::new(|j| j["versions"][1]["version"] = 2.into()),
            ),
            (
                "dropped version",
                Box::new(|j| {
                    j["versions"].as_array_mut().unwrap().pop();
                }),
            ),
            (
                "short material",
                Box::new(|j| j["versions"][0]["material"] = BASE64.encode([1u8; 31]).into()),
            ),
            (
                "long material",
                Box::new(|j| j["versions"][0]["material"] = BASE64.encode([1u8; 33]).into()),
            ),
            (
                "non-base64 material",
                Box::new(|j| j["versions"][0]["material"] = "!!!!".into()),
            ),
        ];
        for (what, mutate) in mutations {
            let mut j = good.clone();
            mutate(&mut j);
            let result = load(&j);
            assert!(result.is_err(), "{what} was accepted");
            assert_corrupt(result);
        }
        assert_corrupt(NamedKey::from_record(b"not json"));
        assert_corrupt(NamedKey::from_record(b""));
    }

    #[test]
    fn record_buffer_never_reallocates() {
        // Every field at its longest; `to_record` debug-asserts that its buffer kept
        // its initial capacity.
        let max = u32::MAX;
        let versions: Vec<_> = (max - 2..=max)
            .map(|ver| {
                serde_json::json!({
                    "version": ver,
                    "created_at_ms": u64::MAX,
                    "material": BASE64.encode([0xFF; KEY_LEN]),
                    "usage_reserved": true,
                })
            })
            .collect();
        let record = serde_json::json!({
            "format": 1,
            "name": "x".repeat(MAX_KEY_NAME_LEN),
            "key_type": "xchacha20-poly1305",
            "deletion_allowed": false,
            "derived": false,
            "exportable": false,
            "created_at_ms": u64::MAX,
            "latest_version": max,
            "min_decryption_version": max - 2,
            "min_encryption_version": max,
            "min_available_version": max - 2,
            "versions": versions,
            "id": "f".repeat(32),
            "generation": u64::MAX,
            "deletion_time_ms": u64::MAX,
            "auto_rotate_period_s": u64::MAX,
        });
        let k = load(&record).unwrap();
        let out = k.to_record();
        assert!(out.len() < RECORD_BASE_CAPACITY + 3 * RECORD_PER_VERSION_CAPACITY);
    }

    #[test]
    fn id_generation_deletion_and_rotation_period_round_trip() {
        let mut k = key(CreateOptions {
            deletion_allowed: true,
            ..Default::default()
        });
        let id = k.id().expect("new keys have an id");
        assert_ne!(
            Some(id),
            key(CreateOptions::default()).id(),
            "ids are random"
        );
        assert_eq!(id.to_string().len(), 32);
        k.next_generation();
        k.next_generation();
        k.schedule_deletion(5_000).unwrap();
        assert!(k.schedule_deletion(9_000).is_err(), "already scheduled");
        k.set_auto_rotate_period_s(3600);
        let back = NamedKey::from_record(k.to_record().expose_secret()).unwrap();
        assert_eq!(back.id(), Some(id));
        assert_eq!(back.generation(), 2);
        assert_eq!(back.deletion_time_ms(), Some(5_000));
        assert_eq!(back.auto_rotate_period_s(), 3600);

        let mut back = back;
        assert!(back.cancel_deletion());
        assert!(!back.cancel_deletion());
        assert_eq!(back.deletion_time_ms(), None);

        // A record without the fields (an older server's) loads with none of them.
        let mut old = record_json(&key(CreateOptions::default()));
        let map = old.as_object_mut().unwrap();
        for field in [
            "id",
            "generation",
            "deletion_time_ms",
            "auto_rotate_period_s",
        ] {
            map.remove(field);
        }
        let old = load(&old).unwrap();
        assert_eq!(old.id(), None);
        assert_eq!(old.generation(), 0);
        assert!(!String::from_utf8_lossy(old.to_record().expose_secret()).contains("\"id\""));
        for bad in [
            "ABCDEF0123456789abcdef0123456789",
            "abc",
            "g".repeat(32).as_str(),
        ] {
            let mut r = record_json(&k);
            r["id"] = bad.into();
            assert!(load(&r).is_err(), "{bad}");
        }
    }

    #[test]
    fn deletion_needs_deletion_allowed() {
        let mut k = key(CreateOptions::default());
        assert!(k.schedule_deletion(1).is_err());
        assert_eq!(k.deletion_time_ms(), None);
    }

    #[test]
    fn rotation_is_due_one_period_after_the_latest_version() {
        let mut k = NamedKey::create(
            KeyName::new("r").unwrap(),
            CreateOptions::default(),
            1_000_000,
        )
        .unwrap();
        assert!(!k.rotation_due(u64::MAX), "no period set");
        k.set_auto_rotate_period_s(60);
        assert!(!k.rotation_due(1_059_999));
        assert!(k.rotation_due(1_060_000));
        k.rotate(1_060_000).unwrap();
        assert!(!k.rotation_due(1_060_000), "the new version is fresh");
        assert!(k.rotation_due(1_120_000));
        // A clock behind the version's creation never rotates.
        assert!(!k.rotation_due(0));
        // A key pending deletion is not rotated.
        let mut d = NamedKey::create(
            KeyName::new("d").unwrap(),
            CreateOptions {
                deletion_allowed: true,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        d.set_auto_rotate_period_s(1);
        d.schedule_deletion(u64::MAX).unwrap();
        assert!(!d.rotation_due(u64::MAX));
    }

    #[test]
    fn usage_reserved_is_set_once_kept_and_written_only_when_set() {
        let mut k = key(CreateOptions::default());
        let v1 = KeyVersion::FIRST;
        assert!(!k.usage_reserved(v1).unwrap());
        assert!(!String::from_utf8_lossy(k.to_record().expose_secret()).contains("usage"));
        assert!(k.mark_usage_reserved(v1).unwrap());
        assert!(!k.mark_usage_reserved(v1).unwrap(), "already set");
        let v2 = k.rotate(2).unwrap();
        assert!(!k.usage_reserved(v2).unwrap());
        let reloaded = NamedKey::from_record(k.to_record().expose_secret()).unwrap();
        assert!(reloaded.usage_reserved(v1).unwrap());
        assert!(!reloaded.usage_reserved(v2).unwrap());
        let missing = KeyVersion::new(9).unwrap();
        assert!(reloaded.usage_reserved(missing).is_err());
        assert!(k.mark_usage_reserved(missing).is_err());
    }

    #[test]
    fn record_errors_do_not_echo_material() {
        let k = key(CreateOptions::default());
        let mut j = record_json(&k);
        let material = j["versions"][0]["material"].as_str().unwrap().to_owned();
        j["versions"][0]["material"] = serde_json::Value::from(material.clone() + "A");
        let err = load(&j).unwrap_err().to_string();
        assert!(!err.contains(&material[..20]), "{err}");
        j["versions"][0]["material"] = 5.into();
        let err = load(&j).unwrap_err().to_string();
        assert!(
            err.starts_with("precondition failed: corrupt key record"),
            "{err}"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Rotate,
        MinDec(u32),
        MinEnc(u32),
        Exportable(bool),
        Trim(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Rotate),
            2 => (0u32..12).prop_map(Op::MinDec),
            2 => (0u32..12).prop_map(Op::MinEnc),
            1 => any::<bool>().prop_map(Op::Exportable),
            2 => (0u32..12).prop_map(Op::Trim),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn operations_keep_invariants(ops in proptest::collection::vec(op(), 1..40)) {
            let mut k = key(CreateOptions::default());
            // Every version ever issued, with its material at issue time.
            let mut issued: BTreeMap<u32, [u8; KEY_LEN]> = BTreeMap::new();
            issued.insert(1, *k.material(v(1)).unwrap().expose_secret());
            let mut trimmed_below = 1u32;
            for (step, op) in ops.into_iter().enumerate() {
                let before = k.to_record();
                let result = match op {
                    Op::Rotate => k.rotate(step as u64).map(|new| {
                        assert!(!issued.contains_key(&new.get()), "version {new} reused");
                        assert!(issued.keys().all(|old| *old < new.get()));
                        issued.insert(new.get(), *k.material(new).unwrap().expose_secret());
                    }),
                    Op::MinDec(n) => KeyVersion::new(n).and_then(|n| {
                        k.update_config(ConfigUpdate {
                            min_decryption_version: Some(n),
                            ..Default::default()
                        })
                    }),
                    Op::MinEnc(n) => k.update_config(ConfigUpdate {
                        min_encryption_version: Some(n),
                        ..Default::default()
                    }),
                    Op::Exportable(e) => k.update_config(ConfigUpdate {
                        exportable: Some(e),
                        ..Default::default()
                    }),
                    Op::Trim(n) => KeyVersion::new(n).and_then(|n| k.trim(n)),
                };
                if result.is_err() {
                    // A refused operation changes nothing.
                    let after = k.to_record();
                    prop_assert_eq!(after.expose_secret(), before.expose_secret());
                }
                trimmed_below = trimmed_below.max(k.min_available_version().get());
                prop_assert_eq!(k.min_available_version().get(), trimmed_below);

                // Surviving versions: contiguous, strictly increasing, unchanged material.
                let held: Vec<u32> = k.versions().map(|(ver, _)| ver.get()).collect();
                let want: Vec<u32> = (trimmed_below..=k.latest_version().get()).collect();
                prop_assert_eq!(&held, &want);
                for ver in &held {
                    prop_assert_eq!(k.material(v(*ver)).unwrap().expose_secret(), &issued[ver]);
                }
                for gone in 1..trimmed_below {
                    prop_assert!(k.material(v(gone)).is_err());
                }

                // The record round-trips and its loader accepts the state as valid.
                let record = k.to_record();
                let back = NamedKey::from_record(record.expose_secret()).unwrap();
                let again = back.to_record();
                prop_assert_eq!(again.expose_secret(), record.expose_secret());
            }
        }
    }
}
