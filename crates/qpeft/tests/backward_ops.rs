//! f64 finite-difference checks of every backward op of the CPU backend, plus the forward products the
//! backward relies on (matmul with transposes) against naive loops.

mod common;

use common::{dot64, fd_error, uniform};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::{AttentionShape, Backend, GluKind, Groups, MatMul};

const BE: Cpu<f64> = Cpu::f64();
const TOL: f64 = 1e-7;

#[test]
fn matmul_transposes_match_naive_products() {
    let (m, n, k) = (5, 7, 3);
    let a = uniform(m * k, 1);
    let b = uniform(k * n, 2);
    let c0 = uniform(m * n, 3);
    // Naive reference of a[m×k]·b[k×n] from row-major storage.
    let naive = |a_at: &dyn Fn(usize, usize) -> f64, b_at: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
        (0..m * n).map(|ij| (0..k).map(|p| a_at(ij / n, p) * b_at(p, ij % n)).sum()).collect()
    };
    let expect = naive(&|i, p| a[i * k + p], &|p, j| b[p * n + j]);
    for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
        // Store the transposed operands where asked, so the product is always the same.
        let a_s: Vec<f64> = if at { (0..m * k).map(|x| a[(x % m) * k + x / m]).collect() } else { a.clone() };
        let b_s: Vec<f64> = if bt { (0..k * n).map(|x| b[(x % k) * n + x / k]).collect() } else { b.clone() };
        let mut shape = MatMul::new(m, n, k).scaled(0.5).acc(true);
        shape.a_transposed = at;
        shape.b_transposed = bt;
        let mut out = c0.clone();
        BE.matmul(&a_s, &b_s, &mut out, shape).unwrap();
        for i in 0..m * n {
            assert!((out[i] - (c0[i] + 0.5 * expect[i])).abs() < 1e-12, "at {at} bt {bt} entry {i}");
        }
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let (rows, dim) = (3, 16);
    let x = uniform(rows * dim, 4);
    let w = uniform(dim, 5);
    let r = uniform(rows * dim, 6);
    for plus_one in [false, true] {
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            BE.rmsnorm(&x.to_vec(), &w, dim, 1e-5, plus_one, &mut y).unwrap();
            dot64(&y, &r)
        };
        // Accumulating onto a non-zero buffer checks `accumulate` too.
        let base = uniform(rows * dim, 7);
        let mut dx = base.clone();
        BE.rmsnorm_backward(&x, &w, &r, dim, 1e-5, plus_one, &mut dx, true).unwrap();
        let dx: Vec<f64> = dx.iter().zip(&base).map(|(a, b)| a - b).collect();
        let err = fd_error(&x, &dx, 48, loss);
        assert!(err < TOL, "plus_one {plus_one}: {err:e}");
    }
}

#[test]
fn rope_backward_matches_finite_differences() {
    let (heads, hd) = (3, 8);
    let positions: Vec<u32> = vec![0, 5, 17, 1000];
    let inv_freq: Vec<f64> = (0..hd / 2).map(|j| 1.0 / 10000f64.powf(2.0 * j as f64 / hd as f64)).collect();
    let x = uniform(positions.len() * heads * hd, 8);
    let r = uniform(x.len(), 9);
    let loss = |x: &[f64]| {
        let mut y = x.to_vec();
        BE.rope(&mut y, &positions, &inv_freq, heads, hd).unwrap();
        dot64(&y, &r)
    };
    let mut dx = r.clone();
    BE.rope_backward(&mut dx, &positions, &inv_freq, heads, hd).unwrap();
    assert!(fd_error(&x, &dx, 96, loss) < TOL);
}

