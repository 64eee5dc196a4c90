//! Atomic file writes: every file that a reader may take as finished (a shard, an index, a log
//! part, a checkpoint, `run.json`) is written under a temporary name in the same directory,
//! flushed to disk and renamed over its final name, so a crash never leaves a half-written file
//! under a finished one's name. Temporary names are `.NAME.tmp`; stores remove leftovers.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The temporary name `path` is written under: `.NAME.tmp` beside it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| io::Write::write_all(f, bytes))
}

/// Creates the temporary file, lets `write` fill it, syncs it and renames it over `path`. On an
/// error the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with<T>(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<T>,
) -> io::Result<T> {
    commit_atomic(path, |tmp| {
        let mut file = File::create(tmp)?;
        let out = write(&mut file)?;
        file.sync_all()?;
        Ok(out)
    })
}

/// For writers that take a path (a safetensors save): `write` writes the temporary path it is
/// given, which is then renamed over `path`. On an error the temporary file is removed.
pub fn commit_atomic<T>(path: &Path, write: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let tmp = temp_path(path);
    match write(&tmp) {
        Ok(out) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(out),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        },
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"old").unwrap();
        let r = write_atomic_with(&p, |f| {
            io::Write::write_all(f, b"half")?;
            Err::<(), _>(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!temp_path(&p).exists());
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
