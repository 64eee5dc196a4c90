//! `features.waveform`, `features.write` and `features.read`.
//!
//! `features.waveform` is the input of the CNN front-end (method.md §1.1): each utterance's samples
//! normalised to zero mean and unit variance (a layer norm over all samples, eps 1e-5, no affine),
//! as one-dimensional frames at the sample rate. `features.write` stores features as Parquet parts
//! (`utt_id`, `num_frames`, `dim`, `features` as a row-major list of float32, …) with an index, for
//! users who compute features once and train many times; `features.read` streams them back.

use crate::fbank::Features;
use crate::types::Utterance;
use arrow::array::{Array, ArrayRef, Float32Array, Float32Builder, Float64Array, Int32Array, ListArray, ListBuilder, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Zero mean, unit variance over all samples (population variance, eps 1e-5), as fairseq's
/// `postprocess` with `normalize: true`.
pub fn normalize_waveform(x: &[f32]) -> Vec<f32> {
    if x.is_empty() {
        return Vec::new();
    }
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-5).sqrt();
    x.iter().map(|&v| ((v as f64 - mean) * inv) as f32).collect()
}

/// The `features.waveform` stage.
pub struct FeaturesWaveform;

impl StageDef for FeaturesWaveform {
    type Params = pipeline::NoParams;
    const KIND: &'static str = "features.waveform";
    const DOC: &'static str = "The CNN front-end's input: each utterance normalised to zero mean and unit variance over its\nsamples (method §1.1), as 1-dimensional frames at the sample rate.";
    const PARALLEL: bool = true;
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Utterance>("in", "utterances")]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("out", "normalised waveforms (dim 1)")]
    }
    fn create(_: &pipeline::NoParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(FeaturesWaveform)
    }
}

impl Stage for FeaturesWaveform {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(u) = io.recv::<Utterance>(0)? {
            let data = normalize_waveform(&u.samples);
            io.send(
                0,
                Features { utt_id: u.utt_id, speaker: u.speaker, source: u.source, transcript: u.transcript, epoch: u.epoch, frame_rate: u.sample_rate as f64, num_frames: data.len(), dim: 1, data },
            )?;
        }
        Ok(())
    }
}

pub const FEATURES_INDEX: &str = "index.json";
/// File name of the corpus statistics `features.stats` writes into its run directory.
pub const STATS_FILE: &str = "feature_stats.json";

/// Mean and (population) variance per feature dimension over every frame seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub dim: usize,
    pub frames: u64,
    pub utterances: u64,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl FeatureStats {
    pub fn load(path: &Path) -> Result<FeatureStats, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let st: FeatureStats = serde_json::from_str(&text).map_err(|e| format!("{}: not feature statistics: {e}", path.display()))?;
        if st.mean.len() != st.dim || st.var.len() != st.dim {
            return Err(format!("{}: mean/var lengths differ from dim {}", path.display(), st.dim));
        }
        Ok(st)
    }
}

/// Parameters of `features.stats`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StatsParams {
    /// Also write the statistics here (besides `feature_stats.json` in the run directory).
    pub out: Option<PathBuf>,
}
impl Params for StatsParams {}

/// The `features.stats` stage.
pub struct FeaturesStats {
    p: StatsParams,
    run_dir: PathBuf,
}

impl StageDef for FeaturesStats {
    type Params = StatsParams;
    const KIND: &'static str = "features.stats";
    const DOC: &'static str = "Corpus mean and variance per feature dimension (feed it `normalize: none` features, one epoch);
writes feature_stats.json into the run directory for `features.fbank` with `normalize: global`.";
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("in", "features")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(p: &StatsParams, ctx: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(FeaturesStats { p: p.clone(), run_dir: ctx.run_dir.clone() })
    }
}

impl Stage for FeaturesStats {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let (mut sum, mut sq): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
        let (mut frames, mut utts) = (0u64, 0u64);
        while let Some(f) = io.recv::<Features>(0)? {
            if f.dim == 0 || f.data.len() != f.num_frames * f.dim {
                return Err(StageError::failed(format!("{}: {} values for {} frames × {} dims", f.utt_id, f.data.len(), f.num_frames, f.dim)));
            }
            if sum.is_empty() {
                sum = vec![0.0; f.dim];
                sq = vec![0.0; f.dim];
            } else if f.dim != sum.len() {
                return Err(StageError::failed(format!("{}: dim {} differs from the first utterance's {}", f.utt_id, f.dim, sum.len())));
            }
            for row in f.data.chunks_exact(f.dim) {
                for ((s, q), &x) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                    *s += x as f64;
                    *q += (x as f64) * (x as f64);
                }
            }
            frames += f.num_frames as u64;
            utts += 1;
        }
        if frames == 0 {
            return Err(StageError::failed("no frames: nothing to compute statistics from"));
        }
        let n = frames as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let var: Vec<f64> = sq.iter().zip(&mean).map(|(q, m)| (q / n - m * m).max(0.0)).collect();
        let st = FeatureStats { dim: mean.len(), frames, utterances: utts, mean, var };
        let text = serde_json::to_string_pretty(&st).map_err(|e| StageError::failed(e.to_string()))? + "\n";
        let mut targets = vec![self.run_dir.join(STATS_FILE)];
        targets.extend(self.p.out.clone());
        for t in targets {
            if let Some(parent) = t.parent() {
                std::fs::create_dir_all(parent).map_err(|e| StageError::io(format!("cannot create {}", parent.display()), e))?;
            }
            let tmp = t.with_extension("json.tmp");
            std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &t)).map_err(|e| StageError::io(format!("cannot write {}", t.display()), e))?;
        }
        eprintln!("{}: statistics of {utts} utterances, {frames} frames, {} dims", io.stage(), st.dim);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturePart {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub blake3: String,
}

