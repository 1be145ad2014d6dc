//! Collective operations of a data-parallel group: every rank holds a replica of the adapters, trains on its share of
//! each global batch, and the ranks sum their gradients (`all_reduce`) before the identical optimizer step on every
//! rank keeps the replicas equal.
//!
//! Implementations: `Solo` (one rank: every op is the identity), `Threads` (ranks are threads of one process, any
//! backend: buffers meet on the host; what CI tests data-parallel training with), `Tcp` (ranks are processes, on one
//! host or several, launched torchrun-style: rank 0 listens on MASTER_ADDR:MASTER_PORT and sums in rank order) and,
//! with the `cuda` feature, NCCL across GPUs (`cuda::nccl`).
//!
//! Every rank must call the same collective ops in the same order. A rank whose `Threads` handle is dropped before
//! the group finishes (its thread failed) makes the ops of the others fail instead of waiting for it forever.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Backend;
use crate::error::{Error, Result};

pub trait Collective<B: Backend>: Send + Sync {
    /// This rank, 0-based; rank 0 writes the run's files.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Every buffer ← its Σ over ranks, the same bits on every rank. By default through the host in one exchange (the
    /// buffers' f32 values summed in f64 by `all_reduce_host`, then rounded once: a sum of two ranks is the correctly
    /// rounded one); NCCL sums on the devices.
    fn all_reduce(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut values = Vec::new();
        for b in bufs.iter() {
            values.extend(be.download(b)?.into_iter().map(f64::from));
        }
        self.all_reduce_host(&mut values)?;
        let mut rest = &values[..];
        for b in bufs.iter_mut() {
            let (mine, after) = rest.split_at(be.len(b));
            **b = be.upload(&mine.iter().map(|&v| v as f32).collect::<Vec<f32>>())?;
            rest = after;
        }
        Ok(())
    }
    /// values ← Σ over ranks of values, on the host (losses, token counts, flags), the same on every rank.
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()>;

    /// Whether this group sums gradients while the backward goes on: then a step hands each layer's gradients over as
    /// soon as the last micro-batch's backward has finished them (`all_reduce_bucket`) and waits for the sums with
    /// `finish_buckets` before clipping; otherwise it sums them all at once after the backward (`all_reduce`; the host
    /// groups, which would only add exchanges).
    fn overlaps_buckets(&self) -> bool {
        false
    }
    /// Starts summing one bucket of buffers (as `all_reduce`); the sums are in place once `finish_buckets` returns.
    fn all_reduce_bucket(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        self.all_reduce(be, bufs)
    }
    fn finish_buckets(&self, _be: &B) -> Result<()> {
        Ok(())
    }

    /// This rank's work is done: its handle going away later is no failure of the group.
    fn finish(&self) {}

    /// Whether `flag` holds on any rank (every rank gets the same answer).
    fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [flag as u8 as f64];
        self.all_reduce_host(&mut v)?;
        Ok(v[0] > 0.0)
    }
}

/// A group of one: nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce(&self, _: &B, _: &mut [&mut B::Buf]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_host(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// One rank of a group of threads in this process (`Threads::group`).
pub struct Threads {
    rank: usize,
    shared: Arc<Shared>,
    /// Set by `finish`: dropping the handle afterwards is no failure.
    finished: std::sync::atomic::AtomicBool,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// One exchange: each rank deposits its values; the last to arrive sums them in rank order (the same bits for every
/// rank, whatever the arrival order), and each rank takes the sum; the round is over when all have taken it.
#[derive(Default)]
struct Round {
    deposits: Vec<Option<Vec<f64>>>,
    sum: Option<Arc<Vec<f64>>>,
    taken: usize,
    /// A rank whose handle was dropped before `finish`.
    failed: Option<usize>,
}

impl Threads {
    /// The `world` ranks of one group, rank i at index i: give each to its own thread.
    pub fn group(world: usize) -> Vec<Threads> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Round { deposits: vec![None; world], ..Round::default() }),
            changed: Condvar::new(),
        });
        (0..world).map(|rank| Threads { rank, shared: shared.clone(), finished: Default::default() }).collect()
    }

    fn failure(rank: usize) -> Error {
        Error::Invalid(format!("data-parallel rank {rank} stopped (its own error says why)"))
    }

    /// Σ over ranks of `values` (summed in f64, rank 0 first).
    fn exchange(&self, values: Vec<f64>) -> Result<Arc<Vec<f64>>> {
        let s = &*self.shared;
        let mut round = s.state.lock().map_err(|_| Self::failure(usize::MAX))?;
        // The previous round's sum is still being taken.
        while round.sum.is_some() || round.deposits[self.rank].is_some() {
            if let Some(r) = round.failed {
                return Err(Self::failure(r));
            }
            round = s.changed.wait(round).map_err(|_| Self::failure(usize::MAX))?;
        }
        round.deposits[self.rank] = Some(values);
        if round.deposits.iter().all(Option::is_some) {
            let parts: Vec<Vec<f64>> = round.deposits.iter_mut().map(|d| d.take().expect("all deposited")).collect();
            if parts.iter().any(|p| p.len() != parts[0].len()) {
                round.failed = Some(self.rank);
                s.changed.notify_all();
                let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
                return Err(Error::Invalid(format!("all-reduce: the ranks gave {lens:?} values")));
            }
            let mut sum = parts[0].clone();
            for p in &parts[1..] {
                sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            round.sum = Some(Arc::new(sum));
            round.taken = 0;
            s.changed.notify_all();
        }
        loop {
            if let Some(sum) = round.sum.clone() {
                round.taken += 1;
                if round.taken == s.world {
                    round.sum = None;
                    s.changed.notify_all();
                }
                return Ok(sum);
            }
            if let Some(r) = round.failed {
                return Err(Self::failure(r));
            }
            round = s.changed.wait(round).map_err(|_| Self::failure(usize::MAX))?;
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if !self.finished.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(mut round) = self.shared.state.lock() {
                round.failed.get_or_insert(self.rank);
            }
            self.shared.changed.notify_all();
        }
    }
}

