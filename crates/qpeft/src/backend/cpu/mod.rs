//! The CPU backend: rayon over rows, the `gemm` crate for matrix products. It is the reference every other
//! backend is checked against. It computes in f32 (`Cpu::new()`) or, for finite-difference checks of the
//! backward pass, in f64 (`Cpu::f64()`): the same kernels, instantiated twice. `Cpu::f16()` and `Cpu::bf16()` are
//! the f32 backend with the roundings of the CUDA backend's 16-bit modes, so that the GPU's numerics can be checked at
//! their own precision.

mod adam8;
mod attention;
pub mod bf16;
mod weight;

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{
    check, check_adamw_8bit, check_attention, check_f16_range, check_groups, f16_shift, flash_head, poison,
    weight_values_of, AdamStep, AttentionShape, Backend, GluKind, Groups, MatMul, RowWrite, Tail,
};
use crate::error::{Error, Result};
use crate::linalg::{gemm_strided, Real, Strided};
use crate::quant::base::BaseWeight;
pub use weight::{CpuWeight, PackedRows};

/// A product input (`Backend::operand`): x, and what products make of it, each on first use — the values the 16-bit
/// emulations round x to (`product_input`) and the bf16 kernels' tile layout.
pub struct CpuOperand<'a, T: Real> {
    x: &'a Vec<T>,
    /// The f16 mode's power-of-two scale of x (`f16_shift`).
    shift: OnceLock<i32>,
    rounded: OnceLock<Cow<'a, [T]>>,
    tiles: OnceLock<bf16::Input>,
}

/// Rows per rayon task for the row-wise ops: enough work to amortise scheduling.
const ROW_CHUNK: usize = 16;
/// Elements per rayon task for element-wise ops.
const ELEM_CHUNK: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu<T = f32> {
    half: Option<Half>,
    /// The bf16 instructions running base products (`bf16_native`).
    kernel: Option<bf16::Kernel>,
    _t: PhantomData<T>,
}

/// The 16-bit format of the GPU mode an f32 `Cpu` emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    Bf16,
    F16,
}

impl Cpu<f32> {
    pub const fn new() -> Self {
        Cpu { half: None, kernel: None, _t: PhantomData }
    }

    /// f32 kernels rounding where the CUDA backend's f16 mode (`Precision::F16`) rounds: base weights and embedding
    /// tables are stored as fp16, base products take fp16 inputs (output gradients in backward) scaled by a power of
    /// two per tensor (`f16_shift`), checkpointed block inputs are saved as bf16, attention rounds as the GPU's path
    /// for its head size does (`attention_operands`), adapters' products on a linear's input or output gradient take
    /// it as the base product does and their other factor in fp16 under its own scale (`matmul_from`), and the other
    /// products (the adapters' rank-sized ones) take TF32 inputs. Products
    /// accumulate in f32 as on the tensor cores. A power-of-two scale only moves exponents, so rounding x·2^s and
    /// multiplying by 2^−s afterwards, as the GPU does, gives the values this emulation rounds x to. The fused attention
    /// kernels round unnormalised probabilities, the emulation normalised ones, so agreement there is close rather
    /// than exact.
    pub const fn f16() -> Self {
        Cpu { half: Some(Half::F16), kernel: None, _t: PhantomData }
    }

    /// The same for the bf16 mode (`Precision::Bf16`): bf16 in place of fp16, and no scales (bf16 has f32's range).
    pub const fn bf16() -> Self {
        Cpu { half: Some(Half::Bf16), kernel: None, _t: PhantomData }
    }

    /// The bf16 numerics of `bf16()` at the speed of the CPU's bf16 instructions (`--device cpu:bf16`): AMX-BF16 tiles,
    /// else AVX512-BF16 (`bf16::Kernel::detect`). Base weights are packed once into the tiles' layout and base
    /// products (forward and backward) take the operands `bf16()` rounds to, so the two differ only in the order of f32
    /// additions. Without either kernel it is `bf16()`.
    pub fn bf16_native() -> Self {
        Cpu { half: Some(Half::Bf16), kernel: bf16::Kernel::detect(), _t: PhantomData }
    }
}

impl Cpu<f64> {
    /// The f64 instance, for finite-difference checks.
    pub const fn f64() -> Self {
        Cpu { half: None, kernel: None, _t: PhantomData }
    }
}

