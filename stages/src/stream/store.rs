//! The part directory every store is written as: immutable part files (Parquet), each written
//! atomically and recorded with its size and BLAKE3 in `index.json`, which is itself replaced
//! atomically after each part and marked complete at the end. A crash leaves at most a
//! temporary file (`.NAME.tmp`), never a part that reads as finished.

use crate::error::{Error, Result};
use pipeline::storage;
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

/// Reads `dir/index.json` as a `what` (for the error); `None` when there is none. `dir` may be
/// an object-store URL.
pub fn load_index<T: DeserializeOwned>(dir: &Path, what: &str) -> Result<Option<T>> {
    let path = storage::join(dir, INDEX_FILE);
    match storage::read_opt(&path) {
        Ok(Some(t)) => serde_json::from_slice(&t)
            .map(Some)
            .map_err(|e| Error::damaged(&path, format!("not a {what}: {e}"))),
        Ok(None) => Ok(None),
        Err(e) => Err(Error::io("cannot read", &path)(e)),
    }
}

/// Replaces `dir/index.json` atomically (on an object store: in one PUT, after the parts it
/// lists).
pub fn save_index<T: Serialize>(dir: &Path, index: &T) -> Result<()> {
    let path = storage::join(dir, INDEX_FILE);
    let text = serde_json::to_string_pretty(index)
        .map_err(|e| Error::invalid(format!("cannot serialise {}: {e}", path.display())))?
        + "\n";
    storage::write_replace(&path, text.into_bytes().into())
        .map_err(Error::io("cannot write", &path))
}

/// Writes part `name` of `dir` atomically through `write` (given the temporary file), then
/// returns its size and BLAKE3. On an object store the part is written to a local temporary
/// file, then put whole under its name with `PutMode::Create`.
pub fn write_part(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<Written> {
    let path = storage::join(dir, name);
    if !storage::is_remote(dir) {
        pipeline::atomic::write_atomic_with(&path, write)
            .map_err(Error::io("cannot write", &path))?;
        return hash_file(&path);
    }
    let mut tmp =
        tempfile::tempfile().map_err(Error::io("cannot make a temporary file for", &path))?;
    write(&mut tmp).map_err(Error::io("cannot write", &path))?;
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    tmp.rewind()
        .and_then(|_| tmp.read_to_end(&mut bytes))
        .map_err(Error::io("cannot write", &path))?;
    let written = hash_bytes(&bytes);
    storage::write_new(&path, bytes.into()).map_err(Error::io("cannot write", &path))?;
    Ok(written)
}

/// Size and BLAKE3 (hex) of bytes in memory.
pub fn hash_bytes(bytes: &[u8]) -> Written {
    Written {
        bytes: bytes.len() as u64,
        blake3: blake3::hash(bytes).to_hex().to_string(),
    }
}

/// Size and BLAKE3 (hex) of a file, read in a stream (a part is never held twice); an object
/// is read whole.
pub fn hash_file(path: &Path) -> Result<Written> {
    if storage::is_remote(path) {
        let b = storage::read(path).map_err(Error::io("cannot read", path))?;
        return Ok(hash_bytes(&b));
    }
    let mut file = File::open(path).map_err(Error::io("cannot read", path))?;
    let mut hasher = blake3::Hasher::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(Error::io("cannot read", path))?;
    Ok(Written {
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}
