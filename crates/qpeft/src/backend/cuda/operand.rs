//! Product inputs on the GPU (`Backend::operand`): an activation or gradient converted once into the 16-bit
//! tensor-core operand that its base product and its adapters' products read, the adapters' products on it
//! (`Backend::matmul_from`: the other factor converted the same way, under its own scale in the f16 mode), and the
//! 16-bit tails (`Tail`) that a base product takes in by K-concatenation: h written after each row of the operand, the
//! factor after each row (forward) or after the last row (backward) of the dequantized weight, one GEMM over both.

use cudarc::driver::CudaSlice;

use super::gemm::{Dtype, Gemm, Operand};
use super::{grid, Cuda};
use crate::backend::{check, Backend, MatMul, Tail};
use crate::error::Result;

/// A product input: x [rows, cols], and in the 16-bit modes its tensor-core copy (`Cuda::half_copy`) with rows of `ld`
/// values, the last ld − cols of them room for a tail.
pub struct CudaOperand<'a> {
    pub(super) x: &'a CudaSlice<f32>,
    pub(super) half: Option<CudaSlice<u16>>,
    pub(super) cols: usize,
    pub(super) ld: usize,
}

impl CudaOperand<'_> {
    /// The columns after each row of the 16-bit copy that a tail may fill.
    pub(super) fn room(&self) -> usize {
        if self.half.is_some() {
            self.ld - self.cols
        } else {
            0
        }
    }

    /// The 16-bit copy's row stride where it has room after its rows (a GEMM's lda then); None where the rows are
    /// packed (the GEMM's own).
    pub(super) fn row_stride(&self) -> Option<usize> {
        (self.room() > 0).then_some(self.ld)
    }
}

/// Where a kernel that produces an operand's values (`Cuda::pending_operand`) also writes the operand: the 16-bit copy
/// (bf16; row r's value c at half + 2·(r·ld + c), rows of `cols` values; 0: none) or the largest magnitude of what it
/// writes (f16; atomicMax of f32 bits into the u32 at amax, cleared before; 0: none).
#[derive(Clone, Copy)]
pub(super) struct Produced {
    pub half: u64,
    pub cols: i32,
    pub ld: i32,
    pub amax: u64,
}

impl Produced {
    /// Nothing besides the values (rows of `cols`).
    pub(super) fn none(cols: usize) -> Self {
        Produced { half: 0, cols: cols as i32, ld: cols as i32, amax: 0 }
    }
}

/// An operand whose values are still to be written (`Cuda::pending_operand`).
pub(super) struct Pending {
    copy: Option<CudaSlice<u16>>,
    cols: usize,
    ld: usize,
    pub produced: Produced,
}

/// The columns and the 16-bit copy's row stride of an operand of n values as `rows` rows with `room` or more columns
/// after each (the stride rounded up to 8 values, which tensor cores want).
fn layout(n: usize, rows: usize, room: usize) -> Result<(usize, usize)> {
    let rows = rows.max(1);
    check(n.is_multiple_of(rows), "operand", || format!("{n} values in {rows} rows"))?;
    let cols = n / rows;
    Ok((cols, if room > 0 { (cols + room).next_multiple_of(8) } else { cols }))
}

/// The address of the [amax, alpha] scalars after the 16-bit copy of n values at `copy`.
fn scalars_of(copy: u64, n: usize) -> u64 {
    copy + 2 * n.next_multiple_of(2) as u64
}

