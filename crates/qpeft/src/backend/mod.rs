//! The op set a decoder needs, implemented once per device.
//!
//! Buffers are device-resident (`Backend::Buf`); ops take buffers and explicit sizes and never
//! return data to the host except through `download`, so a GPU backend can queue them without
//! synchronising. Layouts are row-major; "rows" are tokens.

pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::Result;
use crate::quant::base::BaseWeight;

/// Where a model runs: `cpu:f32`, `cpu:bf16` (`Cpu::bf16_native`: bf16 base products on AMX tiles or AVX512-BF16
/// where the CPU has them), `cpu` (the CPU's default: `cpu:bf16` where it has either, `cpu:f32` elsewhere —
/// `Device::cpu_default`), or
/// `cuda[:N][:f16|:bf16|:f32]` (GPU N, default 0, in `Precision::F16` unless another precision is asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    CpuBf16,
    Cuda(usize, Precision),
}

impl Device {
    /// The CPU's default precision: bf16 base products where the CPU has bf16 instructions — AMX-BF16 tiles (2–3× the
    /// f32 products) or AVX512-BF16 (2–2.8× on AMD Zen 4) — with predictions on the evaluation fixture identical to
    /// f32's; f32 elsewhere (the bf16 emulation without them is slower than f32). `cpu:f32` stays the reference.
    pub fn cpu_default() -> Device {
        if cpu::bf16::Kernel::detect().is_some() {
            Device::CpuBf16
        } else {
            Device::Cpu
        }
    }
}

/// How a GPU computes. In both 16-bit modes the base weights and their inputs (output gradients in backward) are
/// 16-bit tensor-core operands, attention runs in 16-bit (fused kernels, `flash_head`), an adapter's products on its
/// linear's input or output gradient read the same 16-bit copy (`Backend::matmul_from`), the other products run in TF32,
/// everything accumulates in f32, and activations, adapters, gradients and optimizer state stay f32.
/// - `F16`: fp16 operands (11 significant bits) with a power-of-two scale per tensor (`f16_shift`), so that no
///   activation or gradient leaves fp16's range. 8× finer than bf16 at the same speed: the gradients stay within
///   ≈ 1e-2 of f32 through SmolLM2's 30 blocks, where bf16 rounding noise reaches 2–3e-2.
/// - `Bf16`: bitsandbytes' QLoRA setting (bf16 compute dtype), no scales.
/// - `F32`: every product in true FP32 (parity checks, debugging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F16,
    Bf16,
    F32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// The power-of-two exponent s that brings a tensor whose largest magnitude is `amax` into fp16's range: amax·2^s <
/// 2^15 (≤ 2^15 after rounding, below fp16's largest finite 65504), from amax's binary exponent alone, so that the
/// GPU's kernels and the CPU's emulation pick the same s. Zero and non-finite maxima give s for the smallest normal
/// float and 0 (a NaN or ∞ stays one); s is clamped to ±120 so that 2^s is a finite f32.
pub fn f16_shift(amax: f32) -> i32 {
    f16_shift_for(binary_exponent(amax))
}

/// s for a bound 2^e on a tensor's magnitudes: amax < 2^e.
pub fn f16_shift_for(e: i32) -> i32 {
    (15 - e).clamp(-120, 120)
}

/// The e with |x| < 2^e and |x| ≥ 2^(e−1) for a normal x (frexp's exponent); −126 for zero and subnormals; 15 (s = 0)
/// for ∞ and NaN.
pub fn binary_exponent(x: f32) -> i32 {
    let biased = ((x.to_bits() >> 23) & 0xff) as i32;
    match biased {
        0xff => 15,
        0 => -126,
        b => b - 126,
    }
}

impl Device {
    /// What decides the device's numbers, without the GPU's ordinal: `cpu:f32`, `cpu:bf16`, `cuda:f16`, … A run
    /// continued on other numerics would mix two precisions in one result.
    pub fn numerics(&self) -> String {
        match self {
            Device::Cuda(_, p) => format!("cuda:{}", p.name()),
            d => d.to_string(),
        }
    }

