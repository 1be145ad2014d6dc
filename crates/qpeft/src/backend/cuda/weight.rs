//! Frozen linear weights on the GPU. A quantized base stays packed in device memory (bitsandbytes NF4/FP4 with
//! plain or double-quantized scales and IR-QLoRA's τ, or GPTQ int4) and is dequantized at every use into one
//! buffer shared by all layers, in the GEMM's dtype: fp16 or bf16 (the 16-bit precisions, rounded to nearest even
//! from the exact f32 value, as bitsandbytes returns it for an fp16 or bf16 compute dtype) or f32. The f32 values are
//! bit-exact with the CPU's `BaseWeight::dequantize`. A dense base is stored in the GEMM dtype.

use std::sync::{Mutex, MutexGuard};

use cudarc::driver::LaunchConfig;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::gemm::{Dtype, Gemm, Operand};
use super::operand::CudaOperand;
use super::{device_err, grid, Cuda, Precision, THREADS};
use crate::backend::{check, check_f16_range, Backend, MatMul, Tail};
use crate::error::Result;
use crate::quant::base::BaseWeight;
use crate::quant::icq::{ICQ_BLOCK, SUPER_BLOCK};
use crate::quant::nf4::{Absmax, Bnb4};

pub struct CudaWeight {
    out_dim: usize,
    in_dim: usize,
    form: Form,
}

enum Form {
    DenseF32(CudaSlice<f32>),
    /// The 16-bit precisions' bits (`Cuda::half`).
    DenseHalf(CudaSlice<u16>),
    Bnb4(PackedBnb4),
    Int4(PackedInt4),
}

struct PackedBnb4 {
    packed: CudaSlice<u8>,
    table: CudaSlice<f32>,
    n: usize,
    block: usize,
    scales: Scales,
    /// IR-QLoRA's τ: codes and per-super-block scales.
    tau: Option<(CudaSlice<u8>, CudaSlice<f32>)>,
}

enum Scales {
    Plain(CudaSlice<f32>),
    Double { codes: CudaSlice<u8>, nested: CudaSlice<f32>, nested_block: usize, offset: f32 },
}

struct PackedInt4 {
    qweight: CudaSlice<u32>,
    scales: CudaSlice<f32>,
    zeros: CudaSlice<f32>,
    g_idx: CudaSlice<u32>,
}

/// The kernels' `struct Bnb4` (kernels.cu); null pointers mark absent parts.
#[repr(C)]
#[derive(Clone, Copy)]
struct Bnb4Args {
    packed: u64,
    table: u64,
    n: i64,
    block_shift: i32,
    absmax: u64,
    absmax_codes: u64,
    nested: u64,
    nested_shift: i32,
    offset: f32,
    tau_codes: u64,
    tau_scales: u64,
    tau_shift: i32,
    tau_super_shift: i32,
    dyn_map: u64,
    in_dim: i32,
    ld: i32,
}

/// The kernels' `struct Int4`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Int4Args {
    qweight: u64,
    scales: u64,
    zeros: u64,
    g_idx: u64,
    out_dim: i32,
    in_dim: i32,
    ld: i32,
}

// SAFETY: plain #[repr(C)] structs of integers, floats and device addresses, laid out as the kernels' structs.
unsafe impl DeviceRepr for Bnb4Args {}
unsafe impl DeviceRepr for Int4Args {}

/// log2 of a block size, which the kernels need to be a power of two (bitsandbytes' always are).
fn shift(block: usize) -> Result<i32> {
    check(block.is_power_of_two(), "dequantize", || format!("block size {block} is not a power of two"))?;
    Ok(block.trailing_zeros() as i32)
}

/// A weight dequantized once for the products of a `hold_weights` span (in the 16-bit dtype): Ŵ's rows at a stride of
/// `ld` (room after each for a forward tail's factor) and `extra` rows after them (room for a backward tail's);
/// `filled` once its first product has dequantized it. Keyed by the address of its packed values.
pub(super) struct Held {
    key: u64,
    ld: usize,
    extra: usize,
    buf: CudaSlice<u16>,
    filled: bool,
}

