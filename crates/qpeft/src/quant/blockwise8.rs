//! bitsandbytes' 8-bit block-wise quantization against a 256-entry code (methods.md §1.2), as its CPU kernel
//! (bitsandbytes ≥ 0.50, csrc/cpu_ops.cpp `quantize_cpu_impl`) does it. It compresses the NF4 absmax in double
//! quantization.
//!
//! The CPU kernel does not search the code: it scales by `1 / absmax`, maps the value in [-1, 1] to one of 65536
//! evenly spaced bins, `bin = u16(((y + 1) * 0.5) * 65535 + 0.5)`, and reads the code index from a table built
//! for the bin centres `-1 + 2i / 65535` (the number of code midpoints strictly below the centre). Near a
//! midpoint this can pick the farther neighbour, which is why the CUDA kernel's nearest-value rule is not used
//! here. A block whose absmax is 0 gets code 0.

/// Codes and per-block absmax of an 8-bit block-wise quantized vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
    pub block: usize,
}

const BINS: usize = 65536;

/// Code index of every bin centre.
fn bin_table(code: &[f32; 256]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut index = 0usize;
    (0..BINS)
        .map(|i| {
            let centre = -1.0f32 + (2.0f32 * i as f32) / (BINS - 1) as f32;
            while index < midpoints.len() && midpoints[index] < centre {
                index += 1;
            }
            index as u8
        })
        .collect()
}

#[inline]
fn bin(y: f32) -> usize {
    ((y.clamp(-1.0, 1.0) + 1.0) * 0.5 * (BINS - 1) as f32 + 0.5) as u16 as usize
}

pub fn quantize(x: &[f32], code: &[f32; 256], block: usize) -> Blockwise8 {
    let table = bin_table(code);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(amax);
        if amax == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, chunk.len()));
            continue;
        }
        let r = 1.0 / amax;
        codes.extend(chunk.iter().map(|&v| table[bin(v * r)]));
    }
    Blockwise8 { codes, absmax, block }
}

impl Blockwise8 {
    /// code[q] * absmax in f32, as both bitsandbytes backends do.
    pub fn dequantize(&self, code: &[f32; 256]) -> Vec<f32> {
        self.codes
            .chunks(self.block)
            .zip(&self.absmax)
            .flat_map(|(chunk, &amax)| chunk.iter().map(move |&q| code[q as usize] * amax))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::maps::signed_dynamic;

    #[test]
    fn rounding_follows_the_cpu_kernel() {
        let code = signed_dynamic();
        // Code values away from 0 map to themselves; the block max maps to 1.0 (index 255).
        let q = quantize(&[code[200] * 2.0, 2.0, code[10] * 2.0, 0.0], &code, 4);
        assert_eq!(q.codes[..3], [200, 255, 10]);
        // 0 falls in bin 32768, centred on 1/65535 = 1.53e-5, above the midpoints of the codes 0, 5.5e-7,
        // 3.25e-6, 7.75e-6 and 2.125e-5 (indices 127..131; the last midpoint is 1.45e-5): code 131.
        assert_eq!(q.codes[3], 131);
        assert_eq!(q.absmax, vec![2.0]);
        // Codes 1 (-0.97890625) and 2 (-0.96484375) have the midpoint -0.971875. The bin of -0.97187537 (just
        // below it) is u16(0.01406231 * 65535 + 0.5) = 922, whose centre -1 + 1844/65535 = -0.9718624 lies above
        // the midpoint: the kernel returns 2, although 1 is nearer.
        assert_eq!(bin(-0.971_875_37), 922);
        assert_eq!(quantize(&[-0.971_875_37, 1.0], &code, 2).codes[0], 2);
        // An all-zero block gets code 0.
        assert_eq!(quantize(&[0.0, 0.0], &code, 2).codes, vec![0, 0]);
    }
}
