//! `audio.decode`: lists the input (a directory tree, a LibriSpeech-style tree, or a fairseq
//! wav2vec manifest), decodes every file, down-mixes to mono and resamples. A file that cannot be
//! used becomes a `Rejected` item with its reason; the run goes on.

use crate::data::audio::{MonoStream, StreamResampler};
use crate::items::{Decoded, Reject, Utterance};
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// How the input is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `manifest` for a file; `librispeech` for a directory holding `*.trans.txt`; else `dir`.
    #[default]
    Auto,
    /// Every audio file below the directory, sorted by path.
    Dir,
    /// LibriSpeech: `<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac` with `*.trans.txt`.
    Librispeech,
    /// fairseq wav2vec manifest: first line the root, then `path<TAB>num_samples`.
    Manifest,
}

fn default_extensions() -> Vec<String> {
    [
        "wav", "wave", "flac", "ogg", "oga", "mp3", "mp2", "mp1", "mpga", "m4a", "mp4", "aac",
        "aif", "aiff", "aifc", "caf", "mka", "mkv", "webm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Parameters of `audio.decode`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeParams {
    /// A directory of audio (searched recursively) or a fairseq wav2vec manifest file.
    pub input: PathBuf,
    /// Input layout: auto, dir, librispeech or manifest.
    pub layout: Layout,
    /// Target sample rate in Hz; audio at other rates is resampled.
    pub sample_rate: u32,
    /// Files shorter than this (in seconds, after decoding) are rejected.
    pub min_seconds: f64,
    /// Longest row, in seconds (default 40: LibriSpeech's longest utterance is 35 s, so a
    /// LibriSpeech tree is never cut). A longer file is decoded and stored in bounded memory as
    /// rows `ID@0`, `ID@1`, … of exactly this length, the last one holding the rest (split in two
    /// halves instead where it would be a tail shorter than `min_seconds`); the segments join
    /// without a seam (they are cut from one resampled stream). Its transcript goes on `ID@0` only.
    /// At least 1 and at least twice `min_seconds`.
    pub max_segment_seconds: f64,
    /// Follow symbolic links that lead outside the input directory (default false: such a link is
    /// rejected as `outside the input root`). Links inside it are always followed, each directory
    /// and file at most once, whatever the number of paths to it (no loops).
    pub follow_links: bool,
    /// File extensions taken as audio in directory layouts (empty: every file). Text and metadata
    /// files (txt, tsv, csv, json, md, lab, …) are counted and ignored; any other file is an input
    /// that is rejected as `not audio`, so no file of the tree goes unaccounted.
    pub extensions: Vec<String>,
    /// Prep split over N independent processes (a Slurm array, a Kubernetes indexed Job):
    /// `{index: i, count: N}` takes the i-th of N contiguous, equal runs of the sorted input list
    /// (manifest order for a manifest), and `shards.write` stores it in `DIR/part-iiiii-of-NNNNN`
    /// with its own index; `ehmam shards merge DIR` then makes one store of the N. `index`
    /// defaults to `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`, over
    /// `SLURM_ARRAY_TASK_STEP`) or `JOB_COMPLETION_INDEX`, `count` to `SLURM_ARRAY_TASK_COUNT`.
    /// Absent (default): the whole input, no partition.
    pub partition: Option<PartitionParams>,
    #[serde(skip)]
    #[schemars(skip)]
    listing: Arc<OnceLock<Result<Listing, Arc<crate::Error>>>>,
}

impl Default for DecodeParams {
    fn default() -> Self {
        DecodeParams {
            input: PathBuf::new(),
            layout: Layout::Auto,
            sample_rate: 16000,
            min_seconds: 0.1,
            max_segment_seconds: 40.0,
            follow_links: false,
            extensions: default_extensions(),
            partition: None,
            listing: Arc::new(OnceLock::new()),
        }
    }
}

impl Params for DecodeParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.input.as_os_str().is_empty() {
            e.push(ParamError::new(
                "input",
                "required: a directory of audio or a manifest file",
            ));
        }
        if !(1000..=384_000).contains(&self.sample_rate) {
            e.push(ParamError::new(
                "sample_rate",
                format!("must be from 1000 to 384000 Hz, got {}", self.sample_rate),
            ));
        }
        if !(self.min_seconds >= 0.0 && self.min_seconds.is_finite()) {
            e.push(ParamError::new(
                "min_seconds",
                format!("must be a number ≥ 0, got {}", self.min_seconds),
            ));
        }
        if !(self.max_segment_seconds >= 1.0 && self.max_segment_seconds.is_finite()) {
            e.push(ParamError::new(
                "max_segment_seconds",
                format!(
                    "must be a number of seconds ≥ 1, got {}",
                    self.max_segment_seconds
                ),
            ));
        } else if self.max_segment_seconds < 2.0 * self.min_seconds {
            e.push(ParamError::new(
                "max_segment_seconds",
                format!(
                    "must be at least twice min_seconds ({}), got {}",
                    self.min_seconds, self.max_segment_seconds
                ),
            ));
        }
        if let Err((field, msg)) = self.partition() {
            e.push(ParamError::new(&format!("partition.{field}"), msg));
        }
        e
    }
}

/// `audio.decode`'s `partition`: this process's share of the inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionParams {
    /// This process's partition, from 0 (default: from the Slurm array or Kubernetes indexed Job).
    pub index: Option<usize>,
    /// How many partitions (default: `SLURM_ARRAY_TASK_COUNT`; a Kubernetes Job's completions
    /// must be given here).
    pub count: Option<usize>,
}

/// The largest partition count (a five-digit directory name).
pub const MAX_PARTITIONS: usize = 99_999;

fn env_usize(name: &str) -> Result<Option<usize>, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| format!("{name}={v} is not a whole number")),
        _ => Ok(None),
    }
}