#[test]
fn glu_backward_matches_finite_differences() {
    let n = 40;
    let gate: Vec<f64> = uniform(n, 10).iter().map(|v| v * 4.0).collect();
    let up = uniform(n, 11);
    let r = uniform(n, 12);
    for kind in [GluKind::Silu, GluKind::GeluTanh] {
        let out = |g: &[f64], u: &[f64]| {
            let mut y = vec![0.0; n];
            BE.glu(&g.to_vec(), &u.to_vec(), kind, &mut y).unwrap();
            dot64(&y, &r)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        BE.glu_backward(&gate, &up, &r, kind, &mut dg, &mut du).unwrap();
        assert!(fd_error(&gate, &dg, n, |g| out(g, &up)) < TOL, "{kind:?} gate");
        assert!(fd_error(&up, &du, n, |u| out(&gate, u)) < TOL, "{kind:?} up");
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    // GQA (4 query heads on 2 KV heads), a padded key, a sliding window, and queries that start inside the
    // cache (q_len < kv_len) with spare capacity.
    for window in [None, Some(3)] {
        let s = AttentionShape {
            batch: 2,
            q_len: 4,
            kv_len: 6,
            kv_capacity: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
            window,
        };
        let q = uniform(s.batch * s.q_len * s.heads * s.head_dim, 13);
        let k = uniform(s.batch * s.kv_capacity * s.kv_heads * s.head_dim, 14);
        let v = uniform(k.len(), 15);
        let mut mask = vec![1u32; s.batch * s.kv_capacity];
        mask[s.kv_capacity + 1] = 0;
        let r = uniform(q.len(), 16);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut o = vec![0.0; q.len()];
            BE.attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), &mask, s, &mut o).unwrap();
            dot64(&o, &r)
        };
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![9.0; k.len()], vec![9.0; v.len()]);
        let mut o = vec![0.0; q.len()];
        BE.attention(&q, &k, &v, &mask, s, &mut o).unwrap();
        BE.attention_backward(&q, &k, &v, &mask, s, &o, &r, &mut dq, &mut dk, &mut dv, None).unwrap();
        assert!(fd_error(&q, &dq, 64, |q| loss(q, &k, &v)) < TOL, "dq, window {window:?}");
        assert!(fd_error(&k, &dk, 112, |k| loss(&q, k, &v)) < TOL, "dk, window {window:?}");
        assert!(fd_error(&v, &dv, 112, |v| loss(&q, &k, v)) < TOL, "dv, window {window:?}");
    }
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let (rows, vocab) = (4, 11);
    let logits: Vec<f64> = uniform(rows * vocab, 17).iter().map(|v| v * 3.0).collect();
    let targets = vec![3u32, 100, 0, 10];
    let loss = |l: &[f64]| {
        let mut out = vec![0.0; rows];
        BE.cross_entropy(&l.to_vec(), &targets, vocab, 100, &mut out).unwrap();
        out.iter().sum::<f64>() * 0.25
    };
    let mut d = vec![0.0; logits.len()];
    BE.cross_entropy_backward(&logits, &targets, vocab, 100, 0.25, &mut d).unwrap();
    assert!(d[vocab..2 * vocab].iter().all(|&g| g == 0.0), "an ignored row has no gradient");
    assert!(fd_error(&logits, &d, rows * vocab, loss) < TOL);
}

#[test]
fn group_reduce_and_expand_are_adjoint_and_pool_as_specified() {
    let rows = 2;
    for g in [Groups { width: 12, groups: 4 }, Groups { width: 10, groups: 4 }, Groups { width: 7, groups: 7 }] {
        let x = uniform(rows * g.width, 18);
        let h = uniform(rows * g.groups, 19);
        for mean in [false, true] {
            let mut pooled = vec![0.0; h.len()];
            BE.group_reduce(&x, rows, g, mean, 1.5, &mut pooled, false).unwrap();
            let mut spread = vec![0.0; x.len()];
            BE.group_expand(&h, rows, g, mean, 1.5, &mut spread, false).unwrap();
            // ⟨reduce(x), h⟩ = ⟨x, expand(h)⟩: each is the other's backward.
            assert!((dot64(&pooled, &h) - dot64(&x, &spread)).abs() < 1e-12, "{g:?} mean {mean}");
        }
        // Hand-derived membership: feature i is in group ⌊i·groups/width⌋.
        let mut pooled = vec![0.0; h.len()];
        BE.group_reduce(&x, rows, g, true, 1.0, &mut pooled, false).unwrap();
        for r in 0..rows {
            for k in 0..g.groups {
                let members: Vec<f64> =
                    (0..g.width).filter(|i| i * g.groups / g.width == k).map(|i| x[r * g.width + i]).collect();
                assert!(!members.is_empty());
                let mean = members.iter().sum::<f64>() / members.len() as f64;
                assert!((pooled[r * g.groups + k] - mean).abs() < 1e-12);
            }
        }
    }
    // width 10 in 4 groups: runs of 3, 2, 3, 2 (i·4/10 = 0,0,0,1,1,2,2,2,3,3).
    let g = Groups { width: 10, groups: 4 };
    assert_eq!((0..4).map(|k| g.range(k)).collect::<Vec<_>>(), vec![(0, 3), (3, 5), (5, 8), (8, 10)]);
    assert!(BE
        .group_reduce(&vec![0.0; 10], 1, Groups { width: 10, groups: 11 }, true, 1.0, &mut vec![0.0; 11], false)
        .is_err());
}

#[test]
fn dropout_is_reproducible_scaled_and_at_the_asked_rate() {
    let x = vec![1.0f64; 100_000];
    let (mut a, mut b, mut c) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
    BE.dropout(&x, 0.1, 42, 0, &mut a).unwrap();
    BE.dropout(&x, 0.1, 42, 0, &mut b).unwrap();
    BE.dropout(&x, 0.1, 43, 0, &mut c).unwrap();
    assert_eq!(a, b, "same seed, same mask");
    assert_ne!(a, c, "another seed, another mask");
    let kept = a.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
    assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
    // p arrives as f32: the kept values are 1 / (1 − (0.1 as f32)).
    assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / (1.0 - 0.1f32 as f64)).abs() < 1e-12));
    // The f32 and f64 backends draw the same mask.
    let mut f = vec![0f32; x.len()];
    Cpu::new().dropout(&vec![1f32; x.len()], 0.1, 42, 0, &mut f).unwrap();
    assert!(f.iter().zip(&a).all(|(&f, &a)| (f == 0.0) == (a == 0.0)));
    // A tail of the values, run on its own from its offset, draws the tail of the same mask.
    let mut tail = vec![0.0; 1000];
    BE.dropout(&x[..1000].to_vec(), 0.1, 42, (x.len() - 1000) as u64, &mut tail).unwrap();
    assert_eq!(tail[..], a[x.len() - 1000..]);
}