/// `index.json` of a feature directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureIndex {
    pub format: String,
    pub complete: bool,
    pub parts: Vec<FeaturePart>,
}

impl FeatureIndex {
    pub fn load(dir: &Path) -> Result<Option<FeatureIndex>, String> {
        let p = dir.join(FEATURES_INDEX);
        match std::fs::read_to_string(&p) {
            Ok(t) => {
                let index: FeatureIndex = serde_json::from_str(&t).map_err(|e| format!("{}: not a feature index: {e}", p.display()))?;
                if let Some(part) = index.parts.iter().find(|x| x.rows > x.bytes.max(1)) {
                    return Err(format!("{}: part {} claims {} rows in {} bytes: the index is damaged", p.display(), part.file, part.rows, part.bytes));
                }
                Ok(Some(index))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }
    fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{FEATURES_INDEX}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self).map_err(std::io::Error::other)? + "\n")?;
        std::fs::rename(&tmp, dir.join(FEATURES_INDEX))
    }
}

fn feature_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("utt_id", DataType::Utf8, false),
        Field::new("speaker", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, false),
        Field::new("transcript", DataType::Utf8, true),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("frame_rate", DataType::Float64, false),
        Field::new("num_frames", DataType::Int32, false),
        Field::new("dim", DataType::Int32, false),
        Field::new("features", DataType::List(Arc::new(Field::new("item", DataType::Float32, false))), false),
    ]))
}

fn feature_batch(rows: &[Features]) -> Result<RecordBatch, String> {
    let mut list = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new("item", DataType::Float32, false)));
    for f in rows {
        list.values().append_slice(&f.data);
        list.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|f| f.utt_id.as_str()))),
        Arc::new(StringArray::from(rows.iter().map(|f| f.speaker.as_deref()).collect::<Vec<_>>())),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|f| f.source.as_str()))),
        Arc::new(StringArray::from(rows.iter().map(|f| f.transcript.as_deref()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|f| f.epoch))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|f| f.frame_rate))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|f| f.num_frames as i32))),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|f| f.dim as i32))),
        Arc::new(list.finish()),
    ];
    RecordBatch::try_new(feature_schema(), cols).map_err(|e| e.to_string())
}

/// Parameters of `features.write`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesWriteParams {
    /// Directory of the feature parts and their `index.json` (replaced by each run).
    pub dir: PathBuf,
    /// Target size of one part in MB of float32 features (before compression).
    pub target_mb: f64,
    /// zstd compression level (1–22).
    pub zstd_level: i32,
}

impl Default for FeaturesWriteParams {
    fn default() -> Self {
        FeaturesWriteParams { dir: PathBuf::new(), target_mb: 128.0, zstd_level: 3 }
    }
}

impl Params for FeaturesWriteParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.dir.as_os_str().is_empty() {
            e.push(ParamError::new("dir", "required: the feature directory"));
        }
        if !(self.target_mb > 0.0 && self.target_mb.is_finite()) {
            e.push(ParamError::new("target_mb", format!("must be > 0, got {}", self.target_mb)));
        }
        if !(1..=22).contains(&self.zstd_level) {
            e.push(ParamError::new("zstd_level", format!("must be from 1 to 22, got {}", self.zstd_level)));
        }
        e
    }
}

/// The `features.write` stage.
pub struct FeaturesWrite {
    p: FeaturesWriteParams,
    index: FeatureIndex,
    rows: Vec<Features>,
    bytes: f64,
}