/// The partition index and count the launcher gives: a Slurm array task's, else a Kubernetes
/// indexed Job's index (its count is not in the environment).
fn launcher_partition() -> Result<(Option<usize>, Option<usize>, &'static str), String> {
    if let Some(id) = env_usize("SLURM_ARRAY_TASK_ID")? {
        let min = env_usize("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = env_usize("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        if id < min || (id - min) % step != 0 {
            return Err(format!(
                "SLURM_ARRAY_TASK_ID={id} is not SLURM_ARRAY_TASK_MIN ({min}) plus a multiple of SLURM_ARRAY_TASK_STEP ({step}): give partition.index"
            ));
        }
        let count = env_usize("SLURM_ARRAY_TASK_COUNT")?;
        return Ok((Some((id - min) / step), count, "the Slurm array"));
    }
    if let Some(i) = env_usize("JOB_COMPLETION_INDEX")? {
        return Ok((Some(i), None, "the Kubernetes indexed Job"));
    }
    Ok((None, None, ""))
}

impl DecodeParams {
    /// `(index, count)` of this process's partition, `None` without `partition`. `Err` names the
    /// field (`index`, `count`) and what is wrong.
    pub fn partition(&self) -> Result<Option<(usize, usize)>, (&'static str, String)> {
        let Some(p) = &self.partition else {
            return Ok(None);
        };
        let (env_index, env_count, from) = launcher_partition().map_err(|m| ("index", m))?;
        let index = p.index.or(env_index).ok_or((
            "index",
            "not given, and neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set"
                .to_string(),
        ))?;
        let count = p.count.or(env_count).ok_or((
            "count",
            "not given, and SLURM_ARRAY_TASK_COUNT is not set (a Kubernetes Job's completions go here)"
                .to_string(),
        ))?;
        if count == 0 || count > MAX_PARTITIONS {
            return Err((
                "count",
                format!("must be from 1 to {MAX_PARTITIONS}, got {count}"),
            ));
        }
        if index >= count {
            let whence = if p.index.is_none() {
                format!(" (from {from})")
            } else {
                String::new()
            };
            return Err((
                "index",
                format!("must be below count ({count}), got {index}{whence}"),
            ));
        }
        Ok(Some((index, count)))
    }

    /// The listing of the whole input (every partition's), made once.
    pub fn full_listing(&self) -> crate::Result<Listing> {
        self.listing
            .get_or_init(|| list_inputs(self).map_err(Arc::new))
            .clone()
            .map_err(|e| crate::Error::invalid(e.to_string()))
    }
}

/// The inputs `[first, end)` of partition `index` of `count` over `n` inputs: contiguous runs
/// whose sizes differ by at most one, in order.
pub fn partition_range(n: usize, index: usize, count: usize) -> (usize, usize) {
    let at = |i: usize| ((n as u128 * i as u128) / count as u128) as usize;
    (at(index), at(index + 1))
}

/// What `audio.decode` tells `shards.write` of its partition (the `audio.partition` link).
#[derive(Debug, Clone)]
pub struct Partition {
    pub index: usize,
    pub count: usize,
    params: DecodeParams,
}

/// A partition with its place in the whole input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlace {
    pub first_input: u64,
    pub inputs: u64,
    pub total_inputs: u64,
    /// BLAKE3 of the decode parameters (but the partition index and the input's path) and of
    /// the whole listing (sources, ids, problems): the same for every partition of one prep.
    pub prep: String,
}

pub const PARTITION: pipeline::Link<Partition> = pipeline::Link::new("audio.partition");

impl Partition {
    /// `part-iiiii-of-NNNNN`: the partition's directory in a store.
    pub fn dir_name(&self) -> String {
        format!("part-{:05}-of-{:05}", self.index, self.count)
    }
    /// Lists the input (once) and places this partition in it; `extra` joins the fingerprint
    /// (the writer's own parameters).
    pub fn place(&self, extra: &serde_json::Value) -> crate::Result<PartitionPlace> {
        let listing = self.params.full_listing()?;
        let n = listing.files.len();
        let (a, b) = partition_range(n, self.index, self.count);
        let mut params = serde_json::to_value(&self.params).map_err(|e| {
            crate::Error::invalid(format!("cannot serialise the decode parameters: {e}"))
        })?;
        if let Some(m) = params.as_object_mut() {
            // Machines mount the corpus at different paths; the listing below is relative.
            m.remove("input");
            m.insert(
                "partition".into(),
                serde_json::json!({ "count": self.count }),
            );
        }
        let mut h = blake3::Hasher::new();
        h.update(b"ehmam-partition/1\n");
        h.update(params.to_string().as_bytes());
        h.update(b"\n");
        h.update(extra.to_string().as_bytes());
        h.update(b"\n");
        h.update(format!("{:?}\n", listing.layout).as_bytes());
        for f in &listing.files {
            let line = serde_json::json!([
                f.source,
                f.utt_id,
                f.speaker,
                f.chapter,
                f.transcript,
                f.problem,
                f.manifest_samples.map(|m| m.1)
            ]);
            h.update(line.to_string().as_bytes());
            h.update(b"\n");
        }
        Ok(PartitionPlace {
            first_input: a as u64,
            inputs: (b - a) as u64,
            total_inputs: n as u64,
            prep: h.finalize().to_hex().to_string(),
        })
    }
}

/// One input file.
#[derive(Debug, Clone, Default)]
pub struct InputFile {
    pub path: PathBuf,
    /// Relative to the input root, `/`-separated.
    pub source: String,
    pub utt_id: String,
    pub speaker: Option<String>,
    pub chapter: Option<String>,
    pub transcript: Option<String>,
    /// A problem found while listing (missing file, bad manifest line): rejected without decoding.
    pub problem: Option<String>,
    /// Manifest layout: the line and the sample count it gives, checked against the file.
    pub manifest_samples: Option<(usize, u64)>,
}

/// The inputs of a run, in the order they are decoded and stored.
#[derive(Debug, Clone)]
pub struct Listing {
    pub root: PathBuf,
    pub layout: Layout,
    pub files: Vec<InputFile>,
    /// Files not taken as audio, by extension.
    pub ignored: BTreeMap<String, usize>,
    /// Paths not listed because they lead to a directory or file listed already (symbolic links,
    /// hard links): each real file is read once.
    pub links_skipped: usize,
}

