//! Optional per-kernel timing, on when QPEFT_CUDA_PROFILE is set: a pair of CUDA events around every kernel launch and
//! GEMM, summed by name when read (`Backend::kernel_times`). Off, it costs one branch per launch.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::{device_err, Cuda};
use crate::backend::KernelTime;
use crate::error::Result;

#[derive(Default)]
pub(super) struct Profile(Mutex<Vec<(String, CudaEvent, CudaEvent)>>);

impl Profile {
    pub fn from_env() -> Option<Profile> {
        std::env::var_os("QPEFT_CUDA_PROFILE").map(|_| Profile::default())
    }
}

impl Cuda {
    /// Runs `f` (which queues GPU work), timing it under `name()` when profiling (the name is only built then).
    pub(super) fn timed(&self, name: impl FnOnce() -> String, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(profile) = &self.profile else { return f() };
        let event = || {
            self.stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| device_err("recording an event", e))
        };
        let start = event()?;
        f()?;
        let end = event()?;
        profile.0.lock().unwrap_or_else(|e| e.into_inner()).push((name(), start, end));
        Ok(())
    }

    /// GPU time per name since the last call, slowest first.
    pub(super) fn drain_profile(&self) -> Result<Vec<KernelTime>> {
        let Some(profile) = &self.profile else { return Ok(Vec::new()) };
        let marks = std::mem::take(&mut *profile.0.lock().unwrap_or_else(|e| e.into_inner()));
        let mut sums: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for (name, start, end) in marks {
            let ms = start.elapsed_ms(&end).map_err(|e| device_err("reading an event", e))? as f64;
            let s = sums.entry(name).or_default();
            s.0 += 1;
            s.1 += ms;
        }
        let mut out: Vec<KernelTime> =
            sums.into_iter().map(|(name, (calls, ms))| KernelTime { name, calls, ms }).collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(out)
    }
}
