//! `audio.decode`: lists the input (a directory tree, a LibriSpeech-style tree, or a fairseq
//! wav2vec manifest), decodes every file, down-mixes to mono and resamples. A file that cannot be
//! used becomes a `Rejected` item with its reason; the run goes on.

use crate::data::audio::{decode_file, resample};
use crate::items::{Decoded, Reject, Utterance};
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
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
    /// File extensions taken as audio in directory layouts (empty: every file). Text and metadata
    /// files (txt, tsv, csv, json, md, lab, …) are counted and ignored; any other file is an input
    /// that is rejected as `not audio`, so no file of the tree goes unaccounted.
    pub extensions: Vec<String>,
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
            extensions: default_extensions(),
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
        e
    }
}

/// One input file.
#[derive(Debug, Clone)]
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
}

/// The inputs of a run, in the order they are decoded and stored.
#[derive(Debug, Clone)]
pub struct Listing {
    pub root: PathBuf,
    pub layout: Layout,
    pub files: Vec<InputFile>,
    /// Files not taken as audio, by extension.
    pub ignored: BTreeMap<String, usize>,
}

fn rel(root: &Path, p: &Path) -> String {
    let r = p.strip_prefix(root).unwrap_or(p);
    r.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> crate::Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut entries: Vec<PathBuf> = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        entries.push(entry.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
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
    let (audio, transcripts, ignored) = walk_tree(params, layout)?;
    let files = input_files(input, layout, &audio, &transcripts);
    Ok(Listing {
        root: input.clone(),
        layout,
        files,
        ignored,
    })
}

/// A file found under the input root, with the reason it cannot be an input, if any.
type Found = (PathBuf, Option<String>);

/// Walks the input tree: audio inputs (and files that claim to be), LibriSpeech transcripts by
/// utterance id, and the metadata files ignored, by extension.
fn walk_tree(
    params: &DecodeParams,
    layout: Layout,
) -> crate::Result<(Vec<Found>, HashMap<String, String>, BTreeMap<String, usize>)> {
    let input = &params.input;
    let mut paths = Vec::new();
    walk(input, &mut paths)?;
    let exts: Vec<String> = params
        .extensions
        .iter()
        .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
        .collect();
    let mut ignored = BTreeMap::new();
    let mut transcripts: HashMap<String, String> = HashMap::new();
    let mut audio = Vec::new();
    for p in paths {
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
    Ok((audio, transcripts, ignored))
}

/// The listing's inputs. Ids: the file stem (LibriSpeech) or the relative path without
/// extension; a clash falls back to the relative path with extension.
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
                match source.rfind('.') {
                    Some(i) if i > source.rfind('/').map_or(0, |j| j + 1) => {
                        source[..i].to_string()
                    }
                    _ => source.clone(),
                }
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
            }
        })
        .collect();
    let mut count: HashMap<String, usize> = HashMap::new();
    for f in &files {
        *count.entry(f.utt_id.clone()).or_insert(0) += 1;
    }
    for f in &mut files {
        if count[&f.utt_id] > 1 {
            f.utt_id = f.source.clone();
        }
    }
    files
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
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in lines.enumerate() {
        let lineno = i + 2;
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split('\t');
        let relp = parts.next().unwrap_or("").trim();
        let n = parts.next();
        let mut problem = None;
        if relp.is_empty() {
            problem = Some(format!("manifest line {lineno}: no path"));
        } else if let Some(n) = n {
            if n.trim().parse::<u64>().is_err() {
                problem = Some(format!(
                    "manifest line {lineno}: num_samples `{}` is not a number",
                    n.trim()
                ));
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
        let base = match source.rfind('.') {
            Some(i) if i > source.rfind('/').map_or(0, |j| j + 1) => source[..i].to_string(),
            _ => source.clone(),
        };
        let k = seen.entry(base.clone()).or_insert(0);
        *k += 1;
        let utt_id = if *k > 1 {
            format!("{source}#{lineno}")
        } else {
            base
        };
        files.push(InputFile {
            path: p,
            source,
            utt_id,
            speaker: None,
            chapter: None,
            transcript: None,
            problem,
        });
    }
    Ok(Listing {
        root,
        layout: Layout::Manifest,
        files,
        ignored: BTreeMap::new(),
    })
}

/// Decodes one input into an utterance or a rejection.
pub fn decode_input(f: &InputFile, sample_rate: u32, min_seconds: f64) -> Decoded {
    let rejected = |reason: String| {
        Decoded::Rejected(Reject {
            source: f.source.clone(),
            reason,
        })
    };
    if let Some(p) = &f.problem {
        return rejected(p.clone());
    }
    let pcm = match decode_file(&f.path) {
        Ok(p) => p,
        Err(crate::Error::BadInput { reason, .. }) => return rejected(reason),
        Err(e) => return rejected(e.to_string()),
    };
    let secs = pcm.frames() as f64 / pcm.sample_rate as f64;
    if secs < min_seconds {
        return rejected(format!(
            "too short: {secs:.3} s < min_seconds {min_seconds}"
        ));
    }
    let mono = pcm.to_mono();
    let samples = match resample(&mono, pcm.sample_rate, sample_rate) {
        Ok(s) => s,
        Err(e) => return rejected(format!("resampling failed: {e}")),
    };
    Decoded::Utterance(Utterance {
        utt_id: f.utt_id.clone(),
        speaker: f.speaker.clone(),
        chapter: f.chapter.clone(),
        source: f.source.clone(),
        transcript: f.transcript.clone(),
        sample_rate,
        samples,
        epoch: 0,
    })
}

/// The `audio.decode` stage.
pub struct AudioDecode {
    params: DecodeParams,
    listing: Listing,
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
        _ctx: &StageContext,
        _worker: usize,
    ) -> Result<Self, StageError> {
        let listing = params
            .listing
            .get_or_init(|| list_inputs(params).map_err(Arc::new))
            .clone()
            .map_err(|e| StageError::failed(e.to_string()))?;
        Ok(AudioDecode {
            params: params.clone(),
            listing,
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
            if skip > 0 {
                io.count("resumed_inputs", skip as u64);
                io.note(format!(
                    "resuming: {skip} of {} inputs are already stored",
                    files.len()
                ));
            }
            io.progress().set_length(todo, "files");
        }
        while let Some(u) = io.claim(todo)? {
            let f = &files[skip + u as usize];
            let item = decode_input(f, self.params.sample_rate, self.params.min_seconds);
            io.progress().inc(1);
            io.send(0, item)?;
        }
        Ok(())
    }
}
