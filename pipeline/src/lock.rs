//! Exclusive directory locks: one process at a time writes a run directory, a shard directory or
//! a feature store.
//!
//! A lock is an OS file lock (`flock` on Unix, through [`std::fs::File::try_lock`]) on
//! `DIR/.ehmam.lock`, held for the lifetime of the [`DirLock`] and released by the kernel when the
//! process ends, however it ends (a crash or `kill -9` leaves no stale lock). The file itself
//! stays; it says who holds, or last held, the lock: the process id, when it started and its
//! command line, so that a second process is refused at once with a message naming the holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = ".ehmam.lock";

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    _file: File,
}

impl DirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{} is in use by another ehmam process ({holder}); wait for it to finish or stop it, or use another directory", dir.display())]
    Held { dir: PathBuf, holder: String },
    /// The cause is part of the message (not a `source`), so `{:#}` chains print it once.
    #[error("cannot create or lock {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Creates `dir` if needed and locks it for this process; `what` says what the process does
/// there (written into the lock file for whoever is refused next).
pub fn lock_dir(dir: &Path, what: &str) -> Result<DirLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |cause| LockError::Io {
        path: path.clone(),
        cause,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            // Readers hold it shared (and cannot say who they are); a writer holds it alone
            // and wrote its name into the file.
            let holder = if file.try_lock_shared().is_ok() {
                let _ = file.unlock();
                "reading it as its input".to_string()
            } else {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                describe_holder(&text)
            };
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let command: Vec<String> = std::env::args().collect();
    let text = format!(
        "pid: {}\nstarted: {started}\nwhat: {what}\ncommand: {}\n",
        std::process::id(),
        command.join(" ")
    );
    file.set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(text.as_bytes()))
        .and_then(|_| file.flush())
        .map_err(io)?;
    Ok(DirLock {
        dir: dir.to_path_buf(),
        _file: file,
    })
}

/// Holds a store that this process reads with a shared lock, so that no writer replaces it
/// while it is read: several readers at once, never beside a writer (refused at once, naming
/// it). A store without a lock file (written before locks, or on a read-only medium) is read
/// unlocked: nothing is created in a directory that is only read.
pub fn lock_dir_shared(dir: &Path) -> Result<Option<DirLock>, LockError> {
    let Ok(mut file) = File::open(dir.join(LOCK_FILE)) else {
        return Ok(None);
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(DirLock {
            dir: dir.to_path_buf(),
            _file: file,
        })),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder: describe_holder(&text),
            })
        }
        // A file system without locks: read as before.
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

/// Whether another process holds `dir`'s lock now (a directory without a lock file is free).
/// The probe takes the lock for an instant when it is free, so it is for checks after the fact
/// (did a crashed holder leave it?), not for racing a process that is about to lock.
pub fn holder(dir: &Path) -> Option<String> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::open(&path).ok()?;
    match file.try_lock() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Some(describe_holder(&text))
        }
        Err(std::fs::TryLockError::Error(_)) => None,
    }
}

/// "pid 123, started 2026-12-06T21:00:00Z: run of spec tiny" from the lock file's text.
fn describe_holder(text: &str) -> String {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
    };
    match (field("pid:"), field("started:")) {
        (Some(pid), Some(started)) => {
            let what = field("what:").map(|w| format!(": {w}")).unwrap_or_default();
            format!("pid {pid}, started {started}{what}")
        }
        _ => "a process that has not yet said who it is".to_string(),
    }
}

/// Locks several directories (each once, whatever its spelling); all or none.
pub fn lock_dirs<'a>(
    dirs: impl IntoIterator<Item = (&'a Path, String)>,
) -> Result<Vec<DirLock>, LockError> {
    let mut held: Vec<DirLock> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for (dir, what) in dirs {
        std::fs::create_dir_all(dir).map_err(|cause| LockError::Io {
            path: dir.to_path_buf(),
            cause,
        })?;
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        held.push(lock_dir(dir, &what)?);
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = lock_dir(&dir, "run of spec a").unwrap();
        // flock locks belong to an open file: a second open in this process conflicts as a
        // second process would.
        let err = lock_dir(&dir, "run of spec b").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("started 20"), "{msg}");
        assert!(msg.contains("run of spec a"), "{msg}");
        assert_eq!(
            holder(&dir).as_deref().map(|h| h.contains("run of spec a")),
            Some(true)
        );
        drop(first);
        assert_eq!(holder(&dir), None);
        let again = lock_dir(&dir, "run of spec b").unwrap();
        assert_eq!(again.dir(), dir);
        drop(again);
    }

    #[test]
    fn readers_share_a_store_and_keep_writers_out() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shards");
        // No lock file yet (a store from before locks): read unlocked, nothing created.
        std::fs::create_dir_all(&dir).unwrap();
        assert!(lock_dir_shared(&dir).unwrap().is_none());
        assert!(!dir.join(LOCK_FILE).exists());
        drop(lock_dir(&dir, "prep `p`").unwrap());
        let r1 = lock_dir_shared(&dir).unwrap().unwrap();
        let r2 = lock_dir_shared(&dir).unwrap().unwrap();
        let msg = lock_dir(&dir, "prep `q`").unwrap_err().to_string();
        assert!(msg.contains("reading it as its input"), "{msg}");
        drop((r1, r2));
        let w = lock_dir(&dir, "prep `q`").unwrap();
        let msg = lock_dir_shared(&dir).unwrap_err().to_string();
        assert!(msg.contains("prep `q`"), "{msg}");
        drop(w);
    }

    #[test]
    fn lock_dirs_takes_each_directory_once_whatever_its_spelling() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let a2 = tmp.path().join("a/../a/");
        std::fs::create_dir_all(&a).unwrap();
        let held = lock_dirs([(a.as_path(), "x".into()), (a2.as_path(), "y".into())]).unwrap();
        assert_eq!(held.len(), 1);
    }
}