    /// A comma-separated list of devices of one kind and precision (`cpu:f32,cpu:f32` — thread ranks of one process
    /// — or `cuda:0,cuda:1`, and `cuda:all[:f16|:bf16|:f32]` for every GPU): one data-parallel rank each. A single
    /// device is a list of one.
    pub fn parse_list(s: &str) -> Result<Vec<Device>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim) {
            match part.strip_prefix("cuda:all") {
                Some(rest) if rest.is_empty() || rest.starts_with(':') => {
                    let precision = format!("cuda:0{rest}").parse::<Device>()?;
                    let Device::Cuda(_, p) = precision else { unreachable!("parsed as cuda") };
                    out.extend((0..gpu_count()?).map(|n| Device::Cuda(n, p)));
                }
                _ => out.push(part.parse()?),
            }
        }
        let bad = |why: &str| Err(crate::error::Error::Invalid(format!("devices `{s}`: {why}")));
        if out.is_empty() {
            return bad("no device");
        }
        let same_kind = out.iter().all(|d| match (d, out[0]) {
            (Device::Cuda(_, p), Device::Cuda(_, q)) => *p == q,
            (d, first) => *d == first,
        });
        if !same_kind {
            return bad("the ranks of one run must share one kind and precision");
        }
        let gpus: Vec<usize> =
            out.iter().filter_map(|d| if let Device::Cuda(n, _) = d { Some(*n) } else { None }).collect();
        if (1..gpus.len()).any(|i| gpus[..i].contains(&gpus[i])) {
            return bad("a GPU is named twice (one rank per GPU)");
        }
        Ok(out)
    }
}

/// GPUs on this host.
fn gpu_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        cuda::gpu_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::error::Error::Invalid(
            "cuda:all: this qpeft was built without CUDA support (cargo build --release --features cuda)".into(),
        ))
    }
}

