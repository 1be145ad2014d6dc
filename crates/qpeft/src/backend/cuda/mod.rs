//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so nothing CUDA is needed to build; the
//! driver, NVRTC and cuBLAS are found at run time, and their absence is an error, not a panic. Activations,
//! adapters and gradients are f32 device buffers; frozen base weights stay packed and are dequantized per use
//! (weight.rs); matrix products go through cuBLAS (gemm.rs); attention runs in fused flash-style kernels in the 16-bit
//! modes (flash.rs, flash.cu) and as GEMMs around a softmax kernel otherwise (attention.rs); the other ops are the
//! kernels of `kernels.cu`. All kernels are compiled by NVRTC when the backend is created.
//! Three precisions (`Precision`): `F32` (true FP32 products, within summation-order noise of the CPU), and `F16` and
//! `Bf16` (base weights and their inputs as 16-bit tensor-core operands — fp16 under a power-of-two scale per tensor,
//! or bf16 —, attention on 16-bit tensor cores, adapters' products on a linear's input or output gradient on its
//! 16-bit copy (operand.rs), other products in TF32, all accumulating in f32). Each is checked op
//! by op and on whole models against the CPU backend at the same precision (tests/cuda_parity.rs, run by
//! scripts/gpu/test.sh).

/// Launches `kernel` with `cfg` and the arguments pushed by `args`.
macro_rules! launch {
    ($self:expr, $kernel:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let cfg = $cfg;
        let name: &str = $kernel;
        let f = $self.func(name)?;
        let mut b = $self.stream.launch_builder(&f);
        $( b.arg($arg); )*
        // SAFETY: every kernel's parameter list matches the arguments pushed here (kernels.cu), and the
        // sizes were checked against the buffers before the launch.
        $self.timed(|| name.to_string(), || unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| $crate::backend::cuda::device_err(&format!("launching `{name}`"), e)))
    }};
}

mod attention;
mod flash;
mod gemm;
pub mod nccl;
mod offload;
mod operand;
mod profile;
mod weight;

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

pub use self::flash::FlashKept;
use self::gemm::{Gemm, Operand};
pub use self::operand::CudaOperand;
use self::operand::Produced;
use self::profile::Profile;
pub use self::weight::CudaWeight;
use self::weight::Scratch;
use super::Groups;
use super::{
    check, check_adamw_8bit, check_attention, check_groups, poison, weight_values_of, AdamStep, AttentionShape,
    Backend, DeviceMemory, GluKind, KernelTime, MatMul, Precision, RowWrite, Tail, ADAM8_BLOCK,
};
use crate::error::{DeviceFailure, Error, Result};
use crate::quant::base::BaseWeight;
use crate::quant::maps::{signed_dynamic, unsigned_dynamic};

const SOURCE: &str = concat!(include_str!("kernels.cu"), include_str!("flash.cu"));
/// Threads per block of the element-wise kernels and the row reductions.
const THREADS: u32 = 256;

/// A saved activation: f32, or bf16 bits in the 16-bit modes (bf16's range: the residual stream is not scaled); on
/// the device, or offloaded to pinned host memory in the same form (`offload`).
pub enum Saved {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Host(offload::HostCopy),
}

pub struct Cuda {
    ordinal: usize,
    precision: Precision,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    module: Arc<CudaModule>,
    /// Compute capability 8.0 or later: bf16 tensor-core instructions for the fused attention kernels.
    bf16_tensor_cores: bool,
    /// bitsandbytes' signed dynamic 8-bit map (double-quantized scales, ICQ τ, 8-bit AdamW's m) and its unsigned one
    /// (8-bit AdamW's v).
    dyn_map: CudaSlice<f32>,
    udyn_map: CudaSlice<f32>,
    /// The dequantized weight of the current product (f32 or 16-bit).
    w_f32: Scratch<f32>,
    w_half: Scratch<u16>,
    /// The weights `hold_weights` keeps dequantized.
    held: std::sync::Mutex<Vec<weight::Held>>,
    /// 0.0 and 1.0: the betas of products whose alpha is on the device.
    unit_scalars: CudaSlice<f32>,
    /// The largest magnitude of the current product's tail (`Tail`, f16 mode).
    tail_amax: CudaSlice<u32>,
    /// Attention scores and their gradients.
    scores_a: Scratch<f32>,
    scores_b: Scratch<f32>,
    /// The copy stream and host buffers of offloaded activations, from the first `offload` on.
    offload: std::sync::Mutex<Option<offload::Offload>>,
    profile: Option<Profile>,
}

