//! The feature store: `features.write` (Parquet parts with an index) and `features.read`.

use crate::items::Features;
use crate::stream::{PartSource, ReadStage};
use arrow::array::{
    Array, ArrayRef, Float32Array, Float32Builder, Float64Array, Int32Array, ListArray,
    ListBuilder, StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturePart {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub blake3: String,
}

pub const FEATURES_INDEX: &str = "index.json";

/// `index.json` of a feature directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureIndex {
    pub format: String,
    pub complete: bool,
    pub parts: Vec<FeaturePart>,
}

impl FeatureIndex {
    pub fn load(dir: &Path) -> crate::Result<Option<FeatureIndex>> {
        let Some(index) = crate::stream::store::load_index::<FeatureIndex>(dir, "feature index")?
        else {
            return Ok(None);
        };
        // A row takes at least a byte: a larger count is a damaged index (and must not size
        // allocations).
        if let Some(part) = index.parts.iter().find(|x| x.rows > x.bytes.max(1)) {
            let what = format!(
                "part {} claims {} rows in {} bytes: the index is damaged",
                part.file, part.rows, part.bytes
            );
            return Err(crate::Error::damaged(dir.join(FEATURES_INDEX), what));
        }
        Ok(Some(index))
    }
    fn save(&self, dir: &Path) -> crate::Result<()> {
        crate::stream::store::save_index(dir, self)
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
        Field::new(
            "features",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            false,
        ),
    ]))
}

fn feature_batch(rows: &[Features]) -> crate::Result<RecordBatch> {
    let mut list = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Float32,
        false,
    )));
    for f in rows {
        list.values().append_slice(&f.data);
        list.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|f| f.utt_id.as_str()),
        )),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|f| f.speaker.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|f| f.source.as_str()),
        )),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|f| f.transcript.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|f| f.epoch))),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|f| f.frame_rate),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|f| f.num_frames as i32),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|f| f.dim as i32),
        )),
        Arc::new(list.finish()),
    ];
    RecordBatch::try_new(feature_schema(), cols)
        .map_err(|e| e.to_string())
        .map_err(crate::Error::from)
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
        FeaturesWriteParams {
            dir: PathBuf::new(),
            target_mb: 128.0,
            zstd_level: 3,
        }
    }
}

impl Params for FeaturesWriteParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.dir.as_os_str().is_empty() {
            e.push(ParamError::new("dir", "required: the feature directory"));
        }
        if let Some(m) = pipeline::storage::unsupported_url(&self.dir) {
            e.push(ParamError::new("dir", m));
        }
        if !(self.target_mb > 0.0 && self.target_mb.is_finite()) {
            e.push(ParamError::new(
                "target_mb",
                format!("must be > 0, got {}", self.target_mb),
            ));
        }
        if !(1..=22).contains(&self.zstd_level) {
            e.push(ParamError::new(
                "zstd_level",
                format!("must be from 1 to 22, got {}", self.zstd_level),
            ));
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
    fn paths(p: &FeaturesWriteParams, _ctx: &StageContext) -> pipeline::StagePaths {
        pipeline::StagePaths {
            reads: vec![],
            writes: vec![p.dir.clone()],
            ..Default::default()
        }
    }
    fn create(p: &FeaturesWriteParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        use pipeline::storage;
        storage::create_dir_all(&p.dir)
            .map_err(|e| StageError::io(format!("cannot create {}", p.dir.display()), e))?;
        // Start over: drop the index first, so a crash in between never leaves a complete-looking
        // mix of old and new parts.
        let index = p.dir.join(FEATURES_INDEX);
        storage::remove(&index)
            .map_err(|e| StageError::io(format!("cannot remove {}", index.display()), e))?;
        let (files, _) = storage::list(&p.dir)
            .map_err(|e| StageError::io(format!("cannot list {}", p.dir.display()), e))?;
        for name in files {
            if (name.starts_with("features-") && name.ends_with(".parquet"))
                || name.ends_with(".tmp")
            {
                let f = p.dir.join(&name);
                storage::remove(&f)
                    .map_err(|e| StageError::io(format!("cannot remove {}", f.display()), e))?;
            }
        }
        Ok(FeaturesWrite {
            p: p.clone(),
            index: FeatureIndex {
                format: "ehmam-features/1".into(),
                complete: false,
                parts: Vec::new(),
            },
            rows: Vec::new(),
            bytes: 0.0,
        })
    }
}

