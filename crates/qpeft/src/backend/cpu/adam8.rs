//! bitsandbytes' block-wise 8-bit AdamW on the host (`Backend::adamw_8bit`), rounded step by step in f32 as the
//! CUDA kernel is.

use crate::backend::{AdamStep, ADAM8_BLOCK};
use crate::quant::maps::{signed_dynamic, unsigned_dynamic};

/// Nearest entry of the sorted `code` to `y`, a tie going to the even index (the CUDA kernel's binary search).
pub(super) fn nearest(code: &[f32; 256], y: f32) -> u8 {
    let i = code.partition_point(|&c| c <= y);
    if i == 0 {
        return 0;
    }
    if i == 256 {
        return 255;
    }
    let (lo, hi) = (i - 1, i);
    let mid = (code[lo] + code[hi]) * 0.5;
    // Below the midpoint, or on it with an even lower index: the lower entry.
    let pick = if y < mid || (y == mid && lo % 2 == 0) { lo } else { hi };
    pick as u8
}

/// One step over every block of p (see `Backend::adamw_8bit`).
pub(super) fn step(
    p: &mut [f32],
    g: &[f32],
    mc: &mut [u8],
    ma: &mut [f32],
    vc: &mut [u8],
    va: &mut [f32],
    s: AdamStep,
) {
    let (ds, du) = (signed_dynamic(), unsigned_dynamic());
    let step_size = -s.lr * s.c2 / s.c1;
    let mut m = [0f32; ADAM8_BLOCK];
    let mut v = [0f32; ADAM8_BLOCK];
    for (b, start) in (0..p.len()).step_by(ADAM8_BLOCK).enumerate() {
        let end = (start + ADAM8_BLOCK).min(p.len());
        let (mut m_max, mut v_max) = (0f32, 0f32);
        for i in start..end {
            let j = i - start;
            let gi = g[i] * s.grad_coef;
            if gi.is_finite() {
                m[j] = s.beta1 * (ds[mc[i] as usize] * ma[b]) + (1.0 - s.beta1) * gi;
                v[j] = s.beta2 * (du[vc[i] as usize] * va[b]) + (1.0 - s.beta2) * gi * gi;
                p[i] += step_size * (m[j] / (v[j].sqrt() + s.c2 * s.eps));
                if s.weight_decay > 0.0 {
                    p[i] *= 1.0 - s.lr * s.weight_decay;
                }
            } else {
                m[j] = 0.0;
                v[j] = 0.0;
            }
            m_max = m_max.max(m[j].abs());
            v_max = v_max.max(v[j].abs());
        }
        ma[b] = m_max;
        va[b] = v_max;
        for i in start..end {
            let j = i - start;
            let mut c = if m_max > 0.0 { nearest(&ds, m[j] / m_max) } else { 127 };
            if ds[c as usize].is_sign_negative() != m[j].is_sign_negative() {
                c = if m[j] > 0.0 { c.saturating_add(1) } else { c.saturating_sub(1) };
            }
            mc[i] = c;
            vc[i] = if v_max > 0.0 { nearest(&du, v[j] / v_max) } else { 0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rounds_to_the_closer_code_and_ties_to_even() {
        let d = signed_dynamic();
        assert_eq!(nearest(&d, 1.0), 255);
        assert_eq!(nearest(&d, -1.0), 0);
        assert_eq!(nearest(&d, 0.0), 127);
        assert_eq!(nearest(&d, d[200]), 200);
        let mid = (d[200] + d[201]) * 0.5;
        assert_eq!(nearest(&d, mid), 200, "a tie goes to the even index");
        let mid = (d[201] + d[202]) * 0.5;
        assert_eq!(nearest(&d, mid), 202);
        assert_eq!(nearest(&d, f32::from_bits(mid.to_bits() - 1)), 201);
    }
}
