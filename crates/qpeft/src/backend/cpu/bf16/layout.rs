//! The operand layouts of the bf16 kernels (see `bf16`): W packed once into the tiles' right-operand layout, the input
//! converted once per product call into whole 16 × 32 tiles.

use rayon::prelude::*;

use crate::linalg::Real;
use crate::simd::to_bf16_bits;

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

    /// The packed blocks of feature group j (features 16·j … 16·j + 16): `k_blocks()` blocks of 512 values.
    pub(super) fn group(&self, j: usize) -> &[u16] {
        &self.data[j * self.k_blocks() * 512..(j + 1) * self.k_blocks() * 512]
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

/// The left operand of `product`: `rows` rows of `k` values in bf16, zero-padded to whole blocks of 32 rows and of
/// 32 inputs, each 16 × 32 tile contiguous (1 KiB, so a tile load reads 16 consecutive lines): row group g (16
/// rows), k block kk at (g·kb + kk)·512. One conversion serves every weight that reads the same input.
pub struct Input {
    data: Vec<u16>,
    rows: usize,
    k: usize,
}

impl Input {
    /// Converts x ([rows, k]) to bf16 (nearest, ties to even).
    pub fn new<T: Real>(x: &[T], rows: usize, k: usize) -> Input {
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

impl Input {
    pub(super) fn rows(&self) -> usize {
        self.rows
    }
    pub(super) fn k(&self) -> usize {
        self.k
    }
    pub(super) fn data(&self) -> &[u16] {
        &self.data
    }
    /// Where row r0 (a multiple of 8) starts: its k block kk at kk·512 from there, the next 7 rows 32 values apart.
    pub(super) fn row_block(&self, r0: usize) -> *const u16 {
        debug_assert!(r0.is_multiple_of(8) && r0 < self.rows.div_ceil(32) * 32);
        self.data[(r0 / 16) * self.k.div_ceil(32) * 512 + (r0 % 16) * 32..].as_ptr()
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

thread_local! {
    /// The storage of the last `Input` dropped on this thread, for the next. Taken out while an input lives, so an
    /// input made meanwhile (in a rayon task run while the thread waits) allocates its own.
    static A_BUFFER: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The output of a product, shared by its tasks, each of which writes its own columns.
#[derive(Clone, Copy)]
pub(super) struct OutPtr<T>(pub(super) *mut T);
// SAFETY: the tasks write disjoint elements (each its own output features).
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// Through a method, so that closures capture the whole (Sync) wrapper rather than its raw pointer field.
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

impl<T: Real> OutPtr<T> {
    /// Sets (or, with `accumulate`, adds to) columns col0 … col0 + cols of `rows` output rows from row0 on (rows
    /// `n` values apart) to the rows of `c` (`c_stride` floats apart): a kernel's block at an edge of the output, or
    /// in another type than f32.
    ///
    /// # Safety
    /// The calling task alone writes those elements, which lie inside the output; the output outlives the call.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn write_block(
        self,
        row0: usize,
        rows: usize,
        n: usize,
        col0: usize,
        cols: usize,
        c: &[f32],
        c_stride: usize,
        accumulate: bool,
    ) {
        for r in 0..rows {
            let dst = std::slice::from_raw_parts_mut(self.get().add((row0 + r) * n + col0), cols);
            let src = &c[r * c_stride..r * c_stride + cols];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + T::of(s));
            } else {
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = T::of(s));
            }
        }
    }
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16({} × {})", self.out_dim, self.in_dim)
    }
}
