//! The AVX512-BF16 kernel of `bf16`, for CPUs that have it without AMX (AMD Zen 4 and later, Intel Cooper Lake): the
//! same operands, layouts and results as the tile kernel (`amx`), on vector registers.
//!
//! One `vdpbf16ps` adds to each of 16 f32 lanes the two products of a pair of bf16 values in each operand. `PackedBf16`
//! already holds W in that shape: per 16 output features and input pair, one 64-byte row of (W[n, 2p], W[n, 2p + 1])
//! for n = 0…15. So the kernel broadcasts the pair (x[m, 2p], x[m, 2p + 1]) of one input row to every lane and adds
//! its products with 16 features at once. A block of 8 rows × 3 feature groups (48 features) keeps 24 accumulators
//! in registers; per input pair it loads 3 rows of W and 8 pairs of x for 24 `vdpbf16ps`.
//!

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::layout::{Input, OutPtr, PackedBf16};
use crate::linalg::Real;

/// Rows of one register block (half of `Input`'s 16-row groups).
const ROWS: usize = 8;
/// Feature groups of 16 in one register block.
const GROUPS: usize = 3;

/// Whether this CPU has AVX512-BF16.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// `bf16::product` with `vdpbf16ps`: each task takes 48 output features and runs every 8-row block of x against
/// them. Panics unless `available()`.
pub(super) fn product<T: Real>(a: &Input, w: &PackedBf16, out: &mut [T], accumulate: bool) {
    assert!(available(), "AVX512-BF16 is not available");
    let (rows, k, n) = (a.rows(), w.in_dim, w.out_dim);
    assert!(a.k() == k && out.len() == rows * n, "{} × {} input and out {} for {w:?}", rows, a.k(), out.len());
    let kb = k.div_ceil(32);
    if kb == 0 || n == 0 {
        if !accumulate {
            out.fill(T::zero());
        }
        return;
    }
    let groups = n.div_ceil(16);
    let out_at = OutPtr(out.as_mut_ptr());
    (0..groups.div_ceil(GROUPS)).into_par_iter().for_each(|task| {
        let g0 = task * GROUPS;
        let ng = (groups - g0).min(GROUPS);
        let w_at = |t: usize| w.group(g0 + t.min(ng - 1)).as_ptr();
        let w_groups = [w_at(0), w_at(1), w_at(2)];
        for r0 in (0..rows).step_by(ROWS) {
            // SAFETY: `available()`; `a.row_block(r0)` is 8 padded rows of kb blocks and each W group kb blocks.
            let acc = unsafe {
                match ng {
                    1 => widen::<1>(block::<1>(a.row_block(r0), kb, [w_groups[0]])),
                    2 => widen::<2>(block::<2>(a.row_block(r0), kb, [w_groups[0], w_groups[1]])),
                    _ => block::<3>(a.row_block(r0), kb, w_groups),
                }
            };
            for (i, acc) in acc.iter().enumerate().take((rows - r0).min(ROWS)) {
                let row = r0 + i;
                for (t, lanes) in acc.iter().enumerate().take(ng) {
                    let c0 = (g0 + t) * 16;
                    let cols = (n - c0).min(16);
                    // SAFETY: this task alone writes columns c0 … c0 + cols of every row, inside `out` (rows × n),
                    // which outlives the parallel loop.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_at.get().add(row * n + c0), cols) };
                    if accumulate {
                        dst.iter_mut().zip(lanes).for_each(|(d, &s)| *d = *d + T::of(s));
                    } else {
                        dst.iter_mut().zip(lanes).for_each(|(d, &s)| *d = T::of(s));
                    }
                }
            }
        }
    });
}

/// A block of fewer groups, padded with zero lanes to the full width.
fn widen<const G: usize>(acc: [[[f32; 16]; G]; ROWS]) -> [[[f32; 16]; GROUPS]; ROWS] {
    let mut wide = [[[0f32; 16]; GROUPS]; ROWS];
    for (w, a) in wide.iter_mut().zip(acc) {
        w[..G].copy_from_slice(&a);
    }
    wide
}

/// The 8 × (16·G) f32 product of 8 input rows (`Input`'s layout: row i of k block kk at kk·512 + i·32 from `a`) and G
/// packed feature groups of W (k block kk at kk·512, input pair p at p·32 within it), over kb blocks of 32 inputs.
///
/// # Safety
/// AVX512-BF16 is available; `a` and every `w[t]` point at kb blocks of 512 values as described.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const G: usize>(a: *const u16, kb: usize, w: [*const u16; G]) -> [[[f32; 16]; G]; ROWS] {
    let mut acc = [[_mm512_setzero_ps(); G]; ROWS];
    for kk in 0..kb {
        let a = a.add(kk * 512);
        for p in 0..16 {
            let mut wv = [_mm512_setzero_si512(); G];
            for (t, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(w[t].add(kk * 512 + p * 32) as *const _);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let pair = _mm512_set1_epi32((a.add(i * 32 + 2 * p) as *const i32).read_unaligned());
                for (t, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_dpbf16_ps(
                        *acc,
                        std::mem::transmute::<__m512i, __m512bh>(pair),
                        std::mem::transmute::<__m512i, __m512bh>(wv[t]),
                    );
                }
            }
        }
    }
    // Vectors leave as plain arrays: the caller is not compiled for AVX-512.
    acc.map(|row| row.map(|v| std::mem::transmute::<__m512, [f32; 16]>(v)))
}
