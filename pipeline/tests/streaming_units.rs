//! A unit of a parallel stage that sends many items (a long file's segments) streams through
//! the relay that restores order: the relay does not hold the whole unit until it is done.

use pipeline::schemars::JsonSchema;
use pipeline::{
    CancelToken, Params, Port, Registry, RunOptions, Stage, StageContext, StageDef, StageError,
    StageIo,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};

static LIVE: AtomicI64 = AtomicI64::new(0);
static MAX_LIVE: AtomicI64 = AtomicI64::new(0);
static RECEIVED: AtomicI64 = AtomicI64::new(0);

/// An item that counts how many exist at once.
struct Chunk(#[allow(dead_code)] Vec<u8>);
impl Chunk {
    fn new() -> Self {
        let live = LIVE.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_LIVE.fetch_max(live, Ordering::SeqCst);
        Chunk(vec![0u8; 1 << 12])
    }
}
impl Drop for Chunk {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct ManyParams {
    /// Items of the first unit.
    items: u64,
}
impl Params for ManyParams {}

/// Two units: the first sends `items` chunks, the second one.
struct Many(ManyParams);
impl StageDef for Many {
    type Params = ManyParams;
    const KIND: &'static str = "test.many";
    const DOC: &'static str = "many items in one unit";
    const PARALLEL: bool = true;
    fn inputs() -> Vec<Port> {
        vec![]
    }
    fn outputs() -> Vec<Port> {
        vec![Port::of::<Chunk>("out", "chunks")]
    }
    fn create(p: &ManyParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(Many(p.clone()))
    }
}
impl Stage for Many {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(u) = io.claim(2)? {
            let n = if u == 0 { self.0.items } else { 1 };
            for _ in 0..n {
                io.send(0, Chunk::new())?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct DropParams {}
impl Params for DropParams {}

struct DropAll;
impl StageDef for DropAll {
    type Params = DropParams;
    const KIND: &'static str = "test.drop";
    const DOC: &'static str = "drops chunks";
    fn inputs() -> Vec<Port> {
        vec![Port::of::<Chunk>("in", "chunks")]
    }
    fn outputs() -> Vec<Port> {
        vec![]
    }
    fn create(_: &DropParams, _: &StageContext, _: usize) -> Result<Self, StageError> {
        Ok(DropAll)
    }
}
impl Stage for DropAll {
    fn run(&mut self, io: &mut StageIo) -> Result<(), StageError> {
        while let Some(c) = io.recv::<Chunk>(0)? {
            RECEIVED.fetch_add(1, Ordering::SeqCst);
            drop(c);
        }
        Ok(())
    }
}

#[test]
fn a_unit_of_many_items_streams_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "run_dir: {}
name: t
stages:
  many: {{ kind: test.many, workers: 2, with: {{ items: 2000 }} }}
  sink: {{ kind: test.drop, from: many }}
",
        dir.path().join("run").display()
    );
    let mut reg = Registry::new();
    reg.with::<Many>().with::<DropAll>();
    let plan = pipeline::validate(pipeline::load_str(&yaml, "t.yaml", &[]).unwrap(), &reg).unwrap();
    pipeline::run(
        plan,
        &RunOptions {
            force: false,
            quiet: true,
        },
        &CancelToken::new(),
    )
    .unwrap();
    assert_eq!(RECEIVED.load(Ordering::SeqCst), 2001);
    // The channels hold a few dozen items (capacity 8 per channel); holding the unit until it is
    // done would keep all 2000 alive at once.
    let max = MAX_LIVE.load(Ordering::SeqCst);
    assert!(max < 100, "{max} items of one unit alive at once");
}
