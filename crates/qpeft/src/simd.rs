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

/// `pub fn NAME(ARGS) -> R = KERNEL;` — a public function that runs `KERNEL` (an `#[inline(always)]` portable
/// function) built for AVX-512 where `avx512()` says the CPU has it, and as the portable build otherwise. The kernels
/// are written once, in plain loops the compiler vectorizes 16 lanes wide inside the AVX-512 build.
macro_rules! vectorized {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $kernel:ident;) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx512() {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                fn avx512_build($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                // SAFETY: the CPU has the features `avx512_build` is compiled for.
                return unsafe { avx512_build($($arg),*) };
            }
            $kernel($($arg),*)
        }
    };
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

vectorized! {
    /// Σ a[i]·b[i] over the common length, in f32 with the fixed order above.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 = dot_lanes;
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

vectorized! {
    /// The nearest bf16 of each x (ties to even; a NaN stays a NaN, quieted), as bits: `half::bf16::from_f32`, in a
    /// form that vectorizes (16 values per instruction with AVX-512). Converting products' inputs one value at a time
    /// through `half` took 5–8% of an evaluation on AMX tiles.
    pub fn to_bf16_bits(x: &[f32], out: &mut [u16]) = to_bf16_lanes;
}

vectorized! {
    /// Each x rounded to the nearest bf16 (as `to_bf16_bits`), in place.
    pub fn round_bf16(x: &mut [f32]) = round_bf16_lanes;
}

vectorized! {
    /// out[i] = silu(gate[i])·up[i], silu(z) = z / (1 + e^−z) as torch computes it (`exp` for e^−z).
    pub fn silu_glu(gate: &[f32], up: &[f32], out: &mut [f32]) = silu_glu_lanes;
}

#[inline(always)]
fn silu_glu_lanes(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

vectorized! {
    /// The SiLU GLU's gradients for dy = ∂L/∂out: dgate = dy·up·silu'(gate), silu'(z) = s·(1 + z·(1 − s)) with
    /// s = 1 / (1 + e^−z), and dup = dy·silu(gate).
    pub fn silu_glu_backward(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) =
        silu_glu_backward_lanes;
}

#[inline(always)]
fn silu_glu_backward_lanes(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for i in 0..gate.len().min(up.len()).min(dy.len()).min(dgate.len()).min(dup.len()) {
        let (g, e) = (gate[i], 1.0 + exp(-gate[i]));
        let s = 1.0 / e;
        dgate[i] = dy[i] * up[i] * (s * (1.0 + g * (1.0 - s)));
        dup[i] = dy[i] * (g / e);
    }
}

vectorized! {
    /// out[i] = x[i]·scale where the draw u of element `first + i` (`dropout_draw`) keeps it, else 0: the mask of
    /// `backend::cpu::dropout_keeps`, which keeps the element when u·2⁻²⁴ ≥ p, i.e. when u ≥ `threshold` = ⌈p·2²⁴⌉
    /// (`dropout_threshold`). In integers, so that the
    /// three 64-bit multiplications per element run 8 lanes wide (AVX-512DQ); one element at a time, the masks took
    /// 15% of a `cpu:bf16` training step with dropout.
    pub fn dropout(x: &[f32], out: &mut [f32], seed: u64, first: u64, threshold: u64, scale: f32) = dropout_lanes;
}

/// The smallest 24-bit draw `dropout` keeps for probability p: ⌈p·2²⁴⌉ (p·2²⁴ is exact in f32, and u·2⁻²⁴ ≥ p holds
/// for an integer u exactly when u ≥ ⌈p·2²⁴⌉).
pub fn dropout_threshold(p: f32) -> u64 {
    (p * (1u32 << 24) as f32).ceil() as u64
}

/// The 24-bit dropout draw of element i under `seed`: the top bits of a SplitMix64 hash of (seed, i) (kernels.cu's
/// `dropout` computes the same).
#[inline(always)]
pub fn dropout_draw(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 40
}

#[inline(always)]
fn dropout_lanes(x: &[f32], out: &mut [f32], seed: u64, first: u64, threshold: u64, scale: f32) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = if dropout_draw(seed, first.wrapping_add(i as u64)) >= threshold { v * scale } else { 0.0 };
    }
}

