//! Group-wise int4 quantization as AutoGPTQ does it (methods.md §1.4), and its checkpoint layout.
//!
//! Per output row and group of `group` consecutive input columns: `xmin = min(0, min w)`, `xmax = max(0, max w)`;
//! symmetric: `xmax = max(|xmin|, xmax)` and, only if `xmin < 0`, `xmin = -xmax` (so a group without negative
//! values keeps `xmin = 0` and zero 8, and can only represent [0, 7·scale] — AutoGPTQ's behaviour, kept);
//! an all-zero group uses [-1, 1]. `scale = (xmax - xmin) / 15`, `zero = 8` (sym) or `round(-xmin / scale)`,
//! `q = clamp(round(w / scale) + zero, 0, 15)`, all in f32 with round-half-to-even.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

pub const MAXQ: f32 = 15.0;

/// Scale and zero point of one group row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: f32,
}

impl GroupParams {
    /// AutoGPTQ's `Quantizer.find_params` for one row of a group; IR-QLoRA's ICQ then scales the range by the
    /// multiplier `p` (1 for plain GPTQ, see `icq`).
    pub fn find(w: &[f32], sym: bool, p: f32) -> GroupParams {
        let mut xmin = w.iter().fold(0.0f32, |m, &v| m.min(v));
        let mut xmax = w.iter().fold(0.0f32, |m, &v| m.max(v));
        if sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        if p != 1.0 {
            xmin *= p;
            xmax *= p;
        }
        let scale = (xmax - xmin) / MAXQ;
        let zero = if sym { (MAXQ + 1.0) / 2.0 } else { (-xmin / scale).round_ties_even() };
        GroupParams { scale, zero }
    }

    #[inline]
    pub fn code(&self, w: f32) -> u8 {
        ((w / self.scale).round_ties_even() + self.zero).clamp(0.0, MAXQ) as u8
    }

    #[inline]
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale * (q as f32 - self.zero)
    }
}

/// Checks a GPTQ group size against the input dimension.
pub fn check_group(group: usize, in_dim: usize) -> Result<()> {
    if group == 0 || !in_dim.is_multiple_of(group) || !group.is_multiple_of(8) {
        return Err(Error::Invalid(format!(
            "int4 group size {group} must be a positive multiple of 8 dividing the input dimension {in_dim}"
        )));
    }
    Ok(())
}

/// A linear weight in AutoGPTQ's 4-bit checkpoint layout (`qlinear_cuda_old`, GPTQ "v1" zeros).
#[derive(Clone, Debug, PartialEq)]
pub struct GptqInt4 {
    pub in_dim: usize,
    pub out_dim: usize,
    pub group: usize,
    pub sym: bool,
    /// [in/8, out]: word (i, j) holds input rows 8i..8i+7 of output j, row 8i+t in bits 4t..4t+3.
    pub qweight: Vec<i32>,
    /// [groups, out/8]: `(zero - 1) & 0xF` of outputs 8c..8c+7, output 8c+t in bits 4t..4t+3.
    pub qzeros: Vec<i32>,
    /// [groups, out]
    pub scales: Vec<f16>,
    /// [in]: the group of each input row.
    pub g_idx: Vec<i32>,
    /// [groups, out] fp16 zero points that replace `qzeros` after QA-LoRA's merge (`merge_into_zeros`); stored as
    /// `<m>.zeros` in qpeft's GPTQ directories (`qzeros` is then omitted, so AutoGPTQ loaders refuse the file
    /// instead of silently using the unmerged zeros).
    pub float_zeros: Option<Vec<f16>>,
}

impl GptqInt4 {
    /// Packs codes [out, in] and per-(row, group) parameters [out, groups] with contiguous groups.
    pub fn pack(
        codes: &[u8],
        params: &[GroupParams],
        out_dim: usize,
        in_dim: usize,
        group: usize,
        sym: bool,
    ) -> Result<Self> {
        check_group(group, in_dim)?;
        if !out_dim.is_multiple_of(8) {
            return Err(Error::Invalid(format!(
                "int4 packing needs an output dimension divisible by 8, got {out_dim}"
            )));
        }
        let groups = in_dim / group;
        let mut qweight = vec![0i32; in_dim / 8 * out_dim];
        for j in 0..out_dim {
            for i in 0..in_dim {
                qweight[(i / 8) * out_dim + j] |= ((codes[j * in_dim + i] as u32 & 0xF) << (4 * (i % 8))) as i32;
            }
        }
        let mut qzeros = vec![0i32; groups * out_dim / 8];
        let mut scales = Vec::with_capacity(groups * out_dim);
        for g in 0..groups {
            for j in 0..out_dim {
                let p = params[j * groups + g];
                // GPTQ v1 stores zero - 1; a zero of 0 wraps to 15 and reads back as (15 + 1) & 0xF = 0.
                let stored = (p.zero as i32 - 1) as u32 & 0xF;
                qzeros[g * out_dim / 8 + j / 8] |= (stored << (4 * (j % 8))) as i32;
                scales.push(f16::from_f32(p.scale));
            }
        }
        let g_idx = (0..in_dim).map(|i| (i / group) as i32).collect();
        Ok(GptqInt4 { in_dim, out_dim, group, sym, qweight, qzeros, scales, g_idx, float_zeros: None })
    }

