//! Causal grouped-query attention on the CPU, forward and backward.
//!
//! Forward: per (sequence, head, block of queries) one score GEMM, a masked softmax, one value GEMM.
//! Backward recomputes the probabilities P of a block instead of storing them (as flash attention does), then
//! with dO the output gradient and O the forward's output:
//!   dV += Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ⊙ (dP − rowsum(dO ⊙ O)),   dQ = scale·dS·K,   dK += scale·dSᵀ·Q.
//! (rowsum(dO ⊙ O) = rowsum(P ⊙ dP), one pass over the head instead of one over the keys, as flash attention does.)
//! Backward tasks own one (sequence, KV head) so that the dK/dV sums over the query heads sharing it
//! (GQA) need no synchronisation.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::backend::{binary_exponent, f16_shift, f16_shift_for, AttentionShape};
use crate::linalg::{gemm_strided, Real, Strided};

const QUERY_BLOCK: usize = 128;

/// Where one block of queries of one head looks.
struct Block {
    b: usize,
    h: usize,
    q0: usize,
    rows: usize,
    /// Keys the block can see: cache indices k0..keys.
    k0: usize,
    keys: usize,
}

impl Block {
    fn new(s: &AttentionShape, key_mask: &[u32], b: usize, h: usize, qb: usize) -> Self {
        let q0 = qb * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(s.q_len - q0);
        // Causality: the last query of the block sees keys up to its own cache index. In a packed row (segments in the
        // key mask, never decreasing) no query of the block sees the keys before its first query's segment.
        let mask = &key_mask[b * s.kv_capacity..b * s.kv_capacity + s.kv_len];
        let first = s.kv_len - s.q_len + q0;
        let seg = mask[first];
        let k0 = if seg > 1 { first - mask[..first].iter().rev().take_while(|&&m| m == seg).count() } else { 0 };
        Block { b, h, q0, rows, k0, keys: first + rows }
    }
    /// Keys from k0.
    fn n(&self) -> usize {
        self.keys - self.k0
    }
    fn q_view(&self, s: &AttentionShape) -> Strided {
        Strided::rows(s.heads * s.head_dim)
            .at((self.b * s.q_len + self.q0) * s.heads * s.head_dim + self.h * s.head_dim)
    }
    /// The block's keys (and values) from k0.
    fn kv_view(&self, s: &AttentionShape) -> Strided {
        let kv_head = self.h / (s.heads / s.kv_heads);
        Strided::rows(s.kv_heads * s.head_dim)
            .at((self.b * s.kv_capacity + self.k0) * s.kv_heads * s.head_dim + kv_head * s.head_dim)
    }

    /// The block's attention probabilities [rows, keys k0..keys].
    fn probabilities<T: Real>(&self, q: &[T], k: &[T], key_mask: &[u32], s: &AttentionShape) -> Vec<T> {
        let (rows, keys, d) = (self.rows, self.n(), s.head_dim);
        let mut p = vec![T::zero(); rows * keys];
        gemm_strided(
            (rows, keys, d),
            &mut p,
            Strided::rows(keys),
            q,
            self.q_view(s),
            k,
            self.kv_view(s).t(),
            T::of(s.scale),
            false,
            false,
        );
        let row_mask = &key_mask[self.b * s.kv_capacity..self.b * s.kv_capacity + self.keys];
        let first = s.kv_len - s.q_len;
        for (i, row) in p.chunks_exact_mut(keys).enumerate() {
            let ci = first + self.q0 + i;
            let lo = s.window.map_or(0, |w| (ci + 1).saturating_sub(w));
            // Indices relative to k0.
            softmax_masked(row, lo.saturating_sub(self.k0), ci + 1 - self.k0, &row_mask[self.k0..], row_mask[ci]);
        }
        p
    }
}

fn blocks(s: &AttentionShape) -> usize {
    s.q_len.div_ceil(QUERY_BLOCK)
}

/// How the products inside attention see their operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    /// As they are.
    Exact,
    /// TF32-rounded: the CUDA 16-bit modes' GEMM path (heads that are not `flash_head`).
    Tf32,
    /// bf16-rounded: the CUDA bf16 mode's fused kernels, which round q, k, v and dO as they load them and the
    /// probabilities and score gradients before their products.
    Bf16,
    /// fp16-rounded at the same places: the CUDA f16 mode's fused kernels. q, k, v and dO are scaled by 2^s per tensor
    /// (`f16_shift` of the tensor's largest magnitude), the probabilities (≤ 1) not at all, and the score gradients dS
    /// by the s of their bound: |dS| ≤ |dP| + |rowsum(dO ⊙ O)| ≤ 2·head_dim·max|dO|·max|V| < 2^(1 + ⌈log2 head_dim⌉ +
    /// e(dO) + e(V)), e the binary exponent (`dscore_shift`).
    F16,
}