#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    // Adding 0x7fff plus the kept part's lowest bit carries into it exactly when the dropped half is above one half
    // ulp, or equal to it with an odd kept part.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if nan {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded as u16
    }
}

#[inline(always)]
fn to_bf16_lanes(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16_bits(v);
    }
}

#[inline(always)]
fn round_bf16_lanes(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = f32::from_bits((bf16_bits(*v) as u32) << 16);
    }
}

vectorized! {
    /// The largest value of x (−∞ for an empty x; NaNs are skipped, as `f32::max` does), in 64 lanes: a fold of
    /// `f32::max` is a chain of dependent operations — over a 49,152-entry vocabulary row, as long as its exponentials.
    pub fn max(x: &[f32]) -> f32 = max_lanes;
}

vectorized! {
    /// Σ e^(x[i] − shift), each term in f32 (`exp`'s accuracy), the total in f64: the normalizer of a softmax whose
    /// largest input is `shift`.
    pub fn exp_sum(x: &[f32], shift: f32) -> f64 = exp_sum_lanes;
}

vectorized! {
    /// x[i] ← e^(x[i] − shift), as `exp`.
    pub fn exp_shifted(x: &mut [f32], shift: f32) = exp_shifted_lanes;
}

/// e^x in f32 within 2 ulp, in a form that vectorizes: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by Cephes' expf
/// polynomial, 2^n put into the exponent. Below −87.3 (where e^x leaves the normal range) it gives 0, above 88.7 +∞;
/// NaN stays NaN. libm's `expf`, one call per value, was 4–6% of an evaluation's time.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first with few enough bits that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_55, 88.722_83);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, from t's mantissa (t = 1.5·2^23 + n exactly): a float-to-int cast does not vectorize.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2^n in two factors: n runs from −126 to 128, and 2^128 is not a float.
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let scaled = er * pow2(ni >> 1) * pow2(ni - (ni >> 1));
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        scaled
    }
}

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Values per f32 partial sum before it is added to the f64 total: each term is ≤ 1 when `shift` is the maximum,
/// so a partial sum stays exact to about 2^−24 · 64 of its size.
const EXP_BLOCK: usize = LANES * 64;

#[inline(always)]
fn exp_sum_lanes(x: &[f32], shift: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(EXP_BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift);
            }
        }
        for (i, &v) in rest.iter().enumerate() {
            acc[i] += exp(v - shift);
        }
        total += reduce(&acc) as f64;
    }
    total
}

#[inline(always)]
fn exp_shifted_lanes(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
}

vectorized! {
    /// Softmax over row[lo..hi] restricted to the keys `sees_key(mask[j], seg)` lets through; everything else becomes
    /// 0, and a row with no visible key all zeros. (`attention`'s masked softmax for f32 rows: three branch-free passes
    /// that vectorize, where the generic loop tested each key's visibility one at a time — a sixth of an MMLU
    /// evaluation.)
    pub fn softmax_masked(row: &mut [f32], lo: usize, hi: usize, mask: &[u32], seg: u32) = softmax_masked_lanes;
}

/// Whether a query of segment `seg` sees a key of segment `key` (attention's key mask holds segments: 0 is padding; a
/// real query sees its own segment only — packed examples stay apart — and a padding query, 0, every real key).
#[inline(always)]
pub fn sees_key(key: u32, seg: u32) -> bool {
    key != 0 && (seg == 0 || key == seg)
}

