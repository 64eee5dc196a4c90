//! The part directory every store is written as: immutable part files (Parquet), each written
//! atomically and recorded with its size and BLAKE3 in `index.json`, which is itself replaced
//! atomically after each part and marked complete at the end. A crash leaves at most a
//! temporary file (`.NAME.tmp`), never a part that reads as finished.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::File;
use std::path::Path;

/// The index of a part directory.
pub const INDEX_FILE: &str = "index.json";

/// A part as written: its size and content hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub blake3: String,
}

/// Reads `dir/index.json` as a `what` (for the error); `None` when there is none.
pub fn load_index<T: DeserializeOwned>(dir: &Path, what: &str) -> Result<Option<T>> {
    let path = dir.join(INDEX_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| Error::damaged(&path, format!("not a {what}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read", &path)(e)),
    }
}

/// Replaces `dir/index.json` atomically.
pub fn save_index<T: Serialize>(dir: &Path, index: &T) -> Result<()> {
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(index)
        .map_err(|e| Error::invalid(format!("cannot serialise {}: {e}", path.display())))?
        + "\n";
    pipeline::atomic::write_atomic(&path, text.as_bytes()).map_err(Error::io("cannot write", &path))
}

/// Writes part `name` of `dir` atomically through `write` (given the temporary file), then
/// returns its size and BLAKE3.
pub fn write_part(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<Written> {
    let path = dir.join(name);
    pipeline::atomic::write_atomic_with(&path, write).map_err(Error::io("cannot write", &path))?;
    hash_file(&path)
}

/// Size and BLAKE3 (hex) of a file, read in a stream (a part is never held twice).
pub fn hash_file(path: &Path) -> Result<Written> {
    let mut file = File::open(path).map_err(Error::io("cannot read", path))?;
    let mut hasher = blake3::Hasher::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(Error::io("cannot read", path))?;
    Ok(Written {
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}
