//! bf16 products on Intel AMX tiles (issue 27): C[m, n] (+)= Σ_k A[m, k] · W[n, k] with bf16 operands and f32
//! accumulation, the product of a base linear (x · Wᵀ).
//!
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile of A by a 32 × 16 tile of Wᵀ into a 16 × 16 f32 tile: 8,192
//! multiply-adds. The kernel keeps a 32 × 32 block of C in four accumulator tiles (tmm0–3), and for every 32 values of
//! k loads two tiles of A (tmm4–5, rows as they lie in memory) and two of W (tmm6–7) — 4 products per 4 loads. W is
//! packed once (`PackedBf16`) into the layout the tile unit reads for its right operand: per 16 output features and
//! 32 inputs, 16 rows of (feature, input pair) — W[n, 2r], W[n, 2r + 1] side by side for n = 0…15. Rows and features
//! are padded to multiples of 32 and inputs to multiples of 32 with zeros, which add nothing.
//!
//! Products of bf16 values are exact in f32, so the result differs from the bf16 emulation (`Cpu::bf16()`, which
//! rounds the same operands and multiplies in f32) only by the order of the f32 additions.
//!
//! Stable Rust has no AMX intrinsics: the instructions are written with `asm!`. The tile registers are not known to
//! the compiler, which never uses them, so they keep their values between the `asm!` blocks of one thread. Linux
//! hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per process.

use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::linalg::Real;
use crate::simd::to_bf16_bits;

/// Whether this CPU has AMX-BF16 and the kernel lets this process use the tiles (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a system call with integer arguments; it changes only this process's permitted state.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

/// The tile configuration: palette 1; tiles 0–7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn tile_config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for t in 0..8 {
        c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
        c[48 + t] = 16;
    }
    TileConfig(c)
}

/// The nearest bf16 (ties to even) of x, as its bits.
fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// A weight [out, in] as bf16 tiles of the right operand's layout (see the module documentation).
pub struct PackedBf16 {
    pub out_dim: usize,
    pub in_dim: usize,
    /// Blocks of 16 output features × 32 inputs (512 values), feature block major.
    data: Vec<u16>,
}

impl PackedBf16 {
    fn k_blocks(&self) -> usize {
        self.in_dim.div_ceil(32)
    }

    /// Packs `w` ([out_dim, in_dim] row-major), rounding each value to the nearest bf16.
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> PackedBf16 {
        assert_eq!(w.len(), out_dim * in_dim, "a {out_dim} × {in_dim} weight");
        let (nb, kb) = (out_dim.div_ceil(32) * 2, in_dim.div_ceil(32));
        let mut data = vec![0u16; nb * kb * 512];
        data.par_chunks_mut(kb * 512).enumerate().for_each(|(j, blocks)| {
            for n in 0..16 {
                let row = j * 16 + n;
                if row >= out_dim {
                    break;
                }
                let src = &w[row * in_dim..(row + 1) * in_dim];
                for (k, &v) in src.iter().enumerate() {
                    // Block k / 32; within it, row (k % 32) / 2, column n, element k % 2.
                    let at = (k / 32) * 512 + ((k % 32) / 2) * 32 + n * 2 + (k % 2);
                    blocks[at] = bf16_bits(v);
                }
            }
        });
        PackedBf16 { out_dim, in_dim, data }
    }

    /// The transpose, packed (the right operand of backward products).
    pub fn transposed(&self) -> PackedBf16 {
        let rows: Vec<Vec<f32>> = (0..self.out_dim).into_par_iter().map(|n| self.row(n)).collect();
        let t: Vec<f32> =
            (0..self.in_dim * self.out_dim).into_par_iter().map(|i| rows[i % self.out_dim][i / self.out_dim]).collect();
        PackedBf16::pack(&t, self.in_dim, self.out_dim)
    }

