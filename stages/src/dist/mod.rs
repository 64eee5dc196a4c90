//! Data-parallel training: which rank of how many this process is (from the launcher's
//! environment, or the spec's `distributed:` block), and the collectives the ranks use (MPI for
//! CPU ranks, behind the `mpi` cargo feature).
//!
//! The split of the work (see the README's "Scaling out"):
//! - the learner's data stream is split by rank: rank `r` of `W` reads the utterances whose index
//!   in the epoch's order is `r` modulo `W` (`shards.read`, `features.read`), and batches them on
//!   its own; its `j`-th local batch of update `u` is the run's batch `u·k·W + j·W + r` (`k` the
//!   student's `update_freq`), the step the teacher, the masks and the noise see;
//! - before an update the ranks exchange what they hold (update number, masked frames, data
//!   position) through rank 0, with a deadline that names a missing rank; every batch's loss is
//!   weighted by its share of the masked frames of all ranks; the gradients (and the loss) are
//!   summed over the ranks in one flat f32 buffer (`MPI_Allreduce`), so every rank takes the
//!   same optimiser and EMA step;
//! - rank 0 writes the checkpoints (with every rank's data position) and the run's logs; rank
//!   `r > 0` runs in `RUN_DIR/rank-r` (its telemetry and logs of its own batches) and resumes
//!   from rank 0's checkpoints.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use serde::Deserialize;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The spec's `distributed:` block: overrides of what the launcher says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DistSpec {
    /// `mpi` (CPU ranks); default: `mpi` on `cpu`.
    pub backend: Option<String>,
    /// Ranks in the run; checked against the launcher's count.
    pub world_size: Option<usize>,
    /// This process's rank (for launchers ehmam does not read; MPI's rank must agree).
    pub rank: Option<usize>,
    /// This process's rank on its machine.
    pub local_rank: Option<usize>,
    /// Seconds a rank waits for the others at an exchange or an all-reduce before it stops with
    /// an error naming the ranks that did not come.
    pub timeout_s: f64,
}

impl Default for DistSpec {
    fn default() -> Self {
        DistSpec {
            backend: None,
            world_size: None,
            rank: None,
            local_rank: None,
            timeout_s: 600.0,
        }
    }
}

impl DistSpec {
    /// The block of a spec (`None` when it has none); errors name the key.
    pub fn from_value(v: Option<&serde_yaml::Value>) -> Result<DistSpec, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(DistSpec::default());
        };
        let d: DistSpec = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                format!("distributed: {}", e.inner())
            } else {
                format!("distributed.{path}: {}", e.inner())
            }
        })?;
        if !(d.timeout_s > 0.0 && d.timeout_s.is_finite()) {
            return Err(format!(
                "distributed.timeout_s: must be > 0 seconds, got {}",
                d.timeout_s
            ));
        }
        if let Some(b) = &d.backend {
            if b != "mpi" && b != "nccl" {
                return Err(format!(
                    "distributed.backend: `{b}` is not a backend (mpi for CPU ranks, nccl for GPUs)"
                ));
            }
        }
        if d.world_size == Some(0) {
            return Err("distributed.world_size: must be at least 1".into());
        }
        if let (Some(r), Some(w)) = (d.rank, d.world_size) {
            if r >= w {
                return Err(format!("distributed.rank: {r} is not below world_size {w}"));
            }
        }
        Ok(d)
    }
}

/// Rank and world size as a launcher set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Which launcher's variables they came from.
    pub source: &'static str,
}

fn env_usize(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, String> {
    match get(name) {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("environment variable {name}={s:?} is not a number")),
    }
}

