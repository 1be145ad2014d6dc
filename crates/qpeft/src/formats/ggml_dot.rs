//! Dot products of a row stored in a ggml block format with f32 vectors, without the row in memory: each block is
//! dequantized in registers (AVX-512) and multiplied at once — generation's products on the CPU, where
//! dequantizing into a buffer and reading it back cost more than the arithmetic.
//!
//! Bit-identical to `ggml_quants::dequantize_into` followed by `simd::dot` on every x: each element is dequantized
//! with the same operations (gguf-py's, no fused multiply-add) and lands in the same partial sum (element j in
//! `simd::LANES`' j mod 64: four 16-lane accumulators, products added in row order, then the 64 sums in order), so
//! the fused and the buffered paths agree exactly and either can stand in for the other.

use super::ggml_quants::GgmlType;

/// Whether `dot_rows` has a fused kernel for `dtype` on this CPU.
pub fn fused(dtype: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() {
        return matches!(dtype, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q6K);
    }
    let _ = dtype;
    false
}

/// out[r] = Σ_j Ŵrow[j] · x[r·k + j] for each of the `out.len()` vectors in `x` (k = the row's length), where
/// `row` is one row of `dtype` blocks. Only for types where `fused(dtype)`; panics otherwise.
pub fn dot_rows(dtype: GgmlType, row: &[u8], x: &[f32], out: &mut [f32]) {
    assert!(fused(dtype), "no fused dot product for {dtype:?} on this CPU");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `fused` checked the CPU features the kernels are compiled for.
    unsafe {
        avx512::dot_rows(dtype, row, x, out)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::ggml_quants::{f16_at, k_scales, GgmlType};

    /// At most this many x vectors per call (generation's products have one per sequence).
    pub const MAX_X: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2")]
    pub unsafe fn dot_rows(dtype: GgmlType, row: &[u8], x: &[f32], out: &mut [f32]) {
        let (block, block_bytes) = dtype.layout().expect("a fused type");
        let k = row.len() / block_bytes * block;
        assert!(
            out.len() <= MAX_X && x.len() == out.len() * k,
            "{} x vectors of {} for a row of {k}",
            out.len(),
            x.len()
        );
        // The count of vectors as a constant, so that the accumulators live in registers.
        match out.len() {
            1 => blocks::<1>(dtype, row, x, k, block, block_bytes, out),
            2 => blocks::<2>(dtype, row, x, k, block, block_bytes, out),
            3 => blocks::<3>(dtype, row, x, k, block, block_bytes, out),
            4 => blocks::<4>(dtype, row, x, k, block, block_bytes, out),
            _ => {}
        }
    }

    #[inline(always)]
    unsafe fn blocks<const N: usize>(
        dtype: GgmlType,
        row: &[u8],
        x: &[f32],
        k: usize,
        block: usize,
        block_bytes: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; 4];
        match dtype {
            GgmlType::Q4_0 => blocks_of_32(GgmlType::Q4_0, row, block_bytes, x, k, &mut acc),
            GgmlType::Q4_1 => blocks_of_32(GgmlType::Q4_1, row, block_bytes, x, k, &mut acc),
            GgmlType::Q8_0 => blocks_of_32(GgmlType::Q8_0, row, block_bytes, x, k, &mut acc),
            GgmlType::Q4K => {
                for (b, bytes) in row.chunks_exact(block_bytes).enumerate() {
                    prefetch(bytes);
                    q4_k(bytes, x, k, b * block, &mut acc);
                }
            }
            GgmlType::Q6K => {
                for (b, bytes) in row.chunks_exact(block_bytes).enumerate() {
                    prefetch(bytes);
                    q6_k(bytes, x, k, b * block, &mut acc);
                }
            }
            _ => unreachable!("checked by fused"),
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = reduce(acc[0][r], acc[1][r], acc[2][r], acc[3][r]);
        }
    }

    /// `simd::reduce` of the four slots' lanes, in vector registers (the same additions in the same tree).
    #[inline(always)]
    unsafe fn reduce(s0: __m512, s1: __m512, s2: __m512, s3: __m512) -> f32 {
        let v = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
        let v8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
        let v1 = _mm_add_ss(v2, _mm_shuffle_ps::<1>(v2, v2));
        _mm_cvtss_f32(v1)
    }

    /// Bytes this far past the block being read are asked for ahead of time: the weights stream from memory once
    /// per token, and the hardware prefetchers stop at each 4 KiB page of the memory-mapped file.
    const PREFETCH_AHEAD: usize = 2048;

    /// Prefetches the four cache lines (a block is at most 210 bytes) `PREFETCH_AHEAD` bytes past the start of `bytes` (a hint: it never faults, so it
    /// may point past the row or the mapping).
    #[inline(always)]
    unsafe fn prefetch(bytes: &[u8]) {
        let ahead = bytes.as_ptr().wrapping_add(PREFETCH_AHEAD);
        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(192) as *const i8);
    }

    /// 16 codes (bytes) → f32.
    #[inline(always)]
    unsafe fn codes(q: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q))
    }

    /// Accumulators: [slot][vector]; element j goes to slot (j / 16) mod 4.
    type Acc<const N: usize> = [[__m512; N]; 4];

    /// acc[s][r] += w[s] · x[r·k + at + 16s …+16] for every vector r, where `at` starts a 64-element chunk (a
    /// product, then a sum: as `simd::dot`). The slots are constants here, so the accumulators stay in registers.
    #[inline(always)]
    unsafe fn accumulate<const N: usize, const S: usize>(
        w: [__m512; S],
        x: &[f32],
        k: usize,
        at: usize,
        acc: &mut Acc<N>,
    ) {
        debug_assert!(at.is_multiple_of(64));
        for (s, w) in w.into_iter().enumerate() {
            for (r, a) in acc[s].iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.as_ptr().add(r * k + at + 16 * s));
                *a = _mm512_add_ps(*a, _mm512_mul_ps(w, xv));
            }
        }
    }

    /// A row of 32-element blocks, each dequantized into two vectors: two blocks per 64-element chunk, and a last
    /// odd block on its own. (The kernel is chosen by a match, not passed as a closure: closures do not inherit
    /// the AVX-512 target features, and their intrinsics would not inline.)
    #[inline(always)]
    unsafe fn blocks_of_32<const N: usize>(
        dtype: GgmlType,
        row: &[u8],
        block_bytes: usize,
        x: &[f32],
        k: usize,
        acc: &mut Acc<N>,
    ) {
        let pairs = row.chunks_exact(2 * block_bytes);
        let odd = pairs.remainder();
        for (c, two) in pairs.enumerate() {
            prefetch(two);
            let [a, b] = [block_32(dtype, two), block_32(dtype, &two[block_bytes..])];
            accumulate([a[0], a[1], b[0], b[1]], x, k, 64 * c, acc);
        }
        if !odd.is_empty() {
            accumulate(block_32(dtype, odd), x, k, k - 32, acc);
        }
    }

    #[inline(always)]
    unsafe fn block_32(dtype: GgmlType, b: &[u8]) -> [__m512; 2] {
        match dtype {
            GgmlType::Q4_0 => q4_0_block(b),
            GgmlType::Q4_1 => q4_1_block(b),
            _ => q8_0_block(b),
        }
    }

    /// Q4_0: x = d·(q − 8); low nibbles of bytes 2..18 are elements 0..16, high nibbles 16..32.
    #[inline(always)]
    unsafe fn q4_0_block(b: &[u8]) -> [__m512; 2] {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let q = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let eight = _mm512_set1_epi32(8);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
        let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
        [_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi)]
    }

    /// Q8_0: x = q·d for 32 signed bytes after the f16 d.
    #[inline(always)]
    unsafe fn q8_0_block(b: &[u8]) -> [__m512; 2] {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let lo = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
        let hi = _mm_loadu_si128(b.as_ptr().add(18) as *const __m128i);
        [
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
        ]
    }

    /// Q4_1: x = d·q + m; low nibbles of bytes 4..20 are elements 0..16, high nibbles 16..32.
    #[inline(always)]
    unsafe fn q4_1_block(b: &[u8]) -> [__m512; 2] {
        let (d, m) = (_mm512_set1_ps(f16_at(b, 0)), _mm512_set1_ps(f16_at(b, 2)));
        let q = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        [_mm512_add_ps(_mm512_mul_ps(d, codes(lo)), m), _mm512_add_ps(_mm512_mul_ps(d, codes(hi)), m)]
    }

    /// Q4_K: sub-block g (32 elements) is the low (g even) or high (g odd) nibbles of bytes 16 + 32·(g/2)…;
    /// x = (d·sc[g])·q − dmin·mn[g]. Each 32 bytes of nibbles are one 64-element chunk.
    #[inline(always)]
    unsafe fn q4_k<const N: usize>(b: &[u8], x: &[f32], k: usize, x0: usize, acc: &mut Acc<N>) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, mn) = k_scales(&b[4..16]);
        let mask = _mm256_set1_epi8(0x0F);
        for pair in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * pair) as *const __m256i);
            let nibbles = [_mm256_and_si256(q, mask), _mm256_and_si256(_mm256_srli_epi16(q, 4), mask)];
            let mut w = [_mm512_setzero_ps(); 4];
            for (h, q) in nibbles.into_iter().enumerate() {
                let g = 2 * pair + h;
                let scale = _mm512_set1_ps(d * sc[g] as f32);
                let min = _mm512_set1_ps(dmin * mn[g] as f32);
                let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
                for (i, q) in halves.into_iter().enumerate() {
                    w[2 * h + i] = _mm512_sub_ps(_mm512_mul_ps(scale, codes(q)), min);
                }
            }
            accumulate(w, x, k, x0 + 64 * pair, acc);
        }
    }

    /// Q6_K: per 128-element half, part p (elements 32p…) takes the low (p < 2) or high nibbles of
    /// ql[32·(p%2)…] and bits 2p, 2p+1 of qh; x = (d·scale)·(q − 32), one signed scale per 16 elements. Parts
    /// (0, 1) and (2, 3) are the half's two 64-element chunks.
    #[inline(always)]
    unsafe fn q6_k<const N: usize>(b: &[u8], x: &[f32], k: usize, x0: usize, acc: &mut Acc<N>) {
        let d = f16_at(b, 208);
        let (mask4, mask2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
        let offset = _mm512_set1_epi32(32);
        for half in 0..2 {
            let ql = b.as_ptr().add(64 * half);
            let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * half) as *const __m256i);
            let scales = &b[192 + 8 * half..192 + 8 * half + 8];
            let lows = [_mm256_loadu_si256(ql as *const __m256i), _mm256_loadu_si256(ql.add(32) as *const __m256i)];
            for chunk in 0..2 {
                let mut w = [_mm512_setzero_ps(); 4];
                for (p, low) in [2 * chunk, 2 * chunk + 1].into_iter().zip(lows) {
                    let low = if p < 2 {
                        _mm256_and_si256(low, mask4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(low, 4), mask4)
                    };
                    let high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * p as i32)), mask2);
                    let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                    let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)];
                    for (s, q) in halves.into_iter().enumerate() {
                        let scale = _mm512_set1_ps(d * scales[2 * p + s] as i8 as f32);
                        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), offset));
                        w[2 * (p % 2) + s] = _mm512_mul_ps(scale, v);
                    }
                }
                accumulate(w, x, k, x0 + 128 * half + 64 * chunk, acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::ggml_quants::dequantize_into;

    /// Blocks of pseudo-random bytes with f16 scales kept finite and small.
    fn row(dtype: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        let (_, bb) = dtype.layout().unwrap();
        let mut s = seed;
        let mut bytes: Vec<u8> = (0..blocks * bb)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect();
        let f16s: &[usize] = match dtype {
            GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
            _ => &[208],
        };
        for blk in bytes.chunks_exact_mut(bb) {
            for &at in f16s {
                let v = half::f16::from_f32(((blk[at] as f32) - 128.0) / 4096.0).to_le_bytes();
                blk[at..at + 2].copy_from_slice(&v);
            }
        }
        bytes
    }

    #[test]
    fn fused_dots_equal_dequantizing_then_the_simd_dot() {
        for dtype in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
            if !fused(dtype) {
                eprintln!("no AVX-512 here: nothing to compare");
                return;
            }
            let (block, _) = dtype.layout().unwrap();
            for (blocks, vectors) in [(1, 1), (3, 2), (6, 4)] {
                let bytes = row(dtype, blocks, blocks as u64 * 7 + vectors as u64);
                let k = blocks * block;
                let x: Vec<f32> = (0..vectors * k).map(|i| ((i * 29 % 97) as f32 - 48.0) / 11.0).collect();
                let mut w = vec![0f32; k];
                dequantize_into(dtype, &bytes, &mut w).unwrap();
                let want: Vec<f32> = x.chunks_exact(k).map(|x| crate::simd::dot(&w, x)).collect();
                let mut got = vec![0f32; vectors];
                dot_rows(dtype, &bytes, &x, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dtype:?}, {blocks} blocks, {vectors} vectors");
            }
        }
    }
}
