//! `dir:` sources: nothing can be frozen, so the live tree itself is read. The guard says
//! so ([`super::SnapshotGuard::consistent`] is false) and this module warns loudly, so an
//! inconsistent backup never looks like a consistent one.

use super::{io_err, SnapshotError};
use std::path::{Path, PathBuf};

pub(crate) fn take(path: &Path) -> Result<PathBuf, SnapshotError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Err(SnapshotError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    tracing::warn!(
        path = %path.display(),
        "NO SNAPSHOT: dir: source is read live; files changing during the backup may be \
         copied inconsistently"
    );
    Ok(path.to_owned())
}
