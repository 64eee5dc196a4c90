//! `shards.write` and `shards.read`: utterances as zstd Parquet shards with an index.
//!
//! A shard directory holds `shard-NNNNN.parquet` files and `index.json`, which lists every
//! finished shard with its rows, bytes, BLAKE3 hash, the range of inputs it consumed and the
//! rejects among them. Shards are written to a temporary name and renamed when complete, and the
//! index is replaced atomically after each shard, so a reader never sees half a shard and a rerun
//! resumes after the last finished one.

use crate::data::audio::to_i16;
use crate::data::decode::PARTITION;
use crate::items::{Decoded, Reject, Utterance};
use crate::stream::{PartSource, ReadStage};
use arrow::array::{
    Array, ArrayRef, Float32Array, Float32Builder, Float64Array, Int16Array, Int16Builder,
    Int32Array, Int64Array, ListArray, ListBuilder, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use pipeline::{ParamError, Params, Port, Stage, StageContext, StageDef, StageError, StageIo};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const INDEX_FILE: &str = "index.json";
pub const INDEX_FORMAT: &str = "ehmam-shards/1";

/// How audio samples are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// 16-bit PCM (value = round(x · 32768), clipped).
    #[default]
    Int16,
    /// 32-bit float in [-1, 1].
    Float32,
}

impl AudioFormat {
    pub fn name(self) -> &'static str {
        match self {
            AudioFormat::Int16 => "int16",
            AudioFormat::Float32 => "float32",
        }
    }
}

/// One finished shard in the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name in the shard directory; absent when every input of the range was rejected.
    pub file: Option<String>,
    pub rows: u64,
    pub bytes: u64,
    pub blake3: Option<String>,
    pub duration_s: f64,
    /// Inputs consumed by this shard: `first_input .. first_input + inputs`, rejects included. An
    /// input cut into segments counts once, in the shard that holds its last item.
    pub first_input: u64,
    pub inputs: u64,
    pub rejects: Vec<RejectEntry>,
    /// The input this shard ends inside (a long file cut into segments whose later segments did
    /// not fit in it): a resume after this shard decodes it again and drops the segments stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<OpenInput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectEntry {
    pub source: String,
    pub reason: String,
}

/// `index.json` of a shard directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub audio_format: AudioFormat,
    pub target_mb: f64,
    pub sample_rate: Option<u32>,
    /// True once the prep that wrote the directory finished.
    pub complete: bool,
    pub shards: Vec<ShardEntry>,
    /// A partition's store (`DIR/part-iiiii-of-NNNNN`): its place in the whole prep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionEntry>,
    /// A store merged from partitions by `ehmam shards merge`: their count and prep fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<MergedEntry>,
}

/// The partition a store holds (`audio.decode`'s `partition`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    pub index: usize,
    pub count: usize,
    /// Its inputs in the whole listing: `first_input .. first_input + inputs` of `total_inputs`.
    pub first_input: u64,
    pub inputs: u64,
    pub total_inputs: u64,
    /// The prep's fingerprint (decode and shard parameters, the whole listing): equal in every
    /// partition of one prep.
    pub prep: String,
}

/// What a merged store was made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedEntry {
    pub partitions: usize,
    pub prep: String,
}

/// An input whose items (a long file's segments) are coming in, until its last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenInput {
    /// Its `source`.
    pub source: String,
    /// Items of it received so far (its first segments), stored or dropped.
    pub items: u64,
    /// It was rejected already (an id clash): the rest of it is dropped.
    pub rejected: bool,
}

impl ShardIndex {
    pub fn load(dir: &Path) -> crate::Result<Option<ShardIndex>> {
        let Some(index) = crate::stream::store::load_index::<ShardIndex>(dir, "shard index")?
        else {
            return Ok(None);
        };
        // A row takes at least a byte: a larger count is a damaged index (and must not size
        // allocations).
        if let Some((i, s)) = index
            .shards
            .iter()
            .enumerate()
            .find(|(_, s)| s.rows > s.bytes.max(1) || (s.file.is_none() && s.rows > 0))
        {
            let what = format!(
                "shard {i} claims {} rows in {} bytes: the index is damaged",
                s.rows, s.bytes
            );
            return Err(crate::Error::damaged(dir.join(INDEX_FILE), what));
        }
        Ok(Some(index))
    }
    fn save(&self, dir: &Path) -> crate::Result<()> {
        crate::stream::store::save_index(dir, self)
    }
    pub fn inputs_done(&self) -> u64 {
        self.shards.iter().map(|s| s.inputs).sum()
    }
}

/// The Arrow schema of a shard.
pub fn shard_schema(format: AudioFormat) -> SchemaRef {
    let item = match format {
        AudioFormat::Int16 => DataType::Int16,
        AudioFormat::Float32 => DataType::Float32,
    };
    let meta: HashMap<String, String> =
        [("ehmam.audio_format".to_string(), format.name().to_string())].into();
    Arc::new(
        Schema::new(vec![
            Field::new("utt_id", DataType::Utf8, false),
            Field::new("speaker", DataType::Utf8, true),
            Field::new("chapter", DataType::Utf8, true),
            Field::new("source", DataType::Utf8, false),
            Field::new("sample_rate", DataType::Int32, false),
            Field::new("num_samples", DataType::Int64, false),
            Field::new("duration_s", DataType::Float64, false),
            Field::new("transcript", DataType::Utf8, true),
            Field::new(
                "audio",
                DataType::List(Arc::new(Field::new("item", item, false))),
                false,
            ),
        ])
        .with_metadata(meta),
    )
}

