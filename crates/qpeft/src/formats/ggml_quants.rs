//! ggml's tensor types (their numbering in GGUF files, block layouts) and their dequantization to f32.
//!
//! The arithmetic follows gguf-py's reference (float32, one rounding per operation, no fused
//! multiply-add), which is what transformers uses when it loads a GGUF file; so the weights qpeft
//! computes with are bit-identical to the ones transformers computes with.

use half::{bf16, f16};
use rayon::prelude::*;

#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Tensor element types of ggml (the numbering is part of the file format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    Other(u32),
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// (elements per block, bytes per block), or None for types qpeft cannot read.
    pub fn layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            _ => return None,
        })
    }
}

/// Dequantizes `numel` elements stored as `dtype` in `bytes`; None for an unsupported type.
/// The caller guarantees `bytes` holds exactly the blocks for `numel` elements.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let (block, block_bytes) = dtype.layout()?;
    debug_assert_eq!(bytes.len(), numel / block * block_bytes);
    let mut out = vec![0f32; numel];
    // Chunks of many blocks keep rayon's per-task overhead small for the 1-element types.
    let per_task = (4096 / block).max(1);
    out.par_chunks_mut(block * per_task).zip(bytes.par_chunks(block_bytes * per_task)).for_each(|(o, b)| {
        dequantize_into(dtype, b, o).expect("layout checked above");
    });
    Some(out)
}

/// `dequantize` into `out` on the calling thread (a tile of a weight dequantized per use); None for an unsupported
/// type. `bytes` holds exactly the blocks of `out.len()` elements.
pub fn dequantize_into(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    let (block, block_bytes) = dtype.layout()?;
    debug_assert_eq!(bytes.len(), out.len() / block * block_bytes);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() {
        // SAFETY: the CPU has the features `blocks_avx512` is compiled for.
        return unsafe { blocks_avx512(dtype, bytes, out) };
    }
    blocks(dtype, bytes, out)
}

/// The block loop with the kernels inlined, compiled for AVX-512: the same operations in the same order on each
/// element (no fused multiply-adds: Rust never contracts), so the values are bit-identical, 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn blocks_avx512(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    blocks(dtype, bytes, out)
}

/// Every block of `bytes` through its type's kernel, called directly so that it inlines into `blocks_avx512`.
#[inline(always)]
fn blocks(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    let (block, block_bytes) = dtype.layout()?;
    // A macro rather than a function taking the kernel, so that each kernel is called directly and inlines.
    macro_rules! each {
        ($kernel:ident) => {
            for (o, b) in out.chunks_exact_mut(block).zip(bytes.chunks_exact(block_bytes)) {
                $kernel(b, o);
            }
        };
    }
    match dtype {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => each!(q4_0),
        GgmlType::Q4_1 => each!(q4_1),
        GgmlType::Q8_0 => each!(q8_0),
        GgmlType::Q4K => each!(q4_k),
        GgmlType::Q5K => each!(q5_k),
        GgmlType::Q6K => each!(q6_k),
        _ => return None,
    }
    Some(())
}

/// Q4_0: f16 scale d, 16 bytes of nibbles; low nibbles are elements 0..16, high nibbles 16..32.
#[inline(always)]
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
        *lo = d * ((q & 0xF) as i32 - 8) as f32;
        *hi = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: f16 scale d and f16 minimum m, then nibbles as in Q4_0; x = d·q + m.
#[inline(always)]
fn q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = out.split_at_mut(16);
    for ((lo, hi), &q) in lo.iter_mut().zip(hi).zip(&b[4..20]) {
        *lo = d * (q & 0xF) as f32 + m;
        *hi = d * (q >> 4) as f32 + m;
    }
}

/// Q8_0: f16 scale d and 32 signed bytes.
#[inline(always)]
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// The 6-bit scales and minimums of the eight 32-element sub-blocks of a Q4_K/Q5_K super-block,
/// packed in 12 bytes: bytes 0-3 hold scales 0-3 (and the top 2 bits of scales 4-7), bytes 4-7 the
/// minimums likewise, bytes 8-11 the low 4 bits of scales/minimums 4-7.
#[inline(always)]
pub(super) fn k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Shared body of Q4_K and Q5_K: sub-block g holds the low (g even) or high (g odd) nibbles of
/// bytes 32·(g/2)…+32, plus bit g of the `qh` bytes for Q5_K; x = (d·sc)·q − dmin·min.
#[inline(always)]
fn k_quant(b: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales(&b[4..16]);
    for (g, o) in out[..256].chunks_exact_mut(32).enumerate() {
        let scale = d * sc[g] as f32;
        let min = dmin * mn[g] as f32;
        let shift = if g % 2 == 0 { 0 } else { 4 };
        let q4 = &qs[32 * (g / 2)..32 * (g / 2) + 32];
        match qh {
            None => {
                for (o, &q) in o.iter_mut().zip(q4) {
                    *o = scale * ((q >> shift) & 0xF) as f32 - min;
                }
            }
            Some(qh) => {
                for ((o, &q), &h) in o.iter_mut().zip(q4).zip(&qh[..32]) {
                    *o = scale * (((q >> shift) & 0xF) | (((h >> g) & 1) << 4)) as f32 - min;
                }
            }
        }
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles (256 elements).
#[inline(always)]
fn q4_k(b: &[u8], out: &mut [f32]) {
    k_quant(b, None, &b[16..144], out)
}

/// Q5_K: as Q4_K plus 32 bytes holding the fifth bit of each element.
#[inline(always)]
fn q5_k(b: &[u8], out: &mut [f32]) {
    k_quant(b, Some(&b[16..48]), &b[48..176], out)
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales, f16 d.
/// Each 128-element half: elements l, l+32, l+64, l+96 take the low nibble of ql[l], the low nibble
/// of ql[l+32], the high nibble of ql[l], the high nibble of ql[l+32], and bits 0-1, 2-3, 4-5, 6-7
/// of qh[l]; one scale per 16 elements.
#[inline(always)]
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let scales = &b[192 + 8 * half..192 + 8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        // Part k (elements 32k..32k+32): the low (k < 2) or high nibbles of ql[32·(k%2)…], bits 2k, 2k+1 of qh.
        for (k, o) in o.chunks_exact_mut(32).enumerate() {
            let low = &ql[32 * (k % 2)..32 * (k % 2) + 32];
            let nibble_shift = if k < 2 { 0 } else { 4 };
            // Sixteen elements per scale.
            for (s, o) in o.chunks_exact_mut(16).enumerate() {
                let scale = d * scales[2 * k + s] as i8 as f32;
                let (low, qh) = (&low[16 * s..16 * s + 16], &qh[16 * s..16 * s + 16]);
                for ((o, &l), &h) in o.iter_mut().zip(low).zip(qh) {
                    let q = ((l >> nibble_shift) & 0xF) | (((h >> (2 * k)) & 3) << 4);
                    *o = scale * (q as i32 - 32) as f32;
                }
            }
        }
    }
}