/// The nearest bf16 (ties to even), as `__float2bfloat16_rn`.
fn bf16_rne(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The nearest fp16 (ties to even, subnormals kept, beyond 65504 infinite), as `cvt.rn.f16.f32`.
fn f16_rne(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// 2^s for |s| ≤ 126, exactly.
fn pow2(s: i32) -> f32 {
    f32::from_bits(((127 + s) as u32) << 23)
}

/// The largest magnitude in x (NaN if x holds one).
fn amax<T: Real>(x: &[T]) -> f32 {
    x.iter().fold(0f32, |m, v| {
        let a = v.to_f32().unwrap_or(f32::NAN).abs();
        if a > m || a.is_nan() {
            a
        } else {
            m
        }
    })
}

/// x as the f16 mode's GPU sees it after scaling by 2^s: fp16(x·2^s)·2^−s.
fn f16_scaled(x: f32, s: i32) -> f32 {
    f16_rne(x * pow2(s)) * pow2(-s)
}

/// The nearest TF32 (10 explicit mantissa bits, ties away from zero), as `cvt.rna.tf32.f32`. (Truncation, the other
/// candidate, measured 10× further from cuBLAS's TF32 products on an H100.)
fn tf32_rna(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
}

impl<T: Real> Cpu<T> {
    /// The bf16 kernel of a backend that packed a `CpuWeight::Bf16` (only `bf16_native` with a kernel does).
    fn native(&self) -> bf16::Kernel {
        self.kernel.expect("bf16 weights come from a backend with a bf16 kernel")
    }

    /// Attention's rounding: the CUDA 16-bit modes' fused kernels where `flash_head`, their TF32 GEMMs elsewhere.
    fn attention_operands(&self, s: &AttentionShape) -> attention::Operands {
        match (self.half, flash_head(s.head_dim)) {
            (None, _) => attention::Operands::Exact,
            (Some(_), false) => attention::Operands::Tf32,
            (Some(Half::Bf16), true) => attention::Operands::Bf16,
            (Some(Half::F16), true) => attention::Operands::F16,
        }
    }

    /// x with `round` applied to every value in the 16-bit emulations; x itself otherwise.
    fn rounded<'a>(&self, x: &'a [T], round: impl Fn(f32) -> f32 + Sync) -> Cow<'a, [T]> {
        if self.half.is_none() {
            return Cow::Borrowed(x);
        }
        Cow::Owned(x.par_iter().map(|v| T::of(round(v.to_f32().unwrap_or(f32::NAN)))).collect())
    }

    /// x rounded to bf16 in the 16-bit emulations (`rounded` with `bf16_rne`, vectorized); x itself otherwise.
    fn rounded_bf16<'a>(&self, x: &'a [T]) -> Cow<'a, [T]> {
        if self.half.is_none() {
            return Cow::Borrowed(x);
        }
        let mut x = x.to_vec();
        x.par_chunks_mut(ELEM_CHUNK).for_each(T::round_bf16);
        Cow::Owned(x)
    }

    /// A base product's input (output gradient in backward) as the tensor cores see it: bf16, or fp16 under the
    /// tensor's power-of-two scale.
    fn product_input<'a>(&self, x: &'a [T]) -> Cow<'a, [T]> {
        match self.half {
            Some(Half::F16) => {
                let s = f16_shift(amax(x));
                self.rounded(x, move |v| f16_scaled(v, s))
            }
            _ => self.rounded_bf16(x),
        }
    }

    /// The values the products on `x` read (`product_input`, once per operand).
    fn rounded_operand<'o>(&self, x: &'o CpuOperand<'_, T>) -> &'o [T] {
        x.rounded.get_or_init(|| match self.half {
            Some(Half::F16) => {
                let s = self.operand_shift(x);
                self.rounded(x.x, move |v| f16_scaled(v, s))
            }
            _ => self.product_input(x.x),
        })
    }

    /// The f16 mode's scale of an operand (`f16_shift` of its largest magnitude), once per operand.
    fn operand_shift(&self, x: &CpuOperand<'_, T>) -> i32 {
        *x.shift.get_or_init(|| f16_shift(amax(x.x)))
    }

    /// out += the tail's product for the operand x of its linear (`forward`: F is [out, r], else [r, in]), its
    /// factors rounded as `Tail` describes.
    fn tail_product(
        &self,
        x: &CpuOperand<'_, T>,
        t: Tail<'_, Self>,
        rows: usize,
        out: &mut [T],
        forward: bool,
    ) -> Result<()> {
        let scale = t.scale;
        let (h, f, alpha) = match self.half {
            None => (Cow::Borrowed(&t.h[..]), Cow::Borrowed(&t.factor[..]), scale),
            Some(Half::Bf16) => (self.rounded_bf16(t.h), self.rounded(t.factor, move |v| bf16_rne(v * scale)), 1.0),
            Some(Half::F16) => {
                let (u, th) = (self.operand_shift(x), f16_shift(amax(t.h)));
                let h = self.rounded(t.h, move |v| f16_scaled(v, th));
                // Clamped as the GPU clamps it (reached only when h is 0, whose shift is 120, or 2^120 from x's scale).
                let d = (u - th).clamp(-120, 120);
                (h, self.rounded(t.factor, move |v| f16_scaled(v * scale, d)), 1.0)
            }
        };
        let shape = MatMul::new(rows, out.len() / rows.max(1), t.rank).scaled(alpha).acc(true);
        self.gemm(&h, &f, out, if forward { shape.bt() } else { shape })
    }
    /// The base product of `linear_from`.
    fn base_product(
        &self,
        x: &CpuOperand<'_, T>,
        w: &CpuWeight<T>,
        rows: usize,
        out: &mut [T],
        accumulate: bool,
    ) -> Result<()> {
        match w {
            CpuWeight::Values(w) => {
                let (in_dim, out_dim) = (x.x.len() / rows.max(1), out.len() / rows.max(1));
                self.gemm(self.rounded_operand(x), w, out, MatMul::new(rows, out_dim, in_dim).bt().acc(accumulate))
            }
            CpuWeight::Packed(g) => {
                check(x.x.len() == rows * g.in_dim() && out.len() == rows * g.out_dim(), "linear", || {
                    format!(
                        "{} inputs and {} outputs for {rows} rows of a {} × {} weight",
                        x.x.len(),
                        out.len(),
                        g.out_dim(),
                        g.in_dim()
                    )
                })?;
                self.linear_packed(self.rounded_operand(x), g, rows, out, accumulate);
                Ok(())
            }
            CpuWeight::Bf16 { forward, .. } => {
                check(x.x.len() == rows * forward.in_dim && out.len() == rows * forward.out_dim, "linear", || {
                    format!("{} inputs and {} outputs for {rows} rows of {forward:?}", x.x.len(), out.len())
                })?;
                let a = x.tiles.get_or_init(|| bf16::Input::new(x.x, rows, forward.in_dim));
                bf16::product(self.native(), a, forward, out, accumulate);
                Ok(())
            }
        }
    }

    /// The base product of `linear_backward_from`.
    fn base_backward(
        &self,
        dy: &CpuOperand<'_, T>,
        w: &CpuWeight<T>,
        rows: usize,
        dx: &mut [T],
        accumulate: bool,
    ) -> Result<()> {
        let (out_dim, in_dim) = (dy.x.len() / rows.max(1), dx.len() / rows.max(1));
        match w {
            CpuWeight::Values(w) => {
                self.gemm(self.rounded_operand(dy), w, dx, MatMul::new(rows, in_dim, out_dim).acc(accumulate))
            }
            CpuWeight::Packed(g) => {
                check(dy.x.len() == rows * g.out_dim() && dx.len() == rows * g.in_dim(), "linear_backward", || {
                    format!(
                        "{} output gradients and {} input gradients for {rows} rows of a {} × {} weight",
                        dy.x.len(),
                        dx.len(),
                        g.out_dim(),
                        g.in_dim()
                    )
                })?;
                self.linear_backward_packed(self.rounded_operand(dy), g, rows, dx, accumulate)
            }
            CpuWeight::Bf16 { forward, backward } => {
                check(
                    dy.x.len() == rows * forward.out_dim && dx.len() == rows * forward.in_dim,
                    "linear_backward",
                    || {
                        format!(
                            "{} output gradients and {} input gradients for {rows} rows of {forward:?}",
                            dy.x.len(),
                            dx.len()
                        )
                    },
                )?;
                let a = dy.tiles.get_or_init(|| bf16::Input::new(dy.x, rows, forward.out_dim));
                bf16::product(self.native(), a, backward.get_or_init(|| forward.transposed()), dx, accumulate);
                Ok(())
            }
        }
    }
    fn gemm(&self, a: &[T], b: &[T], out: &mut [T], s: MatMul) -> Result<()> {
        check(a.len() == s.m * s.k && b.len() == s.k * s.n && out.len() == s.m * s.n, "matmul", || {
            format!("sizes {}, {}, {} do not fit {s:?}", a.len(), b.len(), out.len())
        })?;
        let lhs = if s.a_transposed { Strided::rows(s.m).t() } else { Strided::rows(s.k) };
        let rhs = if s.b_transposed { Strided::rows(s.k).t() } else { Strided::rows(s.n) };
        gemm_strided((s.m, s.n, s.k), out, Strided::rows(s.n), a, lhs, b, rhs, T::of(s.alpha), s.accumulate, true);
        Ok(())
    }
}

