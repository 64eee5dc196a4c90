//! Where stores live: a local directory, or a prefix of an object store given as a URL
//! (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`) through the
//! `object_store` crate, with credentials and endpoints from the usual environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`).
//!
//! Object stores have no rename: a file that must never read as half-written is put whole in
//! one request, with `PutMode::Create` (`If-None-Match: *`) for immutable parts, so a crash or
//! a concurrent writer never leaves or replaces a part under its final name; an index that
//! lists the parts is put last. Requests are retried (with backoff) on 5xx answers and broken
//! connections by the client; `EHMAM_STORE_RETRIES` and `EHMAM_STORE_TIMEOUT_S` tune that.
//!
//! Paths stay `Path`s in specs and code: a URL is a path whose text starts with a scheme
//! (`s3://…`); joining names onto it gives the objects under the prefix.

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The URL schemes taken as object stores.
pub const SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "abfs", "abfss", "azure"];

/// The scheme of `p` when it is an object-store URL (`s3://…`).
pub fn scheme(p: &Path) -> Option<&'static str> {
    let s = p.to_str()?;
    let (scheme, rest) = s.split_once("://")?;
    if rest.is_empty() {
        return None;
    }
    SCHEMES
        .iter()
        .copied()
        .find(|k| k.eq_ignore_ascii_case(scheme))
}

/// Whether `p` is an object-store URL rather than a local path.
pub fn is_remote(p: &Path) -> bool {
    scheme(p).is_some()
}

/// A path that looks like a URL of a scheme this build does not read (`http://`, `ftp://`),
/// for a clear refusal instead of a local directory named `http:`.
pub fn unsupported_url(p: &Path) -> Option<String> {
    let s = p.to_str()?;
    let (scheme, _) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+')
    {
        return None;
    }
    if is_remote(p) {
        return None;
    }
    Some(format!(
        "{s}: `{scheme}://` is no store this build reads (object stores: {}; or a local path)",
        SCHEMES
            .iter()
            .map(|k| format!("{k}://"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The runtime every object-store request runs on (stages call from plain threads).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ehmam-store")
            .enable_all()
            .build()
            .expect("cannot start the object-store runtime")
    })
}

/// Runs `f` to completion from synchronous code (stages and commands call from plain threads,
/// never from inside a runtime).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// The retry policy: object_store's defaults (10 retries, 3 minutes, backoff), or the
/// environment's.
fn retry_config() -> object_store::RetryConfig {
    let mut r = object_store::RetryConfig::default();
    if let Some(n) = std::env::var("EHMAM_STORE_RETRIES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        r.max_retries = n;
    }
    if let Some(s) = std::env::var("EHMAM_STORE_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
    {
        r.retry_timeout = std::time::Duration::from_secs_f64(s);
    }
    r
}

/// What names a bucket: the URL up to its path (`s3://bucket`, `abfs://container@account.…`).
fn bucket_key(url: &url::Url) -> String {
    url[..url::Position::BeforePath].to_string()
}

/// The store of a bucket (one client per bucket, kept for the process).
fn store_for(url: &url::Url) -> io::Result<Arc<dyn ObjectStore>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let key = bucket_key(url);
    let stores = STORES.get_or_init(Default::default);
    if let Some(s) = stores.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(s.clone());
    }
    let store = new_store(url)?;
    stores
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, store.clone());
    Ok(store)
}

/// A new client for the bucket of `url` (credentials and endpoint from the environment, the
/// retries of [`retry_config`]), not shared with this module's own requests.
fn new_store(url: &url::Url) -> io::Result<Arc<dyn ObjectStore>> {
    let key = bucket_key(url);
    let bad = |e: object_store::Error| io::Error::other(format!("{key}: {e}"));
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map_err(bad)?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map_err(bad)?,
        ),
        _ => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .build()
                .map_err(bad)?,
        ),
    };
    Ok(store)
}

