//! The `nccl` backend: GPU ranks (`cuda:LOCAL_RANK`) whose gradients are summed by NCCL
//! (cudarc's bindings through candle's `nccl` feature) on candle's own CUDA stream.
//!
//! Rendezvous as torchrun's: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank
//! connects (retrying until the deadline, rank 0 may start later) and receives the NCCL unique id
//! over that connection; the same connections carry the small per-update exchanges (the header of
//! [`Collective::exchange`]: update number, masked frames, data position), with a deadline that
//! names a missing rank, as torch's TCP store carries its control messages. A rank that dies
//! closes its connection, which the others see at once.
//!
//! Not run here (no GPU on the build machines; the two-GPU command is in the README).

use super::{name_ranks, Collective};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// NCCL's communicator; every use goes through [`NcclComm`]'s lock (NCCL calls on one
/// communicator must not overlap).
struct SharedComm(Comm);
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

enum Control {
    /// Rank 0: the connection of rank r at index r − 1.
    Root(Vec<TcpStream>),
    Peer(TcpStream),
}

pub struct NcclComm {
    comm: Mutex<SharedComm>,
    control: Mutex<(Control, u64)>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn write_words(s: &mut TcpStream, w: &[u64]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(8 * (w.len() + 1));
    b.extend_from_slice(&(w.len() as u64).to_le_bytes());
    for x in w {
        b.extend_from_slice(&x.to_le_bytes());
    }
    s.write_all(&b)
}

/// Reads one message of words before `deadline`; `Ok(None)` when the deadline passed first.
fn read_words(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Option<Vec<u64>>> {
    let mut read_exact = |buf: &mut [u8]| -> std::io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            s.set_read_timeout(Some(left))?;
            match s.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the connection closed (the process ended)",
                    ))
                }
                Ok(n) => got += n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    };
    let mut n = [0u8; 8];
    if !read_exact(&mut n)? {
        return Ok(None);
    }
    let n = u64::from_le_bytes(n) as usize;
    if n > 1 << 24 {
        return Err(std::io::Error::other(format!(
            "a control message of {n} words: not an ehmam rank"
        )));
    }
    let mut b = vec![0u8; 8 * n];
    if !read_exact(&mut b)? {
        return Ok(None);
    }
    Ok(Some(
        b.chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    ))
}

