//! Product inputs on the GPU (`Backend::operand`): an activation or gradient converted once into the 16-bit
//! tensor-core operand that its base product and its adapters' products read, and the adapters' products on it
//! (`Backend::matmul_from`: the other factor converted the same way, under its own scale in the f16 mode).

use cudarc::driver::CudaSlice;

use super::gemm::{Dtype, Gemm, Operand};
use super::{grid, Cuda};
use crate::backend::{check, Backend, MatMul};
use crate::error::Result;

/// A product input: x, and in the 16-bit modes its tensor-core copy (`Cuda::half_copy`).
pub struct CudaOperand<'a> {
    pub(super) x: &'a CudaSlice<f32>,
    pub(super) half: Option<CudaSlice<u16>>,
}

/// The address of the [amax, alpha] scalars after the 16-bit copy of n values at `copy`.
fn scalars_of(copy: u64, n: usize) -> u64 {
    copy + 2 * n.next_multiple_of(2) as u64
}

impl Cuda {
    /// x's operand: converted now in the 16-bit modes (every product of a linear's input or output gradient reads it
    /// in 16 bits there), x alone in f32.
    pub(super) fn operand_of<'a>(&self, x: &'a CudaSlice<f32>) -> Result<CudaOperand<'a>> {
        let half = match self.half() {
            Some(_) => Some(self.half_copy(x, 0, 1.0)?),
            None => None,
        };
        Ok(CudaOperand { x, half })
    }

    /// x as a 16-bit tensor-core operand at `out` (`x.len()` values): bf16, or in the f16 mode fp16 of x·2^s with s
    /// the f16_shift of x's largest magnitude, which goes to the u32 at `amax`; 2^−s goes to the f32 at `inv_scale`
    /// unless it is 0.
    pub(super) fn to_operand(&self, x: &CudaSlice<f32>, out: u64, amax: u64, inv_scale: u64) -> Result<()> {
        self.to_operand_times(x, out, amax, inv_scale, 0, 1.0)
    }

    /// `to_operand` with the f16 mode's alpha at `inv_scale` multiplied by `factor` and by the f32 at `times` unless
    /// that is 0: the alpha of a product of two scaled operands.
    fn to_operand_times(
        &self,
        x: &CudaSlice<f32>,
        out: u64,
        amax: u64,
        inv_scale: u64,
        times: u64,
        factor: f32,
    ) -> Result<()> {
        if self.half() != Some(Dtype::F16) {
            return self.round_to_bf16(x, out);
        }
        self.absmax_into(x, amax)?;
        let n64 = x.len() as i64;
        launch!(self, "to_f16_scaled", grid(x.len().div_ceil(8)), x, &out, &n64, &amax, &inv_scale, &times, &factor)
    }

    /// x's 16-bit copy (`to_operand`) followed by its two 32-bit scalars, [amax, alpha] (`scalars_of`); the alpha is
    /// `to_operand_times`'s.
    fn half_copy(&self, x: &CudaSlice<f32>, times: u64, factor: f32) -> Result<CudaSlice<u16>> {
        // Every value is written by the conversion below, and the scalars by it before they are read.
        let copy = self.alloc_uninit::<u16>(x.len().next_multiple_of(2) + 4)?;
        let scalars = scalars_of(self.addr(&copy), x.len());
        self.to_operand_times(x, self.addr(&copy), scalars, scalars + 4, times, factor)?;
        Ok(copy)
    }

    /// The GEMM operand of x for a product whose other operand is `dtype`, and the device alpha that undoes its scale
    /// (0: none).
    pub(super) fn gemm_operand(&self, x: &CudaOperand, dtype: Dtype) -> Result<(Operand, u64)> {
        match (&x.half, dtype) {
            (_, Dtype::F32) => Ok((Operand::f32(self.addr(x.x)), 0)),
            (Some(copy), h) => {
                let alpha = if h == Dtype::F16 { scalars_of(self.addr(copy), x.x.len()) + 4 } else { 0 };
                Ok((Operand::half(self.addr(copy), h), alpha))
            }
            (None, _) => Err(crate::error::Error::Invalid("a 16-bit product on an f32 operand".into())),
        }
    }

    /// `Backend::matmul_from`: out (+)= alpha·op(a)·op(b) with b converted as a's 16-bit format (under its own scale
    /// in f16, the product's alpha then s.alpha·2^−s_a·2^−s_b, written by b's conversion); `matmul` in f32.
    pub(super) fn operand_product(
        &self,
        a: &CudaOperand,
        b: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        s: MatMul,
    ) -> Result<()> {
        check(a.x.len() == s.m * s.k && b.len() == s.k * s.n && out.len() == s.m * s.n, "matmul", || {
            format!("sizes {}, {}, {} do not fit {s:?}", a.x.len(), b.len(), out.len())
        })?;
        let Some(dtype) = self.half() else {
            return Backend::matmul(self, a.x, b, out, s);
        };
        let mut g = Gemm::new(s.m, s.n, s.k, s.a_transposed, s.b_transposed);
        (g.alpha, g.beta) = (s.alpha, if s.accumulate { 1.0 } else { 0.0 });
        let (a_op, a_alpha) = self.gemm_operand(a, dtype)?;
        let copy = self.half_copy(b, a_alpha, s.alpha)?;
        if dtype == Dtype::F16 {
            g.alpha_at = scalars_of(self.addr(&copy), b.len()) + 4;
        }
        // SAFETY: the sizes were checked above against m, n, k; the copies hold as many values as their sources.
        unsafe { self.gemm(g, a_op, Operand::half(self.addr(&copy), dtype), self.addr(out)) }
    }
}