    pub fn groups(&self) -> usize {
        self.scales.len() / self.out_dim
    }

    #[inline]
    pub fn code(&self, j: usize, i: usize) -> u8 {
        ((self.qweight[(i / 8) * self.out_dim + j] as u32 >> (4 * (i % 8))) & 0xF) as u8
    }

    /// The zero point of (group g, output j): the merged fp16 value when there is one.
    #[inline]
    pub fn zero_point(&self, g: usize, j: usize) -> f32 {
        match &self.float_zeros {
            Some(z) => z[g * self.out_dim + j].to_f32(),
            None => self.zero(g, j) as f32,
        }
    }

    #[inline]
    pub fn zero(&self, g: usize, j: usize) -> u8 {
        let stored = (self.qzeros[g * self.out_dim / 8 + j / 8] as u32 >> (4 * (j % 8))) & 0xF;
        ((stored + 1) & 0xF) as u8
    }

    /// W [out, in] = f16(scales[g, j] · (q − zero)), the value AutoGPTQ's fp16 forward multiplies by.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(|g, j| self.zero_point(g, j))
    }

    /// Dequantization with float zero points [groups, out] (after QA-LoRA's merge, `merge_into_zeros`).
    pub fn dequantize_with_zeros(&self, zeros: &[f16]) -> Vec<f32> {
        self.dequantize_with(|g, j| zeros[g * self.out_dim + j].to_f32())
    }

    fn dequantize_with(&self, zero: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut w = vec![0.0f32; self.out_dim * self.in_dim];
        for j in 0..self.out_dim {
            for i in 0..self.in_dim {
                let g = self.g_idx[i] as usize;
                let s = self.scales[g * self.out_dim + j].to_f32();
                let v = s * (self.code(j, i) as f32 - zero(g, j));
                w[j * self.in_dim + i] = f16::from_f32(v).to_f32();
            }
        }
        w
    }

    /// Folds a ΔW [out, in] that is constant inside every quantization group (QA-LoRA's) into the zero points:
    /// scale·(q − z') = scale·(q − z) + ΔW gives z' = z − ΔW/scale, stored as fp16 [groups, out] (no longer
    /// integers, so they cannot be re-packed into 4-bit qzeros). Refuses a ΔW that varies within a group.
    pub fn merge_into_zeros(&self, delta: &[f32]) -> Result<Vec<f16>> {
        let (o, n) = (self.out_dim, self.in_dim);
        if delta.len() != o * n {
            return Err(Error::Invalid(format!("ΔW has {} values for a {o} × {n} layer", delta.len())));
        }
        let groups = self.groups();
        let mut first: Vec<Option<f32>> = vec![None; groups * o];
        for j in 0..o {
            for i in 0..n {
                let g = self.g_idx[i] as usize;
                let d = delta[j * n + i];
                match first[g * o + j] {
                    None => first[g * o + j] = Some(d),
                    Some(f) if f == d => {}
                    Some(f) => {
                        return Err(Error::Invalid(format!(
                            "ΔW is not constant inside quantization group {g} of output {j} ({f} vs {d} at input {i}): only a \
                             group-constant update (QA-LoRA's) folds into the zero points"
                        )))
                    }
                }
            }
        }
        Ok((0..groups * o)
            .map(|gj| {
                let (g, j) = (gj / o, gj % o);
                let s = self.scales[gj].to_f32();
                f16::from_f32(self.zero_point(g, j) - first[gj].unwrap_or(0.0) / s)
            })
            .collect())
    }

    /// Checks that the arrays fit the dimensions (for checkpoints read from disk).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (i, o) = (self.in_dim, self.out_dim);
        if i % 8 != 0 || o % 8 != 0 || self.qweight.len() != i / 8 * o || self.g_idx.len() != i {
            return Err(format!("qweight/g_idx do not fit in_features {i}, out_features {o}"));
        }
        let groups = self.groups();
        let zeros_fit = match &self.float_zeros {
            Some(z) => z.len() == groups * o,
            None => self.qzeros.len() == groups * o / 8,
        };
        if self.scales.len() != groups * o || !zeros_fit {
            return Err(format!("scales/zeros do not fit {groups} groups of out_features {o}"));
        }
        if let Some(g) = self.g_idx.iter().find(|&&g| g < 0 || g as usize >= groups) {
            return Err(format!("g_idx value {g} outside 0..{groups}"));
        }
        Ok(())
    }

    /// Storage bits per parameter (codes, zeros, fp16 scales, g_idx).
    pub fn bits_per_param(&self) -> f64 {
        let float_zeros = self.float_zeros.as_ref().map_or(0, Vec::len);
        let bytes =
            4 * (self.qweight.len() + self.qzeros.len() + self.g_idx.len()) + 2 * (self.scales.len() + float_zeros);
        8.0 * bytes as f64 / (self.in_dim * self.out_dim) as f64
    }
}

