//! IR-QLoRA's information calibration quantization (ICQ, methods.md §3.1–3.2): shift (NF4) or widen/narrow
//! (int4) the quantization range so the 4-bit codes of each block carry as much information (entropy) as possible.

use rayon::prelude::*;

use super::int4::GroupParams;
use super::maps::signed_dynamic;
use super::nf4::{check_finite, Bnb4, CodeRounder, FourBit};
use crate::error::{Error, Result};

/// 1/Φ⁻¹(0.9677083): turns a block's half-range into the standard deviation NF4's normal model assumes.
pub const SIGMA: f64 = 0.541_087_236_897_823_7;
/// NF4 blocks per τ super-block (one f32 scale each).
pub const SUPER_BLOCK: usize = 256;
/// ICQ works on bitsandbytes' default 64-element blocks.
pub const ICQ_BLOCK: usize = 64;

/// The τ search: `2n + 1` factors evenly spaced in [−λσ, +λσ] (IR-QLoRA: λ 0.1, n 100).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TauSearch {
    pub lambda: f64,
    pub n: usize,
}

impl Default for TauSearch {
    fn default() -> Self {
        TauSearch { lambda: 0.1, n: 100 }
    }
}

impl TauSearch {
    fn factors(&self) -> Vec<f32> {
        let (lo, steps) = (-self.lambda * SIGMA, 2 * self.n);
        (0..=steps)
            .map(|j| if steps == 0 { 0.0 } else { (lo + 2.0 * self.lambda * SIGMA * j as f64 / steps as f64) as f32 })
            .collect()
    }
}

