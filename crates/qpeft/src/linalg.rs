//! Dense linear algebra on host slices, shared by the CPU backend and GPTQ: the float element type (`Real`: f32,
//! or f64 for the finite-difference oracle) and safe strided matrix products on top of the `gemm` crate (AVX-512
//! through its `x86-v4` feature).

use std::fmt::Debug;

use gemm::Parallelism;
use num_traits::{Float, FromPrimitive};

/// The float types the CPU kernels run in.
pub trait Real: Float + FromPrimitive + std::iter::Sum + Default + Debug + Send + Sync + 'static {
    fn of(x: f32) -> Self;
    fn f64(self) -> f64;
    /// Σ w[i]·x[i] in this type (f32: `simd::dot`'s fixed lane order).
    fn dot_f32(w: &[f32], x: &[Self]) -> Self;
    /// `x` as f32s when this type is f32 (kernels written for f32 alone).
    fn as_f32s(x: &[Self]) -> Option<&[f32]>;
    /// The same, mutable.
    fn as_f32s_mut(x: &mut [Self]) -> Option<&mut [f32]>;
    /// Each value rounded to the nearest bf16 (ties to even), in place.
    fn round_bf16(x: &mut [Self]);
    /// The largest value (−∞ if none; NaNs skipped).
    fn max_of(x: &[Self]) -> Self;
    /// Σ e^(x[i] − shift), in f64 (f32: `simd::exp_sum`).
    fn exp_sum(x: &[Self], shift: Self) -> f64;
    /// x[i] ← e^(x[i] − shift) (f32: `simd::exp`).
    fn exp_shifted(x: &mut [Self], shift: Self);
}

impl Real for f32 {
    fn of(x: f32) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        crate::simd::dot(w, x)
    }
    fn as_f32s(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    fn as_f32s_mut(x: &mut [f32]) -> Option<&mut [f32]> {
        Some(x)
    }
    fn round_bf16(x: &mut [f32]) {
        crate::simd::round_bf16(x)
    }
    fn max_of(x: &[f32]) -> f32 {
        crate::simd::max(x)
    }
    fn exp_sum(x: &[f32], shift: f32) -> f64 {
        crate::simd::exp_sum(x, shift)
    }
    fn exp_shifted(x: &mut [f32], shift: f32) {
        crate::simd::exp_shifted(x, shift)
    }
}

impl Real for f64 {
    fn of(x: f32) -> Self {
        x as f64
    }
    fn f64(self) -> f64 {
        self
    }
    fn dot_f32(w: &[f32], x: &[f64]) -> f64 {
        w.iter().zip(x).map(|(&w, &x)| w as f64 * x).sum()
    }
    fn as_f32s(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32s_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
    fn round_bf16(x: &mut [f64]) {
        x.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v as f32).to_f64());
    }
    fn max_of(x: &[f64]) -> f64 {
        x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v))
    }
    fn exp_sum(x: &[f64], shift: f64) -> f64 {
        x.iter().map(|&v| (v - shift).exp()).sum()
    }
    fn exp_shifted(x: &mut [f64], shift: f64) {
        x.iter_mut().for_each(|v| *v = (*v - shift).exp());
    }
}

/// A matrix view into a slice: element (i, j) is at `offset + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Strided {
    pub fn rows(rs: usize) -> Self {
        Strided { offset: 0, rs, cs: 1 }
    }
    pub fn at(self, offset: usize) -> Self {
        Strided { offset: self.offset + offset, ..self }
    }
    /// The transpose of this view.
    pub fn t(self) -> Self {
        Strided { offset: self.offset, rs: self.cs, cs: self.rs }
    }
    fn last(self, rows: usize, cols: usize) -> usize {
        self.offset + rows.saturating_sub(1) * self.rs + cols.saturating_sub(1) * self.cs
    }
}

/// dst[m×n] = (accumulate ? dst : 0) + scale · lhs[m×k] · rhs[k×n].
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    d: Strided,
    lhs: &[T],
    l: Strided,
    rhs: &[T],
    r: Strided,
    scale: T,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[d.offset + i * d.rs + j * d.cs] = T::zero();
                }
            }
        }
        return;
    }
    // The bounds checks that make the unsafe call below sound.
    assert!(d.last(m, n) < dst.len(), "gemm: destination view out of bounds");
    assert!(l.last(m, k) < lhs.len(), "gemm: lhs view out of bounds");
    assert!(r.last(k, n) < rhs.len(), "gemm: rhs view out of bounds");
    let par = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: all three views were checked to lie inside their slices; dst is borrowed mutably
    // and cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(l.offset),
            l.cs as isize,
            l.rs as isize,
            rhs.as_ptr().add(r.offset),
            r.cs as isize,
            r.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            par,
        );
    }
}