/// The error of a failed CUDA call, naming what was attempted.
pub(crate) fn device_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::device(DeviceFailure::Driver, format!("CUDA: {what}"), e)
}

/// Folders searched for the CUDA headers NVRTC may need: $CUDA_HOME, $CUDA_PATH, the usual install paths.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|p| PathBuf::from(p).join("include"))
        .collect();
    dirs.extend(
        ["/usr/local/cuda/include", "/usr/local/cuda-13.0/include", "/opt/cuda/include", "/usr/include"]
            .map(PathBuf::from),
    );
    let mut found: Vec<PathBuf> = Vec::new();
    for d in dirs.into_iter().filter(|d| d.join("cuda_runtime_api.h").exists()).filter_map(|d| d.canonicalize().ok()) {
        if !found.contains(&d) {
            found.push(d);
        }
    }
    found
}

/// Blocks of the `dot_partials` kernel: its partial sums are added in order.
const SUM_BLOCKS: usize = 1024;

/// The kernels' `struct AdamStep`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamArgs(AdamStep);

// SAFETY: AdamStep is eight f32 fields; the kernels' struct has the same eight floats in the same order.
unsafe impl DeviceRepr for AdamArgs {}

#[repr(C)]
#[derive(Clone, Copy)]
struct Attn {
    batch: i32,
    q_len: i32,
    kv_len: i32,
    kv_capacity: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    scale: f32,
    window: i32,
}

// SAFETY: a plain #[repr(C)] struct of i32/f32 fields, passed by value to the kernels' `struct Attn`.
unsafe impl DeviceRepr for Attn {}

impl Attn {
    fn of(s: AttentionShape) -> Self {
        Attn {
            batch: s.batch as i32,
            q_len: s.q_len as i32,
            kv_len: s.kv_len as i32,
            kv_capacity: s.kv_capacity as i32,
            heads: s.heads as i32,
            kv_heads: s.kv_heads as i32,
            head_dim: s.head_dim as i32,
            scale: s.scale,
            window: s.window.unwrap_or(0) as i32,
        }
    }
}

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The kernels that may make an operand (`Produced`): enough blocks of four values per thread (or rows, `per_block`
/// 1) to fill the GPU, few enough that each block's one atomicMax of the operand's maximum stays cheap.
fn producing_grid(n: usize, per_block: usize) -> LaunchConfig {
    let blocks = n.div_ceil(per_block).clamp(1, 2048) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn rows_grid(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// GPUs the driver sees (`cuda:all`).
pub fn gpu_count() -> Result<usize> {
    // SAFETY: only tries to dlopen the driver.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::device(
            DeviceFailure::Unavailable,
            "CUDA: cannot load the CUDA driver (libcuda.so)",
            "no GPUs",
        ));
    }
    Ok(CudaContext::device_count().map_err(|e| device_err("counting GPUs", e))?.max(0) as usize)
}