/// Shannon entropy (bits) of a histogram of `total` codes.
pub fn entropy(counts: &[u32], total: usize) -> f64 {
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

fn code_entropy(codes: &[u8]) -> f64 {
    let mut counts = [0u32; 16];
    for &c in codes {
        counts[c as usize] += 1;
    }
    entropy(&counts, codes.len())
}

/// NF4 of (W − τ) plus the per-block shift τ, stored as an 8-bit code of the signed dynamic map times one
/// f32 per super-block of 256 blocks: Ŵ = NF4 part + dynamic[tau_code[b]] · tau_scale[b / 256].
#[derive(Clone, Debug, PartialEq)]
pub struct IcqNf4 {
    pub nf4: Bnb4,
    pub tau_codes: Vec<u8>,
    pub tau_scales: Vec<f32>,
}

/// Per-block result of the search, for reports.
#[derive(Clone, Debug, Default)]
pub struct IcqStats {
    /// Mean per-block code entropy (bits) of plain NF4 and of ICQ.
    pub entropy_plain: f64,
    pub entropy_icq: f64,
    /// The chosen τ of every block (before its 8-bit compression).
    pub tau: Vec<f32>,
}

/// The lower median (index 31 of 64 sorted values, torch.median's choice).
fn lower_median(block: &[f32]) -> f32 {
    let mut s = block.to_vec();
    s.sort_by(f32::total_cmp);
    s[(s.len() - 1) / 2]
}

/// Searches τ for each 64-element block of `w` (row-major, `numel % 64 == 0`), then quantizes W − τ to NF4.
pub fn quantize_nf4(w: &[f32], shape: &[usize], double: bool, search: TauSearch) -> Result<(IcqNf4, IcqStats)> {
    if w.is_empty() || !w.len().is_multiple_of(ICQ_BLOCK) {
        return Err(Error::Invalid(format!("ICQ needs a whole number of 64-element blocks, got {} values", w.len())));
    }
    check_finite(w, shape)?;
    let rounder = CodeRounder::new(FourBit::Nf4);
    let factors = search.factors();
    // (τ, plain entropy, best entropy) per block
    let per_block: Vec<(f32, f64, f64)> = w
        .par_chunks(ICQ_BLOCK)
        .map(|block| {
            let mut codes = [0u8; ICQ_BLOCK];
            let mut shifted = [0.0f32; ICQ_BLOCK];
            rounder.block_codes(block, false, &mut codes);
            let plain = code_entropy(&codes);
            let tau0 = lower_median(block);
            let a = block.iter().fold(0.0f32, |m, v| m.max((v - tau0).abs()));
            let mut best = (f64::NEG_INFINITY, tau0);
            for &f in &factors {
                let tau = f * a + tau0;
                for (s, v) in shifted.iter_mut().zip(block) {
                    *s = v - tau;
                }
                rounder.block_codes(&shifted, false, &mut codes);
                let h = code_entropy(&codes);
                // Strictly greater: among equal entropies the first (most negative) factor wins.
                if h > best.0 {
                    best = (h, tau);
                }
            }
            (best.1, plain, best.0)
        })
        .collect();
    let tau: Vec<f32> = per_block.iter().map(|b| b.0).collect();
    let blocks = tau.len() as f64;
    let stats = IcqStats {
        entropy_plain: per_block.iter().map(|b| b.1).sum::<f64>() / blocks,
        entropy_icq: per_block.iter().map(|b| b.2).sum::<f64>() / blocks,
        tau: tau.clone(),
    };
    let shifted: Vec<f32> = w.iter().enumerate().map(|(i, v)| v - tau[i / ICQ_BLOCK]).collect();
    let nf4 = Bnb4::quantize(&shifted, shape, FourBit::Nf4, ICQ_BLOCK, double)?;
    let (tau_codes, tau_scales) = compress_tau(&tau);
    Ok((IcqNf4 { nf4, tau_codes, tau_scales }, stats))
}

/// τ per super-block: scale = max |τ|, code = the nearest entry of the signed dynamic map to τ / scale (first
/// index on ties).
fn compress_tau(tau: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let map = signed_dynamic();
    let mut codes = Vec::with_capacity(tau.len());
    let mut scales = Vec::new();
    for chunk in tau.chunks(SUPER_BLOCK) {
        let scale = chunk.iter().fold(0.0f32, |m, t| m.max(t.abs()));
        scales.push(scale);
        for &t in chunk {
            let y = if scale > 0.0 { t / scale } else { 0.0 };
            let mut best = 0usize;
            for (k, &d) in map.iter().enumerate() {
                if (y - d).abs() < (y - map[best]).abs() {
                    best = k;
                }
            }
            codes.push(best as u8);
        }
    }
    (codes, scales)
}

impl IcqNf4 {
    /// The stored τ of every block.
    pub fn tau(&self) -> Vec<f32> {
        let map = signed_dynamic();
        self.tau_codes.iter().enumerate().map(|(b, &c)| map[c as usize] * self.tau_scales[b / SUPER_BLOCK]).collect()
    }

    /// Ŵ = NF4 part + τ of its block, in f32 (IR-QLoRA's fp32 path).
    pub fn dequantize(&self) -> Vec<f32> {
        let tau = self.tau();
        let mut w = self.nf4.dequantize();
        for (i, v) in w.iter_mut().enumerate() {
            *v += tau[i / ICQ_BLOCK];
        }
        w
    }

    pub fn bits_per_param(&self) -> f64 {
        self.nf4.bits_per_param()
            + 8.0 * (self.tau_codes.len() + 4 * self.tau_scales.len()) as f64 / self.nf4.numel() as f64
    }
}

/// IR-QLoRA's int4 range multipliers: 1, then 1 + λ·k/n and 1 − λ·k/n for k = 1..n (λ 0.1, n 50).
pub fn range_multipliers(lambda: f32, n: usize) -> Vec<f32> {
    let step = |k: usize| lambda * k as f32 / n as f32;
    std::iter::once(1.0).chain((1..=n).map(|k| 1.0 + step(k))).chain((1..=n).map(|k| 1.0 - step(k))).collect()
}

/// The group parameters of `row` whose codes have the highest entropy over the range multipliers (the first
/// candidate wins ties); a drop-in for `GroupParams::find` in RTN or GPTQ.
pub fn find_int4_params(row: &[f32], sym: bool, multipliers: &[f32]) -> GroupParams {
    let mut best = (f64::NEG_INFINITY, GroupParams::find(row, sym, 1.0));
    let mut codes = vec![0u8; row.len()];
    for &p in multipliers {
        let params = GroupParams::find(row, sym, p);
        for (c, &v) in codes.iter_mut().zip(row) {
            *c = params.code(v);
        }
        let h = code_entropy(&codes);
        if h > best.0 {
            best = (h, params);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_tau() {
        // w_k = k/63, k = 0..63: τ0 (lower median) = 31/63, a = 32/63. With n = 1 and λσ = 1 the factors are
        // −1, 0, 1, so τ ∈ {−1/63, 31/63, 1}. τ = −1/63 leaves only non-negative values (codes 7..15, at most
        // log2 9 = 3.17 bits); τ = 1 only non-positive ones (codes 0..7, ≤ 3 bits); τ = 31/63 spreads them over
        // [−0.97, 1] and uses all 16 codes, so it must win.
        let w: Vec<f32> = (0..64).map(|k| k as f32 / 63.0).collect();
        let search = TauSearch { lambda: 1.0 / SIGMA, n: 1 };
        let (q, stats) = quantize_nf4(&w, &[1, 64], false, search).unwrap();
        assert_eq!(stats.tau, vec![31.0 / 63.0]);
        let distinct = (0..64).map(|i| q.nf4.code(i)).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(distinct.len(), 16);
        assert!(stats.entropy_icq > 3.17 && stats.entropy_plain <= 9f64.log2());
        // The τ code of a single block is ±1 (index 255 for a positive τ), its scale |τ|.
        assert_eq!(q.tau_codes, vec![255]);
        assert_eq!(q.tau_scales, vec![31.0 / 63.0]);
        // Reconstruction: NF4 of the centred block plus τ.
        let deq = q.dequantize();
        let err = deq.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(err < 0.1, "{err}");
    }

    #[test]
    fn multipliers_and_entropy() {
        let m = range_multipliers(0.1, 50);
        assert_eq!(m.len(), 101);
        assert_eq!((m[0], m[50], m[100]), (1.0, 1.1, 0.9));
        assert_eq!(entropy(&[16, 16, 16, 16], 64), 2.0);
        // A row with one outlier: shrinking the range (p < 1) clips the outlier and spreads the rest.
        let mut row: Vec<f32> = (0..32).map(|k| (k as f32 - 16.0) / 16.0).collect();
        row[0] = -4.0;
        let plain = GroupParams::find(&row, false, 1.0);
        let icq = find_int4_params(&row, false, &m);
        assert!(icq.scale < plain.scale);
    }
}