/// The device string that parses back to the same device (`cpu:f32`, `cuda:0:f16`).
impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu:f32"),
            Device::CpuBf16 => write!(f, "cpu:bf16"),
            Device::Cuda(n, p) => write!(f, "cuda:{n}:{}", p.name()),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Device> {
        let bad = || {
            crate::error::Error::Invalid(format!("device `{s}` is not cpu[:f32|:bf16] or cuda[:N][:f16|:bf16|:f32]"))
        };
        match s {
            "cpu" => return Ok(Device::cpu_default()),
            "cpu:f32" => return Ok(Device::Cpu),
            "cpu:bf16" => return Ok(Device::CpuBf16),
            _ => {}
        }
        let mut parts = s.split(':');
        if parts.next() != Some("cuda") {
            return Err(bad());
        }
        let (mut ordinal, mut precision) = (None, None);
        for part in parts {
            match part {
                "f32" if precision.is_none() => precision = Some(Precision::F32),
                "bf16" if precision.is_none() => precision = Some(Precision::Bf16),
                "f16" if precision.is_none() => precision = Some(Precision::F16),
                n if ordinal.is_none() && precision.is_none() => ordinal = Some(n.parse().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        Ok(Device::Cuda(ordinal.unwrap_or(0), precision.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        let ok = [
            ("cpu", Device::cpu_default()),
            ("cpu:f32", Device::Cpu),
            ("cpu:bf16", Device::CpuBf16),
            ("cuda", Device::Cuda(0, Precision::F16)),
            ("cuda:1", Device::Cuda(1, Precision::F16)),
            ("cuda:f16", Device::Cuda(0, Precision::F16)),
            ("cuda:f32", Device::Cuda(0, Precision::F32)),
            ("cuda:2:f32", Device::Cuda(2, Precision::F32)),
            ("cuda:3:bf16", Device::Cuda(3, Precision::Bf16)),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Device>().unwrap(), want, "{s}");
        }
        for s in ["gpu", "cuda:", "cuda:x", "cuda:f32:1", "cuda:1:2", "cuda:f32:bf16", "cpu:0"] {
            assert!(s.parse::<Device>().is_err(), "{s}");
        }
    }

    #[test]
    fn device_lists_parse() {
        assert_eq!(Device::parse_list("cpu:f32").unwrap(), vec![Device::Cpu]);
        assert_eq!(Device::parse_list("cpu:f32, cpu:f32").unwrap(), vec![Device::Cpu, Device::Cpu]);
        assert_eq!(
            Device::parse_list("cuda:0:f32,cuda:1:f32").unwrap(),
            vec![Device::Cuda(0, Precision::F32), Device::Cuda(1, Precision::F32)]
        );
        for (s, why) in [
            ("cpu:f32,cpu:bf16", "one kind and precision"),
            ("cuda:0,cuda:1:f32", "one kind and precision"),
            ("cpu:f32,cuda:0", "one kind and precision"),
            ("cuda:1,cuda:1", "named twice"),
            ("cpu,,cpu", "is not cpu"),
        ] {
            let e = Device::parse_list(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}

/// out[m×n] (+)= alpha · op(a)[m×k] · op(b)[k×n]; op transposes a stored matrix. `x · Wᵀ` of a linear layer
/// is `MatMul::new(rows, out, in).bt()`, its input gradient `dY · W` is plain, and a weight gradient
/// `dYᵀ · X` is `.at()`.
#[derive(Clone, Copy, Debug)]
pub struct MatMul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// a is stored as [k, m] rather than [m, k].
    pub a_transposed: bool,
    /// b is stored as [n, k] (a weight matrix) rather than [k, n].
    pub b_transposed: bool,
    pub alpha: f32,
    /// Add into the output instead of overwriting it.
    pub accumulate: bool,
}

impl MatMul {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MatMul { m, n, k, a_transposed: false, b_transposed: false, alpha: 1.0, accumulate: false }
    }
    pub fn at(self) -> Self {
        MatMul { a_transposed: true, ..self }
    }
    pub fn bt(self) -> Self {
        MatMul { b_transposed: true, ..self }
    }
    pub fn scaled(self, alpha: f32) -> Self {
        MatMul { alpha, ..self }
    }
    pub fn acc(self, accumulate: bool) -> Self {
        MatMul { accumulate, ..self }
    }
}

/// A rank-r term that a linear's product takes in with its base product (an adapter's last product, as LoRA's
/// s·(x·Aᵀ)·Bᵀ): forward adds s·h·Fᵀ to the output for h [rows, r] and F [out, r] (B); the input gradient adds s·h·F
/// for F [r, in] (A, with h = ∂L/∂h).
///
/// In the 16-bit modes h and F are rounded like the base product's operands, so that a GPU can append them to the
/// operand's rows and to the weight (K-concatenation: one GEMM over in + r, no [rows, out] output written and read
/// again). bf16: bf16(h) and bf16(s·F). fp16: fp16(h·2^t) with t = `f16_shift` of h's largest magnitude, and
/// fp16(s·F·2^(u−t)) with u the operand's own shift, so the product shares the base product's alpha 2^−u. F's
/// values can fall below fp16's normal range (a young LoRA B); their products then lose low bits, which are far below
/// the base product's own rounding of the output. An F so large that s·F·2^(u−t) passes fp16's range would need
/// s·|F|·‖h‖/‖x‖ beyond 2^15 and gives ∞. u − t is clamped to ±120 (as every shift is): it gets there only when h is 0
/// (shift 120), whose term is 0 either way, or 2^120 away from x's magnitude.
pub struct Tail<'a, B: Backend + ?Sized> {
    pub h: &'a B::Buf,
    pub factor: &'a B::Buf,
    pub rank: usize,
    pub scale: f32,
}

// By hand: a derive would ask B itself to be Copy.
impl<B: Backend + ?Sized> Clone for Tail<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Tail<'_, B> {}

/// A partition of `width` contiguous features into `groups` runs: feature i belongs to group
/// ⌊i·groups/width⌋. With groups | width these are equal runs of width/groups (AvgPool1d with kernel =
/// stride, or PEFT-style repeat_interleave); otherwise the runs differ in length by at most one and none is
/// empty while groups ≤ width (IR-QLoRA's IEC on dimensions r does not divide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub width: usize,
    pub groups: usize,
}

impl Groups {
    pub fn of(self, i: usize) -> usize {
        i * self.groups / self.width
    }
    /// The features [start, end) of group g.
    pub fn range(self, g: usize) -> (usize, usize) {
        ((g * self.width).div_ceil(self.groups), ((g + 1) * self.width).div_ceil(self.groups))
    }
}

/// Shape of one causal attention call over a KV cache laid out [batch, capacity, kv_heads, head_dim].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    /// New query tokens per sequence; queries are [batch, q_len, heads, head_dim].
    pub q_len: usize,
    /// Keys/values valid in the cache (the queries are its last `q_len` positions).
    pub kv_len: usize,
    pub kv_capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Mistral's sliding window: query at cache index i sees keys i − window < j ≤ i.
    pub window: Option<usize>,
}

/// Whether the CUDA 16-bit modes run attention with heads of `head_dim` through their fused, flash-style kernels (on
/// GPUs of compute capability 8.0 and up): multiples of 8 (16-byte rows of 16-bit values) up to 128. Other heads
/// (Gemma's 256) take their GEMM path. The CPU's emulations round inside attention as the path taken for the same shape
/// does.
pub fn flash_head(head_dim: usize) -> bool {
    head_dim <= 128 && head_dim.is_multiple_of(8)
}

/// Where `write_rows` puts a [batch, rows, width] block inside a [batch, capacity, width] buffer.
#[derive(Clone, Copy, Debug)]
pub struct RowWrite {
    pub batch: usize,
    pub rows: usize,
    pub capacity: usize,
    pub start: usize,
    pub width: usize,
}

/// Device memory in bytes. The peaks are high-water marks of this process's buffers since it started (like torch's
/// `max_memory_allocated` / `max_memory_reserved`); `in_use` is everything allocated on the device now, the driver's
/// context and other processes included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub peak_allocated: usize,
    pub peak_reserved: usize,
    /// The backend's buffers now, and what its pool holds for them (≥ allocated; the rest is free for its reuse).
    pub allocated: usize,
    pub reserved: usize,
    pub in_use: usize,
    pub total: usize,
}

