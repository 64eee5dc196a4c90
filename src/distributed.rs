//! `ehmam run` as one rank of a data-parallel run: reads the launcher's environment and the
//! spec's `distributed:` block, starts the collectives, and checks that every rank runs the same
//! spec and sees the same checkpoint before anything runs.

use anyhow::{bail, Result};
use std::path::Path;

/// What a rank adds to its run.
pub struct RankRun {
    pub rank: usize,
    pub world: usize,
    /// `--set` overrides of this rank (rank r > 0 runs in `RUN_DIR/rank-r`).
    pub set: Vec<String>,
}

/// `None` for a run of one process; for a rank, starts the collectives and checks the ranks
/// agree. A spec that does not load or validate is left to the run to report.
pub fn setup(spec_path: &Path, set: &[String], force: bool) -> Result<Option<RankRun>> {
    let launch = stages::dist::launch_from_env().map_err(anyhow::Error::msg)?;
    let Ok(spec) = pipeline::load(spec_path, set) else {
        return Ok(None);
    };
    let Ok(ds) = stages::dist::DistSpec::from_value(spec.distributed.as_ref()) else {
        return Ok(None);
    };
    let world = ds
        .world_size
        .or(launch.as_ref().map(|l| l.world))
        .unwrap_or(1);
    if world <= 1 {
        return Ok(None);
    }
    if let (Some(w), Some(l)) = (ds.world_size, &launch) {
        if w != l.world {
            bail!(
                "the spec's distributed.world_size is {w} but {} started {} ranks",
                l.source,
                l.world
            );
        }
    }
    let on_cpu = spec.device == "cpu";
    let backend = ds
        .backend
        .clone()
        .unwrap_or_else(|| if on_cpu { "mpi" } else { "nccl" }.to_string());
    if backend == "nccl" {
        bail!(
            "device `{}` with {world} ranks: the nccl backend (GPU ranks) is not in this build; data-parallel runs train CPU ranks over MPI (device: cpu, mpirun -np {world} …)",
            spec.device
        );
    }
    if !on_cpu {
        bail!(
            "distributed.backend mpi trains CPU ranks; device `{}` is a GPU",
            spec.device
        );
    }
    if force {
        bail!("--force moves a run directory aside, which the other ranks are using: remove the run directory (or pick another run_dir) before a data-parallel run instead");
    }
    start_mpi(&spec, &ds, launch, world)
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(
    _spec: &pipeline::Spec,
    _ds: &stages::dist::DistSpec,
    launch: Option<stages::dist::Launch>,
    world: usize,
) -> Result<Option<RankRun>> {
    let by = launch.map_or("the spec (distributed.world_size)", |l| l.source);
    bail!(
        "{by} asks for {world} ranks, but this ehmam was built without MPI: build it with `cargo build --release --features mpi` (scripts/install-mpi.sh installs Open MPI) and start it with mpirun -np {world}"
    )
}

#[cfg(feature = "mpi")]
fn start_mpi(
    spec: &pipeline::Spec,
    ds: &stages::dist::DistSpec,
    launch: Option<stages::dist::Launch>,
    world: usize,
) -> Result<Option<RankRun>> {
    use stages::dist::{Collective, Dist};
    let timeout = std::time::Duration::from_secs_f64(ds.timeout_s);
    let comm = stages::dist::mpi::MpiComm::init(timeout).map_err(anyhow::Error::msg)?;
    let (rank, size) = (comm.rank(), comm.size());
    let source = launch
        .as_ref()
        .map_or("the spec".to_string(), |l| l.source.to_string());
    if size != world {
        bail!(
            "{source} asks for {world} ranks but MPI sees {size} process{}: start CPU ranks with `mpirun -np {world}` or `srun --mpi=pmix` (torchrun's ranks are not MPI processes)",
            if size == 1 { "" } else { "es" }
        );
    }
    for (what, r) in [
        ("the launcher's rank", launch.as_ref().map(|l| l.rank)),
        ("distributed.rank", ds.rank),
    ] {
        if let Some(r) = r {
            if r != rank {
                bail!("{what} is {r} but MPI made this process rank {rank}");
            }
        }
    }
    let local_rank = ds
        .local_rank
        .or(launch.as_ref().map(|l| l.local_rank))
        .unwrap_or(0);
    // Every rank: the same resolved spec, the same checkpoint to resume from.
    let hash = stages::dist::spec_hash(&spec.resolved);
    let ckpt = match stages::train::find_checkpoint(&spec.run_dir) {
        Ok(Some(f)) => f.meta.step + 1,
        _ => 0,
    };
    let mut mine = hash.to_vec();
    mine.push(ckpt);
    let table = comm
        .exchange("the start of the run (the spec check)", &mine)
        .map_err(anyhow::Error::msg)?;
    let differ: Vec<usize> = (1..table.len())
        .filter(|&r| table[r][..4] != table[0][..4])
        .collect();
    if !differ.is_empty() {
        bail!(
            "rank {rank}: the ranks run different specs: the resolved spec of {} differs from rank 0's (every rank must run the same spec with the same --set; only distributed.rank and distributed.local_rank may differ)",
            stages::dist::name_ranks(&differ)
        );
    }
    if table.iter().any(|t| t[4] != table[0][4]) {
        let say = |c: u64| {
            if c == 0 {
                "none".to_string()
            } else {
                format!("step {}", c - 1)
            }
        };
        let seen = table
            .iter()
            .enumerate()
            .map(|(r, t)| format!("rank {r}: {}", say(t[4])))
            .collect::<Vec<_>>()
            .join(", ");
        bail!(
            "rank {rank}: the ranks see different checkpoints in {} ({seen}): the run directory must be on a filesystem every rank shares",
            spec.run_dir.display()
        );
    }
    let main_run_dir = spec.run_dir.clone();
    let mut set = Vec::new();
    if rank > 0 {
        let dir = Dist::rank_run_dir(&main_run_dir, rank);
        let v = serde_yaml::to_string(&dir.display().to_string())?;
        set.push(format!("run_dir={}", v.trim()));
    }
    stages::dist::install(Dist {
        rank,
        world,
        local_rank,
        source,
        main_run_dir,
        timeout,
        comm: Box::new(comm),
    })
    .map_err(anyhow::Error::msg)?;
    Ok(Some(RankRun { rank, world, set }))
}
