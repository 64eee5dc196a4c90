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
    if pipeline::storage::is_remote(&spec.run_dir) {
        bail!(
            "run_dir {} is on object storage: a data-parallel run needs its run directory on a filesystem every rank shares (a local run_dir; the stores it reads may be URLs)",
            spec.run_dir.display()
        );
    }
    if force {
        bail!("--force moves a run directory aside, which the other ranks are using: remove the run directory (or pick another run_dir) before a data-parallel run instead");
    }
    let timeout = std::time::Duration::from_secs_f64(ds.timeout_s);
    let mut set = Vec::new();
    let joined = if backend == "nccl" {
        if on_cpu {
            bail!(
                "distributed.backend nccl sums GPU tensors; this spec trains on the cpu (use mpi)"
            );
        }
        let j = start_nccl(&ds, launch, world, timeout)?;
        // Each rank trains on its machine's GPU number LOCAL_RANK.
        set.push(format!("device=cuda:{}", j.local_rank));
        j
    } else {
        if !on_cpu {
            bail!(
                "distributed.backend mpi trains CPU ranks; device `{}` is a GPU (nccl)",
                spec.device
            );
        }
        start_mpi(&ds, launch, world, timeout)?
    };
    agree(&spec, joined, world, timeout, set)
}

/// A rank that joined the others.
struct Joined {
    comm: Box<dyn stages::dist::Collective>,
    rank: usize,
    local_rank: usize,
    source: String,
}

/// Every rank: the same resolved spec, the same checkpoint to resume from; then this process
/// becomes its rank (rank r > 0 in `RUN_DIR/rank-r`).
fn agree(
    spec: &pipeline::Spec,
    j: Joined,
    world: usize,
    timeout: std::time::Duration,
    mut set: Vec<String>,
) -> Result<Option<RankRun>> {
    use stages::dist::Dist;
    let rank = j.rank;
    let hash = stages::dist::spec_hash(&spec.resolved);
    let ckpt = match stages::train::find_checkpoint(&spec.run_dir) {
        Ok(Some(f)) => f.meta.step + 1,
        _ => 0,
    };
    let mut mine = hash.to_vec();
    mine.push(ckpt);
    let table = j
        .comm
        .exchange("the start of the run (the spec check)", &mine)
        .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
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
    if rank > 0 {
        let dir = Dist::rank_run_dir(&main_run_dir, rank);
        let v = serde_yaml::to_string(&dir.display().to_string())?;
        set.push(format!("run_dir={}", v.trim()));
    }
    stages::dist::install(Dist {
        rank,
        world,
        local_rank: j.local_rank,
        source: j.source,
        main_run_dir,
        timeout,
        comm: j.comm,
    })
    .map_err(anyhow::Error::msg)?;
    Ok(Some(RankRun { rank, world, set }))
}

#[cfg(not(feature = "nccl"))]
fn start_nccl(
    _ds: &stages::dist::DistSpec,
    _launch: Option<stages::dist::Launch>,
    world: usize,
    _timeout: std::time::Duration,
) -> Result<Joined> {
    bail!(
        "{world} GPU ranks need the nccl backend, which this ehmam was built without: build it with scripts/cuda-toolchain.sh and `cargo build --release --features nccl` (see the README's \"Scaling out\")"
    )
}

#[cfg(feature = "nccl")]
fn start_nccl(
    ds: &stages::dist::DistSpec,
    launch: Option<stages::dist::Launch>,
    world: usize,
    timeout: std::time::Duration,
) -> Result<Joined> {
    let rank = ds.rank.or(launch.as_ref().map(|l| l.rank)).ok_or_else(|| {
        anyhow::anyhow!(
            "no rank: start the ranks with torchrun or srun, or set distributed.rank per rank"
        )
    })?;
    let local_rank = ds
        .local_rank
        .or(launch.as_ref().map(|l| l.local_rank))
        .unwrap_or(0);
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(host), Some(port)) = (var("MASTER_ADDR"), var("MASTER_PORT")) else {
        bail!("the nccl backend meets at MASTER_ADDR:MASTER_PORT (torchrun sets them; under srun, export them in the batch script: the first node's name and a free port)");
    };
    let device = stages::train::device(&format!("cuda:{local_rank}"))?;
    let comm = stages::dist::nccl::NcclComm::init(
        &device,
        rank,
        world,
        &format!("{host}:{port}"),
        timeout,
    )
    .map_err(|e| anyhow::anyhow!("rank {rank}: {e}"))?;
    Ok(Joined {
        comm: Box::new(comm),
        rank,
        local_rank,
        source: launch.map_or("the spec".to_string(), |l| l.source.to_string()),
    })
}

#[cfg(not(feature = "mpi"))]
fn start_mpi(
    _ds: &stages::dist::DistSpec,
    launch: Option<stages::dist::Launch>,
    world: usize,
    _timeout: std::time::Duration,
) -> Result<Joined> {
    let by = launch.map_or("the spec (distributed.world_size)", |l| l.source);
    bail!(
        "{by} asks for {world} ranks, but this ehmam was built without MPI: build it with `cargo build --release --features mpi` (scripts/install-mpi.sh installs Open MPI) and start it with mpirun -np {world}"
    )
}

#[cfg(feature = "mpi")]
fn start_mpi(
    ds: &stages::dist::DistSpec,
    launch: Option<stages::dist::Launch>,
    world: usize,
    timeout: std::time::Duration,
) -> Result<Joined> {
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
    Ok(Joined {
        comm: Box::new(comm),
        rank,
        local_rank,
        source,
    })
}