impl<T: Real> Backend for Cpu<T> {
    type Buf = Vec<T>;
    type Ints = Vec<u32>;
    type Weight = CpuWeight<T>;
    type Saved = Vec<T>;
    type Bytes = Vec<u8>;
    type Operand<'a>
        = CpuOperand<'a, T>
    where
        Self: 'a;
    /// Nothing: the CPU's backward recomputes what it needs.
    type AttnKept = ();

    fn name(&self) -> String {
        let kind = match (size_of::<T>(), self.half) {
            (8, _) => ", f64",
            (_, Some(Half::Bf16)) if self.kernel == Some(bf16::Kernel::Amx) => ", bf16 on AMX tiles",
            (_, Some(Half::Bf16)) if self.kernel == Some(bf16::Kernel::Avx512) => ", bf16 on AVX512-BF16",
            (_, Some(Half::Bf16)) => ", bf16 emulation",
            (_, Some(Half::F16)) => ", f16 emulation",
            _ => "",
        };
        format!("cpu ({} threads{kind})", rayon::current_num_threads())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<T>> {
        Ok(data.iter().map(|&x| T::of(x)).collect())
    }
    fn upload_ints(&self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }
    fn zeros(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zero(); len])
    }
    fn uninit(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![if poison() { T::of(f32::NAN) } else { T::zero() }; len])
    }
    fn download(&self, buf: &Vec<T>) -> Result<Vec<f32>> {
        Ok(buf.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect())
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn upload_bytes(&self, data: &[u8]) -> Result<Vec<u8>> {
        Ok(data.to_vec())
    }
    fn download_bytes(&self, buf: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(buf.clone())
    }

    fn save(&self, x: &Vec<T>) -> Result<Vec<T>> {
        Ok(self.rounded_bf16(x).into_owned())
    }
    fn restore(&self, saved: &Vec<T>) -> Result<Vec<T>> {
        Ok(saved.clone())
    }

    fn upload_weight(
        &self,
        base: &BaseWeight,
        dense: Option<&[f32]>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<CpuWeight<T>> {
        // With a bf16 kernel every weight becomes bf16 tiles (GGUF blocks too: dequantizing per use would cost more than the
        // products); otherwise a 4-bit storage stays packed.
        let packed = match base {
            _ if self.kernel.is_some() => None,
            BaseWeight::Ggml(g) => Some(PackedRows::Ggml(g.clone())),
            BaseWeight::Bnb4(q) => Some(PackedRows::Bnb4 { q: q.clone(), absmax: q.absmax.values() }),
            _ => None,
        };
        if let Some(p) = packed {
            check(p.out_dim() == out_dim && p.in_dim() == in_dim, "upload_weight", || {
                format!("a {} × {} quantized weight for a {out_dim} × {in_dim} one", p.out_dim(), p.in_dim())
            })?;
            if self.half == Some(Half::F16) {
                check_f16_range(&base.dequantize().expect("a quantized weight dequantizes"))?;
            }
            return Ok(CpuWeight::Packed(p));
        }
        let dense = weight_values_of(base, dense)?;
        check(dense.len() == out_dim * in_dim, "upload_weight", || {
            format!("{} values for a {out_dim} × {in_dim} weight", dense.len())
        })?;
        if self.kernel.is_some() {
            let forward = bf16::PackedBf16::pack(&dense, out_dim, in_dim);
            return Ok(CpuWeight::Bf16 { forward, backward: Default::default() });
        }
        let values = self.upload(&dense)?;
        Ok(CpuWeight::Values(match self.half {
            Some(Half::F16) => {
                check_f16_range(&dense)?;
                self.rounded(&values, f16_rne).into_owned()
            }
            _ => self.rounded_bf16(&values).into_owned(),
        }))
    }
    fn weight_values(&self, w: &CpuWeight<T>) -> Result<Vec<T>> {
        Ok(match w {
            CpuWeight::Values(v) => v.clone(),
            CpuWeight::Packed(g) => self.weight_rows(g, 0..g.out_dim()),
            CpuWeight::Bf16 { forward, .. } => (0..forward.out_dim).flat_map(|n| forward.row(n)).map(T::of).collect(),
        })
    }
    fn operand_with_room<'a>(&self, x: &'a Vec<T>, _rows: usize, _room: usize) -> Result<CpuOperand<'a, T>> {
        Ok(CpuOperand { x, shift: OnceLock::new(), rounded: OnceLock::new(), tiles: OnceLock::new() })
    }
    fn operand_values<'a>(&self, x: &CpuOperand<'a, T>) -> &'a Vec<T>
    where
        Self: 'a,
    {
        x.x
    }
    fn linear_from(
        &self,
        x: &CpuOperand<'_, T>,
        w: &CpuWeight<T>,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        out: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        self.base_product(x, w, rows, out, accumulate)?;
        match tail {
            Some(t) => self.tail_product(x, t, rows, out, true),
            None => Ok(()),
        }
    }
    fn linear_backward_from(
        &self,
        dy: &CpuOperand<'_, T>,
        w: &CpuWeight<T>,
        tail: Option<Tail<'_, Self>>,
        rows: usize,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        self.base_backward(dy, w, rows, dx, accumulate)?;
        match tail {
            Some(t) => self.tail_product(dy, t, rows, dx, false),
            None => Ok(()),
        }
    }

    fn embedding(&self, table: &CpuWeight<T>, ids: &Vec<u32>, dim: usize, scale: f32, out: &mut Vec<T>) -> Result<()> {
        let vocab = match table {
            CpuWeight::Values(t) => t.len() / dim,
            CpuWeight::Packed(g) => g.out_dim(),
            CpuWeight::Bf16 { forward, .. } => forward.out_dim,
        };
        check(out.len() == ids.len() * dim, "embedding", || {
            format!("output holds {} values, need {}", out.len(), ids.len() * dim)
        })?;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let scale = T::of(scale);
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &t)| {
            let t = t as usize;
            let packed;
            let row = match table {
                CpuWeight::Values(v) => &v[t * dim..(t + 1) * dim],
                CpuWeight::Packed(g) => {
                    packed = self.weight_rows(g, t..t + 1);
                    &packed[..]
                }
                CpuWeight::Bf16 { forward, .. } => {
                    packed = forward.row(t).into_iter().map(T::of).collect();
                    &packed[..]
                }
            };
            for (o, &x) in o.iter_mut().zip(row) {
                *o = x * scale;
            }
        });
        Ok(())
    }

    fn matmul(&self, a: &Vec<T>, b: &Vec<T>, out: &mut Vec<T>, s: MatMul) -> Result<()> {
        self.gemm(&self.rounded(a, tf32_rna), &self.rounded(b, tf32_rna), out, s)
    }
    fn matmul_from(&self, a: &CpuOperand<'_, T>, b: &Vec<T>, out: &mut Vec<T>, s: MatMul) -> Result<()> {
        self.gemm(self.rounded_operand(a), &self.product_input(b), out, s)
    }

    fn add_bias(&self, x: &mut Vec<T>, bias: &Vec<T>) -> Result<()> {
        check(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "add_bias", || {
            format!("{} values, bias of {}", x.len(), bias.len())
        })?;
        x.par_chunks_mut(bias.len()).for_each(|r| r.iter_mut().zip(bias).for_each(|(x, &b)| *x = *x + b));
        Ok(())
    }

    fn add(&self, x: &mut Vec<T>, y: &Vec<T>) -> Result<()> {
        check(x.len() == y.len(), "add", || format!("{} vs {} values", x.len(), y.len()))?;
        zip_apply(x, y, |x, y| *x = *x + y);
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<T>, w: &Vec<T>, dim: usize, eps: f32, plus_one: bool, out: &mut Vec<T>) -> Result<()> {
        check(w.len() == dim && x.len().is_multiple_of(dim) && out.len() == x.len(), "rmsnorm", || {
            format!("x {}, w {}, dim {dim}", x.len(), w.len())
        })?;
        out.par_chunks_mut(dim * ROW_CHUNK).zip(x.par_chunks(dim * ROW_CHUNK)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                let r = inv_rms(x, eps);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    // Gemma scales by (1 + w) after normalising; llama by w.
                    *o = if plus_one { (x * r) * (T::one() + w) } else { w * (x * r) };
                }
            }
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<T>,
        positions: &Vec<u32>,
        inv_freq: &Vec<T>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        rotate(x, positions, inv_freq, heads, head_dim, false)
    }

    fn glu(&self, gate: &Vec<T>, up: &Vec<T>, kind: GluKind, out: &mut Vec<T>) -> Result<()> {
        check(gate.len() == up.len() && out.len() == up.len(), "glu", || {
            format!("gate {}, up {}, out {}", gate.len(), up.len(), out.len())
        })?;
        out.par_chunks_mut(ELEM_CHUNK).zip(gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK))).for_each(
            |(o, (g, u))| {
                // f32 SiLU through the vectorized exp (libm's, a call per value, was 4% of an evaluation).
                if let (GluKind::Silu, Some(g), Some(u), Some(o)) =
                    (kind, T::as_f32s(g), T::as_f32s(u), T::as_f32s_mut(o))
                {
                    return crate::simd::silu_glu(g, u, o);
                }
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = activation(kind, g).0 * u;
                }
            },
        );
        Ok(())
    }

    fn write_rows(&self, src: &Vec<T>, dst: &mut Vec<T>, at: RowWrite) -> Result<()> {
        let RowWrite { batch, rows, capacity, start, width } = at;
        check(
            src.len() == batch * rows * width && dst.len() == batch * capacity * width && start + rows <= capacity,
            "write_rows",
            || format!("{rows} rows at {start} into capacity {capacity}"),
        )?;
        for b in 0..batch {
            let d = (b * capacity + start) * width;
            dst[d..d + rows * width].copy_from_slice(&src[b * rows * width..(b + 1) * rows * width]);
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        key_mask: &Vec<u32>,
        s: AttentionShape,
        out: &mut Vec<T>,
    ) -> Result<()> {
        check_attention(q.len(), k.len(), v.len(), key_mask.len(), s, &[out.len()])?;
        attention::forward(q, k, v, key_mask, s, out, self.attention_operands(&s));
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &Vec<T>,
        targets: &Vec<u32>,
        vocab: usize,
        ignore: u32,
        out: &mut Vec<T>,
    ) -> Result<()> {
        check_targets(logits, targets, vocab, ignore, out.len())?;
        out.par_iter_mut().zip(logits.par_chunks(vocab).zip(targets.par_iter())).for_each(|(o, (row, &t))| {
            *o = if t == ignore {
                T::zero()
            } else {
                let (max, sum) = softmax_stats(row);
                T::from_f64(max.f64() + sum.ln() - row[t as usize].f64()).unwrap_or(T::nan())
            };
        });
        Ok(())
    }

    fn sum(&self, x: &Vec<T>) -> Result<f64> {
        Ok(x.iter().map(|v| v.f64()).sum())
    }

    fn copy(&self, src: &Vec<T>, src_at: usize, dst: &mut Vec<T>, dst_at: usize, len: usize) -> Result<()> {
        check(src_at + len <= src.len() && dst_at + len <= dst.len(), "copy", || {
            format!("{len} values from {src_at} of {} to {dst_at} of {}", src.len(), dst.len())
        })?;
        dst[dst_at..dst_at + len].copy_from_slice(&src[src_at..src_at + len]);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<T>, s: f32) -> Result<()> {
        let s = T::of(s);
        x.par_chunks_mut(ELEM_CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x = *x * s));
        Ok(())
    }

    fn add_scaled_by(&self, y: &mut Vec<T>, x: &Vec<T>, s: &Vec<T>, factor: f32) -> Result<()> {
        check(y.len() == x.len() && s.len() == 1, "add_scaled_by", || {
            format!("y {}, x {}, scalar of {}", y.len(), x.len(), s.len())
        })?;
        let a = T::of(factor) * s[0];
        zip_apply(y, x, |y, x| *y = *y + a * x);
        Ok(())
    }

    fn dot(&self, a: &Vec<T>, b: &Vec<T>, factor: f32, out: &mut Vec<T>, accumulate: bool) -> Result<()> {
        check(a.len() == b.len() && out.len() == 1, "dot", || {
            format!("a {}, b {}, out {}", a.len(), b.len(), out.len())
        })?;
        // In f64: a scalar parameter's gradient is a long sum whose terms largely cancel.
        let d: f64 = a
            .par_chunks(ELEM_CHUNK)
            .zip(b.par_chunks(ELEM_CHUNK))
            .map(|(a, b)| a.iter().zip(b).map(|(&a, &b)| a.f64() * b.f64()).sum::<f64>())
            .sum();
        let d = T::from_f64(d).unwrap_or(T::nan());
        out[0] = if accumulate { out[0] } else { T::zero() } + T::of(factor) * d;
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<T>,
        w: &Vec<T>,
        dy: &Vec<T>,
        dim: usize,
        eps: f32,
        plus_one: bool,
        dx: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        check(
            w.len() == dim && x.len().is_multiple_of(dim) && dy.len() == x.len() && dx.len() == x.len(),
            "rmsnorm_backward",
            || format!("x {}, w {}, dy {}, dx {}, dim {dim}", x.len(), w.len(), dy.len(), dx.len()),
        )?;
        let n = T::from_usize(dim).unwrap_or(T::one());
        let rows =
            dx.par_chunks_mut(dim * ROW_CHUNK).zip(x.par_chunks(dim * ROW_CHUNK).zip(dy.par_chunks(dim * ROW_CHUNK)));
        rows.for_each(|(dx, (x, dy))| {
            for (dx, (x, dy)) in dx.chunks_exact_mut(dim).zip(x.chunks_exact(dim).zip(dy.chunks_exact(dim))) {
                // y = g ⊙ x·r with r = (mean x² + eps)^−½ and g = w (or 1 + w):
                // dx = r·(g ⊙ dy) − x · r³/n · Σ (g ⊙ dy ⊙ x).
                let r = inv_rms(x, eps);
                let gain = |i: usize| if plus_one { T::one() + w[i] } else { w[i] };
                let proj: T = (0..dim).map(|i| gain(i) * dy[i] * x[i]).sum();
                let c = r * r * r * proj / n;
                for i in 0..dim {
                    let g = r * gain(i) * dy[i] - x[i] * c;
                    dx[i] = if accumulate { dx[i] + g } else { g };
                }
            }
        });
        Ok(())
    }

    fn rope_backward(
        &self,
        dx: &mut Vec<T>,
        positions: &Vec<u32>,
        inv_freq: &Vec<T>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        rotate(dx, positions, inv_freq, heads, head_dim, true)
    }

    fn glu_backward(
        &self,
        gate: &Vec<T>,
        up: &Vec<T>,
        dy: &Vec<T>,
        kind: GluKind,
        dgate: &mut Vec<T>,
        dup: &mut Vec<T>,
    ) -> Result<()> {
        let n = gate.len();
        check(up.len() == n && dy.len() == n && dgate.len() == n && dup.len() == n, "glu_backward", || {
            format!("sizes differ from gate's {n}")
        })?;
        let outs = dgate.par_chunks_mut(ELEM_CHUNK).zip(dup.par_chunks_mut(ELEM_CHUNK));
        let ins = gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK).zip(dy.par_chunks(ELEM_CHUNK)));
        outs.zip(ins).for_each(|((dg, du), (g, (u, dy)))| {
            let f32s = (T::as_f32s(g), T::as_f32s(u), T::as_f32s(dy));
            if let (GluKind::Silu, (Some(g), Some(u), Some(dy))) = (kind, f32s) {
                let (dg, du) = (T::as_f32s_mut(dg).expect("f32"), T::as_f32s_mut(du).expect("f32"));
                return crate::simd::silu_glu_backward(g, u, dy, dg, du);
            }
            for i in 0..g.len() {
                let (a, da) = activation(kind, g[i]);
                dg[i] = dy[i] * u[i] * da;
                du[i] = dy[i] * a;
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        key_mask: &Vec<u32>,
        s: AttentionShape,
        out: &Vec<T>,
        dout: &Vec<T>,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        _kept: Option<()>,
    ) -> Result<()> {
        check_attention(q.len(), k.len(), v.len(), key_mask.len(), s, &[out.len(), dout.len(), dq.len()])?;
        check(dk.len() == k.len() && dv.len() == v.len(), "attention_backward", || {
            format!("dk {}, dv {} for a cache of {}", dk.len(), dv.len(), k.len())
        })?;
        attention::backward(q, k, v, key_mask, s, out, dout, dq, dk, dv, self.attention_operands(&s));
        Ok(())
    }

    fn cross_entropy_backward(
        &self,
        logits: &Vec<T>,
        targets: &Vec<u32>,
        vocab: usize,
        ignore: u32,
        scale: f32,
        dlogits: &mut Vec<T>,
    ) -> Result<()> {
        check_targets(logits, targets, vocab, ignore, targets.len())?;
        check(dlogits.len() == logits.len(), "cross_entropy_backward", || {
            format!("dlogits {} for {} logits", dlogits.len(), logits.len())
        })?;
        let scale = T::of(scale);
        dlogits.par_chunks_mut(vocab).zip(logits.par_chunks(vocab).zip(targets.par_iter())).for_each(
            |(d, (row, &t))| {
                if t == ignore {
                    d.fill(T::zero());
                    return;
                }
                let (max, sum) = softmax_stats(row);
                let scaled_inv = scale * T::from_f64(1.0 / sum).unwrap_or(T::nan());
                d.copy_from_slice(row);
                T::exp_shifted(d, max);
                d.iter_mut().for_each(|d| *d = *d * scaled_inv);
                d[t as usize] = d[t as usize] - scale;
            },
        );
        Ok(())
    }

    fn group_reduce(
        &self,
        x: &Vec<T>,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        out: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        check_groups("group_reduce", g, rows, x.len(), out.len())?;
        let scale = T::of(scale);
        out.par_chunks_mut(g.groups).zip(x.par_chunks(g.width)).for_each(|(o, x)| {
            for (k, o) in o.iter_mut().enumerate() {
                let (a, b) = g.range(k);
                let v = scale * x[a..b].iter().copied().sum::<T>() / group_divisor::<T>(mean, a, b);
                *o = if accumulate { *o + v } else { v };
            }
        });
        Ok(())
    }

    fn group_expand(
        &self,
        h: &Vec<T>,
        rows: usize,
        g: Groups,
        mean: bool,
        scale: f32,
        y: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        check_groups("group_expand", g, rows, y.len(), h.len())?;
        let scale = T::of(scale);
        y.par_chunks_mut(g.width).zip(h.par_chunks(g.groups)).for_each(|(y, h)| {
            for (k, &hk) in h.iter().enumerate() {
                let (a, b) = g.range(k);
                let v = scale * hk / group_divisor::<T>(mean, a, b);
                for y in &mut y[a..b] {
                    *y = if accumulate { *y + v } else { v };
                }
            }
        });
        Ok(())
    }

    fn dropout(&self, x: &Vec<T>, p: f32, seed: u64, first: u64, out: &mut Vec<T>) -> Result<()> {
        check(x.len() == out.len() && (0.0..1.0).contains(&p), "dropout", || {
            format!("x {}, out {}, p {p}", x.len(), out.len())
        })?;
        let keep = T::one() / (T::one() - T::of(p));
        let threshold = crate::simd::dropout_threshold(p);
        out.par_chunks_mut(ELEM_CHUNK).zip(x.par_chunks(ELEM_CHUNK)).enumerate().for_each(|(c, (o, x))| {
            let first = first + (c * ELEM_CHUNK) as u64;
            if let (Some(x), Some(o)) = (T::as_f32s(x), T::as_f32s_mut(o)) {
                return crate::simd::dropout(x, o, seed, first, threshold, keep.f64() as f32);
            }
            for (i, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                *o = if dropout_keeps(seed, first + i as u64, p) { x * keep } else { T::zero() };
            }
        });
        Ok(())
    }

    fn sum_squares(&self, x: &Vec<T>) -> Result<f64> {
        // In order, so that a run's clip coefficients (and a resumed run's) are reproducible.
        Ok(x.iter().map(|&g| g.f64() * g.f64()).sum())
    }

    fn adamw(&self, p: &mut Vec<T>, g: &Vec<T>, m: &mut Vec<T>, v: &mut Vec<T>, s: AdamStep) -> Result<()> {
        let n = p.len();
        check(g.len() == n && m.len() == n && v.len() == n, "adamw", || {
            format!("p {n}, g {}, m {}, v {}", g.len(), m.len(), v.len())
        })?;
        // The scalar factors are formed in f32, as the kernel's arguments are.
        let f = |x: f32| T::of(x);
        let (b1, b2, one_b1, one_b2) = (f(s.beta1), f(s.beta2), f(1.0 - s.beta1), f(1.0 - s.beta2));
        let (step_size, eps_c2, decay, coef) =
            (f(-s.lr * s.c2 / s.c1), f(s.eps * s.c2), f(1.0 - s.lr * s.weight_decay), f(s.grad_coef));
        p.par_chunks_mut(ELEM_CHUNK)
            .zip(m.par_chunks_mut(ELEM_CHUNK))
            .zip(v.par_chunks_mut(ELEM_CHUNK))
            .zip(g.par_chunks(ELEM_CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = g[i] * coef;
                    m[i] = b1 * m[i] + one_b1 * g;
                    v[i] = b2 * v[i] + one_b2 * g * g;
                    p[i] = p[i] + step_size * (m[i] / (v[i].sqrt() + eps_c2));
                    if s.weight_decay > 0.0 {
                        p[i] = p[i] * decay;
                    }
                }
            });
        Ok(())
    }

    fn adamw_8bit(
        &self,
        p: &mut Vec<T>,
        g: &Vec<T>,
        m: &mut Vec<u8>,
        m_absmax: &mut Vec<T>,
        v: &mut Vec<u8>,
        v_absmax: &mut Vec<T>,
        s: AdamStep,
    ) -> Result<()> {
        check_adamw_8bit(p.len(), g.len(), m.len(), m_absmax.len(), v.len(), v_absmax.len())?;
        // The update is defined in f32 (the f64 backend, for finite differences, has no use for it but runs it in f32).
        let f32s = |x: &[T]| x.iter().map(|v| v.to_f32().unwrap_or(f32::NAN)).collect::<Vec<f32>>();
        let (mut pf, mut ma, mut va) = (f32s(p), f32s(m_absmax), f32s(v_absmax));
        adam8::step(&mut pf, &f32s(g), m, &mut ma, v, &mut va, s);
        for (dst, src) in [(p, pf), (m_absmax, ma), (v_absmax, va)] {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = T::of(s));
        }
        Ok(())
    }
}