impl Cuda {
    /// The device address of a buffer (valid while the buffer lives; all work is on the one stream).
    fn addr<T>(&self, buf: &CudaSlice<T>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    /// The backend on GPU `ordinal` computing in `precision`: loads the driver, NVRTC and cuBLAS, compiles the
    /// kernels.
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self> {
        // cudarc panics when a library is missing; look first so that the user gets an error.
        // SAFETY: these only try to dlopen the library names cudarc would use.
        let missing: Vec<&str> = [
            ("the CUDA driver (libcuda.so)", unsafe { cudarc::driver::sys::is_culib_present() }),
            ("NVRTC (libnvrtc.so)", unsafe { cudarc::nvrtc::sys::is_culib_present() }),
            ("cuBLAS (libcublas.so)", unsafe { cudarc::cublas::sys::is_culib_present() }),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(Error::device(
                DeviceFailure::Unavailable,
                format!("CUDA: cannot load {}", missing.join(", ")),
                "install the NVIDIA driver and the CUDA 13 toolkit libraries, or run on the CPU",
            ));
        }
        let count = CudaContext::device_count().map_err(|e| device_err("counting GPUs", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::device(
                DeviceFailure::Unavailable,
                format!("CUDA: GPU {ordinal}"),
                format!("not found ({count} GPUs)"),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| device_err(&format!("opening GPU {ordinal}"), e))?;
        // One compute stream orders every op; the offload copy stream is ordered by explicit events (offload.rs).
        // cudarc's per-buffer event tracking, which a second stream would switch on, would record events around every
        // launch instead.
        // SAFETY: no buffer exists yet, and buffers are only shared across streams as offload.rs orders them.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device_err("creating the cuBLAS handle", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| device_err("reading the compute capability", e))?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        // The fused attention's operand type is fixed at compile time (flash.cu).
        let options = if precision == Precision::F16 { vec!["-DQPEFT_F16".to_string()] } else { Vec::new() };
        let opts = CompileOptions {
            include_paths: include_dirs().iter().map(|d| d.display().to_string()).collect(),
            arch: Some(arch),
            options,
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, opts)
            .map_err(|e| Error::device(DeviceFailure::Compile, "CUDA: compiling the kernels with NVRTC", e))?;
        let module = ctx.load_module(ptx).map_err(|e| device_err("loading the compiled kernels", e))?;
        let dyn_map = stream.clone_htod(&signed_dynamic()).map_err(|e| device_err("uploading the 8-bit map", e))?;
        let udyn_map = stream.clone_htod(&unsigned_dynamic()).map_err(|e| device_err("uploading the 8-bit map", e))?;
        let unit_scalars = stream.clone_htod(&[0.0f32, 1.0]).map_err(|e| device_err("uploading scalars", e))?;
        let tail_amax = stream.clone_htod(&[0u32]).map_err(|e| device_err("uploading scalars", e))?;
        let (w_f32, w_half, scores_a, scores_b) = (Scratch::new(), Scratch::new(), Scratch::new(), Scratch::new());
        Ok(Cuda {
            ordinal,
            precision,
            stream,
            blas,
            module,
            bf16_tensor_cores: major >= 8,
            dyn_map,
            udyn_map,
            w_f32,
            w_half,
            held: Default::default(),
            unit_scalars,
            tail_amax,
            scores_a,
            scores_b,
            offload: std::sync::Mutex::new(None),
            profile: Profile::from_env(),
        })
    }

    /// Per-block f64 partial sums of a ⊙ b over a fixed grid (`dot`, `sum_squares`).
    fn dot_partials(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<CudaSlice<f64>> {
        let blocks = a.len().div_ceil(THREADS as usize).clamp(1, SUM_BLOCKS);
        let mut partial = self.alloc::<f64>(blocks)?;
        let n = a.len() as i64;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "dot_partials", cfg, a, b, &n, &mut partial)?;
        Ok(partial)
    }

    /// Zero-filled device memory; a failed allocation names its size (out of memory is the usual cause). The fill is
    /// a kernel's worth of writes, timed as "zero fill" by the profile.
    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        let mut buf = self.alloc_raw::<T>(len)?;
        if len > 0 {
            self.timed(
                || "zero fill".into(),
                || self.stream.memset_zeros(&mut buf).map_err(|e| device_err("zero fill", e)),
            )?;
        }
        Ok(buf)
    }

    /// `alloc` without the zero fill, for buffers whose every value is written before it is read (the operands'
    /// 16-bit copies, `Backend::uninit`): a fill would cost as much as the writes. Under QPEFT_POISON (`poison`) the
    /// bytes are 0xFF instead, NaN in every float format, so that a kernel reading one before writing it shows.
    fn alloc_uninit<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        let buf = self.alloc_raw::<T>(len)?;
        if len > 0 && poison() {
            // SAFETY: the buffer holds len values of T, all of them plain data.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    self.addr(&buf),
                    0xff,
                    len * size_of::<T>(),
                    self.stream.cu_stream(),
                )
            }
            .map_err(|e| device_err("poisoning a buffer", e))?;
        }
        Ok(buf)
    }

    fn alloc_raw<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return self.stream.null().map_err(|e| device_err("allocation", e));
        }
        // SAFETY: the callers write every value before it is read (or fill the buffer); T is plain data.
        unsafe { self.stream.alloc::<T>(len) }.map_err(|e| self.alloc_err::<T>(len, e))
    }

    /// The error of a failed allocation of `len` values of T.
    fn alloc_err<T>(&self, len: usize, e: cudarc::driver::DriverError) -> Error {
        let bytes = len * size_of::<T>();
        let free =
            self.stream.context().mem_get_info().map(|(f, _)| format!(", {} MiB free", f >> 20)).unwrap_or_default();
        let kind = if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            DeviceFailure::OutOfMemory
        } else {
            DeviceFailure::Driver
        };
        Error::device(kind, format!("CUDA: allocating {} MiB{free}", bytes.div_ceil(1 << 20)), e)
    }

    fn upload_any<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.stream.null().map_err(|e| device_err("allocation", e));
        }
        self.stream.clone_htod(data).map_err(|e| device_err(&format!("uploading {} values", data.len()), e))
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).map_err(|e| device_err(&format!("kernel `{name}`"), e))
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ints = CudaSlice<u32>;
    type Weight = CudaWeight;
    type Saved = Saved;
    type Bytes = CudaSlice<u8>;
    type Operand<'a> = CudaOperand<'a>;
    type AttnKept = FlashKept;

    fn name(&self) -> String {
        let ctx = self.stream.context();
        format!(
            "cuda:{} ({}, {})",
            self.ordinal,
            ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            self.precision.name()
        )
    }
    fn synchronize(&self) -> Result<()> {
        // Errors of earlier kernels surface here.
        self.stream.synchronize().map_err(|e| device_err("synchronizing", e))
    }
    fn device_memory(&self) -> Result<Option<DeviceMemory>> {
        use cudarc::driver::sys::{cuDeviceGetDefaultMemPool, cuMemPoolGetAttribute, CUmemPool_attribute, CUresult};
        let ctx = self.stream.context();
        let (free, total) = ctx.mem_get_info().map_err(|e| device_err("reading memory use", e))?;
        // Buffers come from the device's default memory pool (stream-ordered allocation); its high-water marks are
        // the peaks.
        let mut pool = std::ptr::null_mut();
        // High-water marks and current values of the pool's used and reserved bytes.
        let mut values = [0u64; 4];
        let attributes = [
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        ];
        // SAFETY: plain queries of the current device's default pool into u64 out-values, as the driver API documents.
        let ok = unsafe {
            cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == CUresult::CUDA_SUCCESS
                && attributes
                    .iter()
                    .zip(values.iter_mut())
                    .all(|(&a, v)| cuMemPoolGetAttribute(pool, a, v as *mut u64 as *mut _) == CUresult::CUDA_SUCCESS)
        };
        if !ok {
            return Err(device_err("reading the memory pool's use", "failed"));
        }
        let [peak_allocated, peak_reserved, allocated, reserved] = values.map(|v| v as usize);
        Ok(Some(DeviceMemory { peak_allocated, peak_reserved, allocated, reserved, in_use: total - free, total }))
    }
    fn kernel_times(&self) -> Result<Vec<KernelTime>> {
        self.drain_profile()
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        self.upload_any(data)
    }
    fn upload_ints(&self, data: &[u32]) -> Result<Self::Ints> {
        self.upload_any(data)
    }
    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        self.alloc(len)
    }
    fn uninit(&self, len: usize) -> Result<Self::Buf> {
        self.alloc_uninit(len)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(buf).map_err(|e| device_err("download", e))
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        buf.len()
    }
    fn upload_bytes(&self, data: &[u8]) -> Result<Self::Bytes> {
        self.upload_any(data)
    }
    fn download_bytes(&self, buf: &Self::Bytes) -> Result<Vec<u8>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(buf).map_err(|e| device_err("download", e))
    }

    fn save(&self, x: &Self::Buf) -> Result<Saved> {
        let n = x.len();
        match self.precision {
            Precision::F32 => {
                let mut y = self.alloc::<f32>(n)?;
                self.copy(x, 0, &mut y, 0, n)?;
                Ok(Saved::F32(y))
            }
            Precision::Bf16 | Precision::F16 => {
                let y = self.alloc::<u16>(n)?;
                self.round_to_bf16(x, self.addr(&y))?;
                Ok(Saved::Bf16(y))
            }
        }
    }
    fn restore(&self, saved: &Saved) -> Result<Self::Buf> {
        match saved {
            Saved::F32(x) => {
                let mut y = self.alloc::<f32>(x.len())?;
                self.copy(x, 0, &mut y, 0, x.len())?;
                Ok(y)
            }
            Saved::Bf16(x) => {
                let mut y = self.alloc::<f32>(x.len())?;
                self.widen_bf16(x, &mut y)?;
                Ok(y)
            }
            Saved::Host(c) => self.restore_copy(c),
        }
    }
    fn saved_bytes(&self) -> usize {
        if self.precision == Precision::F32 {
            4
        } else {
            2
        }
    }
    fn offload(&self, x: &Self::Buf) -> Result<Saved> {
        self.offload_copy(x)
    }
    fn prefetch(&self, saved: &Saved) -> Result<()> {
        match saved {
            Saved::Host(c) => self.prefetch_copy(c),
            _ => Ok(()),
        }
    }

    fn upload_weight(
        &self,
        base: &BaseWeight,
        dense: Option<&[f32]>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<CudaWeight> {
        self.upload_weight_form(&weight_values_of(base, dense)?, base, out_dim, in_dim)
    }
    fn hold_weights(&self, ws: &[&CudaWeight], room: usize) -> Result<()> {
        self.hold(ws, room)
    }
    fn release_weights(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    fn weight_values(&self, w: &CudaWeight) -> Result<Self::Buf> {
        self.weight_values_f32(w)
    }
    fn operand_with_room<'a>(&self, x: &'a Self::Buf, rows: usize, room: usize) -> Result<CudaOperand<'a>> {
        self.operand_of(x, rows, room)
    }
    fn operand_values<'a>(&self, x: &CudaOperand<'a>) -> &'a Self::Buf
    where
        Self: 'a,
    {
        x.x
    }
    fn adapter_term_first(&self) -> bool {
        true
    }
    fn linear_from(
        &self,
        x: &CudaOperand<'_>,
        w: &CudaWeight,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.weight_product(x, w, tail, rows, out, accumulate, true)
    }
    fn linear_backward_from(
        &self,
        dy: &CudaOperand<'_>,
        w: &CudaWeight,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.weight_product(dy, w, tail, rows, dx, accumulate, false)
    }

    fn embedding(
        &self,
        table: &CudaWeight,
        ids: &Self::Ints,
        dim: usize,
        scale: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let rows = out.len() / dim.max(1);
        check(out.len() == rows * dim && ids.len() >= rows, "embedding", || {
            format!("output holds {} values for {} ids × {dim}", out.len(), ids.len())
        })?;
        let (ptr, format) = self.dense_table(table, dim)?;
        // Token ids are checked on the host before they reach the device (Decoder::embed uploads them).
        let (rows_i, dim_i) = (rows as i64, dim as i32);
        launch!(self, "embedding", grid(rows * dim), &ptr, &format, ids, &rows_i, &dim_i, &scale, out)
    }

    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf, s: MatMul) -> Result<()> {
        check(a.len() == s.m * s.k && b.len() == s.k * s.n && out.len() == s.m * s.n, "matmul", || {
            format!("sizes {}, {}, {} do not fit {s:?}", a.len(), b.len(), out.len())
        })?;
        let mut g = Gemm::new(s.m, s.n, s.k, s.a_transposed, s.b_transposed);
        (g.alpha, g.beta) = (s.alpha, if s.accumulate { 1.0 } else { 0.0 });
        // SAFETY: the sizes were checked above against m, n, k; the leading dimensions follow from them.
        unsafe { self.gemm(g, Operand::f32(self.addr(a)), Operand::f32(self.addr(b)), self.addr(out)) }
    }

    fn matmul_from(&self, a: &CudaOperand<'_>, b: &Self::Buf, out: &mut Self::Buf, s: MatMul) -> Result<()> {
        self.operand_product(a, b, out, s)
    }

    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf) -> Result<()> {
        check(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "add_bias", || {
            format!("{} values, bias of {}", x.len(), bias.len())
        })?;
        let (n, dim) = (x.len() as i64, bias.len() as i32);
        launch!(self, "add_bias", grid(x.len()), x, bias, &n, &dim)
    }

    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()> {
        check(x.len() == y.len(), "add", || format!("{} vs {} values", x.len(), y.len()))?;
        let n = x.len() as i64;
        launch!(self, "add", grid(x.len()), x, y, &n)
    }

    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        plus_one: bool,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.rmsnorm_producing(x, w, dim, eps, plus_one, out, Produced::none(dim))
    }
    fn rmsnorm_operand<'a>(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        plus_one: bool,
        out: &'a mut Self::Buf,
        room: usize,
    ) -> Result<CudaOperand<'a>> {
        let p = self.pending_operand(out.len(), out.len() / dim.max(1), room)?;
        self.rmsnorm_producing(x, w, dim, eps, plus_one, out, p.produced)?;
        self.finish_operand(out, p)
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &Self::Ints,
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rotate(x, positions, inv_freq, heads, head_dim, false)
    }

    fn glu(&self, gate: &Self::Buf, up: &Self::Buf, kind: GluKind, out: &mut Self::Buf) -> Result<()> {
        self.glu_producing(gate, up, kind, out, Produced::none(out.len()))
    }
    fn glu_operand<'a>(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        kind: GluKind,
        out: &'a mut Self::Buf,
        rows: usize,
        room: usize,
    ) -> Result<CudaOperand<'a>> {
        let p = self.pending_operand(out.len(), rows, room)?;
        self.glu_producing(gate, up, kind, out, p.produced)?;
        self.finish_operand(out, p)
    }

    fn write_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, at: RowWrite) -> Result<()> {
        let RowWrite { batch, rows, capacity, start, width } = at;
        check(
            src.len() == batch * rows * width && dst.len() == batch * capacity * width && start + rows <= capacity,
            "write_rows",
            || format!("{rows} rows at {start} into capacity {capacity}"),
        )?;
        let v = [batch, rows, capacity, start, width].map(|x| x as i32);
        launch!(self, "write_rows", grid(src.len()), src, dst, &v[0], &v[1], &v[2], &v[3], &v[4])
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: &Self::Ints,
        s: AttentionShape,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.attention_with(q, k, v, key_mask, s, out, false).map(drop)
    }
    fn attention_keeping(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: &Self::Ints,
        s: AttentionShape,
        out: &mut Self::Buf,
    ) -> Result<Option<FlashKept>> {
        self.attention_with(q, k, v, key_mask, s, out, true)
    }

    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ints,
        vocab: usize,
        ignore: u32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let rows = out.len();
        check(logits.len() == rows * vocab && targets.len() >= rows, "cross_entropy", || {
            format!("{} logits for {rows} targets × vocab {vocab}", logits.len())
        })?;
        let v = vocab as i32;
        launch!(self, "cross_entropy", rows_grid(rows), logits, targets, &v, &ignore, out)
    }

    fn sum(&self, x: &Self::Buf) -> Result<f64> {
        Ok(self.download(x)?.iter().map(|&v| v as f64).sum())
    }

    fn copy(&self, src: &Self::Buf, src_at: usize, dst: &mut Self::Buf, dst_at: usize, len: usize) -> Result<()> {
        check(src_at + len <= src.len() && dst_at + len <= dst.len(), "copy", || {
            format!("{len} values from {src_at} of {} to {dst_at} of {}", src.len(), dst.len())
        })?;
        if len == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(&src.slice(src_at..src_at + len), &mut dst.slice_mut(dst_at..dst_at + len))
            .map_err(|e| device_err("copy", e))
    }

    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()> {
        let n = x.len() as i64;
        launch!(self, "scale", grid(x.len()), x, &s, &n)
    }

    fn add_scaled_by(&self, y: &mut Self::Buf, x: &Self::Buf, s: &Self::Buf, factor: f32) -> Result<()> {
        check(y.len() == x.len() && s.len() == 1, "add_scaled_by", || {
            format!("y {}, x {}, scalar of {}", y.len(), x.len(), s.len())
        })?;
        let n = y.len() as i64;
        launch!(self, "add_scaled_by", grid(y.len()), y, x, s, &factor, &n)
    }

    fn dot(&self, a: &Self::Buf, b: &Self::Buf, factor: f32, out: &mut Self::Buf, accumulate: bool) -> Result<()> {
        check(a.len() == b.len() && out.len() == 1, "dot", || {
            format!("a {}, b {}, out {}", a.len(), b.len(), out.len())
        })?;
        let partial = self.dot_partials(a, b)?;
        let (blocks, acc) = (partial.len() as i32, accumulate as i32);
        launch!(self, "dot_finish", LaunchConfig::for_num_elems(1), &partial, &blocks, &factor, out, &acc)
    }

    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dim: usize,
        eps: f32,
        plus_one: bool,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check(
            w.len() == dim && x.len().is_multiple_of(dim) && dy.len() == x.len() && dx.len() == x.len(),
            "rmsnorm_backward",
            || format!("x {}, w {}, dy {}, dx {}, dim {dim}", x.len(), w.len(), dy.len(), dx.len()),
        )?;
        let (d, p, acc) = (dim as i32, plus_one as i32, accumulate as i32);
        launch!(self, "rmsnorm_backward", rows_grid(x.len() / dim), x, w, dy, &d, &eps, &p, dx, &acc)
    }

    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        positions: &Self::Ints,
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rotate(dx, positions, inv_freq, heads, head_dim, true)
    }

    fn glu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dy: &Self::Buf,
        kind: GluKind,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()> {
        let none = Produced::none(gate.len());
        self.glu_backward_producing(gate, up, dy, kind, dgate, dup, [none, none])
    }
    fn glu_backward_operands<'a, 'b>(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dy: &Self::Buf,
        kind: GluKind,
        dgate: &'a mut Self::Buf,
        dup: &'b mut Self::Buf,
        rows: usize,
        rooms: [usize; 2],
    ) -> Result<(CudaOperand<'a>, CudaOperand<'b>)> {
        let pg = self.pending_operand(dgate.len(), rows, rooms[0])?;
        let pu = self.pending_operand(dup.len(), rows, rooms[1])?;
        self.glu_backward_producing(gate, up, dy, kind, dgate, dup, [pg.produced, pu.produced])?;
        Ok((self.finish_operand(dgate, pg)?, self.finish_operand(dup, pu)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: &Self::Ints,
        s: AttentionShape,
        out: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        kept: Option<FlashKept>,
    ) -> Result<()> {
        check_attention(q.len(), k.len(), v.len(), key_mask.len(), s, &[out.len(), dout.len(), dq.len()])?;
        check(dk.len() == k.len() && dv.len() == v.len(), "attention_backward", || {
            format!("dk {}, dv {} for a cache of {}", dk.len(), dv.len(), k.len())
        })?;
        if self.flash(&s) {
            return self.flash_backward(q, k, v, key_mask, s, out, dout, dq, dk, dv, kept);
        }
        self.stream.memset_zeros(dk).map_err(|e| device_err("memset", e))?;
        self.stream.memset_zeros(dv).map_err(|e| device_err("memset", e))?;
        self.attention_gemm_backward(q, k, v, key_mask, s, dout, dq, dk, dv)
    }

    fn cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ints,
        vocab: usize,
        ignore: u32,
        scale: f32,
        dlogits: &mut Self::Buf,
    ) -> Result<()> {
        let rows = logits.len() / vocab.max(1);
        check(
            logits.len() == rows * vocab && targets.len() >= rows && dlogits.len() == logits.len(),
            "cross_entropy_backward",
            || format!("{} logits, vocab {vocab}, dlogits {}", logits.len(), dlogits.len()),
        )?;
        let v = vocab as i32;
        launch!(self, "cross_entropy_backward", rows_grid(rows), logits, targets, &v, &ignore, &scale, dlogits)
    }

    fn group_reduce(
        &self,
        x: &Self::Buf,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check_groups("group_reduce", g, rows, x.len(), out.len())?;
        let (r, w, gs, m, acc) = (rows as i64, g.width as i32, g.groups as i32, mean as i32, accumulate as i32);
        launch!(self, "group_reduce", grid(rows * g.groups), x, &r, &w, &gs, &m, &scale, out, &acc)
    }

    fn group_expand(
        &self,
        h: &Self::Buf,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        y: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        check_groups("group_expand", g, rows, y.len(), h.len())?;
        let (r, w, gs, m, acc) = (rows as i64, g.width as i32, g.groups as i32, mean as i32, accumulate as i32);
        launch!(self, "group_expand", grid(rows * g.width), h, &r, &w, &gs, &m, &scale, y, &acc)
    }

    fn dropout(&self, x: &Self::Buf, p: f32, seed: u64, first: u64, out: &mut Self::Buf) -> Result<()> {
        check(x.len() == out.len() && (0.0..1.0).contains(&p), "dropout", || {
            format!("x {}, out {}, p {p}", x.len(), out.len())
        })?;
        let n = x.len() as i64;
        launch!(self, "dropout", grid(x.len()), x, &p, &seed, &first, out, &n)
    }

    fn sum_squares(&self, x: &Self::Buf) -> Result<f64> {
        let partial = self.dot_partials(x, x)?;
        Ok(self.stream.clone_dtoh(&partial).map_err(|e| device_err("download", e))?.iter().sum())
    }

    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, s: AdamStep) -> Result<()> {
        let n = p.len();
        check(g.len() == n && m.len() == n && v.len() == n, "adamw", || {
            format!("p {n}, g {}, m {}, v {}", g.len(), m.len(), v.len())
        })?;
        let (args, n64) = (AdamArgs(s), n as i64);
        launch!(self, "adamw", grid(n), p, g, m, v, &args, &n64)
    }

    fn adamw_8bit(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Bytes,
        m_absmax: &mut Self::Buf,
        v: &mut Self::Bytes,
        v_absmax: &mut Self::Buf,
        s: AdamStep,
    ) -> Result<()> {
        let n = p.len();
        check_adamw_8bit(n, g.len(), m.len(), m_absmax.len(), v.len(), v_absmax.len())?;
        if n == 0 {
            return Ok(());
        }
        let (args, n64) = (AdamArgs(s), n as i64);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(ADAM8_BLOCK) as u32, 1, 1),
            block_dim: (ADAM8_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "adamw_8bit", cfg, p, g, m, m_absmax, v, v_absmax, &self.dyn_map, &self.udyn_map, &args, &n64)
    }
}