/// GPU time spent in one kernel (or GEMM kind).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelTime {
    pub name: String,
    pub calls: usize,
    pub ms: f64,
}

/// One AdamW update as bitsandbytes' 32-bit kernel computes it (methods.md §8). `repr(C)`: GPU kernels take it by
/// value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub lr: f32,
    /// Bias corrections 1 − β1ᵗ and √(1 − β2ᵗ).
    pub c1: f32,
    pub c2: f32,
    /// Multiplies the gradient first (the clip coefficient).
    pub grad_coef: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluKind {
    Silu,
    GeluTanh,
}

pub trait Backend: Send + Sync {
    /// An f32 device buffer.
    type Buf: Send + Sync;
    /// A u32 device buffer (token ids, positions, masks).
    type Ints: Send + Sync;
    /// A frozen linear weight Ŵ [out, in] in the form the backend multiplies with: f32 on the CPU; on a GPU
    /// the packed 4-bit base, dequantized per use.
    type Weight: Send + Sync;
    /// An activation kept for a later recomputation (a checkpointed block input): exact on the CPU and in the CUDA
    /// backend's f32 mode, bf16 in its 16-bit modes (as a bf16 model keeps its hidden states; bf16 keeps f32's range).
    type Saved: Send + Sync;
    /// A u8 device buffer (8-bit optimizer states).
    type Bytes: Send + Sync;
    /// A product input converted once (`operand`).
    type Operand<'a>: Send + Sync
    where
        Self: 'a;
    /// What an attention forward leaves for the backward of the same q, k and v (`attention_keeping`).
    type AttnKept: Send + Sync;