#[inline(always)]
fn softmax_masked_lanes(row: &mut [f32], lo: usize, hi: usize, mask: &[u32], q_seg: u32) {
    let hi = hi.min(row.len()).min(mask.len());
    let lo = lo.min(hi);
    let (seg, m) = (&mut row[lo..hi], &mask[lo..hi]);
    // Whole chunks of LANES through fixed-size loops, which vectorize (a loop over each chunk's own length ran scalar:
    // 2.5 ns per score); the last, shorter chunk padded into the same lanes (hidden keys), so every sum keeps its order.
    let whole = seg.len() / LANES * LANES;
    let mut tail_x = [0f32; LANES];
    let mut tail_k = [0u32; LANES];
    let rest = seg.len() - whole;
    tail_x[..rest].copy_from_slice(&seg[whole..]);
    tail_k[..rest].copy_from_slice(&m[whole..]);
    let mut acc = [f32::NEG_INFINITY; LANES];
    for (x, k) in seg[..whole].chunks_exact(LANES).zip(m[..whole].chunks_exact(LANES)) {
        masked_max(&mut acc, x.try_into().unwrap(), k.try_into().unwrap(), q_seg);
    }
    masked_max(&mut acc, &tail_x, &tail_k, q_seg);
    let max = acc.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sums = [0f32; LANES];
    let (body, tail) = seg.split_at_mut(whole);
    for (x, k) in body.chunks_exact_mut(LANES).zip(m[..whole].chunks_exact(LANES)) {
        masked_exp(&mut sums, x.try_into().unwrap(), k.try_into().unwrap(), max, q_seg);
    }
    masked_exp(&mut sums, &mut tail_x, &tail_k, max, q_seg);
    tail.copy_from_slice(&tail_x[..rest]);
    let inv = 1.0 / reduce(&sums);
    seg.iter_mut().for_each(|x| *x *= inv);
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}

/// acc[i] = the largest of acc[i] and the visible x[i].
#[inline(always)]
fn masked_max(acc: &mut [f32; LANES], x: &[f32; LANES], k: &[u32; LANES], q_seg: u32) {
    for i in 0..LANES {
        acc[i] = if sees_key(k[i], q_seg) && x[i] > acc[i] { x[i] } else { acc[i] };
    }
}