/// A growable device buffer reused across calls (ops run in stream order, so one buffer serves every layer).
pub(super) struct Scratch<T>(Mutex<Option<CudaSlice<T>>>);

impl<T: DeviceRepr + ValidAsZeroBits> Scratch<T> {
    pub fn new() -> Self {
        Scratch(Mutex::new(None))
    }

    /// Frees the buffer (the next `get` allocates again).
    pub fn release(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The buffer, at least `len` long.
    pub fn get(&self, cuda: &Cuda, len: usize) -> Result<MutexGuard<'_, Option<CudaSlice<T>>>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None;
            *slot = Some(cuda.alloc::<T>(len.max(1))?);
        }
        Ok(slot)
    }
}

impl Cuda {
    pub(super) fn upload_weight_form(
        &self,
        dense: &[f32],
        base: &BaseWeight,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<CudaWeight> {
        check(dense.len() == out_dim * in_dim, "upload_weight", || {
            format!("{} values for a {out_dim} × {in_dim} weight", dense.len())
        })?;
        if self.precision == Precision::F16 {
            // Stored (dense) or dequantized (packed: no larger than the dense values, up to double quantization's
            // rounding of the scales) as fp16.
            check_f16_range(dense)?;
        }
        let form = match base {
            BaseWeight::Bnb4(q) => Form::Bnb4(self.pack_bnb4(q, None)?),
            BaseWeight::IcqNf4(q) => Form::Bnb4(self.pack_bnb4(&q.nf4, Some((&q.tau_codes, &q.tau_scales)))?),
            BaseWeight::Int4(q) => {
                check(out_dim * in_dim < 1 << 32, "upload_weight", || {
                    format!("a {out_dim} × {in_dim} int4 weight has 2³² values or more")
                })?;
                let groups = q.groups();
                let zeros: Vec<f32> = (0..groups)
                    .flat_map(|g| (0..q.out_dim).map(move |j| (g, j)))
                    .map(|(g, j)| q.zero_point(g, j))
                    .collect();
                let scales: Vec<f32> = q.scales.iter().map(|s| s.to_f32()).collect();
                let qweight: Vec<u32> = q.qweight.iter().map(|&w| w as u32).collect();
                let g_idx: Vec<u32> = q.g_idx.iter().map(|&g| g as u32).collect();
                Form::Int4(PackedInt4 {
                    qweight: self.upload_any(&qweight)?,
                    scales: self.upload_any(&scales)?,
                    zeros: self.upload_any(&zeros)?,
                    g_idx: self.upload_any(&g_idx)?,
                })
            }
            // A GGUF block format is uploaded as its values, like a dense weight.
            BaseWeight::Dense | BaseWeight::Ggml(_) => match self.precision {
                Precision::F32 => Form::DenseF32(self.upload_any(dense)?),
                Precision::Bf16 => Form::DenseHalf(
                    self.upload_any(&dense.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>())?,
                ),
                Precision::F16 => Form::DenseHalf(
                    self.upload_any(&dense.iter().map(|&x| f16::from_f32(x).to_bits()).collect::<Vec<u16>>())?,
                ),
            },
        };
        Ok(CudaWeight { out_dim, in_dim, form })
    }

    fn pack_bnb4(&self, q: &Bnb4, tau: Option<(&Vec<u8>, &Vec<f32>)>) -> Result<PackedBnb4> {
        let scales = match &q.absmax {
            Absmax::Plain(a) => Scales::Plain(self.upload_any(a)?),
            Absmax::Double { nested, offset } => Scales::Double {
                codes: self.upload_any(&nested.codes)?,
                nested: self.upload_any(&nested.absmax)?,
                nested_block: nested.block,
                offset: *offset,
            },
        };
        let tau = match tau {
            Some((codes, scales)) => Some((self.upload_any(codes)?, self.upload_any(scales)?)),
            None => None,
        };
        Ok(PackedBnb4 {
            packed: self.upload_any(&q.packed)?,
            table: self.upload_any(&q.kind.table())?,
            n: q.numel(),
            block: q.block,
            scales,
            tau,
        })
    }

    /// Ŵ into `out` as `dtype`, rows at a stride of `ld` (≥ in_dim: room for a tail after each row); `out` must hold
    /// (out_dim − 1) · ld + in_dim values.
    fn dequantize_into(&self, w: &CudaWeight, out: u64, dtype: Dtype, ld: usize) -> Result<()> {
        check(ld >= w.in_dim && ld < 1 << 31, "dequantize", || {
            format!("a row stride of {ld} for rows of {}", w.in_dim)
        })?;
        let n = w.out_dim * w.in_dim;
        let suffix = match dtype {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        };
        match &w.form {
            Form::Bnb4(q) => {
                let (absmax, absmax_codes, nested, nested_shift, offset) = match &q.scales {
                    Scales::Plain(a) => (self.addr(a), 0, 0, 0, 0.0),
                    Scales::Double { codes, nested, nested_block, offset } => {
                        (0, self.addr(codes), self.addr(nested), shift(*nested_block)?, *offset)
                    }
                };
                let (tau_codes, tau_scales) = q.tau.as_ref().map_or((0, 0), |(c, s)| (self.addr(c), self.addr(s)));
                let args = Bnb4Args {
                    packed: self.addr(&q.packed),
                    table: self.addr(&q.table),
                    n: q.n as i64,
                    block_shift: shift(q.block)?,
                    absmax,
                    absmax_codes,
                    nested,
                    nested_shift,
                    offset,
                    tau_codes,
                    tau_scales,
                    tau_shift: shift(ICQ_BLOCK)?,
                    tau_super_shift: shift(SUPER_BLOCK)?,
                    dyn_map: self.addr(&self.dyn_map),
                    in_dim: w.in_dim as i32,
                    ld: ld as i32,
                };
                launch!(self, &format!("dequantize_bnb4_{suffix}"), grid(q.n.div_ceil(16)), &args, &out)
            }
            Form::Int4(q) => {
                let args = Int4Args {
                    qweight: self.addr(&q.qweight),
                    scales: self.addr(&q.scales),
                    zeros: self.addr(&q.zeros),
                    g_idx: self.addr(&q.g_idx),
                    out_dim: w.out_dim as i32,
                    in_dim: w.in_dim as i32,
                    ld: ld as i32,
                };
                launch!(self, &format!("dequantize_int4_{suffix}"), grid(n), &args, &out)
            }
            Form::DenseF32(_) | Form::DenseHalf(_) => unreachable!("dense weights are not dequantized"),
        }
    }

    /// `Backend::hold_weights`: room for each packed weight not held yet, with its rows (and its row count) padded as an
    /// operand with `room` pads its rows, so that the tails of the operands made with that room fit.
    pub(super) fn hold(&self, ws: &[&CudaWeight], room: usize) -> Result<()> {
        if self.half().is_none() {
            return Ok(());
        }
        let padded = |n: usize| if room > 0 { (n + room).next_multiple_of(8) } else { n };
        // The held weights are the span's largest: the shared buffer, sized for the largest weight used so far (the
        // MLP's, in a forward that does not hold them), would sit idle beside them. Freed first, so that it never
        // sits beside them.
        self.w_half.release();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for w in ws {
            let Some(key) = self.packed_key(w) else { continue };
            if held.iter().any(|h| h.key == key) {
                continue;
            }
            let (ld, extra) = (padded(w.in_dim), padded(w.out_dim) - w.out_dim);
            // Ŵ is written at the first product, each tail's region at every product that folds one.
            let buf = self.alloc_uninit::<u16>((w.out_dim + extra) * ld)?;
            held.push(Held { key, ld, extra, buf, filled: false });
        }
        Ok(())
    }

    /// The address identifying a packed weight (its packed values); None for a dense one.
    fn packed_key(&self, w: &CudaWeight) -> Option<u64> {
        match &w.form {
            Form::Bnb4(q) => Some(self.addr(&q.packed)),
            Form::Int4(q) => Some(self.addr(&q.qweight)),
            Form::DenseF32(_) | Form::DenseHalf(_) => None,
        }
    }

    /// Where a held w is (dequantized now if not yet) and its row stride, if it is held and has room for a GEMM of
    /// K = k: forward, rows of k; backward, k − out_dim tail rows.
    fn held_weight(&self, w: &CudaWeight, dtype: Dtype, k: usize, forward: bool) -> Result<Option<(u64, usize)>> {
        let Some(key) = self.packed_key(w) else { return Ok(None) };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = held.iter_mut().find(|h| h.key == key) else { return Ok(None) };
        let fits = if forward { k <= h.ld } else { k - w.out_dim <= h.extra };
        if !fits {
            return Ok(None);
        }
        // The address outlives the lock: products and `release_weights` are queued from the backend's one thread, so
        // the buffer is not freed before the caller's GEMM is queued (and frees are stream-ordered).
        let at = self.addr(&h.buf);
        if !h.filled {
            self.dequantize_into(w, at, dtype, h.ld)?;
            h.filled = true;
        }
        Ok(Some((at, h.ld)))
    }

    /// The address of a dense table with rows of `dim` values, and its format as the `embedding` kernel numbers them
    /// (0 f32, 1 bf16, 2 fp16).
    pub(super) fn dense_table(&self, w: &CudaWeight, dim: usize) -> Result<(u64, i32)> {
        check(w.in_dim == dim, "embedding", || format!("a table with rows of {} values, not {dim}", w.in_dim))?;
        match &w.form {
            Form::DenseF32(d) => Ok((self.addr(d), 0)),
            Form::DenseHalf(d) => Ok((self.addr(d), if self.half() == Some(Dtype::F16) { 2 } else { 1 })),
            _ => Err(crate::error::Error::Invalid("embedding: the table is quantized; embeddings stay dense".into())),
        }
    }

    /// Ŵ in f32 (bit-exact with the CPU's dequantization; a dense bf16 weight widens exactly).
    pub(super) fn weight_values_f32(&self, w: &CudaWeight) -> Result<CudaSlice<f32>> {
        let n = w.out_dim * w.in_dim;
        let mut out = self.alloc::<f32>(n)?;
        match &w.form {
            Form::DenseF32(d) => self.stream.memcpy_dtod(d, &mut out).map_err(|e| device_err("copy", e))?,
            Form::DenseHalf(d) => self.widen_half(d, &mut out)?,
            _ => self.dequantize_into(w, self.addr(&out), Dtype::F32, w.in_dim)?,
        }
        Ok(out)
    }

    /// bf16 bits of x (rounded to nearest even) into the `x.len()` values at `out`.
    pub(super) fn round_to_bf16(&self, x: &CudaSlice<f32>, out: u64) -> Result<()> {
        // One row (no room after it): the kernel's cols and row stride are both the length.
        let (n64, cols) = (x.len() as i64, x.len().max(1) as i32);
        launch!(self, "to_bf16", grid(x.len().div_ceil(8)), x, &out, &n64, &cols, &cols)
    }

    /// bf16 bits widened to f32 (exact); `out` holds as many values as `x`.
    pub(super) fn widen_bf16(&self, x: &CudaSlice<u16>, out: &mut CudaSlice<f32>) -> Result<()> {
        let n64 = x.len() as i64;
        launch!(self, "from_bf16", grid(x.len()), x, out, &n64)
    }

    /// The 16-bit precisions' bits (`half`) widened to f32 (exact).
    fn widen_half(&self, x: &CudaSlice<u16>, out: &mut CudaSlice<f32>) -> Result<()> {
        if self.half() == Some(Dtype::F16) {
            let n64 = x.len() as i64;
            launch!(self, "from_f16", grid(x.len()), x, out, &n64)
        } else {
            self.widen_bf16(x, out)
        }
    }

    /// The largest |x| into the u32 at `amax` (f32 bits), which is cleared first.
    pub(super) fn absmax_into(&self, x: &CudaSlice<f32>, amax: u64) -> Result<()> {
        // SAFETY: `amax` is a live device u32 of this context; the memset is queued on the backend's stream.
        unsafe { cudarc::driver::result::memset_d8_async(amax, 0, 4, self.stream.cu_stream()) }
            .map_err(|e| device_err("clearing a maximum", e))?;
        let n64 = x.len() as i64;
        // Enough blocks to fill the GPU with 16-byte loads, few enough that their atomicMax on one word stays cheap.
        let blocks = x.len().div_ceil(THREADS as usize * 16).clamp(1, 2048) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "absmax", cfg, x, &n64, &amax)
    }

