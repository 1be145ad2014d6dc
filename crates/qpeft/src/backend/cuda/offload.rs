//! Checkpointed activations in pinned host memory (`train.checkpointing = "offload"`), copied on a second stream so
//! that the copies overlap the blocks' compute.
//!
//! Forward: the value is snapshotted on the compute stream into a device staging buffer (as `save` would keep it:
//! bf16 in the 16-bit modes, f32 bits in the f32 mode), the copy stream waits for that and copies it to the host.
//! Backward: `prefetch` copies the next block's input back into a staging buffer on the copy stream while the
//! current block runs; `restore` makes the compute stream wait for it and widens it.
//!
//! Ordering is explicit (the context's per-buffer event tracking is off: it would record events around every kernel
//! launch): each staging buffer travels with the event of the copy that reads or fills it, and is freed on the compute
//! stream only after that stream has waited for the event. A pinned host buffer orders its own uses (cudarc records
//! an event on it with every copy), so the pool hands buffers out again safely.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};

use super::{device_err, Cuda, Saved};
use crate::backend::Precision;
use crate::error::Result;

/// The copy stream, the free pinned buffers, and the staging buffers of copies to the host that may still run.
pub struct Offload {
    stream: Arc<CudaStream>,
    pool: Arc<Mutex<Vec<PinnedHostSlice<u16>>>>,
    in_flight: Vec<(CudaSlice<u16>, CudaEvent)>,
}

/// An offloaded activation: `units` 16-bit words in host memory (two per value when `wide`, f32 bits), and once
/// prefetched its staging buffer on the device with the event of the copy that fills it.
pub struct HostCopy {
    host: Option<PinnedHostSlice<u16>>,
    units: usize,
    wide: bool,
    staged: Mutex<Option<(CudaSlice<u16>, CudaEvent)>>,
    compute: Arc<CudaStream>,
    pool: Arc<Mutex<Vec<PinnedHostSlice<u16>>>>,
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // A prefetch that was never restored: its buffer is freed on the compute stream, after its copy.
        if let Some((buf, done)) = self.staged.get_mut().ok().and_then(Option::take) {
            if self.compute.wait(&done).is_ok() {
                drop(buf);
            } else {
                std::mem::forget(buf);
            }
        }
        if let (Some(host), Ok(mut pool)) = (self.host.take(), self.pool.lock()) {
            pool.push(host);
        }
    }
}

impl Cuda {
    /// `save`'s copy of x, in pinned host memory.
    pub(super) fn offload_copy(&self, x: &CudaSlice<f32>) -> Result<Saved> {
        let err = |e| device_err("offloading an activation to host memory", e);
        let wide = self.precision == Precision::F32;
        let units = if wide { 2 * x.len() } else { x.len() };
        let mut guard = self.offload.lock().map_err(|_| device_err("offload", "a thread panicked"))?;
        if guard.is_none() {
            *guard =
                Some(Offload { stream: self.stream.fork().map_err(err)?, pool: Arc::default(), in_flight: Vec::new() });
        }
        let off = guard.as_mut().expect("set above");
        // Earlier copies to the host have long finished by now (a block ran since): free their staging buffers.
        for (buf, done) in off.in_flight.drain(..) {
            self.stream.wait(&done).map_err(err)?;
            drop(buf);
        }
        let mut staging = self.alloc::<u16>(units)?;
        if wide {
            // SAFETY: x holds x.len() f32 values, the same bytes as 2 · x.len() u16 words.
            let bits = unsafe { x.transmute::<u16>(units) }.expect("an f32 buffer holds twice its length in u16");
            self.stream.memcpy_dtod(&bits, &mut staging).map_err(err)?;
        } else {
            self.round_to_bf16(x, self.addr(&staging))?;
        }
        let ready = self.stream.record_event(None).map_err(err)?;
        off.stream.wait(&ready).map_err(err)?;
        let reuse = {
            let mut pool = off.pool.lock().map_err(|_| device_err("offload", "a thread panicked"))?;
            pool.iter().position(|h| h.len() == units).map(|i| pool.swap_remove(i))
        };
        let mut host = match reuse {
            Some(h) => h,
            // SAFETY: the buffer is written whole by the copy below before anything reads it.
            None => unsafe { self.stream.context().alloc_pinned::<u16>(units) }.map_err(err)?,
        };
        off.stream.memcpy_dtoh(&staging, &mut host).map_err(err)?;
        off.in_flight.push((staging, off.stream.record_event(None).map_err(err)?));
        Ok(Saved::Host(HostCopy {
            host: Some(host),
            units,
            wide,
            staged: Mutex::new(None),
            compute: self.stream.clone(),
            pool: off.pool.clone(),
        }))
    }

    /// Starts copying an offloaded activation back to the device on the copy stream.
    pub(super) fn prefetch_copy(&self, c: &HostCopy) -> Result<()> {
        let err = |e| device_err("bringing an offloaded activation back", e);
        let mut staged = c.staged.lock().map_err(|_| device_err("offload", "a thread panicked"))?;
        if staged.is_some() {
            return Ok(());
        }
        let guard = self.offload.lock().map_err(|_| device_err("offload", "a thread panicked"))?;
        let off = guard.as_ref().ok_or_else(|| device_err("prefetch", "nothing was offloaded"))?;
        let host = c.host.as_ref().expect("held until dropped");
        let mut buf = self.alloc::<u16>(c.units)?;
        // The buffer is allocated in the compute stream's order.
        off.stream.wait(&self.stream.record_event(None).map_err(err)?).map_err(err)?;
        off.stream.memcpy_htod(host, &mut buf).map_err(err)?;
        *staged = Some((buf, off.stream.record_event(None).map_err(err)?));
        Ok(())
    }

    /// An offloaded activation as a new f32 buffer (prefetched or not).
    pub(super) fn restore_copy(&self, c: &HostCopy) -> Result<CudaSlice<f32>> {
        let err = |e| device_err("bringing an offloaded activation back", e);
        self.prefetch_copy(c)?;
        let (buf, done) =
            c.staged.lock().map_err(|_| device_err("offload", "a thread panicked"))?.take().expect("prefetched above");
        self.stream.wait(&done).map_err(err)?;
        let values = if c.wide { c.units / 2 } else { c.units };
        let mut y = self.alloc::<f32>(values)?;
        if c.wide {
            // SAFETY: y holds `values` f32s, the same bytes as `units` u16 words.
            let mut bits = unsafe { y.transmute_mut::<u16>(c.units) }.expect("an f32 buffer holds twice its length");
            self.stream.memcpy_dtod(&buf, &mut bits).map_err(err)?;
        } else {
            self.widen_bf16(&buf, &mut y)?;
        }
        // Freed in the compute stream's order, after the widening that reads it.
        drop(buf);
        Ok(y)
    }
}