impl<B: Backend> Collective<B> for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn finish(&self) {
        self.finished.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    /// With no values: a barrier.
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let sum = self.exchange(values.to_vec())?;
        values.copy_from_slice(&sum);
        Ok(())
    }
}

/// One rank of a group of processes (torchrun-style launch: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Rank 0
/// accepts one connection per other rank; an exchange sends each rank's values to rank 0, which sums them in rank
/// order (rank 0 first, in f64: the same bits as `Threads`) and sends the sum back. A closed connection is an error
/// naming the rank, never a wait.
pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.., in order; another rank: its stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

/// How long a rank waits for the group to form.
const RENDEZVOUS: Duration = Duration::from_secs(300);

impl Tcp {
    /// Joins rank `rank` of `world` at `addr` (MASTER_ADDR:MASTER_PORT): rank 0 listens there until every other rank
    /// has connected; the others retry until rank 0 listens (up to five minutes).
    pub fn join(rank: usize, world: usize, addr: &str) -> Result<Tcp> {
        let io = |what: String| move |e: std::io::Error| Error::Invalid(format!("rendezvous at {addr}: {what}: {e}"));
        if rank >= world {
            return Err(Error::Invalid(format!("RANK {rank} is not below WORLD_SIZE {world}")));
        }
        let mut peers = Vec::new();
        if rank == 0 {
            let listener = TcpListener::bind(addr).map_err(io("listening".into()))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                let (mut stream, _) = listener.accept().map_err(io("accepting a rank".into()))?;
                stream.set_nodelay(true).map_err(io("configuring a connection".into()))?;
                let r = read_u64(&mut stream).map_err(io("reading a rank's number".into()))? as usize;
                match slots.get_mut(r.wrapping_sub(1)) {
                    Some(slot @ None) => *slot = Some(stream),
                    _ => {
                        return Err(Error::Invalid(format!(
                            "rendezvous at {addr}: rank {r} connected twice or is not below {world}"
                        )))
                    }
                }
            }
            peers = slots.into_iter().map(|s| s.expect("all connected")).collect();
        } else {
            let start = Instant::now();
            let mut stream = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < RENDEZVOUS => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(io("connecting to rank 0".into())(e)),
                }
            };
            stream.set_nodelay(true).map_err(io("configuring the connection".into()))?;
            write_u64(&mut stream, rank as u64).map_err(io("sending this rank's number".into()))?;
            peers.push(stream);
        }
        Ok(Tcp { rank, world, peers: Mutex::new(peers) })
    }

    /// Σ over ranks of `values` (f64, rank 0 first).
    fn exchange(&self, values: &mut [f64]) -> Result<()> {
        let mut peers = self.peers.lock().map_err(|_| Error::Invalid("a rank's connections are poisoned".into()))?;
        let lost = |r: usize| move |e: std::io::Error| Error::Invalid(format!("data-parallel rank {r} stopped ({e})"));
        if self.rank == 0 {
            let mut parts = Vec::with_capacity(peers.len());
            for (i, p) in peers.iter_mut().enumerate() {
                parts.push(read_f64s(p, values.len()).map_err(lost(i + 1))?);
            }
            for part in &parts {
                values.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            for (i, p) in peers.iter_mut().enumerate() {
                write_f64s(p, values).map_err(lost(i + 1))?;
            }
        } else {
            write_f64s(&mut peers[0], values).map_err(lost(0))?;
            let sum = read_f64s(&mut peers[0], values.len()).map_err(lost(0))?;
            values.copy_from_slice(&sum);
        }
        Ok(())
    }

    /// Rank 0's `bytes` on every rank (the NCCL group id).
    pub fn broadcast(&self, bytes: &mut [u8]) -> Result<()> {
        let mut peers = self.peers.lock().map_err(|_| Error::Invalid("a rank's connections are poisoned".into()))?;
        let lost = |r: usize| move |e: std::io::Error| Error::Invalid(format!("data-parallel rank {r} stopped ({e})"));
        if self.rank == 0 {
            for (i, p) in peers.iter_mut().enumerate() {
                p.write_all(bytes).map_err(lost(i + 1))?;
            }
        } else {
            peers[0].read_exact(bytes).map_err(lost(0))?;
        }
        Ok(())
    }
}