/// Round-to-nearest: parameters from each group of `w` [out, in], then codes. Returns codes [out, in] and
/// parameters [out, groups].
pub fn quantize_rtn(w: &[f32], out_dim: usize, in_dim: usize, group: usize, sym: bool) -> (Vec<u8>, Vec<GroupParams>) {
    debug_assert_eq!(w.len(), out_dim * in_dim);
    quantize_rtn_with(w, in_dim, group, &|row| GroupParams::find(row, sym, 1.0))
}

/// Round-to-nearest with the group parameters chosen by `find` (plain, or ICQ's range search).
pub fn quantize_rtn_with(
    w: &[f32],
    in_dim: usize,
    group: usize,
    find: &(impl Fn(&[f32]) -> GroupParams + Sync),
) -> (Vec<u8>, Vec<GroupParams>) {
    let rows: Vec<(Vec<u8>, Vec<GroupParams>)> = w
        .par_chunks(in_dim)
        .map(|row| {
            let mut codes = Vec::with_capacity(in_dim);
            let mut params = Vec::with_capacity(in_dim / group);
            for g in row.chunks(group) {
                let p = find(g);
                codes.extend(g.iter().map(|&v| p.code(v)));
                params.push(p);
            }
            (codes, params)
        })
        .collect();
    let (codes, params): (Vec<Vec<u8>>, Vec<Vec<GroupParams>>) = rows.into_iter().unzip();
    (codes.concat(), params.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_groups() {
        // Asym row [-1, 0.5, 2, 0]: scale 3/15 = 0.2, zero round(5) = 5; codes round(w/0.2)+5 with 2.5 → 2 (ties
        // to even): [0, 7, 15, 5].
        let p = GroupParams::find(&[-1.0, 0.5, 2.0, 0.0], false, 1.0);
        assert_eq!(p, GroupParams { scale: 0.2, zero: 5.0 });
        assert_eq!([-1.0, 0.5, 2.0, 0.0].map(|w| p.code(w)), [0, 7, 15, 5]);
        // Sym: xmax = 2, xmin = -2, scale 4/15, zero 8; 2 / (4/15) rounds to 7 or 8, plus 8, clamped to 15.
        let p = GroupParams::find(&[-1.0, 0.5, 2.0, 0.0], true, 1.0);
        assert_eq!(p.zero, 8.0);
        assert_eq!(p.code(2.0), 15);
        // All zero: [-1, 1], scale 2/15.
        assert_eq!(GroupParams::find(&[0.0; 4], true, 1.0).scale, 2.0 / 15.0);
    }

    #[test]
    fn pack_roundtrip_including_zero_point_zero() {
        let (out_dim, in_dim, group) = (16, 32, 16);
        let codes: Vec<u8> = (0..out_dim * in_dim).map(|k| (k * 7 % 16) as u8).collect();
        let params: Vec<GroupParams> =
            (0..out_dim * 2).map(|k| GroupParams { scale: 0.125 * (k + 1) as f32, zero: (k % 16) as f32 }).collect();
        let p = GptqInt4::pack(&codes, &params, out_dim, in_dim, group, false).unwrap();
        for j in 0..out_dim {
            for i in 0..in_dim {
                assert_eq!(p.code(j, i), codes[j * in_dim + i]);
            }
            for g in 0..2 {
                assert_eq!(p.zero(g, j) as f32, params[j * 2 + g].zero);
            }
        }
        assert!(p.validate().is_ok());
        assert!(GptqInt4::pack(&codes, &params, out_dim, in_dim, 12, false).is_err());
    }
}