    fn name(&self) -> String;
    /// Waits until every queued op has run (timing; a no-op where ops run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// GPU time per kernel (name, calls, milliseconds) since the last call, slowest first, where the backend profiles
    /// (the CUDA backend with QPEFT_CUDA_PROFILE set); empty otherwise.
    fn kernel_times(&self) -> Result<Vec<KernelTime>> {
        Ok(Vec::new())
    }
    /// The device's memory, where the backend has its own.
    fn device_memory(&self) -> Result<Option<DeviceMemory>> {
        Ok(None)
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn upload_ints(&self, data: &[u32]) -> Result<Self::Ints>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer for an output that the next op writes whole (a product with `accumulate` false, a norm, a copy): its
    /// values until then are unspecified, so a backend with memory of its own skips the zero fill. Where the
    /// environment sets QPEFT_POISON (`poison`; the test suites do) they are NaN, so that a read before the write shows.
    fn uninit(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn upload_bytes(&self, data: &[u8]) -> Result<Self::Bytes>;
    fn download_bytes(&self, buf: &Self::Bytes) -> Result<Vec<u8>>;

    /// Keeps a copy of x for a recomputation (`Saved`), and gives it back as a new buffer.
    fn save(&self, x: &Self::Buf) -> Result<Self::Saved>;
    fn restore(&self, saved: &Self::Saved) -> Result<Self::Buf>;
    /// Bytes per value of a `Saved` copy (for memory estimates: `model::memory`).
    fn saved_bytes(&self) -> usize {
        4
    }
    /// As `save`, for a copy not needed for a while: a backend with memory of its own may keep it in host memory
    /// (the same values as `save` would keep), copied out alongside the work queued after it.
    fn offload(&self, x: &Self::Buf) -> Result<Self::Saved> {
        self.save(x)
    }
    /// Starts bringing an offloaded copy back, for a `restore` of it later; a no-op for copies on the device.
    fn prefetch(&self, _saved: &Self::Saved) -> Result<()> {
        Ok(())
    }

    /// Ŵ [out_dim, in_dim] from its stored form `base`, which a backend may keep (dequantizing per use), and its f32
    /// values `dense`: required for a `Dense` base; for the others what `base.dequantize()` gives, passed where the
    /// caller has them already (else the backend dequantizes where it needs the values).
    fn upload_weight(
        &self,
        base: &BaseWeight,
        dense: Option<&[f32]>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self::Weight>;
    /// Keeps the frozen weights `ws` ready to multiply with until `release_weights`, each with room for tails of up to
    /// `room` columns (as `operand_with_room`'s; a product with a larger tail multiplies as if not held): a backend
    /// that dequantizes per product (the CUDA backend's packed bases in the 16-bit modes) dequantizes each once, at
    /// its first product, for the products of a span that use it several times (the MLP's row chunks; a recomputed
    /// block, whose forward and backward use the same weights). Their dequantized size in memory meanwhile; the
    /// products compute the same values (read at another row stride, for which the GEMM library may pick another
    /// kernel; `cuda_parity` checks them equal to the bit). A no-op by default.
    fn hold_weights(&self, _ws: &[&Self::Weight], _room: usize) -> Result<()> {
        Ok(())
    }
    /// Ends every `hold_weights`.
    fn release_weights(&self) {}
    /// Ŵ in f32, [out, in] (merging, saving, checks): bit-exact with `base.dequantize()`.
    fn weight_values(&self, w: &Self::Weight) -> Result<Self::Buf>;
    /// A product input converted once for every product that reads it: a linear's input x for its base and its
    /// adapters' products on x, or an output gradient for the base's input gradient and the adapters' products on it.
    /// In the 16-bit modes it is the tensor-core operand — bf16, or fp16 of x·2^s under the tensor's power-of-two
    /// scale (`f16_shift`) —, elsewhere x's values themselves. It borrows x.
    fn operand<'a>(&self, x: &'a Self::Buf) -> Result<Self::Operand<'a>> {
        self.operand_with_room(x, 1, 0)
    }
    /// `operand` of x as `rows` rows, with room after each for a `Tail` of up to `room` columns, which the products
    /// that take one can fold into their GEMM (a backend without that ignores the room).
    fn operand_with_room<'a>(&self, x: &'a Self::Buf, rows: usize, room: usize) -> Result<Self::Operand<'a>>;
    /// The values an operand was made from.
    fn operand_values<'a>(&self, x: &Self::Operand<'a>) -> &'a Self::Buf
    where
        Self: 'a;
    /// out [rows, out] (+)= x·Ŵᵀ (+ the tail's s·h·Fᵀ, F [out, r]) for the operand of x [rows, in].
    fn linear_from(
        &self,
        x: &Self::Operand<'_>,
        w: &Self::Weight,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// dx [rows, in] (+)= dy·Ŵ (+ the tail's s·h·F, F [r, in]) for the operand of dy [rows, out]: a frozen weight's
    /// only gradient.
    fn linear_backward_from(
        &self,
        dy: &Self::Operand<'_>,
        w: &Self::Weight,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// Whether a linear's adapter term goes first, the base product then adding onto it, rather than the base product
    /// first and the adapter's last product adding onto that: whichever product accumulates for free. cuBLAS reads the
    /// output in its epilogue (beta = 1) at no cost to a compute-bound base GEMM, while the CPU's bf16 kernels store
    /// their blocks straight from the registers unless they accumulate, and its f32 GEMM adds on its stores.
    fn adapter_term_first(&self) -> bool {
        false
    }
    /// `linear_from` on x converted for this product alone.
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_from(&self.operand(x)?, w, None, rows, out, accumulate)
    }
    /// `linear_backward_from` on dy converted for this product alone.
    fn linear_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_backward_from(&self.operand(dy)?, w, None, rows, dx, accumulate)
    }

    /// out[r, :] = table[ids[r], :] · scale; the table is a dense weight [vocab, dim] (the tied LM head too).
    fn embedding(
        &self,
        table: &Self::Weight,
        ids: &Self::Ints,
        dim: usize,
        scale: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `MatMul`'s product; in the 16-bit modes its operands are TF32 (the adapters' rank-sized products).
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf, shape: MatMul) -> Result<()>;
    /// `MatMul`'s product with `a` an operand (an adapter's product on its layer's input or output gradient, which
    /// reads the 16-bit copy the base product reads): in the 16-bit modes b is converted as an operand of its own
    /// (bf16, or fp16 under b's own power-of-two scale), and the product accumulates in f32.
    fn matmul_from(&self, a: &Self::Operand<'_>, b: &Self::Buf, out: &mut Self::Buf, shape: MatMul) -> Result<()>;
    /// x[r, :] += bias for every row.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf) -> Result<()>;
    /// x += y.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()>;
    /// out = w ⊙ x / rms(x) (or (1 + w) ⊙ … when `plus_one`), per row of `dim`.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        plus_one: bool,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Rotates x ([rows, heads, head_dim]) in place by angle positions[r] · inv_freq[j].
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &Self::Ints,
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// out = act(gate) ⊙ up.
    fn glu(&self, gate: &Self::Buf, up: &Self::Buf, kind: GluKind, out: &mut Self::Buf) -> Result<()>;
    /// `rmsnorm` into `out`, and out's operand with `room` (`operand_with_room`, rows of `dim`): the same values,
    /// made in one pass where the backend can (the CUDA 16-bit modes: the norm writes the bf16 copy, or in f16 its
    /// output's largest magnitude, sparing the conversion a pass over out).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_operand<'a>(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
        plus_one: bool,
        out: &'a mut Self::Buf,
        room: usize,
    ) -> Result<Self::Operand<'a>> {
        self.rmsnorm(x, w, dim, eps, plus_one, out)?;
        self.operand_with_room(out, self.len(out) / dim.max(1), room)
    }
    /// `glu` into `out`, and out's operand as `rows` rows with `room` (as `rmsnorm_operand`).
    #[allow(clippy::too_many_arguments)]
    fn glu_operand<'a>(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        kind: GluKind,
        out: &'a mut Self::Buf,
        rows: usize,
        room: usize,
    ) -> Result<Self::Operand<'a>> {
        self.glu(gate, up, kind, out)?;
        self.operand_with_room(out, rows, room)
    }
    /// Writes `src` ([batch, rows, width]) into `dst` ([batch, capacity, width]) at row `start`.
    fn write_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, at: RowWrite) -> Result<()>;
    /// Causal grouped-query attention. `key_mask` ([batch, kv_capacity]) holds each token's segment: 0 is padding,
    /// hidden from every query; a real query sees only the keys of its own segment (all real tokens are 1 in an
    /// ordinary batch; a packed row numbers its examples 1, 2, …, which keeps them apart), a padding query every real
    /// key (`simd::sees_key`). Segments must not decrease along a row: the fused kernels skip key tiles of earlier
    /// segments.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        key_mask: &Self::Ints,
        shape: AttentionShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `attention`, also returning what a backward of the same q, k and v may reuse (`attention_backward`'s `kept`):
    /// on the GPU's fused kernels, the 16-bit q, k and v and each query's log-sum-exp, so that the backward neither
    /// converts them again nor walks the keys for the softmax statistics. None where the backend keeps nothing.
    fn attention_keeping(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        key_mask: &Self::Ints,
        shape: AttentionShape,
        out: &mut Self::Buf,
    ) -> Result<Option<Self::AttnKept>> {
        self.attention(q, k_cache, v_cache, key_mask, shape, out)?;
        Ok(None)
    }
    /// Per-row −log softmax(logits)[target]; rows whose target is `ignore` give 0.
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ints,
        vocab: usize,
        ignore: u32,
        out: &mut Self::Buf,
    ) -> Result<()>;

    // ---- backward and adapter ops ----

    /// Σ x, on the host in f64 (losses; a scalar that has to come back anyway).
    fn sum(&self, x: &Self::Buf) -> Result<f64>;
    /// dst[dst_at..dst_at + len] = src[src_at..src_at + len].
    fn copy(&self, src: &Self::Buf, src_at: usize, dst: &mut Self::Buf, dst_at: usize, len: usize) -> Result<()>;
    /// x *= s.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;
    /// y += factor · s[0] · x, where s is a one-element device buffer (a trainable scalar such as IEC's β).
    fn add_scaled_by(&self, y: &mut Self::Buf, x: &Self::Buf, s: &Self::Buf, factor: f32) -> Result<()>;
    /// out[0] (+)= factor · Σ a ⊙ b (a scalar parameter's gradient).
    fn dot(&self, a: &Self::Buf, b: &Self::Buf, factor: f32, out: &mut Self::Buf, accumulate: bool) -> Result<()>;
    /// dx (+)= ∂(rmsnorm(x)·dy)/∂x; the norm weight is frozen, so it gets no gradient.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// The inverse rotation of `rope` (its transpose, hence also its backward).
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        positions: &Self::Ints,
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// dgate, dup of out = act(gate) ⊙ up.
    #[allow(clippy::too_many_arguments)]
    fn glu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dy: &Self::Buf,
        kind: GluKind,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;
    /// `glu_backward`, and the operands of dgate and dup as `rows` rows with rooms `rooms` (as `rmsnorm_operand`).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Self::Operand<'a>, Self::Operand<'b>)> {
        self.glu_backward(gate, up, dy, kind, dgate, dup)?;
        Ok((self.operand_with_room(dgate, rows, rooms[0])?, self.operand_with_room(dup, rows, rooms[1])?))
    }
    /// dq, dk, dv of `attention` (recomputing the probabilities), every value written; `out` is its output; dk and dv
    /// have the cache layout. `kept` is what `attention_keeping` returned for these q, k, v and shape (an error for
    /// another shape).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        key_mask: &Self::Ints,
        shape: AttentionShape,
        out: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        kept: Option<Self::AttnKept>,
    ) -> Result<()>;
    /// dlogits = scale · (softmax(logits) − onehot(target)) per row; rows whose target is `ignore` get 0.
    fn cross_entropy_backward(
        &self,
        logits: &Self::Buf,
        targets: &Self::Ints,
        vocab: usize,
        ignore: u32,
        scale: f32,
        dlogits: &mut Self::Buf,
    ) -> Result<()>;
    /// out[r, g] (+)= scale · Σ_{i ∈ g} x[r, i] (divided by |g| when `mean`): average pooling and group means.
    #[allow(clippy::too_many_arguments)]
    fn group_reduce(
        &self,
        x: &Self::Buf,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        out: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// y[r, i] (+)= scale · h[r, group(i)] (divided by |group(i)| when `mean`): repeat-interleave, and the
    /// adjoint of `group_reduce`.
    #[allow(clippy::too_many_arguments)]
    fn group_expand(
        &self,
        h: &Self::Buf,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        y: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// out = x ⊙ mask / (1 − p), the mask drawn from a counter-based RNG keyed by `seed` (the same seed gives
    /// the same mask, so backward and recomputation reuse it without storing it). x[i] takes the mask's element
    /// `first + i`, so that a range of rows run on its own draws the rows' part of the whole mask.
    fn dropout(&self, x: &Self::Buf, p: f32, seed: u64, first: u64, out: &mut Self::Buf) -> Result<()>;

    // ---- optimizer ----

    /// Σ x², accumulated in f64 and returned to the host (gradient norms).
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;
    /// One AdamW step on parameter p with gradient g and moments m, v, all in place: g̃ = grad_coef·g,
    /// m ← β1·m + (1 − β1)·g̃, v ← β2·v + (1 − β2)·g̃², p ← p − lr·(c2/c1)·m/(√v + eps·c2), then p ← p·(1 − lr·wd).
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, s: AdamStep) -> Result<()>;
    /// bitsandbytes' block-wise 8-bit AdamW step (methods.md §8), in place: m and v are 8-bit codes of the signed and
    /// unsigned dynamic maps with one absmax per `ADAM8_BLOCK` elements. Per block: dequantize both moments, update
    /// them in f32 from g̃ = grad_coef·g (a non-finite g̃ zeroes them and leaves p alone), step p with the unquantized
    /// moments as `adamw` does, then re-quantize against the block's new absmax (nearest code, ties to the even index;
    /// an m code whose sign differs from m moves one step toward m's sign).
    #[allow(clippy::too_many_arguments)]
    fn adamw_8bit(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Bytes,
        m_absmax: &mut Self::Buf,
        v: &mut Self::Bytes,
        v_absmax: &mut Self::Buf,
        s: AdamStep,
    ) -> Result<()>;
}

