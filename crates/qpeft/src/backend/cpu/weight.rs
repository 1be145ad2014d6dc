//! The CPU backend's frozen weights: their values, or a 4-bit storage — a GGUF block format as stored, bitsandbytes
//! NF4/FP4 codes — kept as it is and dequantized per use, a tile of rows at a time, so that a 4-bit model lives in
//! about its quantized size (a 1.5B GGUF model in 1.1 GB rather than 7 GB of f32; QLoRA's NF4 base at 4.5 bits per
//! weight rather than 32).
//!
//! A tile holds exactly the values `upload_weight` would have kept (the same dequantization, then the 16-bit
//! emulations' rounding), so packed and unpacked weights give the same products up to the summation order of the
//! tiled GEMMs.

use std::ops::Range;

use rayon::prelude::*;

use super::bf16::PackedBf16;
use super::{bf16_rne, f16_rne, Cpu, Half};
use crate::error::Result;
use crate::formats::ggml_dot;
use crate::linalg::{gemm_strided, Real, Strided};
use crate::quant::base::GgmlRows;
use crate::quant::nf4::Bnb4;

/// Rows of Ŵ dequantized at once by one task of a forward product: a few hundred KB to a few MB of values.
const TILE_ROWS: usize = 64;
/// Products with at most this many input rows (generation's one token per sequence) take Ŵ a row at a time: each
/// row dequantized into a reused buffer and dotted with the inputs, without a tile in memory or a GEMM's set-up.
const SKINNY_ROWS: usize = 4;
/// Rows of Ŵ per step of a backward product (dequantized in parallel, then one parallel GEMM).
const BACKWARD_TILE_ROWS: usize = 512;

/// A quantized weight [out_dim, in_dim] whose rows dequantize on their own.
pub enum PackedRows {
    Ggml(GgmlRows),
    /// Codes as bitsandbytes stores them, with the block scales dequantized once (double quantization's two levels
    /// resolved): 4 bits plus 32 per block of weights.
    Bnb4 {
        q: Bnb4,
        absmax: Vec<f32>,
    },
}

impl PackedRows {
    pub fn out_dim(&self) -> usize {
        match self {
            PackedRows::Ggml(g) => g.out_dim,
            PackedRows::Bnb4 { q, .. } => q.shape.first().copied().unwrap_or(0),
        }
    }

    pub fn in_dim(&self) -> usize {
        match self {
            PackedRows::Ggml(g) => g.in_dim,
            // Rows of the stored shape; an empty shape has no rows.
            PackedRows::Bnb4 { q, .. } => q.numel().checked_div(self.out_dim()).unwrap_or(0),
        }
    }

    /// Rows `rows` of Ŵ into `out` ([rows.len(), in_dim]): the values `BaseWeight::dequantize` gives.
    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        match self {
            PackedRows::Ggml(g) => g.dequantize_rows(rows, out),
            PackedRows::Bnb4 { q, absmax } => q.dequantize_range(rows.start * self.in_dim(), absmax, out),
        }
    }
}

/// out [rows, n] (+)= the column tiles `tile(j0, tn)` computes ([rows, tn] for columns j0 … j0 + tn), `TILE_ROWS`
/// columns each, in parallel.
fn by_tiles<T: Real>(
    n: usize,
    rows: usize,
    out: &mut [T],
    accumulate: bool,
    tile: impl Fn(usize, usize) -> Vec<T> + Sync,
) {
    let tiles: Vec<(usize, Vec<T>)> = (0..n)
        .step_by(TILE_ROWS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| (j0, tile(j0, TILE_ROWS.min(n - j0))))
        .collect();
    for (j0, y) in tiles {
        let tn = y.len() / rows.max(1);
        for (o, y) in out.chunks_mut(n).zip(y.chunks(tn)) {
            for (o, &y) in o[j0..j0 + tn].iter_mut().zip(y) {
                *o = if accumulate { *o + y } else { y };
            }
        }
    }
}

pub enum CpuWeight<T> {
    Values(Vec<T>),
    Packed(PackedRows),
    /// bf16 values in the layout of the CPU's bf16 kernels (`bf16::PackedBf16`), as Ŵ for forward products and as Ŵᵀ
    /// for backward ones (`Cpu::bf16_native`; Ŵᵀ is packed at the first backward product, so inference holds 2 bytes
    /// per weight).
    Bf16 {
        forward: PackedBf16,
        backward: std::sync::OnceLock<PackedBf16>,
    },
}

