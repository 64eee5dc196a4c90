//! Engine tests with toy stages: validation errors, ordering with workers, error propagation,
//! cancellation, resume skipping and bounded memory under back-pressure.

use pipeline::schemars::JsonSchema;
use pipeline::{
    CancelToken, ParamError, Params, Port, Registry, RunError, RunOptions, Stage, StageContext,
    StageDef, StageError, StageIo,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static COLLECTED: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());
static LIVE: AtomicI64 = AtomicI64::new(0);
static MAX_LIVE: AtomicI64 = AtomicI64::new(0);

/// A large item that counts how many exist at once.
struct Big {
    n: u64,
    _payload: Vec<u8>,
}
impl Big {
    fn new(n: u64) -> Self {
        let live = LIVE.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_LIVE.fetch_max(live, Ordering::SeqCst);
        Big {
            n,
            _payload: vec![0u8; 1 << 16],
        }
    }
}
impl Drop for Big {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct NumsParams {
    /// How many numbers.
    n: u64,
    /// Sleep per item (ms).
    sleep_ms: u64,
    /// Keep going forever (for cancellation tests).
    forever: bool,
}
impl Default for NumsParams {
    fn default() -> Self {
        NumsParams {
            n: 10,
            sleep_ms: 0,
            forever: false,
        }
    }
}
impl Params for NumsParams {
    fn check(&self) -> Vec<ParamError> {
        if self.n > 1_000_000 {
            vec![ParamError::new(
                "n",
                format!("must be at most 1000000, got {}", self.n),
            )]
        } else {
            vec![]
        }
    }
}

/// Emits 0..n; a parallel source, each number a unit of work.
struct Nums(NumsParams);
impl StageDef for Nums {
    type Params = NumsParams;
    const KIND: &'static str = "test.nums";
    const DOC: &'static str = "numbers";
    const PARALLEL: bool = true;
    const HONORS_SKIP: bool = true;
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<u64>("out", "numbers")]
    }
    fn create(p: &NumsParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Nums(p.clone()))
    }
}
impl Stage for Nums {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let skip = io.skip_leading(0);
        let total = if self.0.forever {
            u64::MAX
        } else {
            self.0.n - skip.min(self.0.n)
        };
        while let Some(u) = io.claim(total)? {
            // Uneven work so that workers finish out of order.
            std::thread::sleep(Duration::from_micros(
                ((u * 7919) % 13) * 100 + self.0.sleep_ms * 1000,
            ));
            io.send(0, skip + u)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct MapParams {
    /// Fail on this value.
    fail_on: Option<u64>,
    /// Panic on this value.
    panic_on: Option<u64>,
    /// Emit each value this many times (0 drops it).
    repeat: Option<u64>,
}
impl Params for MapParams {}

/// x → x², stateless; optionally fails, panics, drops or repeats.
struct Square(MapParams);
impl StageDef for Square {
    type Params = MapParams;
    const KIND: &'static str = "test.square";
    const DOC: &'static str = "squares";
    const PARALLEL: bool = true;
    fn inputs() -> Vec<Port> {
        vec![Port::of::<u64>("in", "numbers")]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::cloneable::<u64>("out", "squares")]
    }
    fn create(p: &MapParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Square(p.clone()))
    }
}
impl Stage for Square {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(x) = io.recv::<u64>(0)? {
            if Some(x) == self.0.fail_on {
                return Err(StageError::failed(format!("bad value {x}")));
            }
            if Some(x) == self.0.panic_on {
                panic!("boom at {x}");
            }
            std::thread::sleep(Duration::from_micros(((x * 104729) % 17) * 50));
            for _ in 0..self.0.repeat.unwrap_or(1) {
                io.send(0, x * x)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct CollectParams {
    /// Key under which values are collected.
    key: String,
    /// Stop after this many items.
    take: Option<u64>,
    /// Items already held from an earlier run (resume).
    resume: u64,
    /// Sleep per item (ms).
    sleep_ms: u64,
}
impl Params for CollectParams {}

struct Collect(CollectParams);
impl StageDef for Collect {
    type Params = CollectParams;
    const KIND: &'static str = "test.collect";
    const DOC: &'static str = "collects";
    fn inputs() -> Vec<Port> {
        vec![Port::of::<u64>("in", "values")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(p: &CollectParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Collect(p.clone()))
    }
    fn resume_skip(p: &CollectParams, _: &StageContext) -> Result<u64, StageError> {
        Ok(p.resume)
    }
}
impl Stage for Collect {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let mut got = Vec::new();
        while let Some(x) = io.recv::<u64>(0)? {
            got.push(x);
            std::thread::sleep(Duration::from_millis(self.0.sleep_ms));
            if self.0.take.is_some_and(|t| got.len() as u64 >= t) {
                break;
            }
        }
        COLLECTED.lock().unwrap().insert(self.0.key.clone(), got);
        Ok(())
    }
}

/// Emits big items as fast as it can.
struct BigSource;
impl StageDef for BigSource {
    type Params = NumsParams;
    const KIND: &'static str = "test.big";
    const DOC: &'static str = "big items";
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::of::<Big>("out", "big")]
    }
    fn create(_: &NumsParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(BigSource)
    }
}
impl Stage for BigSource {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        for i in 0..200 {
            io.send(0, Big::new(i))?;
        }
        Ok(())
    }
}