/// The bucket of a URL (`s3://bucket`, as a query engine registers it) with a client of its
/// own for it: for a caller that makes its requests on its own runtime (DataFusion reading the
/// files where they are).
pub fn bucket_store(p: &Path) -> io::Result<(url::Url, Arc<dyn ObjectStore>)> {
    let shown = p.display().to_string();
    let text = p
        .to_str()
        .ok_or_else(|| io::Error::other(format!("{shown}: not UTF-8")))?;
    let url = url::Url::parse(text).map_err(|e| io::Error::other(format!("{shown}: {e}")))?;
    let bucket = url::Url::parse(&bucket_key(&url))
        .map_err(|e| io::Error::other(format!("{shown}: {e}")))?;
    Ok((bucket, new_store(&url)?))
}

/// An object: its store and its path there.
struct Object {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    shown: String,
}

fn object(p: &Path) -> io::Result<Object> {
    let shown = p.display().to_string();
    let text = p
        .to_str()
        .ok_or_else(|| io::Error::other(format!("{shown}: not UTF-8")))?;
    let url = url::Url::parse(text).map_err(|e| io::Error::other(format!("{shown}: {e}")))?;
    let store = store_for(&url)?;
    let key = url.path().trim_start_matches('/').trim_end_matches('/');
    let path = ObjPath::parse(key).map_err(|e| io::Error::other(format!("{shown}: {e}")))?;
    Ok(Object { store, path, shown })
}

fn err(shown: &str, e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            io::Error::new(io::ErrorKind::NotFound, format!("{shown}: no such object"))
        }
        object_store::Error::AlreadyExists { .. } => io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{shown}: exists already"),
        ),
        e => io::Error::other(format!("{shown}: {e}")),
    }
}

/// The whole content of a file or object.
pub fn read(p: &Path) -> io::Result<Bytes> {
    if !is_remote(p) {
        return std::fs::read(p).map(Bytes::from);
    }
    let o = object(p)?;
    block_on(async {
        let r = o.store.get(&o.path).await.map_err(|e| err(&o.shown, e))?;
        r.bytes().await.map_err(|e| err(&o.shown, e))
    })
}

/// Like [`read`], `None` when there is no such file or object.
pub fn read_opt(p: &Path) -> io::Result<Option<Bytes>> {
    match read(p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The size of a file or object, `None` when there is none.
pub fn size(p: &Path) -> io::Result<Option<u64>> {
    if !is_remote(p) {
        return match std::fs::metadata(p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
    }
    let o = object(p)?;
    match block_on(o.store.head(&o.path)) {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(err(&o.shown, e)),
    }
}

/// Writes an immutable part: locally atomically (a temporary file renamed), on an object store
/// with `PutMode::Create`. An object already there with the same bytes is this writer's own
/// (a request retried after its answer was lost, or a rerun after a crash that wrote the part
/// but not the index): kept. Other bytes there are refused (another writer, or another prep
/// into the same prefix).
pub fn write_new(p: &Path, bytes: Bytes) -> io::Result<()> {
    if !is_remote(p) {
        return crate::atomic::write_atomic(p, &bytes);
    }
    let o = object(p)?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let put = block_on(
        o.store
            .put_opts(&o.path, PutPayload::from_bytes(bytes.clone()), opts),
    );
    match put {
        Ok(_) => Ok(()),
        Err(object_store::Error::AlreadyExists { .. }) => {
            let there = read(p)?;
            if there == bytes {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{}: another object is there ({} bytes, this one {}): another writer uses this prefix, or it holds an earlier prep; use another prefix or delete it",
                        o.shown,
                        there.len(),
                        bytes.len()
                    ),
                ))
            }
        }
        Err(e) => Err(err(&o.shown, e)),
    }
}

/// Replaces a file or object whole (an index): locally atomically, on an object store in one
/// PUT (readers see the old or the new one).
pub fn write_replace(p: &Path, bytes: Bytes) -> io::Result<()> {
    if !is_remote(p) {
        return crate::atomic::write_atomic(p, &bytes);
    }
    let o = object(p)?;
    block_on(o.store.put(&o.path, PutPayload::from_bytes(bytes)))
        .map(|_| ())
        .map_err(|e| err(&o.shown, e))
}