/// Elements per absmax block of the 8-bit optimizer states.
pub const ADAM8_BLOCK: usize = 256;

/// The size checks of `adamw_8bit`.
pub(crate) fn check_adamw_8bit(n: usize, g: usize, m: usize, m_absmax: usize, v: usize, v_absmax: usize) -> Result<()> {
    let blocks = n.div_ceil(ADAM8_BLOCK);
    check(g == n && m == n && v == n && m_absmax == blocks && v_absmax == blocks, "adamw_8bit", || {
        format!("p {n}, g {g}, m {m}, v {v}, absmax {m_absmax} and {v_absmax} (need {blocks})")
    })
}

/// `Error::Invalid("op: what")` unless `cond`: the size checks every backend makes before touching buffers.
pub(crate) fn check(cond: bool, op: &str, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(crate::error::Error::Invalid(format!("{op}: {}", what())))
    }
}

/// `upload_weight`'s f32 values of a weight: `dense` where the caller passed them, else its stored form dequantized
/// (a `Dense` base has no other source of values).
pub(crate) fn weight_values_of<'a>(base: &BaseWeight, dense: Option<&'a [f32]>) -> Result<std::borrow::Cow<'a, [f32]>> {
    match (dense, base.dequantize()) {
        (Some(d), _) => Ok(std::borrow::Cow::Borrowed(d)),
        (None, Some(v)) => Ok(std::borrow::Cow::Owned(v)),
        (None, None) => Err(crate::error::Error::Invalid("upload_weight: a dense weight without its values".into())),
    }
}

