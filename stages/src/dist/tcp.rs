//! The control connections of the `nccl` backend, as torchrun's rendezvous: rank 0 listens at
//! `MASTER_ADDR:MASTER_PORT`, every other rank connects (retrying until the deadline: rank 0 may
//! start later) and says its rank. Rank 0 then sends what all need (the NCCL unique id), and the
//! same connections carry the small per-update exchange ([`TcpControl::exchange`]) with a
//! deadline that names a missing rank, as torch's TCP store carries its control messages. A
//! rank that dies closes its connection, which rank 0 sees at once. Messages are length-prefixed
//! little-endian u64 words.

use super::name_ranks;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

enum Conns {
    /// Rank 0: the connection of rank r at index r − 1.
    Root(Vec<TcpStream>),
    Peer(TcpStream),
}

/// One rank's end of the control connections.
pub struct TcpControl {
    conns: Conns,
    seq: u64,
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

impl TcpControl {
    /// Rank `rank` of `world` meets the others at `addr` (`host:port`; rank 0 listens on the
    /// port on every interface) within `timeout`.
    pub fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<TcpControl, String> {
        let deadline = Instant::now() + timeout;
        let secs = timeout.as_secs_f64();
        let conns = if rank == 0 {
            let port = addr.rsplit(':').next().unwrap_or("");
            let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(io_err(
                &format!("rank 0 cannot listen on port {port} (MASTER_PORT)"),
            ))?;
            listener.set_nonblocking(true).map_err(io_err("listen"))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(io_err("accept"))?;
                        s.set_nodelay(true).map_err(io_err("accept"))?;
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
                            let missing: Vec<usize> =
                                (1..world).filter(|r| peers[r - 1].is_none()).collect();
                            return Err(format!(
                                "{} did not connect to {addr} within {secs} s",
                                name_ranks(&missing)
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(format!("accepting ranks at {addr}: {e}")),
                }
            }
            Conns::Root(peers.into_iter().flatten().collect())
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
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            s.set_nodelay(true).map_err(io_err("connect"))?;
            write_words(&mut s, &[rank as u64]).map_err(io_err("hello to rank 0"))?;
            Conns::Peer(s)
        };
        Ok(TcpControl {
            conns,
            seq: 0,
            world,
            timeout,
        })
    }

    /// Rank 0's `words` on every rank (the others pass `None`).
    pub fn broadcast(&mut self, words: Option<&[u64]>) -> Result<Vec<u64>, String> {
        let deadline = Instant::now() + self.timeout;
        match (&mut self.conns, words) {
            (Conns::Root(peers), Some(w)) => {
                for (i, s) in peers.iter_mut().enumerate() {
                    write_words(s, w).map_err(|e| format!("rank {} is gone ({e})", i + 1))?;
                }
                Ok(w.to_vec())
            }
            (Conns::Peer(s), None) => read_words(s, deadline)
                .map_err(|e| format!("rank 0 is gone ({e})"))?
                .ok_or_else(|| {
                    format!(
                        "rank 0 sent nothing within {} s",
                        self.timeout.as_secs_f64()
                    )
                }),
            _ => Err("internal: only rank 0 broadcasts".into()),
        }
    }