fn shard_batch(rows: &[Utterance], format: AudioFormat) -> crate::Result<RecordBatch> {
    let schema = shard_schema(format);
    let audio: ArrayRef =
        match format {
            AudioFormat::Int16 => {
                let mut b = ListBuilder::new(Int16Builder::new()).with_field(Arc::new(Field::new(
                    "item",
                    DataType::Int16,
                    false,
                )));
                for u in rows {
                    let v: Vec<i16> = u.samples.iter().map(|&x| to_i16(x)).collect();
                    b.values().append_slice(&v);
                    b.append(true);
                }
                Arc::new(b.finish())
            }
            AudioFormat::Float32 => {
                let mut b = ListBuilder::new(Float32Builder::new())
                    .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
                for u in rows {
                    b.values().append_slice(&u.samples);
                    b.append(true);
                }
                Arc::new(b.finish())
            }
        };
    let mut cols = meta_columns(rows);
    cols.push(audio);
    RecordBatch::try_new(schema, cols)
        .map_err(|e| e.to_string())
        .map_err(crate::Error::from)
}

/// A shard's columns but the samples, in [`shard_schema`]'s order.
fn meta_columns(rows: &[Utterance]) -> Vec<ArrayRef> {
    vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|u| u.utt_id.as_str()),
        )),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|u| u.speaker.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|u| u.chapter.as_deref())
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|u| u.source.as_str()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|u| u.sample_rate as i32),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|u| u.samples.len() as i64),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|u| u.duration_s()),
        )),
        Arc::new(StringArray::from(
            rows.iter()
                .map(|u| u.transcript.as_deref())
                .collect::<Vec<_>>(),
        )),
    ]
}

/// A shard's columns but the samples, from its rows (what [`read_metadata`] reads back).
fn meta_batch(rows: &[Utterance]) -> crate::Result<RecordBatch> {
    let full = shard_schema(AudioFormat::Int16);
    let fields: Vec<Field> = full
        .fields()
        .iter()
        .filter(|f| f.name() != "audio")
        .map(|f| f.as_ref().clone())
        .collect();
    let cols = meta_columns(rows);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| e.to_string())
        .map_err(crate::Error::from)
}

/// Most bytes of samples (as stored) in one Parquet row group.
pub const ROW_GROUP_MAX_BYTES: usize = 16_000_000;

/// Writes one shard file atomically; returns (bytes, blake3 hex).
fn write_shard(
    dir: &Path,
    name: &str,
    rows: &[Utterance],
    format: AudioFormat,
    zstd_level: i32,
    row_group_rows: usize,
) -> crate::Result<(u64, String)> {
    let level = ZstdLevel::try_new(zstd_level).map_err(|e| e.to_string())?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("ehmam.audio_format".to_string(), format.name().to_string()),
            KeyValue::new(
                "ehmam.audio_scale".to_string(),
                match format {
                    AudioFormat::Int16 => "32768".to_string(),
                    AudioFormat::Float32 => "1".to_string(),
                },
            ),
        ]))
        .build();
    let written = crate::stream::store::write_part(dir, name, |file| {
        let mut w = ArrowWriter::try_new(file, shard_schema(format), Some(props))
            .map_err(std::io::Error::other)?;
        let sample_bytes = match format {
            AudioFormat::Int16 => 2,
            AudioFormat::Float32 => 4,
        };
        let mut start = 0;
        while start < rows.len() {
            // A row group ends at `row_group_rows` rows or at ROW_GROUP_MAX_BYTES of samples,
            // whichever comes first: the writer holds a row group in memory, and 64 rows of
            // 40 s segments would be 80 MB.
            let mut end = start;
            let mut bytes = 0usize;
            while end < rows.len() && end - start < row_group_rows.max(1) {
                bytes += rows[end].samples.len() * sample_bytes;
                end += 1;
                if bytes >= ROW_GROUP_MAX_BYTES {
                    break;
                }
            }
            let batch = shard_batch(&rows[start..end], format).map_err(std::io::Error::other)?;
            w.write(&batch).map_err(std::io::Error::other)?;
            w.flush().map_err(std::io::Error::other)?;
            start = end;
        }
        w.close().map_err(std::io::Error::other)?;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok((written.bytes, written.blake3))
}

/// Parameters of `shards.write`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ShardsWriteParams {
    /// Directory of the shards and their `index.json`.
    pub dir: PathBuf,
    /// Target size of a shard in MB of audio samples as stored (before compression).
    pub target_mb: f64,
    /// Stored sample format: int16 (default) or float32.
    pub audio_format: AudioFormat,
    /// zstd compression level (1–22).
    pub zstd_level: i32,
    /// Rows per Parquet row group (a row group also ends at 16 MB of samples as stored, which
    /// bounds the writer's memory when rows are long).
    pub row_group_rows: usize,
}

impl Default for ShardsWriteParams {
    fn default() -> Self {
        ShardsWriteParams {
            dir: PathBuf::new(),
            target_mb: 64.0,
            audio_format: AudioFormat::Int16,
            zstd_level: 3,
            row_group_rows: 64,
        }
    }
}