/// Whether element `i` survives dropout with probability 1 − p under `seed`: the 24-bit draw of (seed, i)
/// (`simd::dropout_draw`, a SplitMix64 hash) as a uniform in [0, 1), so every backend can reproduce the mask.
pub fn dropout_keeps(seed: u64, i: u64, p: f32) -> bool {
    (crate::simd::dropout_draw(seed, i) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

fn zip_apply<T: Real>(x: &mut [T], y: &[T], f: impl Fn(&mut T, T) + Sync) {
    x.par_chunks_mut(ELEM_CHUNK)
        .zip(y.par_chunks(ELEM_CHUNK))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, &y)| f(x, y)));
}

/// (mean x² + eps)^−½ of one row; the mean is taken in f64 whatever the compute type.
fn inv_rms<T: Real>(x: &[T], eps: f32) -> T {
    let ms = x.iter().map(|&v| v.f64() * v.f64()).sum::<f64>() / x.len() as f64;
    let r =
        if size_of::<T>() == 4 { (1.0 / ((ms as f32) + eps).sqrt()) as f64 } else { 1.0 / (ms + eps as f64).sqrt() };
    T::from_f64(r).unwrap_or(T::nan())
}

/// act(z) and act'(z).
fn activation<T: Real>(kind: GluKind, z: T) -> (T, T) {
    let one = T::one();
    let half = T::of(0.5);
    match kind {
        GluKind::Silu => {
            let e = one + (-z).exp();
            let s = one / e;
            // z / (1 + e^−z), as torch computes SiLU.
            (z / e, s * (one + z * (one - s)))
        }
        GluKind::GeluTanh => {
            let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt()).unwrap_or(T::nan());
            let a = T::of(0.044715);
            let t = (c * (z + a * z * z * z)).tanh();
            let three = T::of(3.0);
            (half * z * (one + t), half * (one + t) + half * z * (one - t * t) * c * (one + three * a * z * z))
        }
    }
}