fn rel(root: &Path, p: &Path) -> String {
    let r = p.strip_prefix(root).unwrap_or(p);
    r.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Identity of a file or directory, whatever the path to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileKey {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn file_key(p: &Path, m: &std::fs::Metadata) -> FileKey {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = p;
        FileKey::Inode(m.dev(), m.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        FileKey::Path(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
    }
}

/// What a directory walk found.
#[derive(Default)]
struct Walked {
    /// Files in path order, each with the reason it cannot be an input, if any.
    files: Vec<Found>,
    links_skipped: usize,
}

/// Every file below `root`, each real file once. Directories are walked without following links
/// first; then the symbolic links found, in path order (those inside followed links join the
/// queue): a link to a directory or file already listed is skipped (so a loop like `ln -s ..
/// loop` is entered at most once), one that leads outside `root` is listed as a reject unless
/// `follow_links`, a broken one is listed (and rejected as unreadable when decoded).
fn walk(root: &Path, follow_links: bool) -> crate::Result<Walked> {
    let canon_root = std::fs::canonicalize(root)
        .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let root_meta =
        std::fs::metadata(root).map_err(|e| format!("cannot list {}: {e}", root.display()))?;
    let mut seen_dirs: HashSet<FileKey> = HashSet::from([file_key(root, &root_meta)]);
    let mut seen_files: HashSet<FileKey> = HashSet::new();
    let mut out = Walked::default();
    let mut links: Vec<PathBuf> = Vec::new();
    walk_dir(root, &mut out, &mut links, &mut seen_dirs, &mut seen_files)?;
    let mut i = 0;
    while i < links.len() {
        let link = links[i].clone();
        i += 1;
        let (Ok(meta), Ok(target)) = (std::fs::metadata(&link), std::fs::canonicalize(&link))
        else {
            out.files.push((link, None));
            continue;
        };
        if !follow_links && !target.starts_with(&canon_root) {
            let reason = format!(
                "outside the input root: a link to {}; set `follow_links: true` to read it",
                target.display()
            );
            out.files.push((link, Some(reason)));
            continue;
        }
        let key = file_key(&link, &meta);
        if meta.is_dir() {
            if seen_dirs.insert(key) {
                walk_dir(&link, &mut out, &mut links, &mut seen_dirs, &mut seen_files)?;
            } else {
                out.links_skipped += 1;
            }
        } else if seen_files.insert(key) {
            out.files.push((link, None));
        } else {
            out.links_skipped += 1;
        }
    }
    out.files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Lists `dir` recursively without following symbolic links, which go to `links`.
fn walk_dir(
    dir: &Path,
    out: &mut Walked,
    links: &mut Vec<PathBuf>,
    seen_dirs: &mut HashSet<FileKey>,
    seen_files: &mut HashSet<FileKey>,
) -> crate::Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut entries = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        entries.push((entry.path(), entry.file_type().ok()));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (p, ft) in entries {
        if ft.is_some_and(|t| t.is_symlink()) {
            links.push(p);
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            out.files.push((p, None));
            continue;
        };
        let key = file_key(&p, &meta);
        if meta.is_dir() {
            if seen_dirs.insert(key) {
                walk_dir(&p, out, links, seen_dirs, seen_files)?;
            } else {
                out.links_skipped += 1;
            }
        } else if seen_files.insert(key) {
            out.files.push((p, None));
        } else {
            out.links_skipped += 1;
        }
    }
    Ok(())
}

fn has_trans_txt(dir: &Path, depth: usize) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if depth > 0 && has_trans_txt(&p, depth - 1) {
                return true;
            }
        } else if p.to_string_lossy().ends_with(".trans.txt") {
            return true;
        }
    }
    false
}

/// Extensions of text and metadata files that sit beside audio in corpora (transcripts, speaker
/// tables, manifests, checksums): not inputs, only counted.
const METADATA_EXTENSIONS: &[&str] = &[
    "txt", "tsv", "csv", "json", "jsonl", "md", "rst", "lab", "yaml", "yml", "xml", "html", "htm",
    "pdf", "lst", "scp", "ctm", "stm", "textgrid", "sha256", "md5", "log",
];

fn ext_of(p: &Path) -> String {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Lists the inputs as `params` describe them.
pub fn list_inputs(params: &DecodeParams) -> crate::Result<Listing> {
    let input = &params.input;
    let layout = match params.layout {
        Layout::Auto => {
            if input.is_file() {
                Layout::Manifest
            } else if has_trans_txt(input, 4) {
                Layout::Librispeech
            } else {
                Layout::Dir
            }
        }
        l => l,
    };
    if layout == Layout::Manifest {
        return list_manifest(input);
    }
    if !input.is_dir() {
        return Err(crate::Error::from(
            format!(
                "{} is not a directory (layout `{layout:?}`)",
                input.display()
            )
            .to_lowercase(),
        ));
    }
    let (audio, transcripts, ignored, links_skipped) = walk_tree(params, layout)?;
    let files = input_files(input, layout, &audio, &transcripts);
    Ok(Listing {
        root: input.clone(),
        layout,
        files,
        ignored,
        links_skipped,
    })
}

/// A file found under the input root, with the reason it cannot be an input, if any.
type Found = (PathBuf, Option<String>);

/// Walks the input tree: audio inputs (and files that claim to be), LibriSpeech transcripts by
/// utterance id, and the metadata files ignored, by extension.
#[allow(clippy::type_complexity)]
fn walk_tree(
    params: &DecodeParams,
    layout: Layout,
) -> crate::Result<(
    Vec<Found>,
    HashMap<String, String>,
    BTreeMap<String, usize>,
    usize,
)> {
    let input = &params.input;
    let walked = walk(input, params.follow_links)?;
    let exts: Vec<String> = params
        .extensions
        .iter()
        .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let mut ignored = BTreeMap::new();
    let mut transcripts: HashMap<String, String> = HashMap::new();
    let mut audio = Vec::new();
    for (p, problem) in walked.files {
        if problem.is_some() {
            audio.push((p, problem));
            continue;
        }
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if layout == Layout::Librispeech && name.ends_with(".trans.txt") {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            for line in text.lines() {
                let line = line.trim();
                if let Some((id, t)) = line.split_once(char::is_whitespace) {
                    transcripts.insert(id.to_string(), t.trim().to_string());
                } else if !line.is_empty() {
                    transcripts.insert(line.to_string(), String::new());
                }
            }
            continue;
        }
        let ext = ext_of(&p);
        if exts.is_empty() || exts.contains(&ext) {
            audio.push((p, None));
        } else if METADATA_EXTENSIONS.contains(&ext.as_str()) {
            *ignored.entry(ext).or_insert(0) += 1;
        } else {
            let what = if ext.is_empty() {
                "no extension".to_string()
            } else {
                format!("extension `.{ext}`")
            };
            audio.push((
                p,
                Some(format!(
                    "not audio: {what} is not among the decodable audio extensions (`extensions`)"
                )),
            ));
        }
    }
    Ok((audio, transcripts, ignored, walked.links_skipped))
}

/// The listing's inputs, with ids as [`unique_ids`] gives them.
fn input_files(
    input: &Path,
    layout: Layout,
    audio: &[Found],
    transcripts: &HashMap<String, String>,
) -> Vec<InputFile> {
    let mut files: Vec<InputFile> = audio
        .iter()
        .map(|(p, problem)| {
            let source = rel(input, p);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let utt_id = if layout == Layout::Librispeech {
                stem.clone()
            } else {
                without_extension(&source)
            };
            let (speaker, chapter, transcript) = if layout == Layout::Librispeech {
                let (speaker, chapter) = librispeech_ids(&stem, &source);
                (speaker, chapter, transcripts.get(&stem).cloned())
            } else {
                (None, None, sidecar_transcript(p))
            };
            InputFile {
                path: p.clone(),
                source,
                utt_id,
                speaker,
                chapter,
                transcript,
                problem: problem.clone(),
                manifest_samples: None,
            }
        })
        .collect();
    unique_ids(&mut files);
    files
}

/// `dir/a.wav` → `dir/a`: the path without its last extension (`a.wav.flac` → `a.wav`).
fn without_extension(source: &str) -> String {
    match source.rfind('.') {
        Some(i) if i > source.rfind('/').map_or(0, |j| j + 1) => source[..i].to_string(),
        _ => source.to_string(),
    }
}

/// Makes the ids of the inputs that will be decoded unique. Each starts as given (the relative
/// path without its last extension, or the LibriSpeech file stem); every input whose id is shared
/// takes its relative path with extension instead, and this is repeated until no two share one:
/// a path with extension can be another file's id without its last extension (`a.wav.flac` →
/// `a.wav`, which `a.wav` takes when `a.flac` is beside it), and that file then keeps its whole
/// path too. Relative paths are unique, so this ends with unique ids. Inputs rejected while
/// listing take part in nothing.
fn unique_ids(files: &mut [InputFile]) {
    loop {
        let mut count: HashMap<&str, usize> = HashMap::new();
        for f in files.iter().filter(|f| f.problem.is_none()) {
            *count.entry(f.utt_id.as_str()).or_insert(0) += 1;
        }
        let clash: Vec<usize> = files
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                f.problem.is_none() && f.utt_id != f.source && count[f.utt_id.as_str()] > 1
            })
            .map(|(i, _)| i)
            .collect();
        if clash.is_empty() {
            return;
        }
        for i in clash {
            files[i].utt_id = files[i].source.clone();
        }
    }
}