    /// Row `n` of the weight (its bf16 values).
    pub fn row(&self, n: usize) -> Vec<f32> {
        let blocks = &self.data[(n / 16) * self.k_blocks() * 512..];
        (0..self.in_dim)
            .map(|k| {
                let at = (k / 32) * 512 + ((k % 32) / 2) * 32 + (n % 16) * 2 + (k % 2);
                half::bf16::from_bits(blocks[at]).to_f32()
            })
            .collect()
    }
}

/// out[m, n] (+)= Σ_k x[m, k] · w[n, k] for `rows` rows of x ([rows, in_dim], rounded to bf16 here), in f32.
/// Panics unless `available()`.
///
/// x is converted to bf16 once; then each task takes 32 output features and runs every 32-row block of x against
/// them. So W streams from memory once per product (its 32-feature block stays in L1/L2 while the rows pass) and
/// the conversions are not repeated — with tasks over row blocks instead, a wide weight (an LM head of 50–150k
/// rows) was read from memory once per 32 rows, and a one-row product ran on one thread.
pub fn linear<T: Real>(x: &[T], w: &PackedBf16, rows: usize, out: &mut [T], accumulate: bool) {
    product(&Input::new(x, rows, w.in_dim), w, out, accumulate);
}

/// The left operand of `product`: `rows` rows of `k` values in bf16, zero-padded to whole blocks of 32 rows and of
/// 32 inputs, each 16 × 32 tile contiguous (1 KiB, so a tile load reads 16 consecutive lines): row group g (16
/// rows), k block kk at (g·kb + kk)·512. One conversion serves every weight that reads the same input.
pub struct Input {
    data: Vec<u16>,
    rows: usize,
    k: usize,
}

impl Input {
    /// Converts x ([rows, k]) to bf16 (nearest, ties to even). Panics unless `available()`.
    pub fn new<T: Real>(x: &[T], rows: usize, k: usize) -> Input {
        assert!(available(), "AMX is not available");
        assert_eq!(x.len(), rows * k, "x for {rows} rows of {k}");
        let kb = k.div_ceil(32);
        // The buffer of an earlier input on this thread, if any (every element is written below): a fresh zeroed
        // one cost more than the conversion.
        let mut data = A_BUFFER.with(|b| b.take());
        data.resize(rows.div_ceil(32) * 2 * kb * 512, 0);
        data.par_chunks_mut(kb.max(1) * 512).enumerate().for_each(|(g, d)| {
            let mut row = vec![0u16; kb * 32];
            for r in 0..16 {
                let i = g * 16 + r;
                if i < rows {
                    let src = &x[i * k..(i + 1) * k];
                    match T::as_f32s(src) {
                        Some(src) => to_bf16_bits(src, &mut row[..k]),
                        None => {
                            row.iter_mut().zip(src).for_each(|(d, &v)| *d = bf16_bits(v.to_f32().unwrap_or(f32::NAN)))
                        }
                    }
                } else {
                    row.fill(0);
                }
                for (kk, piece) in row.chunks_exact(32).enumerate() {
                    d[kk * 512 + r * 32..kk * 512 + r * 32 + 32].copy_from_slice(piece);
                }
            }
        });
        Input { data, rows, k }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        if self.data.capacity() <= KEPT_INPUT {
            A_BUFFER.with(|b| b.set(std::mem::take(&mut self.data)));
        }
    }
}

/// The largest input buffer kept for the next `Input` (bf16 values; 4 MiB): the block products' inputs. Keeping any
/// size (up to the LM head's backward input, 1,024 × 49,152 at SmolLM2 4 × 256) made a checkpointed `cpu:bf16`
/// training step a fifth slower (237 → 195 tok/s; why was not pinned down); keeping none made ARC-Easy 250 3% slower.
const KEPT_INPUT: usize = 2 << 20;