    /// Every rank's `mine` (all of one length), in rank order, through rank 0, with a deadline
    /// that names the ranks that did not come (`what` says where in the run).
    pub fn exchange(&mut self, what: &str, mine: &[u64]) -> Result<Vec<Vec<u64>>, String> {
        self.seq += 1;
        let seq = self.seq;
        let deadline = Instant::now() + self.timeout;
        let secs = self.timeout.as_secs_f64();
        let n = mine.len();
        let world = self.world;
        match &mut self.conns {
            Conns::Root(peers) => {
                let mut table = vec![mine.to_vec()];
                let mut missing = Vec::new();
                for (i, s) in peers.iter_mut().enumerate() {
                    let r = i + 1;
                    // Past the deadline, only who else has come is looked at.
                    let until = if missing.is_empty() {
                        deadline
                    } else {
                        Instant::now() + Duration::from_millis(10)
                    };
                    match read_words(s, until) {
                        Ok(Some(v)) if v.len() == n + 1 && v[0] == seq => {
                            table.push(v[1..].to_vec())
                        }
                        Ok(Some(v)) => {
                            return Err(format!(
                                "rank {r} is at another point of the run than {what} (exchange {} of {} words, expected {seq} of {n}): the ranks run different specs or binaries",
                                v.first().copied().unwrap_or(0),
                                v.len().saturating_sub(1)
                            ))
                        }
                        Ok(None) => missing.push(r),
                        Err(e) => {
                            return Err(format!("rank {r} is gone at {what} ({e}); stopping"))
                        }
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
            Conns::Peer(s) => {
                let mut msg = vec![seq];
                msg.extend_from_slice(mine);
                write_words(s, &msg).map_err(|e| format!("rank 0 is gone at {what} ({e})"))?;
                let flat = match read_words(s, deadline) {
                    Ok(Some(v)) => v,
                    Ok(None) => return Err(format!(
                        "no answer from rank 0 at {what} within {secs} s (rank 0 died, hangs, or waits for another rank); stopping"
                    )),
                    Err(e) => return Err(format!("rank 0 is gone at {what} ({e}); stopping")),
                };
                if flat.len() != n * world {
                    return Err(format!(
                        "rank 0 answered {what} with {} words, expected {}: the ranks run different specs or binaries",
                        flat.len(),
                        n * world
                    ));
                }
                Ok(flat.chunks(n.max(1)).map(|c| c.to_vec()).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Runs `f(rank, control)` on `world` threads that met at a fresh port.
    fn ranks<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(usize, TcpControl) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let addr = format!("127.0.0.1:{}", free_port());
        let f = std::sync::Arc::new(f);
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let (addr, f) = (addr.clone(), f.clone());
                std::thread::spawn(move || {
                    let c = TcpControl::connect(r, world, &addr, timeout).unwrap();
                    f(r, c)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn ranks_meet_broadcast_and_exchange_in_rank_order() {
        let out = ranks(3, Duration::from_secs(20), |r, mut c| {
            let id = c.broadcast((r == 0).then_some(&[7u64, 8, 9][..])).unwrap();
            let a = c.exchange("update 0", &[r as u64, 10 * r as u64]).unwrap();
            let b = c.exchange("update 1", &[100 + r as u64]).unwrap();
            (id, a, b)
        });
        for (id, a, b) in out {
            assert_eq!(id, vec![7, 8, 9]);
            assert_eq!(a, vec![vec![0, 0], vec![1, 10], vec![2, 20]]);
            assert_eq!(b, vec![vec![100], vec![101], vec![102]]);
        }
    }

    #[test]
    fn a_rank_that_does_not_come_is_named() {
        let out = ranks(3, Duration::from_millis(600), |r, mut c| {
            if r == 2 {
                // Stays connected but never reaches the exchange.
                std::thread::sleep(Duration::from_secs(2));
                return String::new();
            }
            let e = c.exchange("update 5", &[1]).unwrap_err();
            // Rank 0 keeps its connections open a while (an ended rank 0 is seen at once).
            std::thread::sleep(Duration::from_millis(1500));
            e
        });
        assert!(
            out[0].contains("rank 2 did not reach update 5 within 0.6 s"),
            "{}",
            out[0]
        );
        assert!(
            out[1].contains("no answer from rank 0 at update 5"),
            "{}",
            out[1]
        );
    }

    #[test]
    fn a_rank_that_ended_is_seen_at_once() {
        let t0 = Instant::now();
        let out = ranks(2, Duration::from_secs(30), |r, mut c| {
            if r == 1 {
                drop(c);
                return String::new();
            }
            c.exchange("update 3", &[1]).unwrap_err()
        });
        assert!(out[0].contains("rank 1 is gone at update 3"), "{}", out[0]);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn ranks_out_of_step_are_refused() {
        let out = ranks(2, Duration::from_secs(20), |r, mut c| {
            if r == 1 {
                // One exchange more than rank 0: its second message has the wrong number.
                let _ = c.exchange("update 0", &[1, 2]);
                return String::new();
            }
            c.exchange("update 0", &[1]).unwrap_err()
        });
        assert!(out[0].contains("another point of the run"), "{}", out[0]);
    }
}