/// Speaker and chapter of a LibriSpeech file: from its id `SPEAKER-CHAPTER-N` (as in the
/// `*.trans.txt` files), else from its folders `SPEAKER/CHAPTER/`.
fn librispeech_ids(stem: &str, source: &str) -> (Option<String>, Option<String>) {
    let parts: Vec<&str> = stem.split('-').collect();
    if parts.len() >= 3 && parts.iter().all(|p| !p.is_empty()) {
        return (Some(parts[0].to_string()), Some(parts[1].to_string()));
    }
    let dirs: Vec<&str> = source.split('/').collect();
    if dirs.len() >= 3 {
        return (
            Some(dirs[dirs.len() - 3].to_string()),
            Some(dirs[dirs.len() - 2].to_string()),
        );
    }
    (
        parts
            .first()
            .filter(|p| !p.is_empty())
            .map(|p| p.to_string()),
        None,
    )
}

/// `foo.wav` → the text of `foo.txt` or `foo.lab` beside it, if present.
fn sidecar_transcript(p: &Path) -> Option<String> {
    for ext in ["txt", "lab"] {
        let side = p.with_extension(ext);
        if side != p && side.is_file() {
            if let Ok(t) = std::fs::read_to_string(&side) {
                let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
                if !t.is_empty() {
                    return Some(t);
                }
            }
        }
    }
    None
}