/// The launcher's rank and world size from an environment (`get` reads a variable): Open MPI's
/// `mpirun` (`OMPI_COMM_WORLD_*`), MPICH/Intel MPI's Hydra (`PMI_*`), torchrun (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`), Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`,
/// `SLURM_LOCALID`; only inside a job step, not in the batch script itself). `None` when none of
/// them started this process.
pub fn launch_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>, String> {
    let sets: [(&'static str, &str, &str, &str); 4] = [
        (
            "Open MPI (mpirun)",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ),
        ("PMI (mpiexec)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        (
            "Slurm (srun)",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
        ),
    ];
    for (source, rank, size, local) in sets {
        if source.starts_with("Slurm") && get("SLURM_STEP_ID").is_none() {
            // In an sbatch script (no job step) SLURM_NTASKS is the allocation's, not ours.
            continue;
        }
        let (Some(r), Some(w)) = (env_usize(get, rank)?, env_usize(get, size)?) else {
            continue;
        };
        if w == 0 || r >= w {
            return Err(format!("{source}: {rank}={r} is not a rank of {size}={w}"));
        }
        let l = env_usize(get, local)?.unwrap_or(0);
        return Ok(Some(Launch {
            rank: r,
            world: w,
            local_rank: l,
            source,
        }));
    }
    Ok(None)
}

/// [`launch_from`] over this process's environment.
pub fn launch_from_env() -> Result<Option<Launch>, String> {
    launch_from(&|k| std::env::var(k).ok())
}

/// What the ranks do together. Every rank makes the same calls in the same order.
pub trait Collective: Send + Sync {
    /// Every rank's `mine` (all of one length), in rank order, gathered through rank 0 with a
    /// deadline: a rank that does not come within it is named in the error (`what` says at
    /// which point of the run).
    fn exchange(&self, what: &str, mine: &[u64]) -> Result<Vec<Vec<u64>>, String>;
    /// `buf` ← its sum over the ranks (every rank gets the sum).
    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<(), String>;
    /// The sum over the ranks of a contiguous f32 tensor on this rank's GPU, summed there
    /// (NCCL); `None` for a backend that sums host buffers ([`Collective::all_reduce_sum`]).
    fn all_reduce_device(
        &self,
        what: &str,
        t: &candle_core::Tensor,
    ) -> Option<Result<candle_core::Tensor, String>> {
        let _ = (what, t);
        None
    }
    /// Ends the collectives (MPI_Finalize); nothing may be called after it.
    fn finish(&self);
}

/// This process's place in a data-parallel run.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Who started the ranks (for messages).
    pub source: String,
    /// Rank 0's run directory: where the checkpoints are (every rank resumes from them).
    pub main_run_dir: PathBuf,
    pub timeout: Duration,
    pub comm: Box<dyn Collective>,
}

impl Dist {
    /// The run directory of rank `rank` of the run whose directory is `main`.
    pub fn rank_run_dir(main: &std::path::Path, rank: usize) -> PathBuf {
        if rank == 0 {
            main.to_path_buf()
        } else {
            main.join(format!("rank-{rank}"))
        }
    }
}

static CURRENT: OnceLock<Arc<Dist>> = OnceLock::new();

/// Makes this process a rank of a data-parallel run (once, before the run is planned).
pub fn install(d: Dist) -> Result<(), String> {
    CURRENT
        .set(Arc::new(d))
        .map_err(|_| "internal: the distributed setup was installed twice".to_string())
}

/// The data-parallel setup, when this process is one of several ranks.
pub fn current() -> Option<Arc<Dist>> {
    CURRENT.get().filter(|d| d.world > 1).cloned()
}

/// Ends the collectives at the end of the process (MPI_Finalize).
pub fn finish() {
    if let Some(d) = CURRENT.get() {
        d.comm.finish();
    }
}

/// Where a learner's checkpoints are: rank 0's run directory in a data-parallel run, else the
/// stage's own.
pub fn checkpoint_root(run_dir: &std::path::Path) -> PathBuf {
    match current() {
        Some(d) => d.main_run_dir.clone(),
        None => run_dir.to_path_buf(),
    }
}

/// The rank split of a data stage: `Some((rank, world))` when this process is a rank of a
/// data-parallel run and `stage`'s stream reaches the learner (the stage that provides
/// [`crate::stream::UPDATE_FREQ`]); other streams (a held-out set) are read whole on every rank.
pub fn stream_split(ctx: &pipeline::StageContext) -> Option<(usize, usize)> {
    let d = current()?;
    let learner = ctx
        .links
        .list()
        .into_iter()
        .find(|l| l.name == crate::stream::UPDATE_FREQ.name())?
        .provider?;
    ctx.graph
        .reaches(&ctx.stage, &learner)
        .then_some((d.rank, d.world))
}

/// The run's batch step of the `local`-th batch of rank `rank` of `world`, with `k` batches per
/// rank and update: `(local / k)·k·world + (local mod k)·world + rank` (the identity on one
/// rank). The batches of one update are then consecutive steps, interleaved over the ranks.
pub fn global_step(local: u64, k: u64, rank: usize, world: usize) -> u64 {
    let (k, w, r) = (k.max(1), world.max(1) as u64, rank as u64);
    (local / k) * k * w + (local % k) * w + r
}

/// The blake3 of a resolved spec as every rank must hold it: without `distributed.rank` and
/// `distributed.local_rank` (which differ by rank), as four u64 words.
pub fn spec_hash(resolved: &serde_yaml::Value) -> [u64; 4] {
    let mut v = resolved.clone();
    if let Some(d) = v
        .as_mapping_mut()
        .and_then(|m| m.get_mut("distributed"))
        .and_then(|d| d.as_mapping_mut())
    {
        d.remove("rank");
        d.remove("local_rank");
    }
    let text = serde_yaml::to_string(&v).unwrap_or_default();
    let h = blake3::hash(text.as_bytes());
    let b = h.as_bytes();
    let mut out = [0u64; 4];
    for (i, o) in out.iter_mut().enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        *o = u64::from_le_bytes(w);
    }
    out
}

