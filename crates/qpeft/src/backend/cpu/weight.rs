//! The CPU backend's frozen weights: their values, or a GGUF block format kept as stored and dequantized per use,
//! a tile of rows at a time, so that a 4-bit GGUF model lives in about its file size (a 1.5B model in 1.1 GB rather
//! than 7 GB of f32).
//!
//! A tile holds exactly the values `upload_weight` would have kept (the same dequantization, then the 16-bit
//! emulations' rounding), so packed and unpacked weights give the same products up to the summation order of the
//! tiled GEMMs.

use std::ops::Range;

use rayon::prelude::*;

use super::amx::PackedBf16;
use super::{bf16_rne, f16_rne, Cpu, Half};
use crate::error::Result;
use crate::linalg::{gemm_strided, Real, Strided};
use crate::quant::base::GgmlRows;

/// Rows of Ŵ dequantized at once by one task of a forward product: a few hundred KB to a few MB of values.
const TILE_ROWS: usize = 64;
/// Rows of Ŵ per step of a backward product (dequantized in parallel, then one parallel GEMM).
const BACKWARD_TILE_ROWS: usize = 512;

pub enum CpuWeight<T> {
    Values(Vec<T>),
    Ggml(GgmlRows),
    /// bf16 values in AMX tile layout, as Ŵ for forward products and as Ŵᵀ for backward ones (`Cpu::bf16_amx`; Ŵᵀ
    /// is packed at the first backward product, so inference holds 2 bytes per weight).
    Amx {
        forward: PackedBf16,
        backward: std::sync::OnceLock<PackedBf16>,
    },
}

impl<T: Real> Cpu<T> {
    /// Rows `rows` of a packed Ŵ as the backend computes with them.
    pub(super) fn weight_rows(&self, g: &GgmlRows, rows: Range<usize>) -> Vec<T> {
        let mut values = vec![0f32; rows.len() * g.in_dim];
        g.dequantize_rows(rows, &mut values);
        let round: fn(f32) -> f32 = match self.half {
            None => return values.into_iter().map(T::of).collect(),
            Some(Half::Bf16) => bf16_rne,
            Some(Half::F16) => f16_rne,
        };
        values.into_iter().map(|v| T::of(round(v))).collect()
    }

    /// out [rows, out_dim] (+)= x·Ŵᵀ for a packed Ŵ: tiles of Ŵ's rows in parallel, each dequantized and multiplied
    /// on its own thread.
    pub(super) fn linear_packed(&self, x: &[T], g: &GgmlRows, rows: usize, out: &mut [T], accumulate: bool) {
        let (n, k) = (g.out_dim, g.in_dim);
        let tiles: Vec<(usize, Vec<T>)> = (0..n)
            .step_by(TILE_ROWS)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|j0| {
                let tn = TILE_ROWS.min(n - j0);
                let w = self.weight_rows(g, j0..j0 + tn);
                let mut y = vec![T::zero(); rows * tn];
                let (lhs, rhs) = (Strided::rows(k), Strided::rows(k).t());
                gemm_strided((rows, tn, k), &mut y, Strided::rows(tn), x, lhs, &w, rhs, T::one(), false, false);
                (j0, y)
            })
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

    /// dx [rows, in_dim] (+)= dy·Ŵ for a packed Ŵ: Ŵ's rows a tile at a time, each tile's product added to dx.
    pub(super) fn linear_backward_packed(
        &self,
        dy: &[T],
        g: &GgmlRows,
        rows: usize,
        dx: &mut [T],
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = (g.out_dim, g.in_dim);
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
