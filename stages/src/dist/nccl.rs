//! The `nccl` backend: GPU ranks (`cuda:LOCAL_RANK`) whose gradients are summed by NCCL
//! (cudarc's bindings through candle's `nccl` feature) on candle's own CUDA stream.
//!
//! Rendezvous as torchrun's ([`TcpControl`], at `MASTER_ADDR:MASTER_PORT`): rank 0 sends the
//! NCCL unique id over it, and it carries the small per-update exchanges (the header of
//! [`Collective::exchange`]: update number, masked frames, data position) with a deadline that
//! names a missing rank.
//!
//! Not run here (no GPU on the build machines; the two-GPU command is in the README).

use super::tcp::TcpControl;
use super::Collective;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Mutex;
use std::time::Duration;

/// NCCL's communicator; every use goes through [`NcclComm`]'s lock (NCCL calls on one
/// communicator must not overlap).
struct SharedComm(Comm);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

pub struct NcclComm {
    comm: Mutex<SharedComm>,
    control: Mutex<TcpControl>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl NcclComm {
    /// Rendezvous at `addr` (`MASTER_ADDR:MASTER_PORT`, see [`TcpControl`]) and the NCCL
    /// communicator on `device`'s stream.
    pub fn init(
        device: &candle_core::Device,
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<NcclComm, String> {
        let stream = device
            .as_cuda_device()
            .map_err(|e| format!("the nccl backend needs a cuda:N device: {e}"))?
            .cuda_stream();
        let mut control = TcpControl::connect(rank, world, addr, timeout)?;
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
            let words: Vec<u64> = id.internal().iter().map(|&c| c as u8 as u64).collect();
            control.broadcast(Some(&words))?;
            id
        } else {
            let words = control.broadcast(None)?;
            if words.len() != 128 {
                return Err(format!(
                    "rank 0 sent an id of {} bytes, not 128",
                    words.len()
                ));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, w) in internal.iter_mut().zip(&words) {
                *d = *w as u8 as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        Ok(NcclComm {
            comm: Mutex::new(SharedComm(comm)),
            control: Mutex::new(control),
            rank,
            world,
            timeout,
        })
    }
}

impl Collective for NcclComm {
    fn exchange(&self, what: &str, mine: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exchange(what, mine)
    }

    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<(), String> {
        let _ = (what, buf);
        Err("internal: the nccl backend sums device tensors (all_reduce_device)".into())
    }

    fn all_reduce_device(&self, what: &str, t: &Tensor) -> Option<Result<Tensor, String>> {
        Some(self.reduce(what, t))
    }

    fn finish(&self) {}
}

impl NcclComm {
    fn reduce(&self, what: &str, t: &Tensor) -> Result<Tensor, String> {
        let g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let out = t
            .apply_op1_no_bwd(&AllReduce(&g.0))
            .map_err(|e| format!("{what}: NCCL all-reduce: {e}"))?;
        // NCCL runs on candle's stream; a rank that died makes it wait for ever there.
        let done = super::watched(
            self.rank,
            self.world,
            self.timeout,
            &format!("{what}: the NCCL all-reduce"),
            || out.device().synchronize(),
        );
        done.map_err(|e| format!("{what}: {e}"))?;
        Ok(out)
    }
}

/// The sum over the ranks of a contiguous f32 CUDA tensor (a new tensor).
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the nccl backend sums CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl all-reduce: the tensor is not contiguous")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
            l.shape().clone(),
        ))
    }
}