impl<T: Real> Cpu<T> {
    /// Rows `rows` of a packed Ŵ as the backend computes with them.
    pub(super) fn weight_rows(&self, g: &PackedRows, rows: Range<usize>) -> Vec<T> {
        let mut values = vec![0f32; rows.len() * g.in_dim()];
        g.dequantize_rows(rows, &mut values);
        self.round_weights(&mut values);
        values.into_iter().map(T::of).collect()
    }

    /// Dequantized values as this backend's precision keeps weights (the 16-bit emulations round them).
    fn round_weights(&self, values: &mut [f32]) {
        let round: fn(f32) -> f32 = match self.half {
            None => return,
            Some(Half::Bf16) => bf16_rne,
            Some(Half::F16) => f16_rne,
        };
        values.iter_mut().for_each(|v| *v = round(*v));
    }

    /// out [rows, out_dim] (+)= x·Ŵᵀ for a packed Ŵ: tiles of `TILE_ROWS` rows of Ŵ in parallel, each dequantized
    /// and multiplied on its own thread.
    pub(super) fn linear_packed(&self, x: &[T], g: &PackedRows, rows: usize, out: &mut [T], accumulate: bool) {
        if rows <= SKINNY_ROWS {
            return self.linear_packed_skinny(x, g, rows, out, accumulate);
        }
        let k = g.in_dim();
        by_tiles(g.out_dim(), rows, out, accumulate, |j0, tn| {
            let w = self.weight_rows(g, j0..j0 + tn);
            let mut y = vec![T::zero(); rows * tn];
            let (lhs, rhs) = (Strided::rows(k), Strided::rows(k).t());
            gemm_strided((rows, tn, k), &mut y, Strided::rows(tn), x, lhs, &w, rhs, T::one(), false, false);
            y
        });
    }

    /// `linear_packed` for at most `SKINNY_ROWS` input rows: each row of a tile dequantized into the task's buffer
    /// (or, where `ggml_dot` has the format, in registers) and dotted with every input row.
    fn linear_packed_skinny(&self, x: &[T], g: &PackedRows, rows: usize, out: &mut [T], accumulate: bool) {
        let k = g.in_dim();
        by_tiles(g.out_dim(), rows, out, accumulate, |j0, tn| {
            let mut y = vec![T::zero(); rows * tn];
            match (g, T::as_f32s(x)) {
                // The same numbers without the row in memory (see `ggml_dot`).
                (PackedRows::Ggml(g), Some(x)) if self.half.is_none() && ggml_dot::fused(g.dtype) => {
                    let rb = g.row_bytes();
                    let mut dots = [0f32; SKINNY_ROWS];
                    for j in 0..tn {
                        let row = &g.data[(j0 + j) * rb..(j0 + j + 1) * rb];
                        ggml_dot::dot_rows(g.dtype, row, x, &mut dots[..rows]);
                        for (r, &d) in dots[..rows].iter().enumerate() {
                            y[r * tn + j] = T::of(d);
                        }
                    }
                }
                _ => {
                    let mut w = vec![0f32; k];
                    for j in 0..tn {
                        g.dequantize_rows(j0 + j..j0 + j + 1, &mut w);
                        self.round_weights(&mut w);
                        for (r, x) in x.chunks_exact(k).enumerate() {
                            y[r * tn + j] = T::dot_f32(&w, x);
                        }
                    }
                }
            }
            y
        });
    }

    /// dx [rows, in_dim] (+)= dy·Ŵ for a packed Ŵ: Ŵ's rows a tile at a time, each tile's product added to dx.
    pub(super) fn linear_backward_packed(
        &self,
        dy: &[T],
        g: &PackedRows,
        rows: usize,
        dx: &mut [T],
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = (g.out_dim(), g.in_dim());
        for j0 in (0..n).step_by(BACKWARD_TILE_ROWS) {
            let tn = BACKWARD_TILE_ROWS.min(n - j0);
            let w: Vec<T> = (j0..j0 + tn)
                .step_by(TILE_ROWS)
                .collect::<Vec<_>>()
                .into_par_iter()
                .flat_map_iter(|r| self.weight_rows(g, r..(r + TILE_ROWS).min(j0 + tn)))
                .collect();
            // dy's columns j0..j0+tn, read in place through a strided view.
            let acc = accumulate || j0 > 0;
            gemm_strided(
                (rows, k, tn),
                dx,
                Strided::rows(k),
                dy,
                Strided::rows(n).at(j0),
                &w,
                Strided::rows(k),
                T::one(),
                acc,
                true,
            );
        }
        Ok(())
    }
}
