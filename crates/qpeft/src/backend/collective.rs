//! Collective operations of a data-parallel group: every rank holds a replica of the adapters, trains on its share of
//! each global batch, and the ranks sum their gradients (`all_reduce`) before the identical optimizer step on every
//! rank keeps the replicas equal.
//!
//! Implementations: `Solo` (one rank: every op is the identity), `Threads` (ranks are threads of one process, any
//! backend: buffers meet on the host; what CI tests data-parallel training with) and, with the `cuda` feature,
//! NCCL across GPUs (`cuda::nccl`).
//!
//! Every rank must call the same collective ops in the same order. A rank whose `Threads` handle is dropped before
//! the group finishes (its thread failed) makes the ops of the others fail instead of waiting for it forever.

use std::sync::{Arc, Condvar, Mutex};

use super::Backend;
use crate::error::{Error, Result};

pub trait Collective<B: Backend>: Send + Sync {
    /// This rank, 0-based; rank 0 writes the run's files.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// buf ← Σ over ranks of buf, the same bits on every rank.
    fn all_reduce(&self, be: &B, buf: &mut B::Buf) -> Result<()>;
    /// values ← Σ over ranks of values, on the host (losses, token counts, flags), the same on every rank.
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()>;

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
    fn all_reduce(&self, _: &B, _: &mut B::Buf) -> Result<()> {
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
    finished: bool,
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
        (0..world).map(|rank| Threads { rank, shared: shared.clone(), finished: false }).collect()
    }

    /// Marks this rank's work as done: dropping the handle no longer fails the others' ops.
    pub fn finish(mut self) {
        self.finished = true;
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
        if !self.finished {
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
    fn world(&self) -> usize {
        self.shared.world
    }
    /// Through the host: f32 values summed in f64 and rounded once, so a sum of two ranks is the correctly rounded
    /// one.
    fn all_reduce(&self, be: &B, buf: &mut B::Buf) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let values = be.download(buf)?.into_iter().map(f64::from).collect();
        let sum = self.exchange(values)?;
        *buf = be.upload(&sum.iter().map(|&v| v as f32).collect::<Vec<f32>>())?;
        Ok(())
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
                            let mut buf = vec![r + round as f32, 1.0, 0.1 * r];
                            comm.all_reduce(be, &mut buf).unwrap();
                            let mut host = [r as f64 * 0.5, round as f64];
                            Collective::<Cpu>::all_reduce_host(&comm, &mut host).unwrap();
                            let any = Collective::<Cpu>::any(&comm, comm.rank == 2 && round == 49).unwrap();
                            out = (buf, host.to_vec(), any);
                        }
                        comm.finish();
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