impl StageDef for FeaturesWrite {
    type Params = FeaturesWriteParams;
    const KIND: &'static str = "features.write";
    const DOC: &'static str = "Stores features as zstd Parquet parts with an index (each part written atomically; the index\nmarked complete at the end). A rerun replaces the directory's parts.";
    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("in", "features")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(p: &FeaturesWriteParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        std::fs::create_dir_all(&p.dir).map_err(|e| StageError::io(format!("cannot create {}", p.dir.display()), e))?;
        // Start over: drop the index first, so a crash in between never leaves a complete-looking
        // mix of old and new parts.
        let _ = std::fs::remove_file(p.dir.join(FEATURES_INDEX));
        if let Ok(rd) = std::fs::read_dir(&p.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (name.starts_with("features-") && name.ends_with(".parquet")) || name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(FeaturesWrite { p: p.clone(), index: FeatureIndex { format: "ehmam-features/1".into(), complete: false, parts: Vec::new() }, rows: Vec::new(), bytes: 0.0 })
    }
}

impl FeaturesWrite {
    fn flush(&mut self) -> Result<(), StageError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let name = format!("features-{:05}.parquet", self.index.parts.len());
        let tmp = self.p.dir.join(format!(".{name}.tmp"));
        let level = ZstdLevel::try_new(self.p.zstd_level).map_err(|e| StageError::failed(e.to_string()))?;
        let props = WriterProperties::builder().set_compression(Compression::ZSTD(level)).set_max_row_group_row_count(Some(256)).build();
        let batch = feature_batch(&self.rows).map_err(StageError::Failed)?;
        let file = File::create(&tmp).map_err(|e| StageError::io(format!("cannot create {}", tmp.display()), e))?;
        let mut w = ArrowWriter::try_new(file, feature_schema(), Some(props)).map_err(|e| StageError::failed(e.to_string()))?;
        w.write(&batch).map_err(|e| StageError::failed(format!("writing {}: {e}", tmp.display())))?;
        let file = w.into_inner().map_err(|e| StageError::failed(format!("writing {}: {e}", tmp.display())))?;
        file.sync_all().map_err(|e| StageError::io(format!("writing {}", tmp.display()), e))?;
        let path = self.p.dir.join(&name);
        std::fs::rename(&tmp, &path).map_err(|e| StageError::io(format!("cannot rename {}", tmp.display()), e))?;
        let (bytes, blake3) = crate::shards::hash_file(&path).map_err(StageError::Failed)?;
        self.index.parts.push(FeaturePart { file: name, rows: self.rows.len() as u64, bytes, blake3 });
        self.index.save(&self.p.dir).map_err(|e| StageError::io("cannot write the feature index", e))?;
        self.rows.clear();
        self.bytes = 0.0;
        Ok(())
    }
}

impl Stage for FeaturesWrite {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(f) = io.recv::<Features>(0)? {
            self.bytes += f.data.len() as f64 * 4.0;
            self.rows.push(f);
            if self.bytes >= self.p.target_mb * 1e6 {
                self.flush()?;
            }
        }
        self.flush()?;
        self.index.complete = true;
        self.index.save(&self.p.dir).map_err(|e| StageError::io("cannot write the feature index", e))?;
        Ok(())
    }
}

/// Reads every row of one feature part.
pub fn read_features(path: &Path, epoch: Option<u32>) -> Result<Vec<Features>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.with_batch_size(256).build()).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
        let err = |c: &str| format!("{}: column `{c}` is missing or of the wrong type", path.display());
        let col = |c: &str| b.column_by_name(c).cloned().ok_or_else(|| err(c));
        let s = |c: &str| -> Result<StringArray, String> { col(c)?.as_any().downcast_ref::<StringArray>().cloned().ok_or_else(|| err(c)) };
        let (ids, spk, src, trn) = (s("utt_id")?, s("speaker")?, s("source")?, s("transcript")?);
        let ep = col("epoch")?.as_any().downcast_ref::<UInt32Array>().cloned().ok_or_else(|| err("epoch"))?;
        let rate = col("frame_rate")?.as_any().downcast_ref::<Float64Array>().cloned().ok_or_else(|| err("frame_rate"))?;
        let nf = col("num_frames")?.as_any().downcast_ref::<Int32Array>().cloned().ok_or_else(|| err("num_frames"))?;
        let dim = col("dim")?.as_any().downcast_ref::<Int32Array>().cloned().ok_or_else(|| err("dim"))?;
        let feats = col("features")?.as_any().downcast_ref::<ListArray>().cloned().ok_or_else(|| err("features"))?;
        for i in 0..b.num_rows() {
            let v = feats.value(i);
            let data = v.as_any().downcast_ref::<Float32Array>().ok_or_else(|| err("features"))?.values().to_vec();
            let (n, d) = (nf.value(i).max(0) as usize, dim.value(i).max(0) as usize);
            if d == 0 || n * d != data.len() {
                return Err(format!("{}: row {i} ({}) has {} values for {n} × {d}", path.display(), ids.value(i), data.len()));
            }
            out.push(Features {
                utt_id: ids.value(i).to_string(),
                speaker: (!spk.is_null(i)).then(|| spk.value(i).to_string()),
                source: src.value(i).to_string(),
                transcript: (!trn.is_null(i)).then(|| trn.value(i).to_string()),
                epoch: epoch.unwrap_or(ep.value(i)),
                frame_rate: rate.value(i),
                num_frames: n,
                dim: d,
                data,
            });
        }
    }
    Ok(out)
}