fn write_u64(s: &mut TcpStream, v: u64) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A length-prefixed f64 vector.
fn write_f64s(s: &mut TcpStream, v: &[f64]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8 + 8 * v.len());
    buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
    v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
    s.write_all(&buf)
}

/// A vector of `len` values from `write_f64s`; another length means the ranks disagree.
fn read_f64s(s: &mut TcpStream, len: usize) -> std::io::Result<Vec<f64>> {
    let n = read_u64(s)? as usize;
    if n != len {
        return Err(std::io::Error::other(format!("it sent {n} values where this rank has {len}")));
    }
    let mut buf = vec![0u8; 8 * n];
    s.read_exact(&mut buf)?;
    Ok(buf.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

impl<B: Backend> Collective<B> for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.exchange(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn threads_sum_in_rank_order_and_agree() {
        let be = Cpu::new();
        let ranks = Threads::group(3);
        let results: Vec<(Vec<f32>, Vec<f64>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|comm| {
                    let be = &be;
                    s.spawn(move || {
                        let r = comm.rank as f32;
                        let mut out = (Vec::new(), Vec::new(), false);
                        // Several rounds back to back: a fast rank must not take a slow one's round.
                        for round in 0..50 {
                            let (mut buf, mut two) = (vec![r + round as f32, 1.0, 0.1 * r], vec![r]);
                            comm.all_reduce(be, &mut [&mut buf, &mut two]).unwrap();
                            assert_eq!(two, vec![3.0]);
                            let mut host = [r as f64 * 0.5, round as f64];
                            Collective::<Cpu>::all_reduce_host(&comm, &mut host).unwrap();
                            let any = Collective::<Cpu>::any(&comm, comm.rank == 2 && round == 49).unwrap();
                            out = (buf, host.to_vec(), any);
                        }
                        Collective::<Cpu>::finish(&comm);
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // By hand: ranks 0, 1, 2 at round 49.
        let want_buf = vec![49.0 + 50.0 + 51.0, 3.0, (0.0f64 + 0.1f32 as f64 + 0.2f32 as f64) as f32];
        for (buf, host, any) in &results {
            assert_eq!(buf, &want_buf);
            assert_eq!(host, &vec![1.5, 147.0]);
            assert!(any);
        }
    }

    #[test]
    fn a_rank_that_stops_fails_the_others_instead_of_hanging() {
        let ranks = Threads::group(2);
        let err = std::thread::scope(|s| {
            let mut it = ranks.into_iter();
            let (a, b) = (it.next().unwrap(), it.next().unwrap());
            let waiting = s.spawn(move || Collective::<Cpu>::all_reduce_host(&a, &mut [1.0]));
            s.spawn(move || drop(b));
            waiting.join().unwrap()
        });
        assert!(err.unwrap_err().to_string().contains("rank 1 stopped"));
    }

    #[test]
    fn tcp_ranks_sum_as_threads_do_and_a_lost_rank_is_an_error() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let be = Cpu::new();
        let out: Vec<(Vec<f32>, Vec<f64>, [u8; 4])> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .rev() // the listener may come last
                .map(|rank| {
                    let (addr, be) = (addr.clone(), &be);
                    s.spawn(move || {
                        let t = Tcp::join(rank, 3, &addr).unwrap();
                        let mut id = if rank == 0 { [1, 2, 3, 4] } else { [0; 4] };
                        t.broadcast(&mut id).unwrap();
                        let r = rank as f32;
                        let mut buf = vec![r, 1.0, 0.1 * r];
                        Collective::<Cpu>::all_reduce(&t, be, &mut [&mut buf]).unwrap();
                        let mut host = [r as f64 * 0.5, 2.0];
                        Collective::<Cpu>::all_reduce_host(&t, &mut host).unwrap();
                        (buf, host.to_vec(), id)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = vec![3.0, 3.0, (0.0f64 + 0.1f32 as f64 + 0.2f32 as f64) as f32];
        for (buf, host, id) in &out {
            assert_eq!((buf, host, id), (&want, &vec![1.5, 6.0], &[1, 2, 3, 4]));
        }
        // Rank 1 leaves: rank 0's next exchange fails, naming it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let err = std::thread::scope(|s| {
            let a = addr.clone();
            let zero = s.spawn(move || {
                let t = Tcp::join(0, 2, &a).unwrap();
                Collective::<Cpu>::all_reduce_host(&t, &mut [1.0])
            });
            s.spawn(move || drop(Tcp::join(1, 2, &addr).unwrap()));
            zero.join().unwrap()
        });
        assert!(err.unwrap_err().to_string().contains("rank 1 stopped"));
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let ranks = Threads::group(2);
        let errs: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|c| s.spawn(move || Collective::<Cpu>::all_reduce_host(&c, &mut vec![0.0; c.rank + 1]).is_err()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs, vec![true, true]);
    }
}