/// Removes a file or object (nothing there is no error).
pub fn remove(p: &Path) -> io::Result<()> {
    if !is_remote(p) {
        return match std::fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let o = object(p)?;
    match block_on(o.store.delete(&o.path)) {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(err(&o.shown, e)),
    }
}

/// The names directly under a directory or prefix: (files, subdirectories), each sorted.
pub fn list(dir: &Path) -> io::Result<(Vec<String>, Vec<String>)> {
    if !is_remote(dir) {
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((files, dirs)),
            Err(e) => return Err(e),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                dirs.push(name);
            } else {
                files.push(name);
            }
        }
        files.sort();
        dirs.sort();
        return Ok((files, dirs));
    }
    let o = object(dir)?;
    let prefix = (!o.path.as_ref().is_empty()).then_some(&o.path);
    let r = block_on(o.store.list_with_delimiter(prefix)).map_err(|e| err(&o.shown, e))?;
    let mut files: Vec<String> = r
        .objects
        .iter()
        .filter_map(|m| m.location.filename().map(str::to_string))
        .collect();
    let mut dirs: Vec<String> = r
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// Makes a local directory (and its parents); nothing for a prefix (object stores have none).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if is_remote(dir) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
}

/// `dir` joined with `name` (a URL keeps its `scheme://`).
pub fn join(dir: &Path, name: &str) -> PathBuf {
    if is_remote(dir) {
        let s = dir.to_string_lossy();
        PathBuf::from(format!("{}/{}", s.trim_end_matches('/'), name))
    } else {
        dir.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        assert_eq!(scheme(Path::new("s3://bucket/a/b")), Some("s3"));
        assert_eq!(scheme(Path::new("GS://bucket")), Some("gs"));
        assert!(!is_remote(Path::new("data/shards")));
        assert!(!is_remote(Path::new("s3://")));
        assert!(!is_remote(Path::new("/tmp/s3:/x")));
        assert!(unsupported_url(Path::new("http://host/x")).is_some());
        assert!(unsupported_url(Path::new("s3://b/x")).is_none());
        assert!(unsupported_url(Path::new("data/x")).is_none());
        assert_eq!(
            join(Path::new("s3://b/p/"), "index.json"),
            PathBuf::from("s3://b/p/index.json")
        );
    }

    #[test]
    fn local_files_go_through_the_same_calls() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.bin");
        assert!(read_opt(&p).unwrap().is_none());
        write_new(&p, Bytes::from_static(b"abc")).unwrap();
        assert_eq!(read(&p).unwrap(), Bytes::from_static(b"abc"));
        assert_eq!(size(&p).unwrap(), Some(3));
        std::fs::create_dir(t.path().join("sub")).unwrap();
        let (files, dirs) = list(t.path()).unwrap();
        assert_eq!(
            (files, dirs),
            (vec!["a.bin".to_string()], vec!["sub".to_string()])
        );
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(size(&p).unwrap(), None);
    }
}

/// Every object below a prefix, by path relative to it (`/`-separated), with its size.
pub fn list_tree(dir: &Path) -> io::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
        let o = object(dir)?;
        let prefix = (!o.path.as_ref().is_empty()).then_some(&o.path);
        let r = block_on(o.store.list_with_delimiter(prefix)).map_err(|e| err(&o.shown, e))?;
        for m in &r.objects {
            if let Some(f) = m.location.filename() {
                out.push((format!("{rel}{f}"), m.size));
            }
        }
        for p in &r.common_prefixes {
            if let Some(d) = p.filename() {
                walk(&join(dir, d), &format!("{rel}{d}/"), out)?;
            }
        }
        Ok(())
    }
    walk(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Where a run directory on object storage is worked on: `$EHMAM_CACHE_DIR/runs/SCHEME/BUCKET/PREFIX`
/// (default `$XDG_CACHE_HOME/ehmam`, else `~/.cache/ehmam`).
pub fn local_copy(url: &Path) -> PathBuf {
    let base = std::env::var_os("EHMAM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("ehmam")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ehmam")))
        .unwrap_or_else(|| std::env::temp_dir().join("ehmam-cache"));
    let text = url.to_string_lossy();
    let (scheme, rest) = text.split_once("://").unwrap_or(("file", &text));
    let mut p = base.join("runs").join(scheme.to_ascii_lowercase());
    for part in rest
        .split('/')
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
    {
        p.push(part);
    }
    p
}