/// fairseq's label files beside a manifest (`train.tsv` → `train.wrd`, else `train.ltr`): one
/// line per data line of the manifest. `.wrd` lines are the words; `.ltr` lines are letters
/// separated by spaces with `|` closing each word (`H E L L O | W O R L D |`), read back to words.
/// A count that differs from the manifest's is an error naming both files.
fn manifest_labels(manifest: &Path, n: usize) -> crate::Result<Option<Vec<String>>> {
    for ext in ["wrd", "ltr"] {
        let p = manifest.with_extension(ext);
        if !p.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .map_err(|e| format!("cannot read labels {}: {e}", p.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != n {
            return Err(crate::Error::from(format!(
                "{}: {} label lines for the {n} data lines of {} (fairseq's label files have one line per manifest line)",
                p.display(),
                lines.len(),
                manifest.display()
            )));
        }
        let words = |l: &str| -> String {
            if ext == "wrd" {
                return l.split_whitespace().collect::<Vec<_>>().join(" ");
            }
            l.split('|')
                .map(|w| w.split_whitespace().collect::<String>())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Ok(Some(lines.into_iter().map(words).collect()));
    }
    Ok(None)
}

fn list_manifest(path: &Path) -> crate::Result<Listing> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read manifest {}: {e}", path.display()))?;
    let mut lines = text.lines();
    let root_line = lines.next().map(str::trim).unwrap_or("");
    if root_line.is_empty() {
        return Err(crate::Error::from(format!(
            "{}:1: a manifest starts with the root directory of its paths",
            path.display()
        )));
    }
    let mut root = PathBuf::from(root_line);
    if root.is_relative() {
        // fairseq writes absolute roots; a relative one is taken relative to the manifest.
        root = path.parent().unwrap_or(Path::new(".")).join(root);
    }
    let mut files = Vec::new();
    // The file each line names (its identity where it exists), and the first line naming it.
    let mut seen: HashMap<Result<FileKey, String>, usize> = HashMap::new();
    for (i, line) in lines.enumerate() {
        let lineno = i + 2;
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split('\t');
        let relp = parts.next().unwrap_or("").trim();
        let n = parts.next();
        let mut problem = None;
        let mut manifest_samples = None;
        if relp.is_empty() {
            problem = Some(format!("manifest line {lineno}: no path"));
        } else if let Some(n) = n {
            match n.trim().parse::<u64>() {
                Ok(n) => manifest_samples = Some((lineno, n)),
                Err(_) => {
                    problem = Some(format!(
                        "manifest line {lineno}: num_samples `{}` is not a number",
                        n.trim()
                    ))
                }
            }
        }
        let p = root.join(relp);
        if problem.is_none() && !p.is_file() {
            problem = Some(format!(
                "missing: manifest line {lineno} names {}, which does not exist",
                p.display()
            ));
        }
        let source = relp.replace('\\', "/");
        if !relp.is_empty() {
            let key = match std::fs::metadata(&p) {
                Ok(m) => Ok(file_key(&p, &m)),
                Err(_) => Err(source.clone()),
            };
            match seen.get(&key) {
                Some(first) => {
                    problem = Some(format!(
                        "duplicate: manifest line {lineno} names the file of line {first} again ({source})"
                    ))
                }
                None => {
                    seen.insert(key, lineno);
                }
            }
        }
        files.push(InputFile {
            path: p,
            utt_id: without_extension(&source),
            source,
            speaker: None,
            chapter: None,
            transcript: None,
            problem,
            manifest_samples,
        });
    }
    if let Some(labels) = manifest_labels(path, files.len())? {
        for (f, t) in files.iter_mut().zip(labels) {
            f.transcript = Some(t);
        }
    }
    unique_ids(&mut files);
    Ok(Listing {
        root,
        layout: Layout::Manifest,
        files,
        ignored: BTreeMap::new(),
        links_skipped: 0,
    })
}

/// How `audio.decode` decodes, checks and cuts each file.
#[derive(Debug, Clone, Copy)]
pub struct DecodeSettings {
    pub sample_rate: u32,
    pub min_seconds: f64,
    /// Longest row in seconds (infinite: never cut).
    pub max_segment_seconds: f64,
}

impl DecodeSettings {
    pub fn of(p: &DecodeParams) -> DecodeSettings {
        DecodeSettings {
            sample_rate: p.sample_rate,
            min_seconds: p.min_seconds,
            max_segment_seconds: p.max_segment_seconds,
        }
    }
}

fn seconds_to_samples(s: f64, rate: u32) -> usize {
    // `as` saturates: infinity is usize::MAX.
    (s * rate as f64).round() as usize
}

/// Decodes one input into an utterance or a rejection, never cut (as [`decode_segments`] with
/// an infinite `max_segment_seconds`).
pub fn decode_input(f: &InputFile, sample_rate: u32, min_seconds: f64) -> Decoded {
    let settings = DecodeSettings {
        sample_rate,
        min_seconds,
        max_segment_seconds: f64::INFINITY,
    };
    let mut last = None;
    let _ = decode_segments::<std::convert::Infallible>(f, &settings, &mut |d| {
        last = Some(d);
        Ok(())
    });
    last.unwrap_or_else(|| {
        Decoded::Rejected(Reject {
            source: f.source.clone(),
            reason: "internal: the decoder emitted nothing".into(),
        })
    })
}

/// The rows of one long file as they fill up.
struct Segmenter<'a> {
    f: &'a InputFile,
    sample_rate: u32,
    /// Samples per full segment.
    seg: usize,
    /// Shortest tail (samples): a segment is cut only once the rest is at least this long.
    min_len: usize,
    /// Segments emitted.
    next: usize,
    /// Resampled samples not emitted yet.
    buf: Vec<f32>,
}

impl Segmenter<'_> {
    fn utterance(&self, utt_id: String, samples: Vec<f32>, transcript: bool) -> Utterance {
        Utterance {
            utt_id,
            speaker: self.f.speaker.clone(),
            chapter: self.f.chapter.clone(),
            source: self.f.source.clone(),
            transcript: if transcript {
                self.f.transcript.clone()
            } else {
                None
            },
            sample_rate: self.sample_rate,
            samples,
            epoch: 0,
        }
    }

    /// Segment `ID@next` of the first `n` samples of the buffer.
    fn row(&mut self, n: usize, last: bool) -> Decoded {
        let samples: Vec<f32> = if n == self.buf.len() {
            std::mem::take(&mut self.buf)
        } else {
            self.buf.drain(..n).collect()
        };
        let u = self.utterance(
            format!("{}@{}", self.f.utt_id, self.next),
            samples,
            self.next == 0,
        );
        self.next += 1;
        if last {
            Decoded::Utterance(u)
        } else {
            Decoded::Part(u)
        }
    }

    /// Emits every full segment that is certainly not the last.
    fn emit_full<E>(&mut self, emit: &mut dyn FnMut(Decoded) -> Result<(), E>) -> Result<(), E> {
        while self.buf.len() >= self.seg.saturating_add(self.min_len) {
            let d = self.row(self.seg, false);
            emit(d)?;
        }
        Ok(())
    }

    /// The end of the file: the whole file as one row with its plain id when it fits, else the
    /// last segments (a rest longer than a segment, but too short to leave a tail of `min_len`,
    /// is cut in two halves).
    fn emit_last<E>(mut self, emit: &mut dyn FnMut(Decoded) -> Result<(), E>) -> Result<(), E> {
        if self.next == 0 && self.buf.len() <= self.seg {
            let samples = std::mem::take(&mut self.buf);
            return emit(Decoded::Utterance(self.utterance(
                self.f.utt_id.clone(),
                samples,
                true,
            )));
        }
        self.emit_full(emit)?;
        let rest = self.buf.len();
        if rest > self.seg {
            let d = self.row(rest / 2, false);
            emit(d)?;
        }
        let d = self.row(self.buf.len(), true);
        emit(d)
    }

    /// A rejection reason, saying which segments were emitted before it.
    fn after(&self, reason: String) -> String {
        match self.next {
            0 => reason,
            n => format!(
                "{reason} (after its first {n} segments, `{id}@0` to `{id}@{}`, which are kept)",
                n - 1,
                id = self.f.utt_id
            ),
        }
    }
}

/// Decodes one input, packet by packet, and hands `emit` its rows: the whole file as one
/// `Utterance`, or for a file longer than `max_segment_seconds` its segments `ID@0`, `ID@1`, …
/// as `Part`s and the last one as an `Utterance`; a file that cannot be used ends with a
/// `Rejected` (after the segments already emitted, if it fails late: they are kept, and the
/// reason says so). Memory is a segment and a packet, not the file. An error of `emit` stops it.
pub fn decode_segments<E>(
    f: &InputFile,
    s: &DecodeSettings,
    emit: &mut dyn FnMut(Decoded) -> Result<(), E>,
) -> Result<(), E> {
    let rejected = |reason: String| {
        Decoded::Rejected(Reject {
            source: f.source.clone(),
            reason,
        })
    };
    if let Some(p) = &f.problem {
        return emit(rejected(p.clone()));
    }
    let mut stream = match MonoStream::open(&f.path) {
        Ok(p) => p,
        Err(crate::Error::BadInput { reason, .. }) => return emit(rejected(reason)),
        Err(e) => return emit(rejected(e.to_string())),
    };
    if let (Some((line, n)), Some(h)) = (f.manifest_samples, stream.header_frames()) {
        // The header of a lossless file is exact but for symphonia's AIFF count (2 frames more).
        if stream.is_lossless() && h.abs_diff(n) > 8 {
            return emit(rejected(format!(
                "manifest count: line {line} gives {n} samples, the file's header {h}"
            )));
        }
    }
    let mut rs = match StreamResampler::new(stream.sample_rate, s.sample_rate) {
        Ok(r) => r,
        Err(e) => return emit(rejected(format!("resampling failed: {e}"))),
    };
    let mut seg = Segmenter {
        f,
        sample_rate: s.sample_rate,
        seg: seconds_to_samples(s.max_segment_seconds, s.sample_rate).max(1),
        min_len: seconds_to_samples(s.min_seconds, s.sample_rate).max(1),
        next: 0,
        buf: Vec::new(),
    };
    let failure = loop {
        match stream.next_chunk() {
            Ok(true) => {
                if let Err(e) = rs.push(stream.chunk(), &mut seg.buf) {
                    break Some(format!("resampling failed: {e}"));
                }
                seg.emit_full(emit)?;
            }
            Ok(false) => break stream.finish().err(),
            Err(reason) => break Some(reason),
        }
    };
    let frames = stream.frames();
    let failure = failure.or_else(|| {
        let (line, n) = f.manifest_samples?;
        let slack = if stream.is_lossless() { 0 } else { 4096 };
        (frames.abs_diff(n) > slack).then(|| {
            format!("manifest count: line {line} gives {n} samples, the file holds {frames}")
        })
    });
    let failure = failure.or_else(|| {
        let secs = frames as f64 / stream.sample_rate as f64;
        (secs < s.min_seconds)
            .then(|| format!("too short: {secs:.3} s < min_seconds {}", s.min_seconds))
    });
    if let Some(reason) = failure {
        return emit(rejected(seg.after(reason)));
    }
    if let Err(e) = rs.finish(&mut seg.buf) {
        return emit(rejected(seg.after(format!("resampling failed: {e}"))));
    }
    seg.emit_last(emit)
}

