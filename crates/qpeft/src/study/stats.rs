//! The statistics of a study report: means over seeds with Student-t intervals, paired differences against the
//! baseline, and a seeded paired bootstrap over seeds and evaluation items for metrics that are means over items.
//!
//! Student's t distribution is computed from the regularized incomplete beta function (a continued fraction), so
//! no statistics crate is needed: P(T ≤ t) = 1 − ½·I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// A mean with its two-sided 95% interval (None with fewer than two values) and, for a difference, a p-value.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// Two-sided, for the hypothesis of no difference (differences only).
    pub p: Option<f64>,
    /// Values (seeds) it was computed from.
    pub n: usize,
}

impl Estimate {
    /// The interval excludes 0 (for a difference).
    pub fn significant(&self) -> bool {
        matches!((self.lo, self.hi), (Some(lo), Some(hi)) if lo > 0.0 || hi < 0.0)
    }
}

pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (n − 1).
pub fn std_dev(xs: &[f64]) -> f64 {
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() as f64 - 1.0)).sqrt()
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error below 1e-13).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1 − x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let s: f64 = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    d = if d.abs() < TINY { TINY } else { d };
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b).
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The t with P(T ≤ t) = p (bisection on `t_cdf`).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The mean of `xs` with its 95% t-interval.
pub fn t_interval(xs: &[f64]) -> Estimate {
    let n = xs.len();
    let m = mean(xs);
    if n < 2 {
        return Estimate { mean: m, lo: None, hi: None, p: None, n };
    }
    let half = t_quantile(0.975, (n - 1) as f64) * std_dev(xs) / (n as f64).sqrt();
    Estimate { mean: m, lo: Some(m - half), hi: Some(m + half), p: None, n }
}

/// The mean of paired differences `a − b` with its 95% t-interval and the two-sided p-value of a paired t-test.
pub fn paired_t(a: &[f64], b: &[f64]) -> Estimate {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mut e = t_interval(&d);
    if d.len() >= 2 {
        let sd = std_dev(&d);
        e.p = Some(if sd == 0.0 {
            if e.mean == 0.0 {
                1.0
            } else {
                0.0
            }
        } else {
            let t = e.mean / (sd / (d.len() as f64).sqrt());
            2.0 * t_cdf(-t.abs(), (d.len() - 1) as f64)
        });
    }
    e
}

/// Per-seed item scores of a variant and its baseline on the same items: `variant[s][i]` and `baseline[s][i]` are
/// item i's score (1/0 for correct/wrong) under seed s.
pub struct PairedItems<'a> {
    pub variant: &'a [Vec<f64>],
    pub baseline: &'a [Vec<f64>],
}

/// The difference of mean item scores (variant − baseline, averaged over seeds) with a 95% percentile interval and
/// a two-sided p-value from a paired bootstrap: each of `resamples` draws seeds with replacement, then items with
/// replacement within each drawn seed, the same items for both sides. Seeded, so a report is reproducible.
pub fn paired_bootstrap(x: &PairedItems, resamples: usize, seed: u64) -> Estimate {
    let seeds = x.variant.len();
    let per_seed = |s: usize, idx: &mut dyn Iterator<Item = usize>| -> f64 {
        let (mut sum, mut n) = (0.0, 0);
        for i in idx {
            sum += x.variant[s][i] - x.baseline[s][i];
            n += 1;
        }
        sum / n.max(1) as f64
    };
    let observed = mean(&(0..seeds).map(|s| per_seed(s, &mut (0..x.variant[s].len()))).collect::<Vec<_>>());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut total = 0.0;
        for _ in 0..seeds {
            let s = below(seeds);
            let items = x.variant[s].len();
            let picks: Vec<usize> = (0..items).map(|_| below(items)).collect();
            total += per_seed(s, &mut picks.into_iter());
        }
        stats.push(total / seeds as f64);
    }
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    let le = stats.iter().filter(|&&d| d <= 0.0).count() as f64 / resamples as f64;
    let ge = stats.iter().filter(|&&d| d >= 0.0).count() as f64 / resamples as f64;
    Estimate {
        mean: observed,
        lo: Some(at(0.025)),
        hi: Some(at(0.975)),
        p: Some((2.0 * le.min(ge)).min(1.0)),
        n: seeds,
    }
}