/// (max, Σ exp(x − max)) of a row, the sum in f64.
fn softmax_stats<T: Real>(row: &[T]) -> (T, f64) {
    let max = T::max_of(row);
    (max, T::exp_sum(row, max))
}

/// Rotates each head pair (x1, x2) by +angle (forward) or −angle (the inverse, which is the transpose).
fn rotate<T: Real>(
    x: &mut [T],
    positions: &[u32],
    inv_freq: &[T],
    heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<()> {
    let half = head_dim / 2;
    let row = heads * head_dim;
    check(inv_freq.len() == half && x.len() == positions.len() * row, "rope", || {
        format!("x {} values for {} positions × {heads} heads × {head_dim}", x.len(), positions.len())
    })?;
    x.par_chunks_mut(row).zip(positions.par_iter()).for_each(|(r, &p)| {
        let (cos, sin): (Vec<T>, Vec<T>) = inv_freq
            .iter()
            .map(|&f| {
                // The angle is formed in the compute type, as transformers does in f32.
                let a = T::from_u32(p).unwrap_or(T::nan()) * f;
                (a.cos(), if inverse { -a.sin() } else { a.sin() })
            })
            .unzip();
        for h in r.chunks_exact_mut(head_dim) {
            let (x1, x2) = h.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * cos[j] - b * sin[j];
                x2[j] = b * cos[j] + a * sin[j];
            }
        }
    });
    Ok(())
}