impl Params for ShardsWriteParams {
    fn check(&self) -> Vec<ParamError> {
        let mut e = Vec::new();
        if self.dir.as_os_str().is_empty() {
            e.push(ParamError::new("dir", "required: the shard directory"));
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
        if self.row_group_rows == 0 {
            e.push(ParamError::new("row_group_rows", "must be at least 1"));
        }
        e
    }
}

/// Loads the index of `dir` and checks that it can be continued with `p`.
fn resumable_index(
    p: &ShardsWriteParams,
    part: Option<&PartitionEntry>,
) -> crate::Result<Option<ShardIndex>> {
    let Some(index) = ShardIndex::load(&p.dir)? else {
        return Ok(None);
    };
    let index_path = p.dir.join(INDEX_FILE);
    if index.merged.is_some() {
        return Err(crate::Error::invalid(format!(
            "{} is a store merged from partitions (`ehmam shards merge`): a prep writes into its partitions (partition: in audio.decode), not into the merged store",
            p.dir.display()
        )));
    }
    if index.partition.as_ref() != part {
        let what = |e: Option<&PartitionEntry>| match e {
            None => "the whole input (no partition)".to_string(),
            Some(e) => format!(
                "partition {} of {} (inputs {}..{} of {}, prep {})",
                e.index,
                e.count,
                e.first_input,
                e.first_input + e.inputs,
                e.total_inputs,
                &e.prep[..12.min(e.prep.len())]
            ),
        };
        return Err(crate::Error::invalid(format!(
            "{} holds shards of {}, but this prep writes {}: the spec or the input listing changed since; use another `dir` or delete it",
            p.dir.display(),
            what(index.partition.as_ref()),
            what(part)
        )));
    }
    if index.format != INDEX_FORMAT {
        return Err(crate::Error::damaged(
            &index_path,
            format!("index format `{}` is not `{INDEX_FORMAT}`", index.format),
        ));
    }
    if index.audio_format != p.audio_format || index.target_mb != p.target_mb {
        return Err(crate::Error::invalid(format!(
            "{} holds shards written with audio_format={}, target_mb={}; this spec asks for audio_format={}, target_mb={}: use another `dir` or delete it",
            p.dir.display(),
            index.audio_format.name(),
            index.target_mb,
            p.audio_format.name(),
            p.target_mb
        )));
    }
    for s in &index.shards {
        if let (Some(f), Some(h)) = (&s.file, &s.blake3) {
            let part = p.dir.join(f);
            if pipeline::storage::is_remote(&part) {
                // On an object store: the size (a HEAD), not every byte downloaded again; the
                // readers check the BLAKE3 of every part they read.
                let there = pipeline::storage::size(&part)
                    .map_err(crate::Error::io("cannot read", &part))?;
                if there != Some(s.bytes) {
                    return Err(crate::Error::damaged(&part, format!("{} where its index entry says {} bytes (changed since it was written); delete the prefix to start over", there.map_or("no object".to_string(), |b| format!("{b} bytes")), s.bytes)));
                }
                continue;
            }
            let written = crate::stream::store::hash_file(&part).map_err(|e| {
                crate::Error::invalid(format!(
                    "{e} (listed in {}; delete the directory to start over)",
                    index_path.display()
                ))
            })?;
            if written.bytes != s.bytes || &written.blake3 != h {
                return Err(crate::Error::damaged(&part, "does not match its index entry (changed since it was written); delete the directory to start over"));
            }
        }
    }
    Ok(Some(index))
}

/// The `shards.write` stage.
pub struct ShardsWrite {
    p: ShardsWriteParams,
    ctx: StageContext,
    index: ShardIndex,
    rows: Vec<Utterance>,
    rejects: Vec<RejectEntry>,
    pending_inputs: u64,
    pending_bytes: f64,
    ids: HashMap<String, String>,
    /// Every stored row's columns but the samples, by shard file: the run's `utterances` table
    /// (kept, not read back: on object storage that would download every shard again).
    meta: HashMap<String, Vec<RecordBatch>>,
    /// The input whose items are coming in, if its last one has not come yet.
    open: Option<OpenInput>,
    /// Leading items of `open` stored before a resume, to drop when they come again.
    resume_drop: u64,
}

impl StageDef for ShardsWrite {
    type Params = ShardsWriteParams;
    const KIND: &'static str = "shards.write";
    const DOC: &'static str = "Stores decoded utterances as zstd Parquet shards with an index (atomic, resumable); writes the\n`utterances` and `rejects` tables into the run directory.";

