//! One process per data dir: an advisory lock on `<data_dir>/cipherd.lock`.
//!
//! Two servers on one data dir serve from two caches over one store, and a
//! rotation through one is never seen by the other (it kept encrypting under the
//! old version). The lock makes the second refuse to start, naming the holder.
//! It is a `flock` on the file: the kernel releases it when the process exits,
//! however it exits, so a SIGKILL never leaves a stale lock behind. The file
//! holds the holder's pid, for the message only. Replicas share PostgreSQL,
//! never a data dir.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "cipherd.lock";

/// The data dir's lock, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Why the data dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data dir {dir} is in use by another cipherd ({holder}); one process per data dir \
         (replicas share PostgreSQL, never a data dir)"
    )]
    Held {
        /// The data dir.
        dir: String,
        /// `pid N`, or `pid unknown`.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("locking {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl DataDirLock {
    /// Locks `dir` (which exists) for this process, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok());
                return Err(LockError::Held {
                    dir: dir.display().to_string(),
                    holder: pid.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}")),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_dir_is_refused_and_names_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
