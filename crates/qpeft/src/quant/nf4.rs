//! bitsandbytes 4-bit block-wise quantization, NF4 and FP4, with optional double quantization of the absmax
//! (methods.md §1.1). Bit-exact with bitsandbytes 0.50.2 on CPU, whose `quantize_4bit` is the pure-torch
//! "default" backend:
//! - full blocks are scaled by `x * (1 / max(absmax, 1e-38))`, the partial last block by `x / max(absmax, 1e-38)`
//!   (and that clamped absmax is what gets stored for it), then clamped to [-1, 1];
//! - the code is the number of f32 midpoints of the sorted table strictly below the value (`torch.bucketize`),
//!   so ties go down and an all-zero block gets the code of 0.0 (the CUDA kernel gives NaN → code 0 there);
//! - two codes per byte, the even flat index in the high nibble; an odd length is padded with a zero value;
//! - double quantization: offset = torch's f32 mean of the absmax, then the centred absmax are 8-bit quantized
//!   with the signed dynamic map in blocks of 256 (see `blockwise8`).

use half::bf16;
use rayon::prelude::*;

use super::blockwise8::{self, Blockwise8};
use super::maps::signed_dynamic;
use super::torch_sum::{torch_sum_f32, TORCH_F32_LANES};
use crate::error::{Error, Result};

/// The 4-bit data type of a bitsandbytes-quantized tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FourBit {
    Nf4,
    Fp4,
}

/// Block size of the second-level quantization of the absmax (fixed in bitsandbytes).
pub const NESTED_BLOCK: usize = 256;

/// bitsandbytes' NF4 table as f32 bit patterns (`create_normal_map`, methods.md §1.1).
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000, 0x3da2faff,
    0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// bitsandbytes' FP4 table by code (sign bit 3, 2 exponent bits, 1 mantissa bit); code 8 is +0.0 as in
/// bitsandbytes' `_get_4bit_code`.
const FP4_BITS: [u32; 16] = [
    0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000, 0x00000000,
    0xbbaaaaab, 0xbf2aaaab, 0xbf800000, 0xbeaaaaab, 0xbf000000, 0xbe2aaaab, 0xbe800000,
];

/// Codes of the FP4 table in ascending value order, as torch's argsort orders it for bitsandbytes (the two
/// zeros, codes 0 and 8, in that order: a value of exactly 0 gets code 0, a tiny positive one code 8).
const FP4_ASCENDING: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

impl FourBit {
    pub fn table(self) -> [f32; 16] {
        match self {
            FourBit::Nf4 => NF4_BITS,
            FourBit::Fp4 => FP4_BITS,
        }
        .map(f32::from_bits)
    }

    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }

    /// Code by ascending-order position.
    fn ascending(self) -> [u8; 16] {
        match self {
            FourBit::Nf4 => std::array::from_fn(|i| i as u8),
            FourBit::Fp4 => FP4_ASCENDING,
        }
    }
}

/// Rounds normalized values to 4-bit codes exactly like `torch.bucketize` on bitsandbytes' f32 midpoints.
#[derive(Clone, Debug)]
pub struct CodeRounder {
    midpoints: [f32; 15],
    ascending: [u8; 16],
}

impl CodeRounder {
    pub fn new(kind: FourBit) -> Self {
        let table = kind.table();
        let ascending = kind.ascending();
        let midpoints =
            std::array::from_fn(|i| (table[ascending[i] as usize] + table[ascending[i + 1] as usize]) / 2.0);
        CodeRounder { midpoints, ascending }
    }

    #[inline]
    pub fn code(&self, y: f32) -> u8 {
        let below = self.midpoints.iter().map(|&m| (m < y) as usize).sum::<usize>();
        self.ascending[below]
    }

    /// Codes of one block, bitsandbytes-style; returns the absmax to store.
    /// `partial` selects the division used for the last, shorter block.
    pub fn block_codes(&self, x: &[f32], partial: bool, codes: &mut [u8]) -> f32 {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let clamped = amax.max(1e-38);
        if partial {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = self.code((v / clamped).clamp(-1.0, 1.0));
            }
            clamped
        } else {
            let r = 1.0 / clamped;
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = self.code((v * r).clamp(-1.0, 1.0));
            }
            amax
        }
    }
}

