//! Data-parallel collectives across GPUs through NCCL (`Collective` for `Cuda`): gradients are summed in place on
//! the devices, on a communication stream of each rank: a step hands each layer's gradients over as soon as the last
//! micro-batch's backward has finished them (`all_reduce_bucket`, which makes the communication stream wait for the
//! compute stream's work so far), so the sums of later layers run while earlier layers' backward computes, and
//! `finish_buckets` makes the compute stream wait for the sums before clipping. NCCL's all-reduce gives every rank
//! the same bits. The host values of a step (losses, token counts, the stop flag) go
//! through the ranks' in-process `Threads` group instead: a rank that fails drops its handle, the others' next host
//! exchange fails, and dropping their communicators aborts NCCL's pending work, so no rank waits forever on a dead
//! one. (Ranks on several hosts would need NCCL there too; not yet.)
//!
//! libnccl is loaded at run time (cudarc's dynamic loading, nothing linked at build time) under the names
//! `libnccl.so` and `libnccl.so.<CUDA major>`; the `nvidia-nccl-cu13` wheel ships `libnccl.so.2` only, so link it as
//! `libnccl.so` in a folder on `LD_LIBRARY_PATH` (`scripts/gpu/nccl_path.sh` does) — `Nccl::id` says so when it is
//! missing.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{device_err, Cuda};
use crate::backend::collective::Collective;
use crate::error::{DeviceFailure, Error, Result};

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    /// The backend's stream (compute) and the communicator's (a fork of it).
    compute: Arc<CudaStream>,
    stream: Arc<CudaStream>,
    host: Box<dyn Collective<Cuda>>,
}

// SAFETY: a communicator is used by the one rank (thread) that owns it; NCCL allows a communicator to be used from
// any thread as long as its calls are not concurrent, and `Collective` ops of one rank run one at a time.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

/// The group's identity: made once (by rank 0, or by the launcher) and given to every rank.
#[derive(Clone, Copy)]
pub struct GroupId(Id);

impl GroupId {
    /// Its 128 bytes, to send to ranks in other processes.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }
    pub fn from_bytes(bytes: [u8; 128]) -> GroupId {
        GroupId(Id::uninit(bytes.map(|b| b as core::ffi::c_char)))
    }
}

impl Nccl {
    /// A new group identity; fails with an explanation when libnccl cannot be loaded.
    pub fn id() -> Result<GroupId> {
        // SAFETY: only tries to dlopen the library names cudarc would use.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::device(
                DeviceFailure::Unavailable,
                "NCCL: cannot load libnccl.so",
                "install NCCL (the nvidia-nccl-cu13 wheel has it as libnccl.so.2: put a libnccl.so link to it in a \
                 folder on LD_LIBRARY_PATH), or train on one GPU",
            ));
        }
        Id::new().map(GroupId).map_err(|e| device_err("NCCL: making a group id", format!("{e:?}")))
    }

    /// Joins `host`'s rank of its group on `be`'s GPU (`host`: the ranks' group for host values — `Threads` in one
    /// process, `Tcp` across processes). Every rank first meets the others on the host (a rank that failed before
    /// makes this an error rather than a wait), then joins NCCL, which waits for all of them.
    pub fn join(be: &Cuda, host: Box<dyn Collective<Cuda>>, id: GroupId) -> Result<Nccl> {
        let (rank, world) = (host.rank(), host.world());
        host.all_reduce_host(&mut [])?;
        let stream = be.stream.fork().map_err(|e| device_err("NCCL: making a communication stream", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id.0)
            .map_err(|e| device_err(&format!("NCCL: joining rank {rank} of {world}"), format!("{e:?}")))?;
        Ok(Nccl { comm, compute: be.stream.clone(), stream, host })
    }
}

impl Collective<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce(&self, be: &Cuda, bufs: &mut [&mut <Cuda as crate::backend::Backend>::Buf]) -> Result<()> {
        self.all_reduce_bucket(be, bufs)?;
        self.finish_buckets(be)
    }
    fn overlaps_buckets(&self) -> bool {
        true
    }
    fn all_reduce_bucket(&self, _: &Cuda, bufs: &mut [&mut <Cuda as crate::backend::Backend>::Buf]) -> Result<()> {
        // The buffers' producers, queued on the compute stream so far, come first.
        let ready = self.compute.record_event(None).map_err(|e| device_err("NCCL: ordering a bucket", e))?;
        self.stream.wait(&ready).map_err(|e| device_err("NCCL: ordering a bucket", e))?;
        for buf in bufs.iter_mut() {
            self.comm
                .all_reduce_in_place(*buf, &ReduceOp::Sum)
                .map_err(|e| device_err("NCCL: all-reduce", format!("{e:?}")))?;
        }
        Ok(())
    }
    fn finish_buckets(&self, _: &Cuda) -> Result<()> {
        let summed = self.stream.record_event(None).map_err(|e| device_err("NCCL: waiting for the sums", e))?;
        self.compute.wait(&summed).map_err(|e| device_err("NCCL: waiting for the sums", e))
    }
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_host(values)
    }
    fn finish(&self) {
        self.host.finish();
    }
}