impl Cuda {
    /// x's operand: converted now in the 16-bit modes (every product of a linear's input or output gradient reads it
    /// in 16 bits there), with `room` or more columns after each of its `rows` rows for a tail (the row stride rounded
    /// up to 8 values, which tensor cores want); x alone in f32.
    pub(super) fn operand_of<'a>(&self, x: &'a CudaSlice<f32>, rows: usize, room: usize) -> Result<CudaOperand<'a>> {
        let (cols, ld) = layout(x.len(), rows, room)?;
        let half = match self.half() {
            Some(_) => Some(self.half_copy(x, cols, ld, 0, 1.0)?),
            None => None,
        };
        Ok(CudaOperand { x, half, cols, ld })
    }

    /// Room for a 16-bit copy of `len` values followed by its [amax, alpha] scalars, and the scalars' address.
    fn half_buffer(&self, len: usize) -> Result<(CudaSlice<u16>, u64)> {
        let copy = self.alloc_uninit::<u16>(len.next_multiple_of(2) + 4)?;
        let scalars = scalars_of(self.addr(&copy), len);
        Ok((copy, scalars))
    }

    /// The first half of an operand whose values a kernel writes, making the operand in the same pass (`Produced`):
    /// for n values as `rows` rows with `room` (`operand_of`), the copy and what the kernel is to write into it.
    pub(super) fn pending_operand(&self, n: usize, rows: usize, room: usize) -> Result<Pending> {
        let (cols, ld) = layout(n, rows, room)?;
        let mut produced = Produced { half: 0, cols: cols as i32, ld: ld as i32, amax: 0 };
        let Some(dtype) = self.half() else {
            return Ok(Pending { copy: None, cols, ld, produced });
        };
        let (copy, scalars) = self.half_buffer(n / cols.max(1) * ld)?;
        if dtype == Dtype::Bf16 {
            produced.half = self.addr(&copy);
        } else {
            produced.amax = scalars;
            // SAFETY: the copy's live u32 slot for the maximum; the memset is queued on the backend's stream.
            unsafe { cudarc::driver::result::memset_d8_async(produced.amax, 0, 4, self.stream.cu_stream()) }
                .map_err(|e| super::device_err("clearing a maximum", e))?;
        }
        Ok(Pending { copy: Some(copy), cols, ld, produced })
    }

    /// The second half: the operand of `out`, once the kernel given `p.produced` has written it (f16: converted now
    /// under the maximum that kernel wrote).
    pub(super) fn finish_operand<'a>(&self, out: &'a CudaSlice<f32>, p: Pending) -> Result<CudaOperand<'a>> {
        let Pending { copy, cols, ld, produced } = p;
        if produced.amax != 0 {
            let copy = copy.as_ref().expect("an f16 copy");
            self.to_f16_under(out, cols, ld, self.addr(copy), produced.amax, produced.amax + 4, 0, 1.0)?;
        }
        Ok(CudaOperand { x: out, half: copy, cols, ld })
    }

    /// x as a 16-bit tensor-core operand at `out` (`x.len()` values): bf16, or in the f16 mode fp16 of x·2^s with s
    /// the f16_shift of x's largest magnitude, which goes to the u32 at `amax`; 2^−s goes to the f32 at `inv_scale`
    /// unless it is 0.
    pub(super) fn to_operand(&self, x: &CudaSlice<f32>, out: u64, amax: u64, inv_scale: u64) -> Result<()> {
        self.to_operand_times(x, x.len().max(1), x.len().max(1), out, amax, inv_scale, 0, 1.0)
    }

    /// `to_operand` for rows of `cols` values written with a row stride of `ld`, with the f16 mode's alpha at
    /// `inv_scale` multiplied by `factor` and by the f32 at `times` unless that is 0: the alpha of a product of two
    /// scaled operands.
    #[allow(clippy::too_many_arguments)]
    fn to_operand_times(
        &self,
        x: &CudaSlice<f32>,
        cols: usize,
        ld: usize,
        out: u64,
        amax: u64,
        inv_scale: u64,
        times: u64,
        factor: f32,
    ) -> Result<()> {
        let (n64, cols32, ld32) = (x.len() as i64, cols as i32, ld as i32);
        if self.half() != Some(Dtype::F16) {
            return launch!(self, "to_bf16", grid(x.len().div_ceil(8)), x, &out, &n64, &cols32, &ld32);
        }
        self.absmax_into(x, amax)?;
        self.to_f16_under(x, cols, ld, out, amax, inv_scale, times, factor)
    }

    /// `to_f16_scaled` of x under the scale its maximum at `amax` gives.
    #[allow(clippy::too_many_arguments)]
    fn to_f16_under(
        &self,
        x: &CudaSlice<f32>,
        cols: usize,
        ld: usize,
        out: u64,
        amax: u64,
        inv_scale: u64,
        times: u64,
        factor: f32,
    ) -> Result<()> {
        let (n64, cols32, ld32) = (x.len() as i64, cols as i32, ld as i32);
        launch!(
            self,
            "to_f16_scaled",
            grid(x.len().div_ceil(8)),
            x,
            &out,
            &n64,
            &cols32,
            &ld32,
            &amax,
            &inv_scale,
            &times,
            &factor
        )
    }

    /// x's 16-bit copy (`to_operand`) with rows of `cols` values at a row stride of `ld`, followed by its two 32-bit
    /// scalars, [amax, alpha] (`scalars_of`); the alpha is `to_operand_times`'s. Room after the rows is left
    /// unwritten: a tail writes it before a product reads it.
    fn half_copy(&self, x: &CudaSlice<f32>, cols: usize, ld: usize, times: u64, factor: f32) -> Result<CudaSlice<u16>> {
        let len = x.len() / cols.max(1) * ld;
        let (copy, scalars) = self.half_buffer(len)?;
        self.to_operand_times(x, cols.max(1), ld.max(1), self.addr(&copy), scalars, scalars + 4, times, factor)?;
        Ok(copy)
    }

    /// The GEMM operand of x for a product whose other operand is `dtype` (with `CudaOperand::row_stride` as its lda
    /// where it has one), and the device alpha that undoes its scale (0: none).
    pub(super) fn gemm_operand(&self, x: &CudaOperand, dtype: Dtype) -> Result<(Operand, u64)> {
        match (&x.half, dtype) {
            (_, Dtype::F32) => Ok((Operand::f32(self.addr(x.x)), 0)),
            (Some(copy), h) => {
                let alpha = if h == Dtype::F16 { self.operand_scalars(x) + 4 } else { 0 };
                Ok((Operand::half(self.addr(copy), h), alpha))
            }
            (None, _) => Err(crate::error::Error::Invalid("a 16-bit product on an f32 operand".into())),
        }
    }

    /// The address of an operand's [amax, alpha] (16-bit modes).
    fn operand_scalars(&self, x: &CudaOperand) -> u64 {
        let copy = x.half.as_ref().expect("a 16-bit operand");
        scalars_of(self.addr(copy), x.x.len() / x.cols.max(1) * x.ld)
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
        if let Some(ld) = a.row_stride() {
            let cols = if s.a_transposed { s.m } else { s.k };
            check(cols == a.cols, "matmul", || format!("an operand of rows of {} values as {s:?}", a.cols))?;
            g.lda = ld;
        }
        let copy = self.half_copy(b, b.len(), b.len(), a_alpha, s.alpha)?;
        if dtype == Dtype::F16 {
            g.alpha_at = scalars_of(self.addr(&copy), b.len()) + 4;
        }
        // SAFETY: the sizes were checked above against m, n, k; the copies hold as many values as their sources, a's
        // rows at its row stride.
        unsafe { self.gemm(g, a_op, Operand::half(self.addr(&copy), dtype), self.addr(out)) }
    }

    /// A tail's two factors in the 16-bit format of the operand x of its product (`Tail`): h [rows, r] into the
    /// [rows, h_cols] region at `h_at` (row stride `h_ld`), the factor F into the [f_rows, f_cols] region at `f_at`
    /// (row stride `f_ld`), zero beyond them. `forward`: F is [out, r], else [r, in].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tail_halves(
        &self,
        x: &CudaOperand,
        t: &Tail<'_, Cuda>,
        rows: usize,
        (h_at, h_cols, h_ld): (u64, usize, usize),
        (f_at, f_rows, f_cols, f_ld): (u64, usize, usize, usize),
        forward: bool,
    ) -> Result<()> {
        let f16 = self.half() == Some(Dtype::F16);
        let (r, f_len) = (t.rank, t.factor.len());
        let (src_rows, src_cols) = if forward { (f_len / r.max(1), r) } else { (r, f_len / r.max(1)) };
        // The factor must fill its region's rows (forward: one per output) or columns (backward: one per input).
        let fits = if forward { src_rows == f_rows } else { src_cols == f_cols };
        let fits = fits && src_rows <= f_rows && src_cols <= f_cols && r <= h_cols;
        check(t.h.len() == rows * r && src_rows * src_cols == f_len && fits, "tail", || {
            format!(
                "h of {} values and a factor of {f_len} for {rows} rows at rank {r} into a {f_rows} × {f_cols} factor",
                t.h.len()
            )
        })?;
        check(rows * h_cols < 1 << 31 && f_rows * f_cols < 1 << 31, "tail", || {
            format!("a tail region of {} or {} values (2^31 or more)", rows * h_cols, f_rows * f_cols)
        })?;
        let (amax_h, amax_x) = if f16 {
            let amax_h = self.addr(&self.tail_amax);
            self.absmax_into(t.h, amax_h)?;
            (amax_h, self.operand_scalars(x))
        } else {
            (0, 0)
        };
        let region = |src: &CudaSlice<f32>,
                      (sr, sc): (usize, usize),
                      (at, ro, co, ld): (u64, usize, usize, usize),
                      plus: u64,
                      minus: u64,
                      factor: f32| {
            let (sr, sc, ro, co, ld, f16) = (sr as i32, sc as i32, ro as i32, co as i32, ld as i64, f16 as i32);
            launch!(
                self,
                "to_half_region",
                grid(ro as usize * co as usize),
                src,
                &sr,
                &sc,
                &ro,
                &co,
                &at,
                &ld,
                &f16,
                &plus,
                &minus,
                &factor
            )
        };
        region(t.h, (rows, r), (h_at, rows, h_cols, h_ld), amax_h, 0, 1.0)?;
        region(t.factor, (src_rows, src_cols), (f_at, f_rows, f_cols, f_ld), amax_x, amax_h, t.scale)
    }
}
