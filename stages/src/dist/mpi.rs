//! The `mpi` backend: CPU ranks over MPI (the `mpi` crate on the system's Open MPI or MPICH).
//!
//! Exchanges go through rank 0 point to point, polled with `MPI_Iprobe` against a deadline, so a
//! rank that does not come is named; the gradient sum is one `MPI_Allreduce` over a flat f32
//! buffer, watched by a timer that stops the process (with a message) when it does not finish in
//! time. MPI calls are serialised by a lock (the student's thread makes them; the main thread
//! only before and after the run).

use super::{name_ranks, poll_until, Collective};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Inner {
    // Dropping the universe calls MPI_Finalize: `finish` takes it out.
    universe: Option<Universe>,
    world: SimpleCommunicator,
    seq: u64,
}

pub struct MpiComm {
    inner: Mutex<Inner>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// MPI handles are plain integers/pointers into the library; every call goes through the mutex
// (MPI is initialised with at least MPI_THREAD_SERIALIZED).
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI; returns this process's communicator of every rank.
    pub fn init(timeout: Duration) -> Result<MpiComm, String> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or("MPI was initialised twice")?;
        if threading < mpi::Threading::Serialized {
            return Err(format!(
                "the MPI library offers thread support {threading:?}; ehmam needs MPI_THREAD_SERIALIZED"
            ));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiComm {
            inner: Mutex::new(Inner {
                universe: Some(universe),
                world,
                seq: 0,
            }),
            rank,
            world: size,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.world
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collective for MpiComm {
    fn exchange(&self, what: &str, mine: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        let mut g = self.lock();
        g.seq += 1;
        // Tags cycle below 32767 (the least MPI_TAG_UB the standard allows); the sequence number
        // travels in the message and is checked.
        let tag = (g.seq % 32000) as i32 + 1;
        let seq = g.seq;
        let world = &g.world;
        let deadline = Instant::now() + self.timeout;
        let secs = self.timeout.as_secs_f64();
        let n = mine.len();
        let mut msg = Vec::with_capacity(n + 1);
        msg.push(seq);
        msg.extend_from_slice(mine);
        if self.rank == 0 {
            let mut table: Vec<Option<Vec<u64>>> = vec![None; self.world];
            table[0] = Some(mine.to_vec());
            let mut missing: Vec<usize> = (1..self.world).collect();
            while !missing.is_empty() {
                let got = poll_until(deadline, || {
                    missing.iter().position(|&r| {
                        world
                            .process_at_rank(r as i32)
                            .immediate_probe_with_tag(tag)
                            .is_some()
                    })
                });
                let Some(i) = got else {
                    return Err(format!(
                        "{} did not reach {what} within {secs} s (a rank that died, hangs, or is slower than distributed.timeout_s); stopping",
                        name_ranks(&missing)
                    ));
                };
                let r = missing.remove(i);
                let (v, _) = world
                    .process_at_rank(r as i32)
                    .receive_vec_with_tag::<u64>(tag);
                if v.len() != n + 1 || v[0] != seq {
                    return Err(format!(
                        "rank {r} is at another point of the run than {what} (exchange {} of {} words, expected {seq} of {}): the ranks run different specs or binaries",
                        v.first().copied().unwrap_or(0),
                        v.len().saturating_sub(1),
                        n
                    ));
                }
                table[r] = Some(v[1..].to_vec());
            }
            let flat: Vec<u64> = table.iter().flatten().flatten().copied().collect();
            for r in 1..self.world {
                world
                    .process_at_rank(r as i32)
                    .send_with_tag(&flat[..], tag);
            }
            Ok(table.into_iter().flatten().collect())
        } else {
            let root = world.process_at_rank(0);
            root.send_with_tag(&msg[..], tag);
            let got = poll_until(deadline, || root.immediate_probe_with_tag(tag));
            if got.is_none() {
                return Err(format!(
                    "no answer from rank 0 at {what} within {secs} s (rank 0 died, hangs, or waits for another rank); stopping"
                ));
            }
            let (flat, _) = root.receive_vec_with_tag::<u64>(tag);
            if flat.len() != n * self.world {
                return Err(format!(
                    "rank 0 answered {what} with {} words, expected {}: the ranks run different specs or binaries",
                    flat.len(),
                    n * self.world
                ));
            }
            Ok(flat.chunks(n.max(1)).map(|c| c.to_vec()).collect())
        }
    }

    fn all_reduce_sum(&self, what: &str, buf: &mut [f32]) -> Result<(), String> {
        let g = self.lock();
        let send = buf.to_vec();
        // Every rank reached the exchange before it, so a rank that does not come died in between.
        super::watched(
            self.rank,
            self.world,
            self.timeout,
            &format!("{what}: the gradient all-reduce"),
            || {
                g.world
                    .all_reduce_into(&send[..], buf, SystemOperation::sum())
            },
        );
        Ok(())
    }

    fn finish(&self) {
        let u = self.lock().universe.take();
        drop(u);
    }
}
