//! ggml's tensor types (their numbering in GGUF files, block layouts) and their dequantization to f32.
//!
//! The arithmetic follows gguf-py's reference (float32, one rounding per operation, no fused
//! multiply-add), which is what transformers uses when it loads a GGUF file; so the weights qpeft
//! computes with are bit-identical to the ones transformers computes with.

use half::{bf16, f16};
use rayon::prelude::*;

fn f16_at(b: &[u8], i: usize) -> f32 {
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

/// Dequantizes one block: its bytes into its elements.
type BlockKernel = fn(&[u8], &mut [f32]);

/// The kernel that dequantizes one block of `dtype`, or None for an unsupported type.
fn block_kernel(dtype: GgmlType) -> Option<BlockKernel> {
    Some(match dtype {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, o| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        _ => return None,
    })
}

/// Dequantizes `numel` elements stored as `dtype` in `bytes`; None for an unsupported type.
/// The caller guarantees `bytes` holds exactly the blocks for `numel` elements.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let (block, block_bytes) = dtype.layout()?;
    let kernel = block_kernel(dtype)?;
    debug_assert_eq!(bytes.len(), numel / block * block_bytes);
    let mut out = vec![0f32; numel];
    // Chunks of many blocks keep rayon's per-task overhead small for the 1-element types.
    let per_task = (4096 / block).max(1);
    out.par_chunks_mut(block * per_task).zip(bytes.par_chunks(block_bytes * per_task)).for_each(|(o, b)| {
        for (ob, bb) in o.chunks_exact_mut(block).zip(b.chunks_exact(block_bytes)) {
            kernel(bb, ob);
        }
    });
    Some(out)
}

/// `dequantize` into `out` on the calling thread (a tile of a weight dequantized per use); None for an unsupported
/// type. `bytes` holds exactly the blocks of `out.len()` elements.
pub fn dequantize_into(dtype: GgmlType, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    let (block, block_bytes) = dtype.layout()?;
    let kernel = block_kernel(dtype)?;
    debug_assert_eq!(bytes.len(), out.len() / block * block_bytes);
    for (ob, bb) in out.chunks_exact_mut(block).zip(bytes.chunks_exact(block_bytes)) {
        kernel(bb, ob);
    }
    Some(())
}

/// Q4_0: f16 scale d, 16 bytes of nibbles; low nibbles are elements 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = d * ((q & 0xF) as i32 - 8) as f32;
        out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: f16 scale d and f16 minimum m, then nibbles as in Q4_0; x = d·q + m.
fn q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = d * (q & 0xF) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// Q8_0: f16 scale d and 32 signed bytes.
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// The 6-bit scales and minimums of the eight 32-element sub-blocks of a Q4_K/Q5_K super-block,
/// packed in 12 bytes: bytes 0-3 hold scales 0-3 (and the top 2 bits of scales 4-7), bytes 4-7 the
/// minimums likewise, bytes 8-11 the low 4 bits of scales/minimums 4-7.
fn k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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
fn k_quant(b: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (sc, mn) = k_scales(&b[4..16]);
    for g in 0..8 {
        let scale = d * sc[g] as f32;
        let min = dmin * mn[g] as f32;
        let shift = if g % 2 == 0 { 0 } else { 4 };
        for l in 0..32 {
            let mut q = (qs[32 * (g / 2) + l] >> shift) & 0xF;
            if let Some(qh) = qh {
                q |= ((qh[l] >> g) & 1) << 4;
            }
            out[32 * g + l] = scale * q as f32 - min;
        }
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles (256 elements).
fn q4_k(b: &[u8], out: &mut [f32]) {
    k_quant(b, None, &b[16..144], out)
}

/// Q5_K: as Q4_K plus 32 bytes holding the fifth bit of each element.
fn q5_k(b: &[u8], out: &mut [f32]) {
    k_quant(b, Some(&b[16..48]), &b[48..176], out)
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales, f16 d.
/// Each 128-element half: elements l, l+32, l+64, l+96 take the low nibble of ql[l], the low nibble
/// of ql[l+32], the high nibble of ql[l], the high nibble of ql[l+32], and bits 0-1, 2-3, 4-5, 6-7
/// of qh[l]; one scale per 16 elements.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let scales = &b[192 + 8 * half..192 + 8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let parts = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &q) in parts.iter().enumerate() {
                let i = 32 * k + l;
                let scale = d * scales[i / 16] as i8 as f32;
                o[i] = scale * (q as i32 - 32) as f32;
            }
        }
    }
}