    fn inputs() -> Vec<Port> {
        vec![Port::cloneable::<Decoded>(
            "in",
            "decoded files, in input order",
        )]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(
        _p: &ShardsWriteParams,
        _ctx: &StageContext,
        linker: &mut pipeline::Linker,
    ) -> Vec<ParamError> {
        linker.read(&PARTITION);
        Vec::new()
    }
    fn paths(p: &ShardsWriteParams, ctx: &StageContext) -> pipeline::StagePaths {
        pipeline::StagePaths {
            reads: vec![],
            writes: vec![partition_dir(p, ctx)],
            ..Default::default()
        }
    }
    fn resume_skip(p: &ShardsWriteParams, ctx: &StageContext) -> Result<u64, StageError> {
        let (p, part) = partitioned(p, ctx)?;
        Ok(resumable_index(&p, part.as_ref())?
            .map(|i| i.inputs_done())
            .unwrap_or(0))
    }
    fn create(
        p: &ShardsWriteParams,
        ctx: &StageContext,
        _worker: usize,
    ) -> Result<Self, StageError> {
        let (p, part) = partitioned(p, ctx)?;
        let p = &p;
        pipeline::storage::create_dir_all(&p.dir)
            .map_err(|e| StageError::io(format!("cannot create {}", p.dir.display()), e))?;
        // Leftovers of an interrupted run are never listed in the index: remove them.
        if let Ok(rd) = std::fs::read_dir(&p.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let resumed = resumable_index(p, part.as_ref())?;
        if pipeline::storage::is_remote(&p.dir) {
            // Parts put before a crash but never listed in the index: removed (a part is
            // written again whole under the same name).
            let listed: std::collections::HashSet<&str> = resumed
                .iter()
                .flat_map(|i| i.shards.iter().filter_map(|s| s.file.as_deref()))
                .collect();
            let (files, _) = pipeline::storage::list(&p.dir)
                .map_err(|e| StageError::io(format!("cannot list {}", p.dir.display()), e))?;
            for f in files {
                if f.starts_with("shard-")
                    && f.ends_with(".parquet")
                    && !listed.contains(f.as_str())
                {
                    let path = p.dir.join(&f);
                    pipeline::storage::remove(&path).map_err(|e| {
                        StageError::io(format!("cannot remove {}", path.display()), e)
                    })?;
                }
            }
        }
        let index = resumed.unwrap_or(ShardIndex {
            format: INDEX_FORMAT.into(),
            audio_format: p.audio_format,
            target_mb: p.target_mb,
            sample_rate: None,
            complete: false,
            shards: Vec::new(),
            partition: part,
            merged: None,
        });
        // Ids already stored, to keep them unique across a resume.
        let mut ids = HashMap::new();
        let mut meta = HashMap::new();
        for s in &index.shards {
            if let Some(f) = &s.file {
                let (utts, batches) = read_metadata(&p.dir.join(f)).map_err(StageError::from)?;
                for (id, src) in utts {
                    ids.insert(id, src);
                }
                meta.insert(f.clone(), batches);
            }
        }
        let open = index.shards.last().and_then(|s| s.open.clone());
        let resume_drop = open.as_ref().map_or(0, |o| o.items);
        Ok(ShardsWrite {
            p: p.clone(),
            ctx: ctx.clone(),
            index,
            open,
            resume_drop,
            rows: Vec::new(),
            rejects: Vec::new(),
            pending_inputs: 0,
            pending_bytes: 0.0,
            ids,
            meta,
        })
    }
}

/// Where the stage writes: `dir`, or `dir/part-iiiii-of-NNNNN` for a partition.
fn partition_dir(p: &ShardsWriteParams, ctx: &StageContext) -> PathBuf {
    match ctx.links.get(&PARTITION) {
        Some(part) => p.dir.join(part.dir_name()),
        None => p.dir.clone(),
    }
}

/// The parameters with the partition's directory, and the partition's index entry (which
/// lists the input, once per run).
fn partitioned(
    p: &ShardsWriteParams,
    ctx: &StageContext,
) -> crate::Result<(ShardsWriteParams, Option<PartitionEntry>)> {
    let Some(part) = ctx.links.get(&PARTITION) else {
        return Ok((p.clone(), None));
    };
    let extra = serde_json::json!({
        "audio_format": p.audio_format.name(),
        "target_mb": p.target_mb,
        "zstd_level": p.zstd_level,
        "row_group_rows": p.row_group_rows,
    });
    let place = part.place(&extra)?;
    let mut q = p.clone();
    q.dir = p.dir.join(part.dir_name());
    Ok((
        q,
        Some(PartitionEntry {
            index: part.index,
            count: part.count,
            first_input: place.first_input,
            inputs: place.inputs,
            total_inputs: place.total_inputs,
            prep: place.prep,
        }),
    ))
}

/// Reads (utt_id, source) of a shard without its audio.
fn read_metadata(path: &Path) -> crate::Result<(Vec<(String, String)>, Vec<RecordBatch>)> {
    let file = pipeline::storage::read(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Every column but the samples.
    let cols: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() != "audio")
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), cols);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut batches = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
        let ids = string_col(&b, "utt_id")?;
        let src = string_col(&b, "source")?;
        for i in 0..b.num_rows() {
            out.push((ids.value(i).to_string(), src.value(i).to_string()));
        }
        batches.push(b);
    }
    Ok((out, batches))
}

fn string_col<'a>(b: &'a RecordBatch, name: &str) -> crate::Result<&'a StringArray> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| crate::Error::invalid(format!("shard has no string column `{name}`")))
}

impl ShardsWrite {
    fn flush(&mut self) -> Result<(), StageError> {
        if self.rows.is_empty() && self.rejects.is_empty() {
            return Ok(());
        }
        let n = self.index.shards.len();
        let first_input = self.index.inputs_done();
        let (file, bytes, hash) = if self.rows.is_empty() {
            (None, 0, None)
        } else {
            let name = format!("shard-{n:05}.parquet");
            let (bytes, hash) = write_shard(
                &self.p.dir,
                &name,
                &self.rows,
                self.p.audio_format,
                self.p.zstd_level,
                self.p.row_group_rows,
            )
            .map_err(StageError::from)?;
            self.meta.insert(
                name.clone(),
                vec![meta_batch(&self.rows).map_err(StageError::from)?],
            );
            (Some(name), bytes, Some(hash))
        };
        self.index.shards.push(ShardEntry {
            file,
            rows: self.rows.len() as u64,
            bytes,
            blake3: hash,
            // Not `sum()`: the sum of nothing is -0.0.
            duration_s: self.rows.iter().fold(0.0, |a, u| a + u.duration_s()),
            first_input,
            inputs: self.pending_inputs,
            rejects: std::mem::take(&mut self.rejects),
            open: self.open.clone(),
        });
        self.index.save(&self.p.dir)?;
        self.rows.clear();
        self.pending_inputs = 0;
        self.pending_bytes = 0.0;
        Ok(())
    }