/// Parameters of `features.read`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesReadParams {
    /// Directory written by `features.write`.
    pub dir: PathBuf,
    /// Passes over the data.
    pub epochs: u32,
    /// Shuffle part order and rows within each part, per epoch, from the stage's seed.
    pub shuffle: bool,
    /// First epoch to stream (resuming).
    pub start_epoch: u32,
    /// Start at this index of `start_epoch`'s order (resuming inside an epoch; parts wholly
    /// before it are not read).
    pub start_index: u64,
}

impl Default for FeaturesReadParams {
    fn default() -> Self {
        FeaturesReadParams { dir: PathBuf::new(), epochs: 1, shuffle: false, start_epoch: 0, start_index: 0 }
    }
}

impl Params for FeaturesReadParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.dir.as_os_str().is_empty() {
            e.push(ParamError::new("dir", "required: a directory written by features.write"));
        }
        if self.epochs == 0 {
            e.push(ParamError::new("epochs", "must be at least 1"));
        }
        if self.start_epoch >= self.epochs.max(1) {
            e.push(ParamError::new("start_epoch", format!("must be below epochs ({}), got {}", self.epochs, self.start_epoch)));
        }
        e
    }
}

/// The `features.read` stage.
pub struct FeaturesRead {
    p: FeaturesReadParams,
    seed: u64,
    files: Vec<PathBuf>,
    rows: Vec<u64>,
}

impl StageDef for FeaturesRead {
    type Params = FeaturesReadParams;
    const KIND: &'static str = "features.read";
    const DOC: &'static str = "Streams stored features back for `epochs` passes, shuffled by seed if asked; one part in memory.";
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<Features>("out", "features, epoch by epoch")]
    }
    fn validate(p: &FeaturesReadParams, ctx: &StageContext) -> Vec<ParamError> {
        crate::train::register_resumable_reader(ctx);
        match FeatureIndex::load(&p.dir) {
            Ok(Some(i)) if !i.complete => vec![ParamError::new("dir", format!("{}: the run that writes it has not finished", p.dir.display()))],
            Ok(Some(_)) => vec![],
            Ok(None) => vec![ParamError::new("dir", format!("no feature index at {}", p.dir.join(FEATURES_INDEX).display()))],
            Err(e) => vec![ParamError::new("dir", e)],
        }
    }
    fn create(p: &FeaturesReadParams, ctx: &StageContext, _: usize) -> Result<Self, StageError> {
        let index = FeatureIndex::load(&p.dir).map_err(StageError::Failed)?.ok_or_else(|| StageError::failed(format!("no feature index in {}", p.dir.display())))?;
        let mut p = p.clone();
        if let Some((epoch, index)) = crate::train::reader_start(ctx, p.epochs) {
            p.start_epoch = epoch;
            p.start_index = index;
        }
        Ok(FeaturesRead { seed: ctx.seed, files: index.parts.iter().map(|x| p.dir.join(&x.file)).collect(), rows: index.parts.iter().map(|x| x.rows).collect(), p })
    }
}

impl Stage for FeaturesRead {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        io.progress().set_length(self.files.len() as u64 * (self.p.epochs - self.p.start_epoch) as u64, "parts");
        for epoch in self.p.start_epoch..self.p.epochs {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut order: Vec<usize> = (0..self.files.len()).collect();
            if self.p.shuffle {
                order.shuffle(&mut rng);
            }
            let mut skip = if epoch == self.p.start_epoch { self.p.start_index } else { 0 };
            for i in order {
                // A row permutation drawn from the row count alone (the same draws as shuffling
                // the rows), so parts before the start are skipped without being read.
                let n = self.rows[i] as usize;
                let mut perm: Vec<usize> = (0..n).collect();
                if self.p.shuffle {
                    perm.shuffle(&mut rng);
                }
                if skip >= n as u64 {
                    skip -= n as u64;
                    io.progress().inc(1);
                    continue;
                }
                let rows = read_features(&self.files[i], Some(epoch)).map_err(StageError::Failed)?;
                if rows.len() != n {
                    return Err(StageError::failed(format!("{}: {} rows, the index says {n}", self.files[i].display(), rows.len())));
                }
                let mut slots: Vec<Option<Features>> = rows.into_iter().map(Some).collect();
                for &r in perm.iter().skip(skip as usize) {
                    if let Some(f) = slots[r].take() {
                        io.send(0, f)?;
                    }
                }
                skip = 0;
                io.progress().inc(1);
            }
        }
        Ok(())
    }
}