impl Cuda {
    /// `Backend::rmsnorm`, also making out's operand as `p` asks (operand.rs, `Produced`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_producing(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dim: usize,
        eps: f32,
        plus_one: bool,
        out: &mut CudaSlice<f32>,
        p: Produced,
    ) -> Result<()> {
        check(w.len() == dim && x.len().is_multiple_of(dim) && out.len() == x.len(), "rmsnorm", || {
            format!("x {}, w {}, dim {dim}", x.len(), w.len())
        })?;
        check(p.cols as usize == dim, "rmsnorm", || format!("an operand of rows of {} for dim {dim}", p.cols))?;
        let (d, plus, rows) = (dim as i32, plus_one as i32, (x.len() / dim) as i64);
        let cfg = producing_grid(rows as usize, 1);
        launch!(self, "rmsnorm", cfg, x, w, &d, &eps, &plus, out, &rows, &p.half, &p.ld, &p.amax)
    }

    /// `Backend::glu`, also making out's operand as `p` asks.
    fn glu_producing(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        kind: GluKind,
        out: &mut CudaSlice<f32>,
        p: Produced,
    ) -> Result<()> {
        check(gate.len() == up.len() && out.len() == up.len(), "glu", || {
            format!("gate {}, up {}, out {}", gate.len(), up.len(), out.len())
        })?;
        let (k, n) = (glu_kind(kind), gate.len() as i64);
        let cfg = producing_grid(gate.len(), 4 * THREADS as usize);
        launch!(self, "glu", cfg, gate, up, &k, out, &n, &p.half, &p.cols, &p.ld, &p.amax)
    }

    /// `Backend::glu_backward`, also making the operands of dgate and dup as `p` asks (rows of the same width).
    #[allow(clippy::too_many_arguments)]
    fn glu_backward_producing(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        kind: GluKind,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
        [pg, pu]: [Produced; 2],
    ) -> Result<()> {
        let n = gate.len();
        check(up.len() == n && dy.len() == n && dgate.len() == n && dup.len() == n, "glu_backward", || {
            format!("sizes differ from gate's {n}")
        })?;
        check(pg.cols == pu.cols, "glu_backward", || format!("operands of rows of {} and {}", pg.cols, pu.cols))?;
        let (k, n64) = (glu_kind(kind), n as i64);
        launch!(
            self,
            "glu_backward",
            producing_grid(n, 4 * THREADS as usize),
            gate,
            up,
            dy,
            &k,
            dgate,
            dup,
            &n64,
            &pg.cols,
            &pg.half,
            &pg.ld,
            &pg.amax,
            &pu.half,
            &pu.ld,
            &pu.amax
        )
    }

    fn rotate(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let row = heads * head_dim;
        let rows = x.len() / row.max(1);
        check(inv_freq.len() == head_dim / 2 && x.len() == rows * row && positions.len() >= rows, "rope", || {
            format!("x {} values for {} positions × {heads} heads × {head_dim}", x.len(), positions.len())
        })?;
        let (r, h, d, inv) = (rows as i64, heads as i32, head_dim as i32, inverse as i32);
        launch!(self, "rope", grid(rows * head_dim / 2), x, positions, inv_freq, &r, &h, &d, &inv)
    }
}

fn glu_kind(kind: GluKind) -> i32 {
    match kind {
        GluKind::Silu => 0,
        GluKind::GeluTanh => 1,
    }
}
