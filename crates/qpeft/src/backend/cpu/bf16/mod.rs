//! bf16 base products on the CPU's own bf16 instructions (`Cpu::bf16_native`, issue 27): C[m, n] (+)= Σ_k A[m, k] ·
//! W[n, k] with bf16 operands and f32 accumulation, the product of a base linear (x · Wᵀ), by one of two kernels over
//! the same operand layouts: Intel's AMX tiles (`amx`) or AVX512-BF16's `vdpbf16ps` on vector registers (`dpbf16`,
//! AMD Zen 4 and later).
//!
//! W is packed once (`PackedBf16`) into the layout the tile unit reads for its right operand: per 16 output features
//! and 32 inputs, 16 rows of (feature, input pair) — W[n, 2r], W[n, 2r + 1] side by side for n = 0…15. That row is
//! also one `vdpbf16ps` operand. The input is converted once per product call (`Input`: bf16, each 16 × 32 tile
//! contiguous) and serves every weight that reads it. Rows and features are padded to multiples of 32 and inputs to
//! multiples of 32 with zeros, which add nothing.
//!
//! Products of bf16 values are exact in f32, so either kernel's result differs from the bf16 emulation
//! (`Cpu::bf16()`, which rounds the same operands and multiplies in f32) only by the order of the f32 additions.

mod amx;
mod dpbf16;
mod layout;

pub use layout::{Input, PackedBf16};

use crate::linalg::Real;

/// Which instructions run the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX-BF16 tiles (`amx`).
    Amx,
    /// AVX512-BF16 `vdpbf16ps` (`dpbf16`).
    Avx512,
}

impl Kernel {
    /// The fastest this CPU offers: AMX-BF16, else AVX512-BF16, else none.
    pub fn detect() -> Option<Kernel> {
        [Kernel::Amx, Kernel::Avx512].into_iter().find(|k| k.available())
    }

    /// Whether this CPU (and, for AMX, the operating system) lets this process run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Amx => amx::available(),
            Kernel::Avx512 => dpbf16::available(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX-BF16 tiles",
            Kernel::Avx512 => "AVX512-BF16",
        }
    }
}

/// out[m, n] (+)= Σ_k x[m, k] · w[n, k] for `rows` rows of x ([rows, in_dim], rounded to bf16 here), in f32, on
/// `kernel` (which this CPU must have: `Kernel::detect`).
pub fn linear<T: Real>(kernel: Kernel, x: &[T], w: &PackedBf16, rows: usize, out: &mut [T], accumulate: bool) {
    product(kernel, &Input::new(x, rows, w.in_dim), w, out, accumulate);
}

/// out[m, n] (+)= Σ_k a[m, k] · w[n, k] for the converted input `a`, in f32, on `kernel`. Each kernel's tasks take a
/// block of output features and run every row block of x against it, so W streams from memory once per product (its
/// block stays in L1/L2 while the rows pass) — with tasks over row blocks instead, a wide weight (an LM head of
/// 50–150k rows) was read from memory once per row block, and a one-row product ran on one thread.
pub fn product<T: Real>(kernel: Kernel, a: &Input, w: &PackedBf16, out: &mut [T], accumulate: bool) {
    match kernel {
        Kernel::Amx => amx::product(a, w, out, accumulate),
        Kernel::Avx512 => dpbf16::product(a, w, out, accumulate),
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

    /// Against the same products in f64 of the bf16-rounded operands: a kernel's only difference is f32
    /// accumulation (and its order), so the error is a few f32 ulps of the sum of magnitudes. Every kernel this CPU
    /// has.
    #[test]
    fn kernel_products_equal_the_bf16_products_on_ragged_shapes() {
        let kernels: Vec<Kernel> = [Kernel::Amx, Kernel::Avx512].into_iter().filter(|k| k.available()).collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        }
        for kernel in kernels {
            products_equal_the_bf16_products(kernel);
        }
    }

    fn products_equal_the_bf16_products(kernel: Kernel) {
        let linear =
            |x: &[f32], w: &PackedBf16, rows: usize, out: &mut [f32], acc: bool| linear(kernel, x, w, rows, out, acc);
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
                    assert!((got - sum).abs() <= bound, "{kernel:?} {m}×{k}×{n} [{i},{j}]: {got} vs {sum}");
                    let got = fresh[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{kernel:?} {m}×{k}×{n} [{i},{j}] overwritten: {got} vs {want}"
                    );
                }
            }
            for j in [0, n / 2, n - 1] {
                let want: Vec<f32> = w[j * k..(j + 1) * k].iter().map(|&v| bf16(v) as f32).collect();
                assert_eq!(packed.row(j), want, "row {j} of {n} × {k}");
            }
        }
    }
}