impl NcclComm {
    /// Rendezvous at `addr` (`MASTER_ADDR:MASTER_PORT`) and the NCCL communicator on `device`'s
    /// stream.
    pub fn init(
        device: &candle_core::Device,
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<NcclComm, String> {
        let deadline = Instant::now() + timeout;
        let secs = timeout.as_secs_f64();
        let stream = device
            .as_cuda_device()
            .map_err(|e| format!("the nccl backend needs a cuda:N device: {e}"))?
            .cuda_stream();
        let (control, id) = if rank == 0 {
            let port = addr.rsplit(':').next().unwrap_or("");
            let listener = TcpListener::bind(format!("0.0.0.0:{port}"))
                .map_err(io_err(&format!("rank 0 cannot listen on port {port} (MASTER_PORT)")))?;
            listener.set_nonblocking(true).map_err(io_err("listen"))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(io_err("accept"))?;
                        let hello = read_words(&mut s, deadline)
                            .map_err(io_err("a rank's hello"))?
                            .ok_or("a rank connected but did not say which it is")?;
                        let r = hello.first().copied().unwrap_or(0) as usize;
                        if r == 0 || r >= world || peers[r - 1].is_some() {
                            return Err(format!(
                                "a process connected to {addr} as rank {r} of {world}: two runs on one MASTER_PORT?"
                            ));
                        }
                        peers[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<usize> = (1..world)
                                .filter(|r| peers[r - 1].is_none())
                                .collect();
                            return Err(format!(
                                "{} did not connect to {addr} within {secs} s",
                                name_ranks(&missing)
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("accepting ranks at {addr}: {e}")),
                }
            }
            let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
            let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
            let words: Vec<u64> = id.internal().iter().map(|&c| c as u8 as u64).collect();
            for s in &mut peers {
                write_words(s, &words).map_err(io_err("sending the NCCL id"))?;
            }
            (Control::Root(peers), id)
        } else {
            let target = addr
                .to_socket_addrs()
                .map_err(io_err(&format!("MASTER_ADDR:MASTER_PORT {addr}")))?
                .next()
                .ok_or_else(|| format!("{addr} resolves to no address"))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() >= deadline {
                            return Err(format!(
                                "rank 0 did not answer at {addr} within {secs} s: {e}"
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            };
            s.set_nodelay(true).map_err(io_err("connect"))?;
            write_words(&mut s, &[rank as u64]).map_err(io_err("hello to rank 0"))?;
            let words = read_words(&mut s, deadline)
                .map_err(io_err("the NCCL id from rank 0"))?
                .ok_or_else(|| format!("rank 0 sent no NCCL id within {secs} s"))?;
            if words.len() != 128 {
                return Err(format!("rank 0 sent an id of {} bytes, not 128", words.len()));
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, w) in internal.iter_mut().zip(&words) {
                *d = *w as u8 as std::ffi::c_char;
            }
            (Control::Peer(s), Id::uninit(internal))
        };
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        Ok(NcclComm {
            comm: Mutex::new(SharedComm(comm)),
            control: Mutex::new((control, 0)),
            rank,
            world,
            timeout,
        })
    }
}

impl Collective for NcclComm {
    fn exchange(&self, what: &str, mine: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        let mut g = self.control.lock().unwrap_or_else(|e| e.into_inner());
        g.1 += 1;
        let seq = g.1;
        let deadline = Instant::now() + self.timeout;
        let secs = self.timeout.as_secs_f64();
        let n = mine.len();
        let mut msg = vec![seq];
        msg.extend_from_slice(mine);
        match &mut g.0 {
            Control::Root(peers) => {
                let mut table = vec![mine.to_vec()];
                let mut missing = Vec::new();
                for (i, s) in peers.iter_mut().enumerate() {
                    let r = i + 1;
                    if !missing.is_empty() {
                        // Past the deadline: who else has not come.
                        match read_words(s, Instant::now() + Duration::from_millis(10)) {
                            Ok(Some(_)) => continue,
                            _ => {
                                missing.push(r);
                                continue;
                            }
                        }
                    }
                    match read_words(s, deadline) {
                        Ok(Some(v)) if v.len() == n + 1 && v[0] == seq => table.push(v[1..].to_vec()),
                        Ok(Some(v)) => return Err(format!(
                            "rank {r} is at another point of the run than {what} (exchange {} of {} words, expected {seq} of {n}): the ranks run different specs or binaries",
                            v.first().copied().unwrap_or(0),
                            v.len().saturating_sub(1)
                        )),
                        Ok(None) => missing.push(r),
                        Err(e) => return Err(format!("rank {r} is gone at {what} ({e}); stopping")),
                    }
                }
                if !missing.is_empty() {
                    return Err(format!(
                        "{} did not reach {what} within {secs} s (a rank that died, hangs, or is slower than distributed.timeout_s); stopping",
                        name_ranks(&missing)
                    ));
                }
                let flat: Vec<u64> = table.iter().flatten().copied().collect();
                for (i, s) in peers.iter_mut().enumerate() {
                    write_words(s, &flat)
                        .map_err(|e| format!("rank {} is gone at {what} ({e})", i + 1))?;
                }
                Ok(table)
            }
            Control::Peer(s) => {
                write_words(s, &msg).map_err(|e| format!("rank 0 is gone at {what} ({e})"))?;
                let flat = match read_words(s, deadline) {
                    Ok(Some(v)) => v,
                    Ok(None) => return Err(format!(
                        "no answer from rank 0 at {what} within {secs} s (rank 0 died, hangs, or waits for another rank); stopping"
                    )),
                    Err(e) => return Err(format!("rank 0 is gone at {what} ({e}); stopping")),
                };
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
        // NCCL runs on candle's stream; a rank that died makes it wait for ever: a timer stops
        // the process when the sum does not arrive in time.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (rank, world, timeout) = (self.rank, self.world, self.timeout);
        let what_s = what.to_string();
        let watch = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                let others: Vec<usize> = (0..world).filter(|&r| r != rank).collect();
                eprintln!(
                    "error: rank {rank}: {what_s}: the NCCL all-reduce with {} did not finish within {} s (a rank died or hangs); stopping",
                    name_ranks(&others),
                    timeout.as_secs_f64()
                );
                std::process::exit(1);
            }
        });
        let done = out.device().synchronize();
        let _ = tx.send(());
        let _ = watch.join();
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