    /// The 16-bit operand type of this precision; None in f32.
    pub(super) fn half(&self) -> Option<Dtype> {
        match self.precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(Dtype::Bf16),
            Precision::F16 => Some(Dtype::F16),
        }
    }

    /// x·Ŵᵀ (`forward`) or dy·Ŵ (input gradient) into `out` for the operand of x (dy), with Ŵ in the GEMM dtype:
    /// packed bases dequantize into the shared weight buffer first (or are held dequantized, `hold`, rows at the held
    /// stride); 16-bit weights read the operand's 16-bit copy (in the f16 mode the product's alpha undoes its scale),
    /// with f32 accumulation and output. A tail joins the GEMM by
    /// K-concatenation where the weight is dequantized anyway and the operand has room for it: h after each of the
    /// operand's rows, the factor after each row of Ŵ (forward: [x | h]·[Ŵ | F]ᵀ) or after its last row (backward:
    /// [dy | h]·[Ŵ ; F]), both padded with zeros to the operand's row stride. Otherwise it is a product of its own,
    /// written first, the base product adding onto it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weight_product(
        &self,
        x: &CudaOperand,
        w: &CudaWeight,
        tail: Option<Tail<'_, Cuda>>,
        rows: usize,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
        forward: bool,
    ) -> Result<()> {
        let (x_cols, out_cols) = if forward { (w.in_dim, w.out_dim) } else { (w.out_dim, w.in_dim) };
        let op = if forward { "linear" } else { "linear_backward" };
        let rows_fit = x.row_stride().is_none_or(|_| x.cols == x_cols);
        check(x.x.len() == rows * x_cols && out.len() == rows * out_cols && rows_fit, op, || {
            format!(
                "{} inputs and {} outputs for {rows} rows of a {} × {} weight",
                x.x.len(),
                out.len(),
                w.out_dim,
                w.in_dim
            )
        })?;
        // Only packed bases need the shared buffer (a dense head would otherwise grow it to the vocabulary's size).
        let half = self.half();
        let packed = !matches!(w.form, Form::DenseF32(_) | Form::DenseHalf(_));
        let fold = tail.as_ref().filter(|t| half.is_some() && packed && x.room() >= t.rank);
        let mut beta = accumulate;
        if let Some(t) = tail.as_ref().filter(|_| fold.is_none()) {
            self.tail_product(x, t, rows, out, accumulate, forward)?;
            beta = true;
        }
        // K of the GEMM: the operand's whole row stride when a tail is folded in.
        let k = if fold.is_some() { x.ld } else { x_cols };
        let held = match half {
            Some(h) if packed => self.held_weight(w, h, k, forward)?,
            _ => None,
        };
        // The dequantized weight's row stride: a held one's, else rows of k (forward) or in_dim (backward).
        let w_ld = held.map_or(if forward { k } else { w.in_dim }, |(_, ld)| ld);
        let n = if packed && held.is_none() { out_cols * k } else { 0 };
        let w_f32 = self.w_f32.get(self, if half.is_some() { 0 } else { n })?;
        let w_half = self.w_half.get(self, if half.is_some() { n } else { 0 })?;
        let weight = match (&w.form, half, held) {
            (Form::DenseF32(d), _, _) => Operand::f32(self.addr(d)),
            (Form::DenseHalf(d), Some(h), _) => Operand::half(self.addr(d), h),
            (_, Some(h), Some((at, _))) => Operand::half(at, h),
            (_, Some(h), None) => {
                let at = self.addr(w_half.as_ref().expect("allocated"));
                self.dequantize_into(w, at, h, w_ld)?;
                Operand::half(at, h)
            }
            (_, None, _) => {
                let at = self.addr(w_f32.as_ref().expect("allocated"));
                self.dequantize_into(w, at, Dtype::F32, w.in_dim)?;
                Operand::f32(at)
            }
        };
        if let Some(t) = fold {
            let copy = self.addr(x.half.as_ref().expect("a 16-bit operand"));
            let h_region = (copy + 2 * x.cols as u64, x.ld - x.cols, x.ld);
            let f_region = if forward {
                (weight.ptr + 2 * w.in_dim as u64, w.out_dim, k - w.in_dim, w_ld)
            } else {
                (weight.ptr + 2 * (w.out_dim * w_ld) as u64, k - w.out_dim, w.in_dim, w_ld)
            };
            self.tail_halves(x, t, rows, h_region, f_region, forward)?;
        }
        let mut g = Gemm::new(rows, out_cols, k, false, forward);
        if packed {
            g.ldb = w_ld;
        }
        g.beta = if beta { 1.0 } else { 0.0 };
        let (input, alpha_at) = self.gemm_operand(x, weight.dtype)?;
        if let (Some(ld), true) = (x.row_stride(), input.is_half()) {
            g.lda = ld;
        }
        g.alpha_at = alpha_at;
        // SAFETY: sizes checked above; the weight operand holds out_dim rows of in_dim values at a stride of w_ld
        // (with a folded tail, its rows or its row count extended to k; a held one fits k, `held_weight`), the
        // operand's copy `rows` rows of its row stride, the scratch buffers at least what was asked of them.
        unsafe { self.gemm(g, input, weight, self.addr(out)) }
    }

    /// out (+)= the tail's product as a GEMM of its own (`forward`: F is [out, r], else [r, in]): in the 16-bit modes on
    /// its 16-bit factors (`tail_halves`) under the operand x's alpha, in f32 with the tail's scale as alpha.
    fn tail_product(
        &self,
        x: &CudaOperand,
        t: &Tail<'_, Cuda>,
        rows: usize,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
        forward: bool,
    ) -> Result<()> {
        let out_cols = out.len() / rows.max(1);
        let Some(dtype) = self.half() else {
            let shape = MatMul::new(rows, out_cols, t.rank).scaled(t.scale).acc(accumulate);
            return Backend::matmul(self, t.h, t.factor, out, if forward { shape.bt() } else { shape });
        };
        let (h, f) = (self.alloc_uninit::<u16>(t.h.len())?, self.alloc_uninit::<u16>(t.factor.len())?);
        let (f_rows, f_cols) = if forward { (out_cols, t.rank) } else { (t.rank, out_cols) };
        self.tail_halves(
            x,
            t,
            rows,
            (self.addr(&h), t.rank, t.rank),
            (self.addr(&f), f_rows, f_cols, f_cols),
            forward,
        )?;
        let mut g = Gemm::new(rows, out_cols, t.rank, false, forward);
        g.beta = if accumulate { 1.0 } else { 0.0 };
        g.alpha_at = self.gemm_operand(x, dtype)?.1;
        // SAFETY: tail_halves checked h [rows, r] and the factor against out's columns; the copies are that large.
        unsafe {
            self.gemm(g, Operand::half(self.addr(&h), dtype), Operand::half(self.addr(&f), dtype), self.addr(out))
        }
    }
}