impl FeaturesWrite {
    fn flush(&mut self) -> Result<(), StageError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let name = format!("features-{:05}.parquet", self.index.parts.len());
        let level =
            ZstdLevel::try_new(self.p.zstd_level).map_err(|e| StageError::failed(e.to_string()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(256))
            .build();
        let batch = feature_batch(&self.rows).map_err(StageError::from)?;
        let crate::stream::store::Written { bytes, blake3 } =
            crate::stream::store::write_part(&self.p.dir, &name, |file| {
                let mut w = ArrowWriter::try_new(file, feature_schema(), Some(props))
                    .map_err(std::io::Error::other)?;
                w.write(&batch).map_err(std::io::Error::other)?;
                w.close().map_err(std::io::Error::other)?;
                Ok(())
            })?;
        self.index.parts.push(FeaturePart {
            file: name,
            rows: self.rows.len() as u64,
            bytes,
            blake3,
        });
        self.index.save(&self.p.dir)?;
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
        self.index.save(&self.p.dir)?;
        Ok(())
    }
}

/// Reads every row of one feature part.
pub fn read_features(path: &Path, epoch: Option<u32>) -> crate::Result<Vec<Features>> {
    let file = pipeline::storage::read(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    decode_features(file, path, epoch)
}

/// The rows of a feature part's bytes (`path` for messages).
pub fn decode_features(
    file: bytes::Bytes,
    path: &Path,
    epoch: Option<u32>,
) -> crate::Result<Vec<Features>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(256).build())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
        let err = |c: &str| {
            crate::Error::damaged(
                path,
                format!("column `{c}` is missing or of the wrong type"),
            )
        };
        let col = |c: &str| b.column_by_name(c).cloned().ok_or_else(|| err(c));
        let s = |c: &str| -> crate::Result<StringArray> {
            col(c)?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| err(c))
        };
        let (ids, spk, src, trn) = (s("utt_id")?, s("speaker")?, s("source")?, s("transcript")?);
        let ep = col("epoch")?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .cloned()
            .ok_or_else(|| err("epoch"))?;
        let rate = col("frame_rate")?
            .as_any()
            .downcast_ref::<Float64Array>()
            .cloned()
            .ok_or_else(|| err("frame_rate"))?;
        let nf = col("num_frames")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .cloned()
            .ok_or_else(|| err("num_frames"))?;
        let dim = col("dim")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .cloned()
            .ok_or_else(|| err("dim"))?;
        let feats = col("features")?
            .as_any()
            .downcast_ref::<ListArray>()
            .cloned()
            .ok_or_else(|| err("features"))?;
        for i in 0..b.num_rows() {
            let v = feats.value(i);
            let data = v
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| err("features"))?
                .values()
                .to_vec();
            let (n, d) = (nf.value(i).max(0) as usize, dim.value(i).max(0) as usize);
            if d == 0 || n * d != data.len() {
                return Err(crate::Error::from(format!(
                    "{}: row {i} ({}) has {} values for {n} × {d}",
                    path.display(),
                    ids.value(i),
                    data.len()
                )));
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

/// A feature store as [`ReadStage`] reads it.
pub struct FeatureStore;

/// The `features.read` stage.
pub type FeaturesRead = ReadStage<FeatureStore>;

impl PartSource for FeatureStore {
    type Item = Features;
    const KIND: &'static str = "features.read";
    const DOC: &'static str = "Streams stored features back for `epochs` passes, shuffled by seed if asked; one part in memory.";
    const OUT_DOC: &'static str = "features, epoch by epoch";
    const UNIT: &'static str = "parts";
    fn parts(dir: &Path) -> crate::Result<Vec<crate::stream::Part>> {
        match FeatureIndex::load(dir)? {
            Some(i) if !i.complete => Err(crate::Error::invalid(format!(
                "{}: the run that writes it has not finished",
                dir.display()
            ))),
            Some(i) => Ok(i
                .parts
                .iter()
                .map(|x| crate::stream::Part {
                    path: dir.join(&x.file),
                    rows: x.rows,
                    bytes: x.bytes,
                    blake3: Some(x.blake3.clone()),
                })
                .collect()),
            None => Err(crate::Error::invalid(format!(
                "no feature index at {}",
                dir.join(FEATURES_INDEX).display()
            ))),
        }
    }
    fn decode(bytes: bytes::Bytes, path: &Path, epoch: u32) -> crate::Result<Vec<Features>> {
        decode_features(bytes, path, Some(epoch))
    }
    fn speaker(item: &Features) -> Option<&str> {
        item.speaker.as_deref()
    }
}
