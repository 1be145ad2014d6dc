//! The AMX kernel of `bf16` (Intel Sapphire Rapids and later).
//!
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile of A by a 32 × 16 tile of Wᵀ into a 16 × 16 f32 tile: 8,192
//! multiply-adds. The kernel keeps a 32 × 32 block of C in four accumulator tiles (tmm0–3), and for every 32 values of
//! k loads two tiles of A (tmm4–5, rows as they lie in memory: `Input`) and two of W (tmm6–7, `PackedBf16`) — 4
//! products per 4 loads.
//!
//! Stable Rust has no AMX intrinsics: the instructions are written with `asm!`. The tile registers are not known to
//! the compiler, which never uses them, so they keep their values between the `asm!` blocks of one thread. Linux
//! hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), once per process.

use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::layout::{Input, OutPtr, PackedBf16};
use crate::linalg::Real;

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

/// `bf16::product` on the tiles. Panics unless `available()`.
pub(super) fn product<T: Real>(a: &Input, w: &PackedBf16, out: &mut [T], accumulate: bool) {
    assert!(available(), "AMX is not available");
    let (rows, k, n) = (a.rows(), w.in_dim, w.out_dim);
    assert!(a.k() == k && out.len() == rows * n, "{} × {} input and out {} for {w:?}", rows, a.k(), out.len());
    let kb = k.div_ceil(32);
    if kb == 0 {
        if !accumulate {
            out.fill(T::zero());
        }
        return;
    }
    let row_blocks = rows.div_ceil(32);
    let a = a.data();
    // Whole 32 × 32 blocks of an f32 output that is overwritten go straight from the tiles to `out`; the others
    // (edges, accumulation, f64) pass through `c`, so that accumulation adds each finished product once, as the
    // emulation does.
    let direct = T::as_f32s_mut(out).is_some() && !accumulate;
    let out_at = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(32)).into_par_iter().for_each(|nb| {
        let cfg = tile_config();
        let mut c = [0f32; 32 * 32];
        let b0 = w.group(2 * nb).as_ptr();
        let b1 = w.group(2 * nb + 1).as_ptr();
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
            // SAFETY: this task alone writes columns nb·32 … nb·32 + cols of every row, inside `out` (rows × n
            // values), which outlives the parallel loop.
            unsafe { out_at.write_block(mb * 32, (rows - mb * 32).min(32), n, nb * 32, cols, &c, 32, accumulate) };
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
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