/// The `audio.decode` stage.
pub struct AudioDecode {
    params: DecodeParams,
    listing: Listing,
    /// Partition `index` of `count`: the inputs from `first` of the `total` listed.
    part: Option<(usize, usize, usize, usize)>,
}

impl StageDef for AudioDecode {
    type Params = DecodeParams;
    const KIND: &'static str = "audio.decode";
    const DOC: &'static str = "Decodes a directory, LibriSpeech tree or wav2vec manifest of audio (WAV, FLAC, Ogg Vorbis, MP3, AAC/M4A, AIFF, CAF, MKV)\nto mono at `sample_rate`; every file becomes an utterance or a reject with its reason.";
    const PARALLEL: bool = true;
    const HONORS_SKIP: bool = true;

    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Decoded>(
            "out",
            "every input file in order: an utterance or a reject",
        )]
    }
    fn paths(p: &DecodeParams, _ctx: &StageContext) -> pipeline::StagePaths {
        pipeline::StagePaths {
            reads: vec![p.input.clone()],
            writes: vec![],
            ..Default::default()
        }
    }
    fn link(
        p: &DecodeParams,
        _ctx: &StageContext,
        linker: &mut pipeline::Linker,
    ) -> Vec<ParamError> {
        let Ok(Some((index, count))) = p.partition() else {
            return Vec::new();
        };
        let part = Partition {
            index,
            count,
            params: p.clone(),
        };
        match linker.provide(&PARTITION, part) {
            Ok(()) => Vec::new(),
            Err(other) => vec![ParamError::new(
                "partition",
                format!(
                    "stage `{}` is a partitioned audio.decode too: a spec preps one partitioned input",
                    other.by
                ),
            )],
        }
    }
    fn validate(p: &DecodeParams, _ctx: &StageContext) -> Vec<ParamError> {
        let mut e = Vec::new();
        if !p.input.exists() {
            e.push(ParamError::new(
                "input",
                format!("{} does not exist", p.input.display()),
            ));
        } else {
            match p.layout {
                Layout::Manifest if !p.input.is_file() => e.push(ParamError::new(
                    "input",
                    format!(
                        "layout `manifest` needs a file, {} is a directory",
                        p.input.display()
                    ),
                )),
                Layout::Dir | Layout::Librispeech if !p.input.is_dir() => e.push(ParamError::new(
                    "input",
                    format!(
                        "layout `{:?}` needs a directory, {} is a file",
                        p.layout,
                        p.input.display()
                    )
                    .to_lowercase(),
                )),
                _ => {}
            }
        }
        e
    }
    fn create(
        params: &DecodeParams,
        ctx: &StageContext,
        _worker: usize,
    ) -> Result<Self, StageError> {
        if crate::dist::stream_split(ctx).is_some() {
            return Err(StageError::failed(
                "a data-parallel run splits its training data by rank where it reads a store: prep the audio into shards first (specs/prep.yaml) and train from shards.read or features.read",
            ));
        }
        let mut listing = params
            .full_listing()
            .map_err(|e| StageError::failed(e.to_string()))?;
        let mut part = None;
        if let Ok(Some((index, count))) = params.partition() {
            let n = listing.files.len();
            let (a, b) = partition_range(n, index, count);
            listing.files = listing.files[a..b].to_vec();
            part = Some((index, count, a, n));
        }
        Ok(AudioDecode {
            params: params.clone(),
            listing,
            part,
        })
    }
}

impl Stage for AudioDecode {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let skip = io.skip_leading(0) as usize;
        let files = &self.listing.files;
        if skip > files.len() {
            return Err(StageError::failed(format!(
                "the output already holds {skip} inputs but {} lists only {}; the input changed since the earlier run — write to a new shard directory",
                self.params.input.display(),
                files.len()
            )));
        }
        let todo = (files.len() - skip) as u64;
        if io.worker() == 0 {
            if let Some((index, count, first, total)) = self.part {
                io.note(format!(
                    "partition {index} of {count}: inputs {first}..{} of the {total} listed",
                    first + files.len()
                ));
            }
            if !self.listing.ignored.is_empty() {
                let list: Vec<String> = self
                    .listing
                    .ignored
                    .iter()
                    .map(|(e, n)| format!(".{e} ×{n}"))
                    .collect();
                let ignored = self.listing.ignored.values().sum::<usize>();
                io.count("ignored_files", ignored as u64);
                io.note(format!(
                    "ignored {ignored} text and metadata files ({})",
                    list.join(", ")
                ));
            }
            if self.listing.links_skipped > 0 {
                let n = self.listing.links_skipped;
                io.count("links_skipped", n as u64);
                io.note(format!(
                    "skipped {n} links to files or directories listed already (each file is read once)"
                ));
            }
            if skip > 0 {
                io.count("resumed_inputs", skip as u64);
                io.note(format!(
                    "resuming: {skip} of {} inputs are already stored",
                    files.len()
                ));
            }
            io.progress().set_length(todo, "files");
        }
        let settings = DecodeSettings::of(&self.params);
        while let Some(u) = io.claim(todo)? {
            let f = &files[skip + u as usize];
            decode_segments(f, &settings, &mut |d| io.send(0, d))?;
            io.progress().inc(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 16-bit PCM WAV; `promise` frames in the header (default: those written).
    fn wav(path: &Path, rate: u32, channels: u16, samples: &[i16], promise: Option<u32>) {
        let frames = samples.len() as u32 / channels as u32;
        let data = promise.unwrap_or(frames) * channels as u32 * 2;
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
        b.extend_from_slice(&(channels * 2).to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data.to_le_bytes());
        for s in samples {
            b.extend_from_slice(&s.to_le_bytes());
        }
        std::fs::write(path, b).unwrap();
    }

    /// Noise and a tone, `n` samples.
    fn signal(n: usize) -> Vec<i16> {
        let mut x = 12345u32;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (x >> 20) as f32 / 4096.0 - 0.5;
                let tone = (i as f32 * 0.05).sin();
                ((noise * 0.3 + tone * 0.5) * 20000.0) as i16
            })
            .collect()
    }