    /// Writes the `utterances` and `rejects` tables of the whole directory into the run directory.
    fn write_tables(&self) -> Result<(), StageError> {
        let run = self.ctx.run.as_str();
        let mut batches = Vec::new();
        for s in &self.index.shards {
            if let Some(f) = &s.file {
                let kept = self.meta.get(f);
                let read;
                let bs = match kept {
                    Some(b) => b,
                    None => {
                        read = read_metadata(&self.p.dir.join(f))
                            .map_err(StageError::from)?
                            .1;
                        &read
                    }
                };
                for b in bs {
                    let n = b.num_rows();
                    let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec![run; n]))];
                    // By name: a column that shards of an older version lack (chapter) is null.
                    for field in shard_schema(self.p.audio_format)
                        .fields()
                        .iter()
                        .filter(|f| f.name() != "audio")
                    {
                        cols.push(
                            b.column_by_name(field.name()).cloned().unwrap_or_else(|| {
                                arrow::array::new_null_array(field.data_type(), n)
                            }),
                        );
                    }
                    cols.push(Arc::new(StringArray::from(vec![f.as_str(); n])));
                    batches.push(cols);
                }
            }
        }
        let meta = shard_schema(self.p.audio_format);
        let mut fields: Vec<Field> = vec![Field::new("run", DataType::Utf8, false)];
        fields.extend(
            meta.fields()
                .iter()
                .filter(|f| f.name() != "audio")
                .map(|f| f.as_ref().clone()),
        );
        fields.push(Field::new("shard", DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let utts = if batches.is_empty() {
            RecordBatch::new_empty(schema.clone())
        } else {
            let parts: Result<Vec<RecordBatch>, _> = batches
                .into_iter()
                .map(|c| RecordBatch::try_new(schema.clone(), c))
                .collect();
            let parts = parts.map_err(|e| StageError::failed(e.to_string()))?;
            arrow::compute::concat_batches(&schema, &parts)
                .map_err(|e| StageError::failed(e.to_string()))?
        };
        let run_dir = &self.ctx.run_dir;
        std::fs::create_dir_all(run_dir)
            .map_err(|e| StageError::io(format!("cannot create {}", run_dir.display()), e))?;
        let p = run_dir.join("utterances.parquet");
        pipeline::telemetry::write_parquet_atomic(&p, &utts)
            .map_err(|e| StageError::io(format!("cannot write {}", p.display()), e))?;

        let rejects: Vec<(&RejectEntry, Option<&str>)> = self
            .index
            .shards
            .iter()
            .flat_map(|s| s.rejects.iter().map(move |r| (r, s.file.as_deref())))
            .collect();
        let rschema = Arc::new(Schema::new(vec![
            Field::new("run", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("reason", DataType::Utf8, false),
        ]));
        let rb = RecordBatch::try_new(
            rschema,
            vec![
                Arc::new(StringArray::from(vec![run; rejects.len()])),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|(r, _)| r.source.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rejects.iter().map(|(r, _)| r.reason.as_str()),
                )),
            ],
        )
        .map_err(|e| StageError::failed(e.to_string()))?;
        let p = run_dir.join("rejects.parquet");
        pipeline::telemetry::write_parquet_atomic(&p, &rb)
            .map_err(|e| StageError::io(format!("cannot write {}", p.display()), e))?;
        Ok(())
    }
}

impl Stage for ShardsWrite {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let target = self.p.target_mb * 1e6;
        let bytes_per_sample = match self.p.audio_format {
            AudioFormat::Int16 => 2.0,
            AudioFormat::Float32 => 4.0,
        };
        self.index.complete = false;
        while let Some(item) = io.recv::<Decoded>(0)? {
            let (row, last) = match item {
                Decoded::Part(u) => (Ok(u), false),
                Decoded::Utterance(u) => (Ok(u), true),
                Decoded::Rejected(r) => (Err(r), true),
            };
            let source = match &row {
                Ok(u) => u.source.clone(),
                Err(r) => r.source.clone(),
            };
            if self.resume_drop > 0 {
                // A resume: the segments of this input already in the shards come again.
                let open = self.open.as_ref().map(|o| o.source.as_str()).unwrap_or("");
                if source != open || last {
                    return Err(StageError::failed(format!(
                        "the shards in {} end inside {open} after {} of its segments, but the rerun gives {}: the input changed since the earlier run — write to a new shard directory",
                        self.p.dir.display(),
                        self.open.as_ref().map_or(0, |o| o.items),
                        if source != open { format!("{source} first") } else { format!("only {} before its end", self.open.as_ref().map_or(0, |o| o.items) - self.resume_drop) }
                    )));
                }
                self.resume_drop -= 1;
                continue;
            }
            let open = self.open.get_or_insert_with(|| OpenInput {
                source: source.clone(),
                items: 0,
                rejected: false,
            });
            if !last {
                open.items += 1;
            }
            let already_rejected = open.rejected;
            match row {
                Err(Reject { source, reason }) => {
                    if !already_rejected {
                        io.count("rejected", 1);
                        io.note(format!("rejected {source}: {reason}"));
                        self.rejects.push(RejectEntry { source, reason });
                    }
                }
                // The rest of an input rejected already.
                Ok(_) if already_rejected => {}
                Ok(u) => {
                    if let Some(other) = self.ids.get(&u.utt_id) {
                        let reason = format!("duplicate utt_id `{}` (also {other})", u.utt_id);
                        io.count("rejected", 1);
                        io.note(format!("rejected {}: {reason}", u.source));
                        self.rejects.push(RejectEntry {
                            source: u.source,
                            reason,
                        });
                        if let Some(o) = self.open.as_mut() {
                            o.rejected = true;
                        }
                    } else {
                        match self.index.sample_rate {
                            None => self.index.sample_rate = Some(u.sample_rate),
                            Some(r) if r != u.sample_rate => {
                                return Err(StageError::failed(format!(
                                    "{}: sample rate {} differs from the shards' {r} Hz",
                                    u.source, u.sample_rate
                                )));
                            }
                            _ => {}
                        }
                        self.ids.insert(u.utt_id.clone(), u.source.clone());
                        self.pending_bytes += u.samples.len() as f64 * bytes_per_sample;
                        self.rows.push(u);
                    }
                }
            }
            if last {
                self.pending_inputs += 1;
                self.open = None;
            }
            if self.pending_bytes >= target {
                self.flush()?;
            }
        }
        self.flush()?;
        self.index.complete = true;
        self.index.save(&self.p.dir)?;
        self.write_tables()?;
        io.note(summary(&self.index, &self.p.dir));
        Ok(())
    }
}