/// x rounded by `round` to the values the products see.
fn each<T: Real>(x: &[T], round: impl Fn(f32) -> f32) -> Cow<'_, [T]> {
    Cow::Owned(x.iter().map(|&v| T::of(round(v.to_f32().unwrap_or(f32::NAN)))).collect())
}

/// A tensor operand (q, k, v, dO) as the products of `mode` see it.
fn operand<T: Real>(x: &[T], mode: Operands) -> Cow<'_, [T]> {
    match mode {
        Operands::Exact => Cow::Borrowed(x),
        Operands::Tf32 => each(x, super::tf32_rna),
        Operands::Bf16 => {
            let mut x = x.to_vec();
            T::round_bf16(&mut x);
            Cow::Owned(x)
        }
        Operands::F16 => {
            let s = f16_shift(super::amax(x));
            each(x, |v| super::f16_scaled(v, s))
        }
    }
}

/// Probabilities (in [0, 1]) as the products of `mode` see them.
fn probabilities<T: Real>(p: &[T], mode: Operands) -> Cow<'_, [T]> {
    match mode {
        Operands::F16 => each(p, super::f16_rne),
        _ => operand(p, mode),
    }
}

/// Score gradients as the products of `mode` see them; `shift` is `dscore_shift`'s.
fn score_gradients<T: Real>(ds: &[T], mode: Operands, shift: i32) -> Cow<'_, [T]> {
    match mode {
        Operands::F16 => each(ds, |v| super::f16_scaled(v, shift)),
        _ => operand(ds, mode),
    }
}

/// The f16 mode's scale exponent for dS (see `Operands::F16`), from the unrounded dO and V.
pub fn dscore_shift(dout_amax: f32, v_amax: f32, head_dim: usize) -> i32 {
    let log2_d = head_dim.next_power_of_two().trailing_zeros() as i32;
    f16_shift_for((1 + log2_d).saturating_add(binary_exponent(dout_amax)).saturating_add(binary_exponent(v_amax)))
}