/// Files of a local tree by relative path (`/`-separated), with size and modification time;
/// the run directory's lock file left out.
fn local_tree(dir: &Path) -> io::Result<Vec<(String, u64, std::time::SystemTime)>> {
    fn walk(
        base: &Path,
        d: &Path,
        out: &mut Vec<(String, u64, std::time::SystemTime)>,
    ) -> io::Result<()> {
        let rd = match std::fs::read_dir(d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let p = e.path();
            let m = e.metadata()?;
            if m.is_dir() {
                walk(base, &p, out)?;
            } else if m.is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                // The lock file, and temporary files of writes in progress.
                if name == crate::lock::LOCK_FILE || name.ends_with(".tmp") {
                    continue;
                }
                let rel = p
                    .strip_prefix(base)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, m.len(), m.modified()?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A run directory on object storage and its local working copy: [`RunMirror::pull`] before
/// the run makes the copy what the store holds; [`RunMirror::push`] during and after it puts
/// what changed, each file whole, the files that say what is complete (`*.json`: a checkpoint's
/// description after its tensors, `run.json` last) after the others, and removes the objects
/// whose files are gone. A crash between two pushes loses at most what came after the first;
/// what was pushed reads as it did locally then (a checkpoint without its description is not
/// one).
pub struct RunMirror {
    pub url: PathBuf,
    pub local: PathBuf,
    pushed: Mutex<HashMap<String, (u64, std::time::SystemTime)>>,
}

impl RunMirror {
    pub fn new(url: &Path) -> RunMirror {
        RunMirror {
            url: url.to_path_buf(),
            local: local_copy(url),
            pushed: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the local copy hold what the store holds (objects downloaded when missing or of
    /// another size, local files the store lacks removed). Returns the files downloaded.
    pub fn pull(&self) -> io::Result<usize> {
        std::fs::create_dir_all(&self.local)?;
        let remote = list_tree(&self.url)?;
        let here = local_tree(&self.local)?;
        let sizes: HashMap<&str, u64> = here.iter().map(|(n, s, _)| (n.as_str(), *s)).collect();
        let mut got = 0;
        for (name, size) in &remote {
            if sizes.get(name.as_str()) == Some(size) {
                continue;
            }
            let bytes = read(&join(&self.url, name))?;
            let path = self.local.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            crate::atomic::write_atomic(&path, &bytes)?;
            got += 1;
        }
        let there: std::collections::HashSet<&str> =
            remote.iter().map(|(n, _)| n.as_str()).collect();
        for (name, _, _) in &here {
            if !there.contains(name.as_str()) {
                std::fs::remove_file(self.local.join(name))?;
            }
        }
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        pushed.clear();
        for (name, size, mtime) in local_tree(&self.local)? {
            pushed.insert(name, (size, mtime));
        }
        Ok(got)
    }

    /// Puts what changed since the last push or pull. Returns the files put.
    pub fn push(&self) -> io::Result<usize> {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        let here = local_tree(&self.local)?;
        let mut changed: Vec<&(String, u64, std::time::SystemTime)> = here
            .iter()
            .filter(|(n, s, t)| pushed.get(n) != Some(&(*s, *t)))
            .collect();
        // What says a thing is complete goes after the things it names.
        let rank = |n: &str| match n {
            "run.json" => 2,
            _ if n.ends_with(".json") => 1,
            _ => 0,
        };
        changed.sort_by_key(|(n, _, _)| (rank(n), n.clone()));
        for (name, size, mtime) in &changed {
            let path = self.local.join(name);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Removed since it was listed (a temporary part replaced): the next push.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            write_replace(&join(&self.url, name), bytes.into())?;
            pushed.insert(name.clone(), (*size, *mtime));
        }
        let names: std::collections::HashSet<&str> =
            here.iter().map(|(n, _, _)| n.as_str()).collect();
        let gone: Vec<String> = pushed
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            remove(&join(&self.url, &name))?;
            pushed.remove(&name);
        }
        Ok(changed.len())
    }
}