/// Waits for `f` to return `Some`, polling (a spin, then short sleeps) until `deadline`.
pub fn poll_until<T>(deadline: std::time::Instant, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(x) = f() {
            return Some(x);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return None;
        }
        if now - start < Duration::from_millis(2) {
            std::hint::spin_loop();
        } else if now - start < Duration::from_millis(50) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// Runs `f`, a blocking collective that cannot be abandoned; when it has not returned within
/// `timeout`, a timer prints why (naming the other ranks) and stops the process, which the
/// launcher then reports.
pub fn watched<T>(
    rank: usize,
    world: usize,
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let what = what.to_string();
    let watch = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
            let others: Vec<usize> = (0..world).filter(|&r| r != rank).collect();
            eprintln!(
                "error: rank {rank}: {what} with {} did not finish within {} s (a rank died or hangs); stopping",
                name_ranks(&others),
                timeout.as_secs_f64()
            );
            std::process::exit(1);
        }
    });
    let out = f();
    let _ = tx.send(());
    let _ = watch.join();
    out
}

/// Ranks as a message lists them: `rank 1`, `ranks 1, 3`.
pub fn name_ranks(r: &[usize]) -> String {
    let list = r
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if r.len() == 1 {
        format!("rank {list}")
    } else {
        format!("ranks {list}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_are_read_from_their_variables() {
        let l = launch_from(&env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (1, 4, 1));
        let l = launch_from(&env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.source),
            (3, 8, 3, "torchrun")
        );
        // Slurm only inside a job step.
        let batch_script = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "16")];
        assert_eq!(launch_from(&env(&batch_script)).unwrap(), None);
        let step = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_ID", "0"),
        ];
        let l = launch_from(&env(&step)).unwrap().unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (5, 16, 1));
        assert_eq!(launch_from(&env(&[])).unwrap(), None);
        let bad = launch_from(&env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(bad.contains("RANK=2"), "{bad}");
        let bad = launch_from(&env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(bad.contains("RANK"), "{bad}");
    }

    #[test]
    fn global_steps_interleave_the_ranks_batches() {
        // One rank: the identity.
        for s in 0..20 {
            assert_eq!(global_step(s, 3, 0, 1), s);
        }
        // 2 ranks × 2 batches per update: every step once, update u = steps 4u..4u+3.
        let mut all: Vec<u64> = (0..2)
            .flat_map(|r| (0..10).map(move |l| global_step(l, 2, r, 2)))
            .collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(global_step(0, 2, 1, 2), 1);
        assert_eq!(global_step(1, 2, 1, 2), 3);
        assert_eq!(global_step(2, 2, 0, 2), 4);
        // Update of each local batch = global step / (k·W) = local / k.
        for l in 0..10 {
            assert_eq!(global_step(l, 2, 1, 2) / 4, l / 2);
        }
    }

    #[test]
    fn the_spec_hash_ignores_only_the_rank() {
        let a: serde_yaml::Value = serde_yaml::from_str(
            "name: x\ndistributed: {rank: 0, timeout_s: 5}\nstages: {a: {kind: k}}",
        )
        .unwrap();
        let b: serde_yaml::Value = serde_yaml::from_str(
            "name: x\ndistributed: {rank: 1, timeout_s: 5}\nstages: {a: {kind: k}}",
        )
        .unwrap();
        let c: serde_yaml::Value = serde_yaml::from_str(
            "name: x\ndistributed: {rank: 1, timeout_s: 6}\nstages: {a: {kind: k}}",
        )
        .unwrap();
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_ne!(spec_hash(&a), spec_hash(&c));
    }

    #[test]
    fn the_block_is_checked() {
        let v: serde_yaml::Value = serde_yaml::from_str("{timeout_s: 0}").unwrap();
        assert!(DistSpec::from_value(Some(&v))
            .unwrap_err()
            .contains("timeout_s"));
        let v: serde_yaml::Value = serde_yaml::from_str("{world_sise: 2}").unwrap();
        assert!(DistSpec::from_value(Some(&v))
            .unwrap_err()
            .contains("world_sise"));
        let v: serde_yaml::Value = serde_yaml::from_str("{backend: gloo}").unwrap();
        assert!(DistSpec::from_value(Some(&v)).unwrap_err().contains("gloo"));
        let v: serde_yaml::Value = serde_yaml::from_str("{world_size: 2, rank: 1}").unwrap();
        let d = DistSpec::from_value(Some(&v)).unwrap();
        assert_eq!(
            (d.world_size, d.rank, d.timeout_s),
            (Some(2), Some(1), 600.0)
        );
    }
}