    fn input(path: &Path, id: &str) -> InputFile {
        InputFile {
            path: path.to_path_buf(),
            source: format!("{id}.wav"),
            utt_id: id.into(),
            transcript: Some("THE WHOLE FILE".into()),
            ..Default::default()
        }
    }

    fn segments(f: &InputFile, s: &DecodeSettings) -> Vec<Decoded> {
        let mut out = Vec::new();
        decode_segments::<()>(f, s, &mut |d| {
            out.push(d);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn a_long_file_becomes_rows_of_max_segment_seconds_that_join_into_the_whole_decode() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.wav");
        // 75 s at 8 kHz, stereo, resampled to 16 kHz.
        wav(&p, 8000, 2, &signal(75 * 8000 * 2), None);
        let f = input(&p, "x");
        let whole = match decode_input(&f, 16000, 0.1) {
            Decoded::Utterance(u) => u.samples,
            other => panic!("{other:?}"),
        };
        assert_eq!(whole.len(), 75 * 16000);
        let s = DecodeSettings {
            sample_rate: 16000,
            min_seconds: 0.1,
            max_segment_seconds: 30.0,
        };
        let items = segments(&f, &s);
        let mut joined = Vec::new();
        let mut rows = Vec::new();
        for (i, d) in items.iter().enumerate() {
            let (u, part) = match d {
                Decoded::Part(u) => (u, true),
                Decoded::Utterance(u) => (u, false),
                Decoded::Rejected(r) => panic!("{r:?}"),
            };
            // Every row but the last is a `Part`; the transcript is on the first only.
            assert_eq!(part, i + 1 < items.len());
            assert_eq!(u.transcript.is_some(), i == 0, "{}", u.utt_id);
            assert_eq!(u.source, "x.wav");
            rows.push((u.utt_id.clone(), u.samples.len()));
            joined.extend_from_slice(&u.samples);
        }
        assert_eq!(
            rows,
            [
                ("x@0".to_string(), 30 * 16000),
                ("x@1".to_string(), 30 * 16000),
                ("x@2".to_string(), 15 * 16000)
            ]
        );
        assert!(
            joined == whole,
            "the segments do not join into the whole decode"
        );

        // A file up to the limit is one row with its plain id, as before.
        let p = tmp.path().join("y.wav");
        wav(&p, 8000, 1, &signal(30 * 8000), None);
        let items = segments(&input(&p, "y"), &s);
        match &items[..] {
            [Decoded::Utterance(u)] => {
                assert_eq!((u.utt_id.as_str(), u.samples.len()), ("y", 30 * 16000));
                assert!(u.transcript.is_some());
            }
            other => panic!("{other:?}"),
        }
        // A rest just over the limit (30.05 s) would leave a tail shorter than min_seconds: it
        // is cut in two halves instead.
        let p = tmp.path().join("z.wav");
        wav(&p, 16000, 1, &signal(30 * 16000 + 800), None);
        let lens: Vec<usize> = segments(&input(&p, "z"), &s)
            .iter()
            .map(|d| match d {
                Decoded::Part(u) | Decoded::Utterance(u) => u.samples.len(),
                Decoded::Rejected(r) => panic!("{r:?}"),
            })
            .collect();
        assert_eq!(lens, [240_400, 240_400]);
    }

    #[test]
    fn a_long_file_failing_late_keeps_its_segments_and_ends_as_a_reject() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("cut.wav");
        // The header promises 10 s; the file holds 4.5 s.
        wav(&p, 16000, 1, &signal(72_000), Some(160_000));
        let s = DecodeSettings {
            sample_rate: 16000,
            min_seconds: 0.1,
            max_segment_seconds: 1.0,
        };
        let items = segments(&input(&p, "cut"), &s);
        let parts: Vec<&str> = items
            .iter()
            .filter_map(|d| match d {
                Decoded::Part(u) => Some(u.utt_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(parts, ["cut@0", "cut@1", "cut@2", "cut@3"]);
        match items.last() {
            Some(Decoded::Rejected(r)) => {
                assert!(r.reason.starts_with("truncated: "), "{}", r.reason);
                assert!(
                    r.reason
                        .contains("after its first 4 segments, `cut@0` to `cut@3`, which are kept"),
                    "{}",
                    r.reason
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(items.len(), 5);
        // The same file under the limit: one reject, the reason as it always was.
        match decode_input(&input(&p, "cut"), 16000, 0.1) {
            Decoded::Rejected(r) => assert_eq!(
                r.reason,
                "truncated: the header promises 160000 samples per channel, the file holds 72000"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_rate_below_1_khz_is_an_invalid_header() {
        let tmp = tempfile::tempdir().unwrap();
        for rate in [1u32, 8, 999] {
            let p = tmp.path().join(format!("r{rate}.wav"));
            wav(&p, rate, 1, &signal(4000), None);
            match decode_input(&input(&p, "r"), 16000, 0.0) {
                Decoded::Rejected(r) => assert!(
                    r.reason
                        .starts_with(&format!("invalid header: sample rate {rate} Hz (less than")),
                    "{rate} Hz: {}",
                    r.reason
                ),
                other => panic!("{rate} Hz should be rejected: {other:?}"),
            }
        }
        let p = tmp.path().join("r1000.wav");
        wav(&p, 1000, 1, &signal(4000), None);
        assert!(matches!(
            decode_input(&input(&p, "r"), 16000, 0.0),
            Decoded::Utterance(_)
        ));
    }

    #[test]
    fn fairseq_label_files_beside_a_manifest_give_the_transcripts() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        wav(&d.join("a.wav"), 16000, 1, &signal(1600), None);
        wav(&d.join("b.wav"), 16000, 1, &signal(1600), None);
        let m = d.join("train.tsv");
        std::fs::write(&m, format!("{}\na.wav\t1600\nb.wav\t1600\n", d.display())).unwrap();
        // No label file: no transcripts.
        let l = list_manifest(&m).unwrap();
        assert!(l.files.iter().all(|f| f.transcript.is_none()));
        // .ltr: letters and word boundaries back to words.
        std::fs::write(d.join("train.ltr"), "H E L L O | W O R L D |\nA |\n").unwrap();
        let l = list_manifest(&m).unwrap();
        let t: Vec<_> = l.files.iter().map(|f| f.transcript.clone()).collect();
        assert_eq!(t, vec![Some("HELLO WORLD".into()), Some("A".into())]);
        // .wrd wins over .ltr.
        std::fs::write(d.join("train.wrd"), "HELLO  THERE\nB\n").unwrap();
        let l = list_manifest(&m).unwrap();
        assert_eq!(l.files[0].transcript.as_deref(), Some("HELLO THERE"));
        // A count that differs is refused, naming both files.
        std::fs::write(d.join("train.wrd"), "ONLY ONE\n").unwrap();
        let e = list_manifest(&m).unwrap_err().to_string();
        assert!(
            e.contains("train.wrd") && e.contains("1 label lines") && e.contains("train.tsv"),
            "{e}"
        );
    }

    #[test]
    fn a_manifest_count_is_checked_and_a_repeated_path_is_a_duplicate() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        wav(&d.join("a.wav"), 16000, 1, &signal(16000), None);
        wav(&d.join("b.wav"), 16000, 1, &signal(8000), None);
        std::fs::write(
            d.join("train.tsv"),
            format!(
                "{}\na.wav\t16000\nb.wav\t8001\n./a.wav\t16000\na.wav\t16000\n",
                d.display()
            ),
        )
        .unwrap();
        let listing = list_manifest(&d.join("train.tsv")).unwrap();
        let got: Vec<(String, Result<String, String>)> = listing
            .files
            .iter()
            .map(|f| {
                (
                    f.source.clone(),
                    match decode_input(f, 16000, 0.1) {
                        Decoded::Utterance(u) => Ok(u.utt_id),
                        Decoded::Part(u) => panic!("{u:?}"),
                        Decoded::Rejected(r) => Err(r.reason),
                    },
                )
            })
            .collect();
        assert_eq!(got[0], ("a.wav".into(), Ok("a".into())));
        let reason = |i: usize| got[i].1.clone().unwrap_err();
        assert_eq!(
            reason(1),
            "manifest count: line 3 gives 8001 samples, the file holds 8000"
        );
        assert!(
            reason(2).starts_with("duplicate: manifest line 4 names the file of line 2 again"),
            "{}",
            reason(2)
        );
        assert!(
            reason(3).starts_with("duplicate: manifest line 5"),
            "{}",
            reason(3)
        );
        assert_eq!(got.len(), 4);
    }

    fn dir_params(input: &Path) -> DecodeParams {
        DecodeParams {
            input: input.to_path_buf(),
            layout: Layout::Dir,
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_unique_for_any_double_extension() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for (names, want) in [
            (&["a.wav", "a.wav.flac"][..], &["a", "a.wav"][..]),
            (
                &["a.flac", "a.wav", "a.wav.flac"][..],
                &["a.flac", "a.wav", "a.wav.flac"][..],
            ),
            (
                &["b.flac", "b.flac.wav", "b.wav", "b.wav.flac"][..],
                &["b.flac", "b.flac.wav", "b.wav", "b.wav.flac"][..],
            ),
            (
                &["c.mp3", "c.mp3.ogg", "c.ogg"][..],
                &["c.mp3", "c.mp3.ogg", "c.ogg"][..],
            ),
        ] {
            let sub = d.join(names[0]);
            std::fs::create_dir_all(&sub).unwrap();
            let sub = sub.join("in");
            std::fs::create_dir_all(&sub).unwrap();
            for n in names {
                std::fs::write(sub.join(n), b"RIFF").unwrap();
            }
            let listing = list_inputs(&dir_params(&sub)).unwrap();
            let ids: Vec<&str> = listing.files.iter().map(|f| f.utt_id.as_str()).collect();
            assert_eq!(ids, want, "{names:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_walk_reads_each_file_once_and_leaves_the_root_only_if_asked() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        for f in ["a.wav", "sub/b.wav", "sub/deeper/c.wav"] {
            std::fs::write(root.join(f), b"RIFF").unwrap();
        }
        std::fs::write(outside.join("far.wav"), b"RIFF").unwrap();
        // Loops (to the root, to a parent), a second path to a directory and to a file, a
        // hard link, and links out of the root.
        symlink("..", root.join("sub/loop")).unwrap();
        symlink("../..", root.join("sub/deeper/up")).unwrap();
        symlink("sub", root.join("alias")).unwrap();
        symlink("a.wav", root.join("again.wav")).unwrap();
        std::fs::hard_link(root.join("a.wav"), root.join("hard.wav")).unwrap();
        symlink(&outside, root.join("out")).unwrap();
        symlink(outside.join("far.wav"), root.join("far.wav")).unwrap();

        let listing = list_inputs(&dir_params(&root)).unwrap();
        let got: Vec<(&str, bool)> = listing
            .files
            .iter()
            .map(|f| (f.source.as_str(), f.problem.is_none()))
            .collect();
        assert_eq!(
            got,
            [
                ("a.wav", true),
                ("far.wav", false),
                ("out", false),
                ("sub/b.wav", true),
                ("sub/deeper/c.wav", true),
            ]
        );
        let why = listing.files[2].problem.clone().unwrap();
        assert!(why.starts_with("outside the input root: "), "{why}");
        // loop, up, alias, again.wav, hard.wav
        assert_eq!(listing.links_skipped, 5);

        let mut p = dir_params(&root);
        p.follow_links = true;
        let listing = list_inputs(&p).unwrap();
        let got: Vec<&str> = listing.files.iter().map(|f| f.source.as_str()).collect();
        assert_eq!(got, ["a.wav", "far.wav", "sub/b.wav", "sub/deeper/c.wav"]);
    }

    #[test]
    fn segment_and_link_parameters_are_checked() {
        let mut p = dir_params(Path::new("x"));
        p.max_segment_seconds = 0.5;
        assert_eq!(p.check()[0].field, "max_segment_seconds");
        p.max_segment_seconds = f64::INFINITY;
        assert_eq!(p.check()[0].field, "max_segment_seconds");
        p.max_segment_seconds = 10.0;
        p.min_seconds = 6.0;
        assert_eq!(p.check()[0].field, "max_segment_seconds");
        p.min_seconds = 5.0;
        assert!(p.check().is_empty());
    }
}
