//! Vector kernels chosen at run time: built for AVX-512 where the CPU has it (the release build targets baseline
//! x86-64, whose vectors are 4 lanes), portable otherwise.

/// Whether this CPU runs the AVX-512 builds (F, BW, VL, DQ; checked once).
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
    })
}

/// Partial sums of the dot products: the summation order is fixed (partial sum i adds the products of elements ≡ i
/// mod 64 in order, then `reduce` adds the partial sums), whichever build runs. Four 16-lane accumulators rather
/// than one hide the latency of the additions.
pub const LANES: usize = 64;

/// The partial sums' total in a fixed tree, as a 16-lane vector unit adds them: the four 16-lane slots as
/// (p[i] + p[16+i]) + (p[32+i] + p[48+i]), then halves folded onto halves (lane i + lane i+8, +4, +2, +1). A
/// sequential sum would be a chain of 64 dependent additions — as long as a 576-element row's products.
pub fn reduce(p: &[f32; LANES]) -> f32 {
    let mut v = [0f32; 16];
    for (i, v) in v.iter_mut().enumerate() {
        *v = (p[i] + p[16 + i]) + (p[32 + i] + p[48 + i]);
    }
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            v[i] += v[i + width];
        }
    }
    v[0]
}

/// Σ a[i]·b[i] over the common length, in f32 with the fixed order above.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has the features `dot_avx512` is compiled for.
        return unsafe { dot_avx512(a, b) };
    }
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += x * y;
    }
    reduce(&acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_f64_sum_of_products() {
        for n in [0, 1, 15, 16, 17, 100, 1536] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 89) as f32 - 44.0) / 3.0).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!((got - exact).abs() <= 1e-5 * exact.abs().max(1.0), "n {n}: {got} vs {exact}");
            // The portable build sums in the same order, so it gives the same bits.
            assert_eq!(got.to_bits(), (dot_lanes(&a, &b) as f64).to_bits(), "n {n}");
        }
    }
}
