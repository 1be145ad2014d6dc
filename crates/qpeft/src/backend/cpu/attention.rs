//! Causal grouped-query attention on the CPU: per (sequence, head, block of queries) one score
//! GEMM, a masked f32 softmax, and one value GEMM — parallel over the tasks with rayon.

use rayon::prelude::*;

use super::gemm::{gemm_strided, Strided};
use crate::backend::AttentionShape;

const QUERY_BLOCK: usize = 128;

pub fn attention(q: &[f32], k: &[f32], v: &[f32], key_mask: &[u32], s: AttentionShape, out: &mut [f32]) {
    let d = s.head_dim;
    let q_rs = s.heads * d;
    let kv_rs = s.kv_heads * d;
    let group = s.heads / s.kv_heads;
    let first = s.kv_len - s.q_len; // cache index of the first query
    let blocks = s.q_len.div_ceil(QUERY_BLOCK);
    let tasks: Vec<(usize, usize, usize)> =
        (0..s.batch).flat_map(|b| (0..s.heads).flat_map(move |h| (0..blocks).map(move |qb| (b, h, qb)))).collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(b, h, qb)| {
            let q0 = qb * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(s.q_len - q0);
            // Causality: the last query of the block sees keys up to its own cache index.
            let keys = first + q0 + rows;
            let kv_head = h / group;
            let mut scores = vec![0f32; rows * keys];
            let q_view = Strided::rows(q_rs).at((b * s.q_len + q0) * q_rs + h * d);
            let k_view = Strided::rows(kv_rs).at(b * s.kv_capacity * kv_rs + kv_head * d);
            gemm_strided((rows, keys, d), &mut scores, Strided::rows(keys), q, q_view, k, k_view.t(), s.scale, false, false);
            let mask = &key_mask[b * s.kv_capacity..b * s.kv_capacity + keys];
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let ci = first + q0 + i;
                let lo = s.window.map_or(0, |w| (ci + 1).saturating_sub(w));
                softmax_masked(row, lo, ci + 1, mask);
            }
            let mut o = vec![0f32; rows * d];
            let v_view = Strided::rows(kv_rs).at(b * s.kv_capacity * kv_rs + kv_head * d);
            gemm_strided((rows, d, keys), &mut o, Strided::rows(d), &scores, Strided::rows(keys), v, v_view, 1.0, false, false);
            o
        })
        .collect();
    for (&(b, h, qb), o) in tasks.iter().zip(results) {
        let q0 = qb * QUERY_BLOCK;
        for (i, row) in o.chunks_exact(d).enumerate() {
            let at = (b * s.q_len + q0 + i) * q_rs + h * d;
            out[at..at + d].copy_from_slice(row);
        }
    }
}

/// Softmax over row[lo..hi] restricted to unmasked keys; everything else becomes 0. A row with no
/// visible key (a padding query) becomes all zeros rather than NaN.
fn softmax_masked(row: &mut [f32], lo: usize, hi: usize, mask: &[u32]) {
    let visible = |j: usize| j >= lo && j < hi && mask[j] != 0;
    let mut max = f32::NEG_INFINITY;
    for (j, &x) in row.iter().enumerate() {
        if visible(j) && x > max {
            max = x;
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if visible(j) { (*x - max).exp() } else { 0.0 };
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}