/// x[i] = e^(x[i] − max) where visible, else 0; sums[i] += x[i].
#[inline(always)]
fn masked_exp(sums: &mut [f32; LANES], x: &mut [f32; LANES], k: &[u32; LANES], max: f32, q_seg: u32) {
    for i in 0..LANES {
        let e = exp(x[i] - max);
        x[i] = if sees_key(k[i], q_seg) { e } else { 0.0 };
        sums[i] += x[i];
    }
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

    /// The draw against SplitMix64's published output, the threshold against the float rule u·2⁻²⁴ ≥ p at its
    /// boundary, and the portable build against the AVX-512 one (backend::cpu's tests hold both against the scalar
    /// mask `dropout_keeps`).
    #[test]
    fn dropout_threshold_is_the_float_rule_and_both_builds_agree() {
        // The draw is SplitMix64's: from state 0 its first output is 0xE220A8397B1DCDAF (the published sequence).
        assert_eq!(dropout_draw(0, 1), 0xE2_20A8);
        // 0.1f32·2²⁴ = 1,677,721.6 keeps 1,677,722 and not below.
        assert_eq!((dropout_threshold(0.0), dropout_threshold(0.5), dropout_threshold(0.1)), (0, 1 << 23, 1_677_722));
        for p in [0.1f32, 0.05, 0.999, f32::from_bits(0.3f32.to_bits() + 1)] {
            let t = dropout_threshold(p);
            let kept = |u: u64| (u as f32) * (1.0 / (1u64 << 24) as f32) >= p;
            assert!(kept(t) && !kept(t - 1), "p {p}: threshold {t}");
        }
        let x: Vec<f32> = (0..1000).map(|i| i as f32 - 500.25).collect();
        for (seed, first, n) in [(7u64, 0u64, 1000usize), (u64::MAX, (1 << 32) + 5, 17)] {
            let (mut fast, mut portable) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            dropout(&x[..n], &mut fast, seed, first, dropout_threshold(0.1), 1.0 / 0.9);
            dropout_lanes(&x[..n], &mut portable, seed, first, dropout_threshold(0.1), 1.0 / 0.9);
            assert_eq!(portable, fast);
            assert!(fast.contains(&0.0) && fast.iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    fn bf16_conversion_is_the_half_crates() {
        // Every exponent with mantissas around the rounding boundary (ties, just below, just above), odd and even
        // kept parts, infinities, NaNs and subnormals, against `half` (the independent reference).
        let mut x = Vec::new();
        for e in 0..256u32 {
            for m in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0x1_7fff, 0x1_8000, 0x1_8001, 0x7f_ffff, 0x40_0000, 0x12_3456] {
                for sign in [0u32, 1 << 31] {
                    x.push(f32::from_bits(sign | (e << 23) | m));
                }
            }
        }
        let mut bits = vec![0u16; x.len()];
        to_bf16_bits(&x, &mut bits);
        let mut rounded = x.clone();
        round_bf16(&mut rounded);
        for (i, &v) in x.iter().enumerate() {
            let want = half::bf16::from_f32(v);
            assert_eq!(bits[i], want.to_bits(), "{v:e} ({:#010x})", v.to_bits());
            assert_eq!(rounded[i].to_bits(), want.to_f32().to_bits(), "{v:e}");
            let mut one = [0u16];
            to_bf16_lanes(&[v], &mut one);
            assert_eq!(one[0], bits[i], "portable build, {v:e}");
        }
    }

    #[test]
    fn silu_glu_and_its_gradients_match_f64() {
        let n = 5000;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 2500.0) / 40.0).chain([-100.0, 100.0, 0.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let dy: Vec<f32> = (0..g.len()).map(|i| ((i * 53 % 89) as f32 - 44.0) / 7.0).collect();
        let (mut out, mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()], vec![0f32; g.len()]);
        silu_glu(&g, &u, &mut out);
        silu_glu_backward(&g, &u, &dy, &mut dg, &mut du);
        // Within a few f32 ulp of the result, or for silu' = s·(1 + z·(1 − s)) of its terms: 1 − s loses bits as s → 1
        // (the same f32 formula as before, with libm's exp) and silu' crosses zero near −1.28.
        let close = |a: f32, b: f64, scale: f64| {
            ((a as f64 - b).abs() <= 5e-7 * b.abs().max(scale) + 1e-30, format!("{a} vs {b}"))
        };
        for i in 0..g.len() {
            let (z, up, d) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-z).exp());
            let (silu, dsilu) = (z * s, s * (1.0 + z * (1.0 - s)));
            for (got, want, scale) in [
                (out[i], silu * up, 0.0),
                (dg[i], d * up * dsilu, (d * up).abs() * (1.0 + z.abs())),
                (du[i], d * silu, 0.0),
            ] {
                let (ok, msg) = close(got, want, scale);
                assert!(ok, "z = {z}: {msg}");
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.3 + 176.0 * i as f32 / 400_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            // One ulp of the f32 result.
            let w32 = want as f32;
            let ulp = (f32::from_bits(w32.to_bits() + 1) - w32) as f64;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn max_and_exp_sum_agree_with_sequential_f64() {
        for n in [0, 1, 63, 64, 65, 4097, 49_152] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 37.0).collect();
            let want_max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&x), want_max, "n {n}");
            let want: f64 = x.iter().map(|&v| (v as f64 - want_max as f64).exp()).sum();
            let got = exp_sum(&x, want_max);
            assert!((got - want).abs() <= 1e-6 * want.max(1e-30), "n {n}: {got} vs {want}");
            let mut e = x.clone();
            exp_shifted(&mut e, want_max);
            assert!(e.iter().zip(&x).all(|(&e, &v)| e == exp(v - want_max)), "n {n}");
        }
        assert_eq!(max(&[f32::NAN, 1.0, f32::NAN]), 1.0);
    }

    #[test]
    fn masked_softmax_matches_f64_and_zeroes_the_rest() {
        let x: Vec<f32> = (0..200).map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0).collect();
        // Padding (0) every 7th key, then segments 1 and 2 (packed examples) split at key 90.
        let mask: Vec<u32> = (0..200)
            .map(|i| {
                if i % 7 == 3 {
                    0
                } else if i < 90 {
                    1
                } else {
                    2
                }
            })
            .collect();
        for ((lo, hi), seg) in
            [(0, 200), (5, 130), (64, 65), (10, 10), (3, 4)].into_iter().flat_map(|r| [(r, 0), (r, 1), (r, 2)])
        {
            let mut row = x.clone();
            softmax_masked(&mut row, lo, hi, &mask, seg);
            let visible = |j: usize| j >= lo && j < hi && mask[j] != 0 && (seg == 0 || mask[j] == seg);
            let max = (0..200).filter(|&j| visible(j)).map(|j| x[j] as f64).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = (0..200).filter(|&j| visible(j)).map(|j| (x[j] as f64 - max).exp()).sum();
            for j in 0..200 {
                let want = if visible(j) { (x[j] as f64 - max).exp() / z } else { 0.0 };
                assert!((row[j] as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12, "({lo}, {hi}) key {j}");
            }
        }
    }
}
