//! One run of a job at a time: an exclusive `flock` on `STATE_DIR/locks/JOB.lock`. The
//! kernel drops the lock when the process dies, so a `kill -9` never leaves a stale lock.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("job {job}: another run holds {path}{}; not starting a second one", holder.as_ref().map(|h| format!(" (pid {h})")).unwrap_or_default())]
    Busy {
        job: String,
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct JobLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl JobLock {
    /// # Errors
    /// `Busy` when another process holds the lock; I/O errors on the state dir.
    pub fn acquire(state_dir: &Path, job: &str) -> Result<Self, LockError> {
        let dir = state_dir.join("locks");
        fs::create_dir_all(&dir).map_err(|source| LockError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(format!("{job}.lock"));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
                return Err(LockError::Busy {
                    job: job.into(),
                    path,
                    holder,
                });
            }
            Err((_, e)) => {
                return Err(LockError::Io {
                    path,
                    source: std::io::Error::from_raw_os_error(e as i32),
                })
            }
        };
        let _ = lock.set_len(0);
        let _ = writeln!(*lock, "{}", std::process::id());
        Ok(JobLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_busy_until_released() {
        let t = tempfile::TempDir::new().unwrap();
        let a = JobLock::acquire(t.path(), "j").unwrap();
        let e = JobLock::acquire(t.path(), "j").err().expect("busy");
        assert!(
            e.to_string().contains("another run")
                && e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(a);
        JobLock::acquire(t.path(), "j").unwrap();
    }
}