/// Whether QPEFT_POISON is set (and not "0"): `Backend::uninit` buffers are then NaN rather than whatever they hold.
pub(crate) fn poison() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var_os("QPEFT_POISON").is_some_and(|v| v != "0"))
}

/// A frozen weight's values must be finite in fp16 (`Precision::F16` stores them unscaled).
pub(crate) fn check_f16_range(values: &[f32]) -> Result<()> {
    use rayon::prelude::*;
    match values.par_iter().find_any(|v| v.abs() > 65504.0) {
        Some(v) => Err(crate::error::Error::Invalid(format!(
            "upload_weight: a weight value {v:e} exceeds fp16's largest finite value (65504); use the bf16 precision (cuda:bf16)"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn check_groups(op: &str, g: Groups, rows: usize, wide: usize, narrow: usize) -> Result<()> {
    check(g.groups > 0 && g.groups <= g.width && wide == rows * g.width && narrow == rows * g.groups, op, || {
        format!("{rows} rows of {} features in {} groups do not fit buffers of {wide} and {narrow}", g.width, g.groups)
    })
}

/// Buffer lengths of an attention call (q, k cache, v cache, key mask, and the buffers shaped like q).
pub(crate) fn check_attention(
    q: usize,
    k: usize,
    v: usize,
    key_mask: usize,
    s: AttentionShape,
    q_like: &[usize],
) -> Result<()> {
    let q_size = s.batch * s.q_len * s.heads * s.head_dim;
    let kv_size = s.batch * s.kv_capacity * s.kv_heads * s.head_dim;
    check(
        q == q_size
            && q_like.iter().all(|&n| n == q_size)
            && k == kv_size
            && v == kv_size
            && key_mask == s.batch * s.kv_capacity
            && s.q_len <= s.kv_len
            && s.kv_len <= s.kv_capacity
            && s.kv_heads > 0
            && s.heads.is_multiple_of(s.kv_heads),
        "attention",
        || format!("buffer sizes do not fit {s:?}"),
    )
}