/// The per-block scales of a 4-bit tensor: plain f32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// absmax_b = dynamic[q_b] * nested_absmax[b / 256] + offset.
    Double {
        nested: Blockwise8,
        offset: f32,
    },
}

impl Absmax {
    fn compress(absmax: Vec<f32>, double: bool) -> Absmax {
        if !double {
            return Absmax::Plain(absmax);
        }
        // torch computes mean() on CPU as sum(...) / n in f32.
        let offset = torch_sum_f32(&absmax, TORCH_F32_LANES) / absmax.len() as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        Absmax::Double { nested: blockwise8::quantize(&centred, &signed_dynamic(), NESTED_BLOCK), offset }
    }

    /// The f32 absmax per block, as bitsandbytes' `dequantize_4bit` reconstructs it.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double { nested, offset } => {
                nested.dequantize(&signed_dynamic()).into_iter().map(|a| a + offset).collect()
            }
        }
    }

    pub fn blocks(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { nested, .. } => nested.codes.len(),
        }
    }

    /// Storage bytes of the scales.
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double { nested, .. } => nested.codes.len() + 4 * nested.absmax.len() + 4,
        }
    }
}

/// A tensor quantized to 4 bits the bitsandbytes way.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4 {
    pub kind: FourBit,
    pub shape: Vec<usize>,
    pub block: usize,
    /// Two codes per byte, even flat index in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// Checks a bitsandbytes block size: a power of two in 32..=4096.
pub fn check_block(block: usize) -> Result<()> {
    if !(32..=4096).contains(&block) || !block.is_power_of_two() {
        return Err(Error::Invalid(format!("4-bit block size {block} is not a power of two in 32..=4096")));
    }
    Ok(())
}

/// Fails on the first NaN or infinite value, naming its position.
pub fn check_finite(x: &[f32], shape: &[usize]) -> Result<()> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        let cols = *shape.last().unwrap_or(&1);
        return Err(Error::Invalid(format!(
            "weight value {} at row {}, column {} is not finite; refusing to quantize",
            x[i],
            i / cols.max(1),
            i % cols.max(1)
        )));
    }
    Ok(())
}

