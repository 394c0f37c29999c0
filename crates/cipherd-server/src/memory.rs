//! Process-wide memory hygiene for the `cipherd` binary: no core dumps, and on
//! request all memory locked into RAM.
//!
//! [`harden`] is called once from `main`, before the server starts and so before
//! any key material exists. It is not called from [`crate::run`]: tests and
//! embedders run the server inside their own process, whose limits are theirs.
//!
//! - Core dumps: the soft and hard `RLIMIT_CORE` become 0 (the hard limit cannot be
//!   raised again by this process), and on Linux `prctl(PR_SET_DUMPABLE, 0)` marks
//!   the process non-dumpable, which also stops `ptrace` attachment and reading
//!   `/proc/<pid>/mem` by other processes of the same user. A crash then leaves no
//!   file holding unsealed keys or plaintext.
//! - `memory.lock = true`: `mlockall(MCL_CURRENT | MCL_FUTURE)`, so no page of the
//!   process (keys, plaintext in flight) is ever written to swap. Failing to lock
//!   when asked is a start-up error naming the cause (usually `RLIMIT_MEMLOCK`).
//!
//! What this does not do: it does not wipe memory (the secret types do that on
//! drop), does not stop a root user or the kernel from reading the process, and
//! does not cover hibernation images. Everything goes through `rustix`'s safe
//! wrappers; this crate keeps `unsafe` forbidden.

use std::io;

/// What [`harden`] did, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardened {
    /// Whether all memory is locked (`memory.lock`).
    pub locked: bool,
}

/// A hardening step that failed; the message names the call and the cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardenError {
    /// `setrlimit(RLIMIT_CORE, 0)` failed.
    #[error("disabling core dumps (setrlimit RLIMIT_CORE 0): {0}")]
    CoreLimit(#[source] io::Error),
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error("marking the process non-dumpable (prctl PR_SET_DUMPABLE 0): {0}")]
    Dumpable(#[source] io::Error),
    /// `memory.lock = true` and `mlockall` failed.
    #[error("memory.lock = true, but mlockall(MCL_CURRENT | MCL_FUTURE) failed: {source}; {hint}")]
    Lock {
        /// The error `mlockall` returned.
        #[source]
        source: io::Error,
        /// What to change, naming `RLIMIT_MEMLOCK` and its current value.
        hint: String,
    },
    /// `memory.lock = true` on a platform where this build cannot lock memory.
    #[error("memory.lock = true is only supported on Linux")]
    LockUnsupported,
}

/// Disables core dumps and, if `lock`, locks all current and future memory.
///
/// Core dumps are disabled before locking is attempted, so a lock failure still
/// leaves the process undumpable (the binary exits on the error anyway).
pub fn harden(lock: bool) -> Result<Hardened, HardenError> {
    use rustix::process::{Resource, Rlimit, setrlimit};

    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardenError::CoreLimit(e.into()))?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardenError::Dumpable(e.into()))?;
    if lock {
        lock_all()?;
    }
    Ok(Hardened { locked: lock })
}

#[cfg(target_os = "linux")]
fn lock_all() -> Result<(), HardenError> {
    use rustix::mm::{MlockAllFlags, mlockall};
    use rustix::process::{Resource, getrlimit};

    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE).map_err(|e| {
        let limit = getrlimit(Resource::Memlock).current;
        HardenError::Lock {
            hint: lock_hint(e, limit),
            source: e.into(),
        }
    })
}

#[cfg(not(target_os = "linux"))]
fn lock_all() -> Result<(), HardenError> {
    Err(HardenError::LockUnsupported)
}

/// What to tell the operator when `mlockall` fails with `errno`, given the soft
/// `RLIMIT_MEMLOCK` (`None` = unlimited).
fn lock_hint(errno: rustix::io::Errno, memlock_limit: Option<u64>) -> String {
    let limit = match memlock_limit {
        None => "unlimited".to_owned(),
        Some(bytes) => format!("{bytes} bytes"),
    };
    match errno {
        rustix::io::Errno::NOMEM | rustix::io::Errno::PERM => format!(
            "RLIMIT_MEMLOCK is {limit}, below what the process maps; raise it \
             (`ulimit -l unlimited`, systemd `LimitMEMLOCK=infinity`, or grant CAP_IPC_LOCK) \
             or set memory.lock = false"
        ),
        other => format!("RLIMIT_MEMLOCK is {limit}; the kernel said {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_failures_name_rlimit_memlock_and_its_value() {
        let hint = lock_hint(rustix::io::Errno::NOMEM, Some(8 << 20));
        assert!(hint.contains("RLIMIT_MEMLOCK is 8388608 bytes"), "{hint}");
        assert!(hint.contains("memory.lock = false"), "{hint}");
        let hint = lock_hint(rustix::io::Errno::PERM, Some(0));
        assert!(hint.contains("RLIMIT_MEMLOCK is 0 bytes"), "{hint}");
        let hint = lock_hint(rustix::io::Errno::AGAIN, None);
        assert!(hint.contains("unlimited"), "{hint}");
        let err = HardenError::Lock {
            source: rustix::io::Errno::NOMEM.into(),
            hint: lock_hint(rustix::io::Errno::NOMEM, Some(65536)),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("memory.lock = true, but mlockall") && text.contains("65536"),
            "{text}"
        );
    }
}