fn group_divisor<T: Real>(mean: bool, a: usize, b: usize) -> T {
    if mean {
        T::from_usize(b - a).unwrap_or(T::one())
    } else {
        T::one()
    }
}

fn check_targets<T>(logits: &[T], targets: &[u32], vocab: usize, ignore: u32, out: usize) -> Result<()> {
    check(logits.len() == targets.len() * vocab && out == targets.len(), "cross_entropy", || {
        format!("{} logits for {} targets × vocab {vocab}", logits.len(), targets.len())
    })?;
    if let Some(&bad) = targets.iter().find(|&&t| t != ignore && t as usize >= vocab) {
        return Err(Error::Invalid(format!("target id {bad} is outside the vocabulary (size {vocab})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend's dropout (f32: `simd::dropout`, 8 lanes and integer thresholds; f64: `dropout_keeps` per value)
    /// against the scalar draw, for probabilities on and between multiples of 2⁻²⁴, a start past 2³², ragged lengths
    /// and inputs that span several of the backend's element chunks.
    #[test]
    fn dropout_keeps_what_the_scalar_draw_keeps() {
        let x: Vec<f32> = (0..10_000).map(|i| i as f32 - 5_000.25).collect();
        for p in [0.0f32, 0.05, 0.1, 0.5, 0.999, 3.0 / 16_777_216.0, f32::from_bits(0.3f32.to_bits() + 1)] {
            for (seed, first, n) in [(7u64, 0u64, 10_000usize), (u64::MAX, (1 << 32) + 5, 17), (42, 999, 1)] {
                let keep = 1.0 / (1.0 - p);
                let mut out = vec![f32::NAN; n];
                Cpu::new().dropout(&x[..n].to_vec(), p, seed, first, &mut out).unwrap();
                let mut wide = vec![f64::NAN; n];
                let x64: Vec<f64> = x[..n].iter().map(|&v| v as f64).collect();
                Cpu::f64().dropout(&x64, p, seed, first, &mut wide).unwrap();
                for i in 0..n {
                    let kept = dropout_keeps(seed, first + i as u64, p);
                    let want = if kept { x[i] * keep } else { 0.0 };
                    assert_eq!(out[i].to_bits(), want.to_bits(), "p {p}, seed {seed}, element {}", first + i as u64);
                    assert_eq!(wide[i] != 0.0, kept, "f64: p {p}, element {}", first + i as u64);
                }
            }
        }
    }
}