/// The closing line of `shards.write`: shards, rows, hours, rejects.
fn summary(index: &ShardIndex, dir: &Path) -> String {
    let rows: u64 = index.shards.iter().map(|s| s.rows).sum();
    let rejected: usize = index.shards.iter().map(|s| s.rejects.len()).sum();
    // Not `sum()`: the sum of nothing is -0.0, printed `-0.000 h`.
    let hours: f64 = index.shards.iter().fold(0.0, |a, s| a + s.duration_s) / 3600.0;
    format!(
        "{} shards, {rows} utterances ({hours:.3} h), {rejected} rejected, in {}",
        index.shards.iter().filter(|s| s.file.is_some()).count(),
        dir.display()
    )
}

/// The transcripts of a finished shard store (`speaker`, `transcript` of every row; only those
/// two columns are read), for a vocabulary built from a corpus.
pub fn store_transcripts(dir: &Path) -> crate::Result<Vec<(Option<String>, Option<String>)>> {
    use parquet::arrow::ProjectionMask;
    let mut out = Vec::new();
    for part in <Shards as PartSource>::parts(dir)? {
        let path = &part.path;
        let file = part.fetch()?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let schema = builder.parquet_schema();
        let cols: Vec<usize> = (0..schema.num_columns())
            .filter(|&c| {
                let n = schema.column(c).path().string();
                n == "speaker" || n == "transcript"
            })
            .collect();
        let mask = ProjectionMask::leaves(schema, cols);
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for b in reader {
            let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
            let spk = string_col(&b, "speaker")
                .map_err(|_| format!("{}: column `speaker` is missing", path.display()))?;
            let trn = string_col(&b, "transcript")
                .map_err(|_| format!("{}: column `transcript` is missing", path.display()))?;
            for i in 0..b.num_rows() {
                out.push((
                    (!spk.is_null(i)).then(|| spk.value(i).to_string()),
                    (!trn.is_null(i)).then(|| trn.value(i).to_string()),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads every utterance of one shard file.
pub fn read_shard(path: &Path, epoch: u32) -> crate::Result<Vec<Utterance>> {
    let file = pipeline::storage::read(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    decode_shard(file, path, epoch)
}

/// The utterances of a shard file's bytes (`path` for messages).
pub fn decode_shard(file: bytes::Bytes, path: &Path, epoch: u32) -> crate::Result<Vec<Utterance>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(64).build())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| format!("{}: {e}", path.display()))?;
        let err = |c: &str| {
            format!(
                "{}: column `{c}` is missing or of the wrong type",
                path.display()
            )
        };
        let ids = string_col(&b, "utt_id").map_err(|_| err("utt_id"))?;
        let spk = string_col(&b, "speaker").map_err(|_| err("speaker"))?;
        let chapter = string_col(&b, "chapter").ok();
        let src = string_col(&b, "source").map_err(|_| err("source"))?;
        let trn = string_col(&b, "transcript").map_err(|_| err("transcript"))?;
        let sr = b
            .column_by_name("sample_rate")
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .ok_or_else(|| err("sample_rate"))?;
        let audio = b
            .column_by_name("audio")
            .and_then(|c| c.as_any().downcast_ref::<ListArray>())
            .ok_or_else(|| err("audio"))?;
        for i in 0..b.num_rows() {
            let a = audio.value(i);
            let samples: Vec<f32> = if let Some(x) = a.as_any().downcast_ref::<Int16Array>() {
                x.values().iter().map(|&v| v as f32 / 32768.0).collect()
            } else if let Some(x) = a.as_any().downcast_ref::<Float32Array>() {
                x.values().to_vec()
            } else {
                return Err(crate::Error::from(err("audio")));
            };
            out.push(Utterance {
                utt_id: ids.value(i).to_string(),
                speaker: (!spk.is_null(i)).then(|| spk.value(i).to_string()),
                chapter: chapter
                    .filter(|c| !c.is_null(i))
                    .map(|c| c.value(i).to_string()),
                source: src.value(i).to_string(),
                transcript: (!trn.is_null(i)).then(|| trn.value(i).to_string()),
                sample_rate: sr.value(i).max(0) as u32,
                samples,
                epoch,
            });
        }
    }
    Ok(out)
}

/// A shard directory as [`ReadStage`] reads it.
pub struct Shards;

/// The `shards.read` stage.
pub type ShardsRead = ReadStage<Shards>;

impl PartSource for Shards {
    type Item = Utterance;
    const KIND: &'static str = "shards.read";
    const DOC: &'static str =
        "Streams utterances back from a shard directory for `epochs` passes, shuffled by seed if asked;\nmemory is bounded by one shard; `start_epoch`/`start_index` resume inside the stream.";
    const OUT_DOC: &'static str = "utterances, epoch by epoch";
    const UNIT: &'static str = "shards";
    fn parts(dir: &Path) -> crate::Result<Vec<crate::stream::Part>> {
        match ShardIndex::load(dir)? {
            Some(i) if !i.complete => Err(crate::Error::invalid(format!(
                "{}: the prep that writes it has not finished; rerun it to complete the shards",
                dir.display()
            ))),
            Some(i) => Ok(i
                .shards
                .iter()
                .filter_map(|s| {
                    s.file.as_ref().map(|f| crate::stream::Part {
                        path: pipeline::storage::join(dir, f),
                        rows: s.rows,
                        bytes: s.bytes,
                        blake3: s.blake3.clone(),
                    })
                })
                .collect()),
            None if !partition_dirs(dir).is_empty() => Err(crate::Error::invalid(format!(
                "{} holds the partitions of a prep but no merged index: run `ehmam shards merge {}` once every partition has finished",
                dir.display(),
                dir.display()
            ))),
            None => Err(crate::Error::invalid(format!(
                "no shard index at {}: run the prep spec first",
                dir.join(INDEX_FILE).display()
            ))),
        }
    }
    fn decode(bytes: bytes::Bytes, path: &Path, epoch: u32) -> crate::Result<Vec<Utterance>> {
        decode_shard(bytes, path, epoch)
    }
    fn speaker(item: &Utterance) -> Option<&str> {
        item.speaker.as_deref()
    }
}

/// The `part-iiiii-of-NNNNN` directories of a store: (name, index, count), sorted by name.
fn partition_dirs(dir: &Path) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = pipeline::storage::list(dir)
        .map(|(_, dirs)| {
            dirs.into_iter()
                .filter_map(|name| {
                    let rest = name.strip_prefix("part-")?;
                    let (i, n) = rest.split_once("-of-")?;
                    let digits = |t: &str| t.len() == 5 && t.bytes().all(|b| b.is_ascii_digit());
                    if !digits(i) || !digits(n) {
                        return None;
                    }
                    Some((name.clone(), i.parse().ok()?, n.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What `ehmam shards merge` did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub partitions: usize,
    pub shards: usize,
    pub rows: u64,
    pub inputs: u64,
    pub rejects: usize,
    pub duration_s: f64,
    /// The store was merged already, from the same partitions: nothing written.
    pub unchanged: bool,
}

/// `ehmam shards merge DIR`: one index over the partitions `DIR/part-iiiii-of-NNNNN` of a
/// prep, written last (atomically) as `DIR/index.json`, so that `shards.read` reads them as one
/// store in the order of the whole input. Refused, naming the partition, when one is missing,
/// unfinished, from a prep of another count, spec or input listing, or when the partitions do
/// not tile the input exactly once; the shard files are checked against their index entries
/// (size, and BLAKE3 with `verify`).
pub fn merge_partitions(dir: &Path, verify: bool) -> crate::Result<MergeSummary> {
    let parts = partition_dirs(dir);
    if parts.is_empty() {
        return Err(crate::Error::invalid(format!(
            "{} holds no partitions (part-iiiii-of-NNNNN directories written by a prep whose audio.decode has `partition`)",
            dir.display()
        )));
    }
    let counts: std::collections::BTreeSet<usize> = parts.iter().map(|p| p.2).collect();
    if counts.len() > 1 {
        let list: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
        return Err(crate::Error::invalid(format!(
            "{} holds partitions of preps split {} ways: one prep's partitions only (remove the others)",
            dir.display(),
            list.join(" and ")
        )));
    }
    let count = parts[0].2;
    let have: std::collections::BTreeSet<usize> = parts.iter().map(|p| p.1).collect();
    let missing: Vec<String> = (0..count)
        .filter(|i| !have.contains(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(10).map(String::as_str).collect();
        let more = if missing.len() > 10 {
            format!(" and {} more", missing.len() - 10)
        } else {
            String::new()
        };
        return Err(crate::Error::invalid(format!(
            "{}: partition{} {}{more} of {count} {} missing: run {} before merging",
            dir.display(),
            if missing.len() > 1 { "s" } else { "" },
            shown.join(", "),
            if missing.len() > 1 { "are" } else { "is" },
            if missing.len() > 1 { "them" } else { "it" },
        )));
    }
    if let Some(bad) = parts.iter().find(|p| p.1 >= count) {
        return Err(crate::Error::invalid(format!(
            "{}: {} is no partition of {count}",
            dir.display(),
            bad.0
        )));
    }
    let mut merged: Option<ShardIndex> = None;
    let mut prep = String::new();
    let mut next_input = 0u64;
    let mut total = 0u64;
    let mut ids: HashMap<String, String> = HashMap::new();
    for (name, i, _) in &parts {
        let pdir = pipeline::storage::join(dir, name);
        let Some(index) = ShardIndex::load(&pdir)? else {
            return Err(crate::Error::invalid(format!(
                "{}: partition {i} has no index (its prep has not written a shard yet): run it to the end before merging",
                pdir.display()
            )));
        };
        let Some(pe) = index.partition.clone() else {
            return Err(crate::Error::invalid(format!(
                "{}: its index is not a partition's (no `partition` entry)",
                pdir.display()
            )));
        };
        if pe.index != *i || pe.count != count {
            return Err(crate::Error::damaged(
                pdir.join(INDEX_FILE),
                format!(
                    "says partition {} of {}, but the directory is partition {i} of {count}",
                    pe.index, pe.count
                ),
            ));
        }
        if !index.complete {
            return Err(crate::Error::invalid(format!(
                "{}: partition {i} has not finished ({} of its {} inputs stored): rerun it (it resumes) before merging",
                pdir.display(),
                index.inputs_done(),
                pe.inputs
            )));
        }
        if index.inputs_done() != pe.inputs {
            return Err(crate::Error::damaged(
                pdir.join(INDEX_FILE),
                format!(
                    "its shards hold {} inputs, its partition {}",
                    index.inputs_done(),
                    pe.inputs
                ),
            ));
        }
        match &mut merged {
            None => {
                prep = pe.prep.clone();
                total = pe.total_inputs;
                merged = Some(ShardIndex {
                    format: INDEX_FORMAT.into(),
                    audio_format: index.audio_format,
                    target_mb: index.target_mb,
                    sample_rate: index.sample_rate,
                    complete: true,
                    shards: Vec::new(),
                    partition: None,
                    merged: None,
                });
            }
            Some(m) => {
                if pe.prep != prep || pe.total_inputs != total {
                    return Err(crate::Error::invalid(format!(
                        "{}: partition {i} was made by another prep than partition 0 (a different spec, parameters or input listing: {} inputs against {total}); rerun it with the others' spec",
                        pdir.display(),
                        pe.total_inputs
                    )));
                }
                match (m.sample_rate, index.sample_rate) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(crate::Error::invalid(format!(
                            "{}: partition {i} is at {b} Hz, the partitions before it at {a} Hz",
                            pdir.display()
                        )))
                    }
                    (None, b) => m.sample_rate = b,
                    _ => {}
                }
            }
        }
        if pe.first_input != next_input {
            return Err(crate::Error::invalid(format!(
                "{}: partition {i} starts at input {} but the partitions before it end at {next_input}: the partitions do not tile the input",
                pdir.display(),
                pe.first_input
            )));
        }
        next_input += pe.inputs;
        let m = merged.as_mut().expect("set above");
        for s in &index.shards {
            let mut e = s.clone();
            e.first_input += pe.first_input;
            if let Some(f) = &s.file {
                let path = pipeline::storage::join(&pdir, f);
                let bytes = pipeline::storage::size(&path)
                    .map_err(crate::Error::io("cannot read", &path))?
                    .unwrap_or(0);
                if bytes != s.bytes {
                    return Err(crate::Error::damaged(
                        &path,
                        format!(
                            "{bytes} bytes where its index says {} (changed since it was written): rerun partition {i} into an empty directory",
                            s.bytes
                        ),
                    ));
                }
                if verify {
                    let w = crate::stream::store::hash_file(&path)?;
                    if Some(&w.blake3) != s.blake3.as_ref() {
                        return Err(crate::Error::damaged(
                            &path,
                            "its BLAKE3 differs from its index entry: rerun the partition into an empty directory",
                        ));
                    }
                }
                let (utts, _) = read_metadata(&path)?;
                for (id, src) in utts {
                    if let Some(other) = ids.insert(id.clone(), src.clone()) {
                        return Err(crate::Error::invalid(format!(
                            "utt_id `{id}` is in two partitions ({other} and {src}): the partitions are not of one listing"
                        )));
                    }
                }
                e.file = Some(format!("{name}/{f}"));
            }
            m.shards.push(e);
        }
    }
    if next_input != total {
        return Err(crate::Error::invalid(format!(
            "{}: the partitions hold {next_input} of the {total} inputs listed",
            dir.display()
        )));
    }
    let mut m = merged.expect("at least one partition");
    m.merged = Some(MergedEntry {
        partitions: count,
        prep,
    });
    let summary = MergeSummary {
        partitions: count,
        shards: m.shards.iter().filter(|s| s.file.is_some()).count(),
        rows: m.shards.iter().map(|s| s.rows).sum(),
        inputs: total,
        rejects: m.shards.iter().map(|s| s.rejects.len()).sum(),
        duration_s: m.shards.iter().fold(0.0, |a, s| a + s.duration_s),
        unchanged: false,
    };
    match ShardIndex::load(dir) {
        Ok(Some(old)) if old == m => {
            return Ok(MergeSummary {
                unchanged: true,
                ..summary
            })
        }
        Ok(Some(old)) if old.merged.is_none() => {
            return Err(crate::Error::invalid(format!(
                "{} holds the index of an unpartitioned prep too: merge the partitions into a directory of their own",
                dir.join(INDEX_FILE).display()
            )))
        }
        // A merge of earlier partitions (rerun with another spec): replaced.
        _ => {}
    }
    m.save(dir)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_prep_says_zero_hours_not_minus_zero() {
        let empty = ShardIndex {
            format: INDEX_FORMAT.into(),
            audio_format: AudioFormat::Int16,
            target_mb: 64.0,
            sample_rate: None,
            complete: true,
            shards: Vec::new(),
            partition: None,
            merged: None,
        };
        let line = summary(&empty, Path::new("out"));
        assert_eq!(line, "0 shards, 0 utterances (0.000 h), 0 rejected, in out");
    }
}