/// out[m, n] (+)= Σ_k a[m, k] · w[n, k] for the converted input `a`, in f32 (see `linear`).
pub fn product<T: Real>(a: &Input, w: &PackedBf16, out: &mut [T], accumulate: bool) {
    let (rows, k, n) = (a.rows, w.in_dim, w.out_dim);
    assert!(a.k == k && out.len() == rows * n, "{} × {} input and out {} for {w:?}", rows, a.k, out.len());
    let kb = w.k_blocks();
    if kb == 0 {
        if !accumulate {
            out.fill(T::zero());
        }
        return;
    }
    let row_blocks = rows.div_ceil(32);
    let a = &a.data;
    // Whole 32 × 32 blocks of an f32 output that is overwritten go straight from the tiles to `out`; the others
    // (edges, accumulation, f64) pass through `c`, so that accumulation adds each finished product once, as the
    // emulation does.
    let direct = T::as_f32s_mut(out).is_some() && !accumulate;
    let out_at = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(32)).into_par_iter().for_each(|nb| {
        let cfg = tile_config();
        let mut c = [0f32; 32 * 32];
        let b0 = w.data[(2 * nb) * kb * 512..].as_ptr();
        let b1 = w.data[(2 * nb + 1) * kb * 512..].as_ptr();
        let cols = (n - nb * 32).min(32);
        // SAFETY: `available()` granted the tile state; the configuration is 64 aligned bytes.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        for mb in 0..row_blocks {
            let a_block = a[mb * 2 * kb * 512..(mb + 1) * 2 * kb * 512].as_ptr();
            let full = direct && cols == 32 && rows - mb * 32 >= 32;
            // SAFETY: kb ≥ 1 (checked above); `a_block` is this row block's 2·kb tiles and b0/b1 the kb packed
            // blocks of this task's two feature groups.
            unsafe {
                block_product(a_block, b0, b1, kb);
            }
            if full {
                // SAFETY: this task alone writes columns nb·32 … nb·32 + 32 of rows mb·32 … mb·32 + 32, inside
                // `out` (rows × n f32 values, `direct`), which outlives the parallel loop.
                unsafe { store_tiles(out_at.get().add(mb * 32 * n + nb * 32) as *mut f32, n * 4) };
                continue;
            }
            // SAFETY: the stores write 16 rows of 64 bytes into `c` (32 rows of 32 floats).
            unsafe { store_tiles(c.as_mut_ptr(), 128) };
            for r in 0..(rows - mb * 32).min(32) {
                let row = mb * 32 + r;
                // SAFETY: this task alone writes columns nb·32 … nb·32 + cols of every row, inside `out`
                // (rows × n values), which outlives the parallel loop.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_at.get().add(row * n + nb * 32), cols) };
                let src = &c[r * 32..r * 32 + cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + T::of(s));
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::of(s));
                }
            }
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