pub fn forward<T: Real>(q: &[T], k: &[T], v: &[T], key_mask: &[u32], s: AttentionShape, out: &mut [T], mode: Operands) {
    let (q, k, v) = (&operand(q, mode)[..], &operand(k, mode)[..], &operand(v, mode)[..]);
    let d = s.head_dim;
    let tasks: Vec<Block> = (0..s.batch)
        .flat_map(|b| (0..s.heads).flat_map(move |h| (0..blocks(&s)).map(move |qb| (b, h, qb))))
        .map(|(b, h, qb)| Block::new(&s, key_mask, b, h, qb))
        .collect();
    let results: Vec<Vec<T>> = tasks
        .par_iter()
        .map(|blk| {
            let p = blk.probabilities(q, k, key_mask, &s);
            let mut o = vec![T::zero(); blk.rows * d];
            gemm_strided(
                (blk.rows, d, blk.n()),
                &mut o,
                Strided::rows(d),
                &probabilities(&p, mode),
                Strided::rows(blk.n()),
                v,
                blk.kv_view(&s),
                T::one(),
                false,
                false,
            );
            o
        })
        .collect();
    for (blk, o) in tasks.iter().zip(results) {
        scatter_rows(out, &o, blk.q_view(&s).offset, s.heads * d, d);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    key_mask: &[u32],
    s: AttentionShape,
    out: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    mode: Operands,
) {
    let d = s.head_dim;
    // rowsum(dO ⊙ O) per query row and head, from the unrounded values.
    let dots: Vec<T> = dout
        .chunks_exact(d)
        .zip(out.chunks_exact(d))
        .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x * y).sum())
        .collect();
    let ds_shift = if mode == Operands::F16 { dscore_shift(super::amax(dout), super::amax(v), d) } else { 0 };
    let (q, k, v, dout) =
        (&operand(q, mode)[..], &operand(k, mode)[..], &operand(v, mode)[..], &operand(dout, mode)[..]);
    let group = s.heads / s.kv_heads;
    let tasks: Vec<(usize, usize)> = (0..s.batch).flat_map(|b| (0..s.kv_heads).map(move |kh| (b, kh))).collect();
    // Each task returns its dK, dV ([kv_len, d]) and the dQ blocks of its query heads.
    type TaskGrads<T> = (Vec<T>, Vec<T>, Vec<(Block, Vec<T>)>);
    let results: Vec<TaskGrads<T>> = tasks
        .par_iter()
        .map(|&(b, kh)| {
            let mut dk_t = vec![T::zero(); s.kv_len * d];
            let mut dv_t = vec![T::zero(); s.kv_len * d];
            let mut dqs = Vec::new();
            for h in kh * group..(kh + 1) * group {
                for qb in 0..blocks(&s) {
                    let blk = Block::new(&s, key_mask, b, h, qb);
                    let (rows, keys) = (blk.rows, blk.n());
                    // This block's keys in the task's dK and dV.
                    let at = blk.k0 * d;
                    let p = blk.probabilities(q, k, key_mask, &s);
                    let (qv, kvv) = (blk.q_view(&s), blk.kv_view(&s));
                    let scale = T::of(s.scale);
                    // dV[keys] += Pᵀ·dO.
                    gemm_strided(
                        (keys, d, rows),
                        &mut dv_t[at..],
                        Strided::rows(d),
                        &probabilities(&p, mode),
                        Strided::rows(keys).t(),
                        dout,
                        qv,
                        T::one(),
                        true,
                        false,
                    );
                    // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O)), in place.
                    let mut ds = vec![T::zero(); rows * keys];
                    gemm_strided(
                        (rows, keys, d),
                        &mut ds,
                        Strided::rows(keys),
                        dout,
                        qv,
                        v,
                        kvv.t(),
                        T::one(),
                        false,
                        false,
                    );
                    for (i, (ds, p)) in ds.chunks_exact_mut(keys).zip(p.chunks_exact(keys)).enumerate() {
                        let dot = dots[qv.offset / d + i * s.heads];
                        for (x, &pj) in ds.iter_mut().zip(p) {
                            *x = pj * (*x - dot);
                        }
                    }
                    let ds = score_gradients(&ds, mode, ds_shift);
                    let mut dq_b = vec![T::zero(); rows * d];
                    gemm_strided(
                        (rows, d, keys),
                        &mut dq_b,
                        Strided::rows(d),
                        &ds,
                        Strided::rows(keys),
                        k,
                        kvv,
                        scale,
                        false,
                        false,
                    );
                    gemm_strided(
                        (keys, d, rows),
                        &mut dk_t[at..],
                        Strided::rows(d),
                        &ds,
                        Strided::rows(keys).t(),
                        q,
                        qv,
                        scale,
                        true,
                        false,
                    );
                    dqs.push((blk, dq_b));
                }
            }
            (dk_t, dv_t, dqs)
        })
        .collect();
    dk.fill(T::zero());
    dv.fill(T::zero());
    let kv_rs = s.kv_heads * d;
    for (&(b, kh), (dk_t, dv_t, dqs)) in tasks.iter().zip(results) {
        let at = b * s.kv_capacity * kv_rs + kh * d;
        scatter_rows(dk, &dk_t, at, kv_rs, d);
        scatter_rows(dv, &dv_t, at, kv_rs, d);
        for (blk, dq_b) in dqs {
            scatter_rows(dq, &dq_b, blk.q_view(&s).offset, s.heads * d, d);
        }
    }
}

/// Copies consecutive rows of `width` from `src` to `dst` rows starting at `at`, `stride` apart.
fn scatter_rows<T: Copy>(dst: &mut [T], src: &[T], at: usize, stride: usize, width: usize) {
    for (i, row) in src.chunks_exact(width).enumerate() {
        dst[at + i * stride..at + i * stride + width].copy_from_slice(row);
    }
}

/// Softmax over row[lo..hi] restricted to the keys a query of segment `seg` sees (`simd::sees_key`: the key mask holds
/// segments, so packed examples stay apart); everything else becomes 0. A row with no visible key becomes all zeros
/// rather than NaN.
fn softmax_masked<T: Real>(row: &mut [T], lo: usize, hi: usize, mask: &[u32], seg: u32) {
    if let Some(row) = T::as_f32s_mut(row) {
        return crate::simd::softmax_masked(row, lo, hi, mask, seg);
    }
    let visible = |j: usize| j >= lo && j < hi && crate::simd::sees_key(mask[j], seg);
    let mut max = T::neg_infinity();
    for (j, &x) in row.iter().enumerate() {
        if visible(j) && x > max {
            max = x;
        }
    }
    if max == T::neg_infinity() {
        row.fill(T::zero());
        return;
    }
    let hi = hi.min(row.len());
    T::exp_shifted(&mut row[lo..hi], max);
    let mut sum = T::zero();
    for (j, x) in row.iter_mut().enumerate() {
        if !visible(j) {
            *x = T::zero();
        }
        sum = sum + *x;
    }
    let inv = T::one() / sum;
    for x in row.iter_mut() {
        *x = *x * inv;
    }
}