impl Bnb4 {
    /// Quantizes row-major `x` of `shape`. Inputs stored in bf16/f16 are passed widened to f32 (exact).
    pub fn quantize(x: &[f32], shape: &[usize], kind: FourBit, block: usize, double: bool) -> Result<Bnb4> {
        check_block(block)?;
        let n: usize = shape.iter().product();
        if n != x.len() || n == 0 {
            return Err(Error::Invalid(format!("cannot quantize {} values as shape {shape:?}", x.len())));
        }
        check_finite(x, shape)?;
        let rounder = CodeRounder::new(kind);
        let mut codes = vec![0u8; n + n % 2];
        // An odd length is padded with one zero value, quantized like bitsandbytes does (bucketize of 0.0).
        if n % 2 == 1 {
            codes[n] = rounder.code(0.0);
        }
        let full = n / block;
        let absmax: Vec<f32> = x
            .par_chunks(block)
            .zip(codes[..n].par_chunks_mut(block))
            .enumerate()
            .map(|(b, (xb, cb))| rounder.block_codes(xb, b >= full, cb))
            .collect();
        let packed = codes.par_chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        Ok(Bnb4 { kind, shape: shape.to_vec(), block, packed, absmax: Absmax::compress(absmax, double) })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Code of flat element `i`.
    #[inline]
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0xF
        }
    }

    /// table[code] * absmax in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_range(0, &self.absmax.values(), &mut out);
        out
    }

    /// Elements `first … first + out.len()` (in storage order) of `dequantize`, given the block scales already
    /// resolved (`absmax.values()`): a scale block at a time, two codes per byte where the run starts on a byte.
    pub fn dequantize_range(&self, first: usize, absmax: &[f32], out: &mut [f32]) {
        let table = self.kind.table();
        let mut j = 0;
        while j < out.len() {
            let block = (first + j) / self.block;
            let end = ((block + 1) * self.block - first).min(out.len());
            let scale = absmax[block];
            let mut at = j;
            if (first + at) % 2 == 1 {
                out[at] = table[self.code(first + at) as usize] * scale;
                at += 1;
            }
            let pairs = (end - at) / 2;
            let bytes = &self.packed[(first + at) / 2..(first + at) / 2 + pairs];
            for (o, &b) in out[at..at + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                o[0] = table[(b >> 4) as usize] * scale;
                o[1] = table[(b & 0xF) as usize] * scale;
            }
            if at + 2 * pairs < end {
                out[end - 1] = table[self.code(first + end - 1) as usize] * scale;
            }
            j = end;
        }
    }

    /// The f32 dequantization rounded to bf16 (round to nearest even), as bitsandbytes returns it for a bf16
    /// compute dtype.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize().into_iter().map(bf16::from_f32).collect()
    }

    /// Storage bits per parameter: codes plus scales.
    pub fn bits_per_param(&self) -> f64 {
        8.0 * (self.packed.len() + self.absmax.bytes()) as f64 / self.numel() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_midpoints_are_the_documented_thresholds() {
        // methods.md §1.1 lists the thresholds as decimal literals; they must round to our f32 midpoints.
        let documented = [
            -0.8480964004993439f64,
            -0.6106329262256622,
            -0.4599952697753906,
            -0.33967943489551544,
            -0.23460740596055984,
            -0.13791173323988914,
            -0.045525018125772476,
            0.03979014977812767,
            0.1202552504837513,
            0.2035212516784668,
            0.2920137718319893,
            0.3893125355243683,
            0.5016634166240692,
            0.6427869200706482,
            0.8614784181118011,
        ];
        let r = CodeRounder::new(FourBit::Nf4);
        for (m, d) in r.midpoints.iter().zip(documented) {
            assert_eq!(*m, d as f32);
        }
    }

    #[test]
    fn hand_checked_block() {
        // Block [2, -2, 1, 0.1, 0, 0.08]: absmax 2, normalized [1, -1, 0.5, 0.05, 0, 0.04].
        // 0.5 lies between 0.44071 (12) and 0.56262 (13), midpoint 0.50166 → 12. 0.05 > 0.03979 → 8.
        // 0.04 > 0.0397901 → 8. 0 → 7. Packed high nibble first.
        let q = Bnb4::quantize(&[2.0, -2.0, 1.0, 0.1, 0.0, 0.08], &[1, 6], FourBit::Nf4, 64, false).unwrap();
        assert_eq!(q.packed, vec![0xF0, 0xC8, 0x78]);
        assert_eq!(q.absmax, Absmax::Plain(vec![2.0]));
        // FP4: |0.5| → code 5, -1 → 8 + 3, 0.05 → between 0.0052 (1) and 0.1667 (6), threshold 0.0859375 → 1.
        let q = Bnb4::quantize(&[2.0, -2.0, 1.0, 0.1, 0.0, 0.08], &[1, 6], FourBit::Fp4, 64, false).unwrap();
        assert_eq!(q.packed, vec![0x3B, 0x51, 0x01]);
    }

    #[test]
    fn rejects_bad_block_and_non_finite() {
        assert!(Bnb4::quantize(&[1.0; 64], &[1, 64], FourBit::Nf4, 48, false).is_err());
        assert!(Bnb4::quantize(&[1.0; 64], &[1, 64], FourBit::Nf4, 8192, false).is_err());
        let mut x = vec![1.0; 64];
        x[5] = f32::NAN;
        let e = Bnb4::quantize(&x, &[2, 32], FourBit::Nf4, 64, false).unwrap_err().to_string();
        assert!(e.contains("row 0, column 5"), "{e}");
    }
}
