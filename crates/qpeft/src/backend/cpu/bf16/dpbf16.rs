//! The AVX512-BF16 kernel of `bf16`, for CPUs that have it without AMX (AMD Zen 4 and later, Intel Cooper Lake): the
//! same operands, layouts and results as the tile kernel (`amx`), on vector registers.
//!
//! One `vdpbf16ps` adds to each of 16 f32 lanes the two products of a pair of bf16 values in each operand. `PackedBf16`
//! already holds W in that shape: per 16 output features and input pair, one 64-byte row of (W[n, 2p], W[n, 2p + 1])
//! for n = 0…15. So the kernel broadcasts the pair (x[m, 2p], x[m, 2p + 1]) of one input row to every lane and adds
//! its products with 16 features at once. A block of 8 rows × 3 feature groups (48 features) keeps 24 accumulators
//! in registers; per input pair it loads 3 rows of W and 8 pairs of x for 24 `vdpbf16ps`.

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
    // Whole blocks (8 rows, 48 features) of an f32 output go from the registers straight into `out` (added to it when
    // accumulating); the others (edges, f64) pass through `c`.
    let direct = T::as_f32s_mut(out).is_some();
    let out_at = OutPtr(out.as_mut_ptr());
    (0..groups.div_ceil(GROUPS)).into_par_iter().for_each(|task| {
        let g0 = task * GROUPS;
        let ng = (groups - g0).min(GROUPS);
        let w_at = |t: usize| w.group(g0 + t.min(ng - 1)).as_ptr();
        let w_groups = [w_at(0), w_at(1), w_at(2)];
        let mut c = [0f32; ROWS * GROUPS * 16];
        for r0 in (0..rows).step_by(ROWS) {
            let (valid_rows, cols) = ((rows - r0).min(ROWS), (n - g0 * 16).min(GROUPS * 16));
            let full = direct && valid_rows == ROWS && cols == ng * 16;
            let (dst, stride, add) = match full {
                true => (out_at.get().wrapping_add(r0 * n + g0 * 16) as *mut f32, n, accumulate),
                false => (c.as_mut_ptr(), GROUPS * 16, false),
            };
            // SAFETY: `available()`; `a.row_block(r0)` is 8 padded rows of kb blocks and each W group kb blocks; `dst`
            // holds 8 rows of ng·16 floats `stride` apart: this task's own columns of 8 rows of `out` (rows × n f32
            // values, which outlives the parallel loop), or `c`.
            unsafe {
                match ng {
                    1 => block::<1>(a.row_block(r0), kb, [w_groups[0]], dst, stride, add),
                    2 => block::<2>(a.row_block(r0), kb, [w_groups[0], w_groups[1]], dst, stride, add),
                    _ => block::<3>(a.row_block(r0), kb, w_groups, dst, stride, add),
                }
            }
            if full {
                continue;
            }
            // SAFETY: this task alone writes columns g0·16 … g0·16 + cols of every row, inside `out`, which outlives
            // the parallel loop.
            unsafe { out_at.write_block(r0, valid_rows, n, g0 * 16, cols, &c, GROUPS * 16, accumulate) };
        }
    });
}

/// The 8 × (16·G) f32 product of 8 input rows (`Input`'s layout: row i of k block kk at kk·512 + i·32 from `a`) and G
/// packed feature groups of W (k block kk at kk·512, input pair p at p·32 within it), over kb blocks of 32 inputs,
/// stored at `dst` (rows `stride` floats apart), or added to what is there with `add`.
///
/// # Safety
/// AVX512-BF16 is available; `a` and every `w[t]` point at kb blocks of 512 values as described; `dst` at 8 rows of
/// 16·G writable floats, `stride` apart.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block<const G: usize>(a: *const u16, kb: usize, w: [*const u16; G], dst: *mut f32, stride: usize, add: bool) {
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
    for (i, acc) in acc.iter().enumerate() {
        for (t, &v) in acc.iter().enumerate() {
            let at = dst.add(i * stride + t * 16);
            _mm512_storeu_ps(at, if add { _mm512_add_ps(_mm512_loadu_ps(at), v) } else { v });
        }
    }
}