/// Consumes big items slowly.
struct SlowSink;
impl StageDef for SlowSink {
    type Params = pipeline::NoParams;
    const KIND: &'static str = "test.slow";
    const DOC: &'static str = "slow sink";
    fn inputs() -> Vec<Port> {
        vec![Port::of::<Big>("in", "big")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(_: &pipeline::NoParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(SlowSink)
    }
}
impl Stage for SlowSink {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        let mut last = None;
        while let Some(b) = io.recv::<Big>(0)? {
            if let Some(l) = last {
                if b.n != l + 1 {
                    return Err(StageError::failed("out of order"));
                }
            }
            last = Some(b.n);
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// A stage whose input is text, for type-mismatch tests.
struct Text;
impl StageDef for Text {
    type Params = pipeline::NoParams;
    const KIND: &'static str = "test.text";
    const DOC: &'static str = "text sink";
    fn inputs() -> Vec<Port> {
        vec![Port::of::<String>("in", "text")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(_: &pipeline::NoParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Text)
    }
}
impl Stage for Text {
    fn run(&mut self, _io: &mut StageIo) -> Result<(), StageError> {
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct FileParams {
    /// A file that must exist (checked on the machine, by `validate`).
    path: String,
    /// At most 10.
    n: u64,
}
impl Params for FileParams {
    fn check(&self) -> Vec<ParamError> {
        if self.n > 10 {
            vec![ParamError::new(
                "n",
                format!("must be at most 10, got {}", self.n),
            )]
        } else {
            vec![]
        }
    }
}

/// A sink whose `validate` looks at the file system; its resume query fails for a `path`
/// ending in `fail-before-start`.
struct FileSource;
impl StageDef for FileSource {
    type Params = FileParams;
    const KIND: &'static str = "test.file";
    const DOC: &'static str = "checks a file";
    fn inputs() -> Vec<Port> {
        vec![Port::of::<u64>("in", "numbers")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn validate(p: &FileParams, _: &StageContext) -> Vec<ParamError> {
        if std::path::Path::new(&p.path).exists() {
            vec![]
        } else {
            vec![ParamError::new(
                "path",
                format!("{} does not exist", p.path),
            )]
        }
    }
    fn resume_skip(p: &FileParams, _: &StageContext) -> Result<u64, StageError> {
        if p.path.ends_with("fail-before-start") {
            Err(StageError::failed(
                "cannot read what an earlier attempt left",
            ))
        } else {
            Ok(0)
        }
    }
    fn create(_: &FileParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(FileSource)
    }
}
impl Stage for FileSource {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while io.recv::<u64>(0)?.is_some() {}
        Ok(())
    }
}

/// A link of the link tests: a number one stage offers and others take.
fn number_link(name: &str) -> pipeline::Link<u64> {
    pipeline::Link::named(format!("test.{name}"))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct LinkParams {
    /// Link name.
    link: String,
    /// Value offered.
    value: u64,
}
impl Params for LinkParams {}

/// Provides `link` with `value` in the link step; sends nothing.
struct Offer;
impl StageDef for Offer {
    type Params = LinkParams;
    const KIND: &'static str = "test.offer";
    const DOC: &'static str = "offers a number";
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(p: &LinkParams, _: &StageContext, l: &mut pipeline::Linker) -> Vec<ParamError> {
        match l.provide(&number_link(&p.link), p.value) {
            Ok(()) => vec![],
            Err(other) => vec![ParamError::new(
                "link",
                format!("also offered by `{}`", other.by),
            )],
        }
    }
    fn create(_: &LinkParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Offer)
    }
}
impl Stage for Offer {
    fn run(&mut self, _: &mut StageIo) -> Result<(), StageError> {
        Ok(())
    }
}

/// Reads `link` and records what it holds when it is built.
struct Take;
impl StageDef for Take {
    type Params = LinkParams;
    const KIND: &'static str = "test.take";
    const DOC: &'static str = "takes a number";
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn link(p: &LinkParams, _: &StageContext, l: &mut pipeline::Linker) -> Vec<ParamError> {
        l.read(&number_link(&p.link));
        vec![]
    }
    fn create(p: &LinkParams, ctx: &StageContext, _: usize) -> Result<Self, StageError> {
        let v = ctx.links.get(&number_link(&p.link)).map(|v| *v);
        COLLECTED
            .lock()
            .unwrap()
            .insert(format!("take-{}", ctx.stage), v.into_iter().collect());
        Ok(Take)
    }
}
impl Stage for Take {
    fn run(&mut self, _: &mut StageIo) -> Result<(), StageError> {
        Ok(())
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.with::<Offer>().with::<Take>();
    r.with::<Nums>()
        .with::<Square>()
        .with::<Collect>()
        .with::<BigSource>()
        .with::<SlowSink>()
        .with::<Text>()
        .with::<FileSource>();
    r
}

fn run_spec(yaml: &str) -> Result<pipeline::RunSummary, RunError> {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("run_dir: {}\n{yaml}", dir.path().join("run").display());
    let spec = pipeline::load_str(&yaml, "test.yaml", &[])?;
    let plan = pipeline::validate(spec, &registry())?;
    pipeline::run(
        plan,
        &RunOptions {
            force: false,
            quiet: true,
        },
        &CancelToken::new(),
    )
}

fn collected(key: &str) -> Vec<u64> {
    COLLECTED
        .lock()
        .unwrap()
        .get(key)
        .cloned()
        .unwrap_or_default()
}

fn errors_of(yaml: &str) -> Vec<String> {
    let r = pipeline::load_str(yaml, "bad.yaml", &[])
        .and_then(|s| pipeline::validate(s, &registry()).map(|_| ()));
    match r {
        Ok(()) => vec![],
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn order_is_restored_behind_parallel_stages() {
    for workers in [1, 4] {
        let key = format!("order{workers}");
        run_spec(&format!(
            "name: t
stages:
  nums: {{ kind: test.nums, workers: {workers}, with: {{ n: 300 }} }}
  sq: {{ kind: test.square, from: nums, workers: {workers} }}
  out: {{ kind: test.collect, from: sq, with: {{ key: {key} }} }}
"
        ))
        .unwrap();
        let want: Vec<u64> = (0..300).map(|x| x * x).collect();
        assert_eq!(collected(&key), want, "workers: {workers}");
    }
}

#[test]
fn parallel_stages_may_drop_or_repeat_items_in_order() {
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, workers: 3, with: { n: 50 } }
  sq: { kind: test.square, from: nums, workers: 3, with: { repeat: 2 } }
  out: { kind: test.collect, from: sq, with: { key: rep } }
",
    )
    .unwrap();
    let want: Vec<u64> = (0..50).flat_map(|x| [x * x, x * x]).collect();
    assert_eq!(collected("rep"), want);
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, workers: 3, with: { n: 50 } }
  sq: { kind: test.square, from: nums, workers: 3, with: { repeat: 0 } }
  out: { kind: test.collect, from: sq, with: { key: drop } }
",
    )
    .unwrap();
    assert!(collected("drop").is_empty());
}

#[test]
fn fan_out_copies_to_every_consumer() {
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, workers: 2, with: { n: 40 } }
  a: { kind: test.collect, from: nums, with: { key: fa } }
  b: { kind: test.collect, from: nums, with: { key: fb } }
",
    )
    .unwrap();
    let want: Vec<u64> = (0..40).collect();
    assert_eq!(collected("fa"), want);
    assert_eq!(collected("fb"), want);
}

#[test]
fn first_error_stops_the_graph_and_names_the_stage() {
    let err = run_spec(
        "name: t
stages:
  nums: { kind: test.nums, with: { forever: true } }
  sq: { kind: test.square, from: nums, workers: 2, with: { fail_on: 25 } }
  out: { kind: test.collect, from: sq, with: { key: err } }
",
    )
    .unwrap_err();
    match err {
        RunError::Stage {
            stage,
            kind,
            message,
        } => {
            assert_eq!(stage, "sq");
            assert_eq!(kind, "test.square");
            assert!(message.contains("bad value 25"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_panicking_stage_is_an_error_not_a_crash() {
    let err = run_spec(
        "name: t
stages:
  nums: { kind: test.nums, with: { n: 100 } }
  sq: { kind: test.square, from: nums, with: { panic_on: 7 } }
  out: { kind: test.collect, from: sq, with: { key: panic } }
",
    )
    .unwrap_err();
    assert!(
        matches!(&err, RunError::Stage { stage, message, .. } if stage == "sq" && message.contains("boom at 7")),
        "{err}"
    );
}

#[test]
fn a_consumer_that_stops_early_stops_its_producers() {
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, workers: 2, with: { forever: true } }
  sq: { kind: test.square, from: nums, workers: 2 }
  out: { kind: test.collect, from: sq, with: { key: take, take: 20 } }
",
    )
    .unwrap();
    let want: Vec<u64> = (0..20).map(|x| x * x).collect();
    assert_eq!(collected("take"), want);
}

#[test]
fn cancellation_stops_every_thread() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: t
run_dir: {}
stages:
  nums: {{ kind: test.nums, workers: 2, with: {{ forever: true, sleep_ms: 1 }} }}
  out: {{ kind: test.collect, from: nums, with: {{ key: cancel }} }}
",
        dir.path().join("r").display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
        &registry(),
    )
    .unwrap();
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        c.interrupt();
    });
    let start = std::time::Instant::now();
    let err = pipeline::run(
        plan,
        &RunOptions {
            force: false,
            quiet: true,
        },
        &cancel,
    )
    .unwrap_err();
    t.join().unwrap();
    assert!(matches!(err, RunError::Interrupted), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn resume_skips_what_the_consumer_holds() {
    // A source that honours the skip starts after it.
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, with: { n: 30 } }
  out: { kind: test.collect, from: nums, with: { key: resume, resume: 12 } }
",
    )
    .unwrap();
    assert_eq!(collected("resume"), (12..30).collect::<Vec<u64>>());
    // Behind a stage that cannot skip, the consumer's input drops the leading items itself.
    run_spec(
        "name: t
stages:
  nums: { kind: test.nums, with: { n: 30 } }
  sq: { kind: test.square, from: nums }
  out: { kind: test.collect, from: sq, with: { key: resume2, resume: 5 } }
",
    )
    .unwrap();
    assert_eq!(
        collected("resume2"),
        (5..30).map(|x| x * x).collect::<Vec<u64>>()
    );
}

#[test]
fn memory_is_bounded_under_back_pressure() {
    MAX_LIVE.store(0, Ordering::SeqCst);
    let summary = run_spec(
        "name: t
channel_capacity: 4
stages:
  big: { kind: test.big }
  slow: { kind: test.slow, from: big }
",
    )
    .unwrap();
    let max = MAX_LIVE.load(Ordering::SeqCst);
    // Capacity 4 in the channel, one being sent, one being consumed.
    assert!(max <= 6, "at most 6 items should exist at once, saw {max}");
    let big = summary.stages.iter().find(|s| s.stage == "big").unwrap();
    assert_eq!(big.items_out, 200);
    assert!(
        big.backpressured_s > 0.05,
        "the fast source should wait on the slow sink: {big:?}"
    );
    let slow = summary.stages.iter().find(|s| s.stage == "slow").unwrap();
    assert_eq!(slow.items_in, 200);
}

#[test]
fn telemetry_is_saved_as_the_stages_table() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let yaml = format!(
        "name: tele
run_dir: {}
stages:
  nums: {{ kind: test.nums, with: {{ n: 5 }} }}
  out: {{ kind: test.collect, from: nums, with: {{ key: tele }} }}
",
        run_dir.display()
    );
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
        &registry(),
    )
    .unwrap();
    pipeline::run(
        plan,
        &RunOptions {
            force: false,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
    let f = std::fs::File::open(run_dir.join("stages.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    assert!(run_dir.join("spec.yaml").is_file());
}

#[test]
fn a_changed_spec_is_refused_in_the_same_run_dir_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mk = |n: u64| {
        format!(
            "name: t
run_dir: {}
stages:
  nums: {{ kind: test.nums, with: {{ n: {n} }} }}
  out: {{ kind: test.collect, from: nums, with: {{ key: chg }} }}
",
            run_dir.display()
        )
    };
    let go = |yaml: String, force: bool| {
        pipeline::run(
            pipeline::validate(
                pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
                &registry(),
            )
            .unwrap(),
            &RunOptions { force, quiet: true },
            &CancelToken::new(),
        )
    };
    go(mk(3), false).unwrap();
    go(mk(3), false).unwrap();
    let err = go(mk(4), false).unwrap_err();
    assert!(err.to_string().contains("different spec"), "{err}");
    // --force starts afresh: the earlier run is moved aside whole, not continued.
    std::fs::write(run_dir.join("left-by-the-old-run"), "x").unwrap();
    go(mk(4), true).unwrap();
    let aside = dir.path().join("run.replaced-1");
    assert!(aside.join("left-by-the-old-run").is_file() && aside.join("spec.yaml").is_file());
    assert!(!run_dir.join("left-by-the-old-run").exists());
    assert_eq!(pipeline::RunStatus::read(&run_dir).unwrap().attempts, 1);
}

#[test]
fn validation_reports_every_error_with_paths_and_lines() {
    let yaml = "name: t
stages:
  nums: { kind: test.nums, with: { n: many, sleep: 3 } }
  sq: { kind: test.sqaure, from: nums }
  out: { kind: test.collect, from: nmus }
  txt: { kind: test.text, from: nums }
  big: { kind: test.big, with: { n: 2000000 } }
  slow: { kind: test.slow, from: big, workers: 3 }
  after: { kind: test.collect, from: sq, with: { key: after } }
";
    let errs = errors_of(yaml);
    let has = |needle: &[&str]| errs.iter().any(|e| needle.iter().all(|n| e.contains(n)));
    assert!(
        has(&["bad.yaml:3", "stages.nums.with.n", "invalid type"]),
        "{errs:#?}"
    );
    assert!(
        has(&["stages.nums.with.sleep", "unknown parameter", "`sleep_ms`"]),
        "{errs:#?}"
    );
    assert!(
        has(&[
            "bad.yaml:4",
            "unknown stage kind `test.sqaure`",
            "`test.square`"
        ]),
        "{errs:#?}"
    );
    assert!(
        has(&[
            "bad.yaml:5",
            "stages.out.from",
            "`nmus` is not a stage",
            "`nums`"
        ]),
        "{errs:#?}"
    );
    assert!(
        has(&["stages.txt.from", "type mismatch", "u64", "String"]),
        "{errs:#?}"
    );
    assert!(has(&["stages.big.with.n", "at most 1000000"]), "{errs:#?}");
    assert!(has(&["stages.slow.workers", "one worker"]), "{errs:#?}");
    // `after` reads from the stage of unknown kind: nothing more to say about it.
    assert!(
        !errs.iter().any(|e| e.contains("stages.after")),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 7, "{errs:#?}");
}

#[test]
fn validation_finds_cycles_missing_inputs_and_zero_workers() {
    let errs = errors_of(
        "name: t
stages:
  a: { kind: test.square, from: b }
  b: { kind: test.square, from: a }
  c: { kind: test.collect }
  d: { kind: test.nums, workers: 0 }
",
    );
    let has = |needle: &[&str]| errs.iter().any(|e| needle.iter().all(|n| e.contains(n)));
    assert!(has(&["cycle", "a", "b"]), "{errs:#?}");
    assert!(
        has(&["stages.c", "input `in`", "not connected"]),
        "{errs:#?}"
    );
    assert!(has(&["stages.d.workers", "at least 1"]), "{errs:#?}");
    let errs = errors_of(
        "name: t
stages:
  a: { kind: test.nums }
  b: { kind: test.collect, from: a.nope }
  c: { kind: test.nums, device: gpu }
",
    );
    assert!(
        errs.iter().any(|e| e.contains("has no output `nope`")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("stages.c.device") && e.contains("unknown stage key")),
        "{errs:#?}"
    );
    let errs = errors_of(
        "name: t
device: cuda:0
stages:
  a: { kind: test.nums }
",
    );
    assert!(
        errs.iter().any(|e| e.contains("no CUDA support")),
        "{errs:#?}"
    );
    // A non-copyable output cannot feed two stages.
    let errs = errors_of(
        "name: t
stages:
  b: { kind: test.big }
  s1: { kind: test.slow, from: b }
  s2: { kind: test.slow, from: b }
",
    );
    assert!(
        errs.iter().any(|e| e.contains("cannot be shared")),
        "{errs:#?}"
    );
}

#[test]
fn overrides_apply_before_validation() {
    let spec = pipeline::load_str(
        "name: t
stages:
  a: { kind: test.nums, with: { n: 3 } }
",
        "t.yaml",
        &["stages.a.with.n=7".into(), "seed=9".into()],
    )
    .unwrap();
    assert_eq!(spec.seed, 9);
    assert_eq!(spec.stages[0].with["n"].as_u64(), Some(7));
    let e = pipeline::validate(
        pipeline::load_str(
            "name: t
stages:
  a: { kind: test.nums }
",
            "t.yaml",
            &["stages.a.with.n=lots".into()],
        )
        .unwrap(),
        &registry(),
    )
    .err()
    .unwrap();
    assert!(
        e.0[0].to_string().starts_with("--set: stages.a.with.n"),
        "{}",
        e
    );
}

#[test]
fn stages_listing_shows_ports_and_documented_parameters() {
    let text = registry().describe();
    assert!(text.contains("test.nums  [parallel: workers: N]"), "{text}");
    assert!(text.contains("outputs: out (u64)"), "{text}");
    assert!(
        text.contains("sleep_ms  integer = 0  Sleep per item (ms)."),
        "{text}"
    );
}

#[test]
fn a_parallel_stage_with_an_unconnected_output_does_not_stall() {
    // No consumer for `sq`: its workers must not wait for a relay that does not exist.
    let summary = run_spec(
        "name: t
channel_capacity: 2
stages:
  nums: { kind: test.nums, with: { n: 200 } }
  sq: { kind: test.square, from: nums, workers: 3 }
",
    )
    .unwrap();
    let sq = summary.stages.iter().find(|s| s.stage == "sq").unwrap();
    assert_eq!((sq.items_in, sq.items_out), (200, 200));
}

#[test]
fn every_error_once_and_where_it_comes_from() {
    // A stage's own checks (the file system) are reported alongside its parameter errors, but
    // not on a field that already has one.
    let errs = errors_of(
        "name: t
stages:
  a: { kind: test.nums }
  f: { kind: test.file, from: a, with: { path: /no/such/file, n: 99 } }
",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("stages.f.with.n") && e.contains("at most 10")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("stages.f.with.path") && e.contains("does not exist")),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    let errs = errors_of(
        "name: t
stages:
  a: { kind: test.nums }
  f: { kind: test.file, from: a, with: { path: [1], n: 3 } }
",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("stages.f.with.path") && errs[0].contains("invalid type"),
        "{errs:#?}"
    );
    // A `from:` or `with:` that cannot be read is one error, not two.
    for from in ["5", "'a.b.c'", "''"] {
        let errs = errors_of(&format!(
            "name: t
stages:
  a: {{ kind: test.nums }}
  b: {{ kind: test.collect, from: {from} }}
"
        ));
        assert_eq!(errs.len(), 1, "from: {from}: {errs:#?}");
        assert!(errs[0].contains("stages.b.from"), "{errs:#?}");
    }
    let errs = errors_of(
        "name: t
stages:
  a: { kind: test.nums }
  f: { kind: test.file, from: a, with: [1, 2] }
",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("stages.f.with") && errs[0].contains("must be a mapping"),
        "{errs:#?}"
    );
    // A null name or an empty run_dir would put the run's files in the wrong place.
    let errs = errors_of(
        "name:
stages:
  a: { kind: test.nums }
",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("bad.yaml:1: name") && e.contains("null")),
        "{errs:#?}"
    );
    let errs = errors_of(
        "name: t
run_dir: ''
stages:
  a: { kind: test.nums }
",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("run_dir") && e.contains("must not be empty")),
        "{errs:#?}"
    );
    // Unknown kinds are matched on their last part too.
    let errs = errors_of(
        "name: t
stages:
  a: { kind: nums }
",
    );
    assert!(
        errs.iter().any(|e| e.contains("(did you mean `test.nums`")),
        "{errs:#?}"
    );
}

#[test]
fn errors_made_by_overrides_point_at_set() {
    let yaml = "name: t
stages:
  a: { kind: test.nums }
";
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match pipeline::load_str(yaml, "t.yaml", &sets)
            .and_then(|s| pipeline::validate(s, &registry()).map(|_| ()))
        {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        }
    };
    let errs = load(&["x.y=z"]);
    assert_eq!(errs, vec!["--set: x: unknown top-level key".to_string()]);
    let errs = load(&["stages.nosuch.with.n=1"]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("--set: stages.nosuch:") && errs[0].contains("kind"),
        "{errs:#?}"
    );
    // A path the file defines still points at the file.
    let errs = load(&["stages.b.from=a"]);
    assert!(errs.iter().all(|e| !e.starts_with("t.yaml")), "{errs:#?}");
    // Depth is bounded, not a stack overflow.
    let deep = format!("{}=1", vec!["k"; 100_000].join("."));
    let errs = load(&[deep.as_str()]);
    assert!(
        errs.len() == 1 && errs[0].contains("more than 64 segments"),
        "{errs:#?}"
    );
}

#[test]
fn a_run_that_fails_before_starting_is_recorded_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let marker = dir.path().join("fail-before-start");
    std::fs::write(&marker, "x").unwrap();
    let yaml = format!(
        "name: t
run_dir: {}
stages:
  a: {{ kind: test.nums }}
  f: {{ kind: test.file, from: a, with: {{ path: {} }} }}
",
        run_dir.display(),
        marker.display()
    );
    let go = || {
        pipeline::run(
            pipeline::validate(
                pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
                &registry(),
            )
            .unwrap(),
            &RunOptions {
                force: false,
                quiet: true,
            },
            &CancelToken::new(),
        )
    };
    let err = go().unwrap_err().to_string();
    assert!(
        err.contains("stage `f`") && err.contains("earlier attempt"),
        "{err}"
    );
    let st = pipeline::RunStatus::read(&run_dir).unwrap();
    assert_eq!(st.status, "failed");
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("earlier attempt"),
        "{st:?}"
    );
    go().unwrap_err();
    assert_eq!(pipeline::RunStatus::read(&run_dir).unwrap().attempts, 2);
}

#[test]
fn an_io_error_names_its_cause_once() {
    // The run directory lies below a plain file: nothing can be written, and the error says why
    // once (the command line prints the error with its sources).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let yaml = format!(
        "name: t
run_dir: {}
stages:
  a: {{ kind: test.nums }}
",
        file.join("run").display()
    );
    let err = pipeline::run(
        pipeline::validate(
            pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
            &registry(),
        )
        .unwrap(),
        &RunOptions {
            force: false,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap_err();
    let chain = anyhow_like(&err);
    assert_eq!(
        chain.matches("os error").count(),
        1,
        "the cause is printed once: {chain}"
    );
}

/// `{:#}`-style chain of an error and its sources, as the command line prints it.
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

#[test]
fn the_same_spec_written_differently_is_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let go = |yaml: String, force: bool| {
        pipeline::run(
            pipeline::validate(
                pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(),
                &registry(),
            )
            .unwrap(),
            &RunOptions { force, quiet: true },
            &CancelToken::new(),
        )
    };
    let rd = run_dir.display();
    go(
        format!(
            "name: t
run_dir: {rd}
seed: 3
stages:
  nums: {{ kind: test.nums, with: {{ n: 3, sleep_ms: 0 }} }}
"
        ),
        false,
    )
    .unwrap();
    // Keys in another order: the same spec.
    go(
        format!(
            "seed: 3
name: t
run_dir: {rd}
stages:
  nums: {{ with: {{ sleep_ms: 0, n: 3 }}, kind: test.nums }}
"
        ),
        false,
    )
    .unwrap();
    // A changed value is named.
    let err = go(
        format!(
            "name: t
run_dir: {rd}
seed: 4
stages:
  nums: {{ kind: test.nums, with: {{ n: 5, sleep_ms: 0 }} }}
"
        ),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("different spec")
            && err.contains("seed")
            && err.contains("stages.nums.with.n"),
        "{err}"
    );
    // 1 and 1.0 are the same number.
    let mut changed = Vec::new();
    let a: pipeline::serde_yaml::Value =
        pipeline::serde_yaml::from_str("{x: 1, y: [1, 2.5], z: {q: true}}").unwrap();
    let b: pipeline::serde_yaml::Value =
        pipeline::serde_yaml::from_str("{z: {q: true}, y: [1.0, 2.5], x: 1.0}").unwrap();
    pipeline::spec_diff(&a, &b, "", &mut changed);
    assert!(changed.is_empty(), "{changed:?}");
    let c: pipeline::serde_yaml::Value =
        pipeline::serde_yaml::from_str("{x: 2, y: [1, 2.5, 3], w: 0}").unwrap();
    pipeline::spec_diff(&a, &c, "", &mut changed);
    assert_eq!(changed, vec!["x", "y", "z", "w"]);
}

#[test]
fn links_reach_readers_whatever_the_order_and_have_one_provider() {
    // The reader comes first in the spec: the link step runs before any stage is built.
    let yaml = r#"
name: links
stages:
  early: { kind: test.take, with: { link: n } }
  giver: { kind: test.offer, with: { link: n, value: 42 } }
  lonely: { kind: test.take, with: { link: nobody } }
"#;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("run_dir: {}\n{yaml}", dir.path().join("run").display());
    let plan = pipeline::validate(
        pipeline::load_str(&yaml, "l.yaml", &[]).unwrap(),
        &registry(),
    )
    .unwrap();
    let links = plan.links();
    let n = links
        .iter()
        .find(|l| l.name == "test.n")
        .expect("the link is listed");
    assert_eq!(
        (n.provider.as_deref(), n.readers.clone()),
        (Some("giver"), vec!["early".to_string()])
    );
    assert_eq!(n.ty, "u64");
    let nobody = links.iter().find(|l| l.name == "test.nobody").unwrap();
    assert_eq!(nobody.provider, None);
    pipeline::run(
        plan,
        &RunOptions {
            force: false,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
    let got = COLLECTED.lock().unwrap().clone();
    assert_eq!(got["take-early"], vec![42]);
    assert!(got["take-lonely"].is_empty());

    let twice = r#"
name: links2
stages:
  a: { kind: test.offer, with: { link: m, value: 1 } }
  b: { kind: test.offer, with: { link: m, value: 2 } }
"#;
    let errs = pipeline::validate(
        pipeline::load_str(twice, "l2.yaml", &[]).unwrap(),
        &registry(),
    )
    .err()
    .expect("two providers are refused");
    let text = errs.to_string();
    assert!(
        text.contains("stages.b.with.link") && text.contains("also offered by `a`"),
        "{text}"
    );
}