thread_local! {
    /// The storage of the last `Input` dropped on this thread, for the next. Taken out while an input lives, so an
    /// input made meanwhile (in a rayon task run while the thread waits) allocates its own.
    static A_BUFFER: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// tmm0–3 = the 32 × 32 product of a 32-row block of A (two row groups of `kb` tiles, `Input`'s layout) and the 32
/// features of W packed at `b0` and `b1` (`kb` blocks of 512 each). Every tile is 1 KiB contiguous (rows 64 bytes
/// apart). A tile load costs about as much as two or three products here (measured:
/// 4 loads + 4 products run at 30% of the products alone), and tile registers are not renamed, so each load is
/// issued right after the last product that reads the register it refills: the next k step's loads overlap this
/// step's remaining products (+15% over loading all four first).
///
/// # Safety
/// The tile state is configured (`tile_config`), kb ≥ 1; `a` points at 2·kb tiles and `b0`/`b1` at kb packed blocks
/// each.
unsafe fn block_product(a: *const u16, b0: *const u16, b1: *const u16, kb: usize) {
    asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "tileloadd tmm4, [{a0} + {s}*1]",
        "tileloadd tmm6, [{b0} + {s}*1]",
        "tileloadd tmm5, [{a1} + {s}*1]",
        "tileloadd tmm7, [{b1} + {s}*1]",
        a0 = in(reg) a,
        a1 = in(reg) a.add(kb * 512),
        b0 = in(reg) b0,
        b1 = in(reg) b1,
        s = in(reg) 64usize,
        options(nostack, readonly),
    );
    for kk in 1..kb {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            a0 = in(reg) a.add(kk * 512),
            a1 = in(reg) a.add((kb + kk) * 512),
            b0 = in(reg) b0.add(kk * 512),
            b1 = in(reg) b1.add(kk * 512),
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    asm!(
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        options(nostack, nomem),
    );
}

/// Stores tmm0–3 (a 32 × 32 f32 block: tmm0 | tmm1 over tmm2 | tmm3) at `c`, rows `stride` bytes apart.
///
/// # Safety
/// `c` points at 32 writable rows of 32 f32 values, `stride` bytes apart.
unsafe fn store_tiles(c: *mut f32, stride: usize) {
    let half = stride / 4 * 16;
    asm!(
        "tilestored [{c} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(half),
        c3 = in(reg) c.add(half + 16),
        s = in(reg) stride,
        options(nostack),
    );
}

/// The output of `linear`, shared by its tasks, each of which writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr<T>(*mut T);
// SAFETY: the tasks write disjoint elements (see `linear`).
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// Through a method, so that closures capture the whole (Sync) wrapper rather than its raw pointer field.
    fn get(self) -> *mut T {
        self.0
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16({} × {})", self.out_dim, self.in_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn bf16(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// Against the same products in f64 of the bf16-rounded operands: the kernel's only difference is f32
    /// accumulation (and its order), so the error is a few f32 ulps of the sum of magnitudes.
    #[test]
    fn tile_products_equal_the_bf16_products_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: this CPU or kernel offers no AMX-BF16");
            return;
        }
        // The converted input's buffer is reused by the next call on this thread: poison it, so that padding left
        // over from this call would turn the products below into NaN.
        let mut poisoned = vec![0f32; 64 * 32];
        linear(&vec![f32::NAN; 64 * 640], &PackedBf16::pack(&[1.0; 32 * 640], 32, 640), 64, &mut poisoned, false);
        assert!(poisoned.iter().all(|v| v.is_nan()));
        for &(m, k, n) in
            &[(1, 7, 5), (16, 32, 16), (17, 33, 31), (33, 64, 50), (70, 100, 65), (5, 576, 1536), (64, 96, 64)]
        {
            let (x, w) = (values(m * k, 1 + m as u64), values(n * k, 2 + n as u64));
            let packed = PackedBf16::pack(&w, n, k);
            let mut out = values(m * n, 3);
            let before = out.clone();
            linear(&x, &packed, m, &mut out, true);
            // Without accumulation the old values are gone (whole 32 × 32 blocks are stored from the tiles
            // straight into the output, the others through a buffer).
            let mut fresh = vec![f32::NAN; m * n];
            linear(&x, &packed, m, &mut fresh, false);
            for i in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (0f64, 0f64);
                    for t in 0..k {
                        let p = bf16(x[i * k + t]) * bf16(w[j * k + t]);
                        want += p;
                        mag += p.abs();
                    }
                    let bound = 4.0 * f32::EPSILON as f64 * (mag + 1.0);
                    let got = out[i * n + j] as f64;
                    let sum = want + before[i * n + j] as f64;
                    assert!((got - sum).abs() <= bound, "{m}×{k}×{n} [{i},{j}]: {got} vs {sum}");
                    let got = fresh[i * n + j] as f64;
                    assert!((got - want).abs() <= bound, "{m}×{k}×{n} [{i},{j}] overwritten: {got} vs {want}");
                }
            }
            for j in [0, n / 2, n - 1] {
                let want: Vec<f32> = w[j * k..(j + 1) * k].iter().map(|&v| bf16(v) as f32).collect();
                assert_eq!(packed.row(j), want, "row {j} of {n} × {k}");
            }
        }
    }
}
