//! Each adapter method on its own: f64 finite-difference checks of the input and parameter gradients (with
//! dropout active), ΔW against the forward pass, initialisation, and parameter counts.

mod common;

use common::{dot64, fd_error, uniform};
use qpeft::adapters::hierarchical::HierarchicalMethod;
use qpeft::adapters::ir_qlora::IrQloraMethod;
use qpeft::adapters::lora::LoraMethod;
use qpeft::adapters::q_bara::QBaraMethod;
use qpeft::adapters::qa_hira::QaHiraMethod;
use qpeft::adapters::qa_lora::QaLoraMethod;
use qpeft::adapters::{build, Adapter, AdapterConfig, Method, Pass};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;

const BE: Cpu<f64> = Cpu::f64();

fn cfg(method: Method, rank: usize, dropout: f32) -> AdapterConfig {
    AdapterConfig { method, rank, alpha: 3.0, dropout }
}

/// (config, in, out) covering every method, IEC also on dimensions its rank does not divide.
fn cases(dropout: f32) -> Vec<(AdapterConfig, usize, usize)> {
    vec![
        (cfg(Method::Lora(LoraMethod), 3, dropout), 12, 8),
        (cfg(Method::IrQlora(IrQloraMethod), 4, dropout), 12, 8),
        (cfg(Method::IrQlora(IrQloraMethod), 4, dropout), 10, 6),
        (cfg(Method::QaLora(QaLoraMethod { group: 4 }), 2, dropout), 12, 8),
        (cfg(Method::QBara(QBaraMethod { lambda: 2 }), 2, dropout), 12, 8),
        (cfg(Method::QaHira(QaHiraMethod { l1: 4, l2: 2, zero_init: false }), 4, dropout), 12, 8),
        (
            cfg(
                Method::Hierarchical(HierarchicalMethod {
                    ranks: vec![2, 1, 1],
                    alphas: vec![3.0, 1.0, 2.0],
                    lr_scales: vec![1.0, 0.5, 0.5],
                }),
                4,
                dropout,
            ),
            12,
            8,
        ),
    ]
}

fn forward(a: &dyn Adapter<Cpu<f64>>, x: &[f64], rows: usize, out: usize, pass: Pass) -> Vec<f64> {
    let mut y = vec![0.0; rows * out];
    let x = x.to_vec();
    a.forward(&BE, &BE.operand(&x).unwrap(), rows, pass, &mut y, true).unwrap();
    y
}

/// Random non-zero values for every parameter (B = 0 and β = 0 at init would hide half the gradients).
fn randomise(a: &mut dyn Adapter<Cpu<f64>>, seed: u64) {
    for (i, p) in a.params_mut().into_iter().enumerate() {
        p.value = uniform(p.value.len(), seed + i as u64);
    }
}

/// In training (dropout active) and at inference, where an unpooled input view is the identity and the input gradient
/// accumulates straight into dx.
#[test]
fn gradients_match_finite_differences() {
    let rows = 5;
    for ((c, n_in, n_out), training) in cases(0.3).into_iter().flat_map(|c| [(c.clone(), true), (c, false)]) {
        let mut a = build(&BE, &c, n_in, n_out, 7).unwrap();
        randomise(a.as_mut(), 100);
        let x = uniform(rows * n_in, 1);
        let r = uniform(rows * n_out, 2);
        let pass = Pass { training, seed: 99, first_row: 0 };
        let base_dx = uniform(x.len(), 3);
        let mut dx = base_dx.clone();
        a.backward(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, &mut dx, true).unwrap();
        let dx: Vec<f64> = dx.iter().zip(&base_dx).map(|(a, b)| a - b).collect();
        // Without accumulation dx and y are overwritten: what was there (NaN) leaves no trace.
        let mut fresh = vec![f64::NAN; x.len()];
        a.backward(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, &mut fresh, false).unwrap();
        let name = c.method.name();
        assert!(
            fresh.iter().zip(&dx).all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0)),
            "{name}: dx overwritten"
        );
        let mut y = vec![f64::NAN; rows * n_out];
        a.forward(&BE, &BE.operand(&x).unwrap(), rows, pass, &mut y, false).unwrap();
        let want = forward(a.as_ref(), &x, rows, n_out, pass);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0)), "{name}: y overwritten");
        for p in a.params_mut() {
            p.grad = vec![];
        }
        a.backward(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, &mut base_dx.clone(), true).unwrap();
        let err = fd_error(&x, &dx, 60, |x| dot64(&forward(a.as_ref(), x, rows, n_out, pass), &r));
        assert!(err < 1e-7, "{name} {n_in}→{n_out}: dx error {err:e}");
        let count = a.params().len();
        for i in 0..count {
            let (value, grad, pname) = {
                let p = &a.params()[i];
                (p.value.clone(), p.grad.clone(), p.name.clone())
            };
            let err = fd_error(&value, &grad, 40, |v| {
                a.params_mut()[i].value = v.to_vec();
                let y = forward(a.as_ref(), &x, rows, n_out, pass);
                a.params_mut()[i].value = value.clone();
                dot64(&y, &r)
            });
            assert!(err < 1e-7, "{name} {n_in}→{n_out}: {pname} error {err:e}");
            assert!(grad.iter().any(|&g| g != 0.0), "{name}: {pname} has a zero gradient");
        }
        // A second backward accumulates: every gradient doubles.
        let first: Vec<Vec<f64>> = a.params().iter().map(|p| p.grad.clone()).collect();
        a.backward(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, &mut vec![0.0; x.len()], true).unwrap();
        for (p, g) in a.params().iter().zip(first) {
            assert!(
                p.grad.iter().zip(&g).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-12 * b.abs().max(1.0)),
                "{name}: {} accumulates",
                p.name
            );
        }
    }
}

#[test]
fn delta_weight_reproduces_the_forward_pass() {
    let rows = 3;
    for (c, n_in, n_out) in cases(0.3) {
        let mut a = build(&BE, &c, n_in, n_out, 7).unwrap();
        randomise(a.as_mut(), 200);
        let x = uniform(rows * n_in, 4);
        // Inference: no dropout.
        let y = forward(a.as_ref(), &x, rows, n_out, Pass { training: false, seed: 0, first_row: 0 });
        let dw = a.delta_weight(&BE).unwrap();
        for r in 0..rows {
            for j in 0..n_out {
                let merged: f64 = (0..n_in).map(|i| x[r * n_in + i] * dw[j * n_in + i] as f64).sum();
                let got = y[r * n_out + j];
                assert!(
                    (merged - got).abs() < 1e-5 * got.abs().max(1.0),
                    "{} row {r} out {j}: {merged} vs {got}",
                    c.method.name()
                );
            }
        }
    }
}

#[test]
fn parameter_counts_match_the_formulas() {
    for (c, n_in, n_out) in cases(0.0) {
        let a = build(&BE, &c, n_in, n_out, 1).unwrap();
        assert_eq!(a.trainable(), c.trainable(n_in, n_out), "{}", c.method.name());
    }
    // Hand-derived counts on 12 → 8: LoRA r 3: 3·20; IEC r 4: 4·20 + 2; QA-LoRA r 2, L 4: 2·(3 + 8);
    // Q-BaRA r 2, λ 2: (2·2)·6 + 4·(2·2); QA-HiRA (4, 2): 3·4; hierarchical 2,1,1: 4·20.
    let counts: Vec<usize> = cases(0.0).iter().filter(|c| c.1 == 12).map(|(c, i, o)| c.trainable(*i, *o)).collect();
    assert_eq!(counts, vec![60, 82, 22, 40, 12, 80]);
}

#[test]
fn initialisation_follows_each_method() {
    let (n_in, n_out) = (64, 32);
    let values =
        |a: &dyn Adapter<Cpu<f64>>, name: &str| a.params().iter().find(|p| p.name == name).unwrap().value.clone();
    let max_abs = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
    // LoRA: A ~ U(±1/√in), B = 0, so ΔW = 0.
    let lora = build(&BE, &cfg(Method::Lora(LoraMethod), 8, 0.0), n_in, n_out, 3).unwrap();
    let a = values(lora.as_ref(), "lora_A.weight");
    assert!(max_abs(&a) <= 1.0 / 8.0 && max_abs(&a) > 0.9 / 8.0);
    assert!(values(lora.as_ref(), "lora_B.weight").iter().all(|&v| v == 0.0));
    assert!(lora.delta_weight(&BE).unwrap().iter().all(|&v| v == 0.0));
    // Same seed, same init; another seed, another one.
    assert_eq!(
        a,
        values(build(&BE, &cfg(Method::Lora(LoraMethod), 8, 0.0), n_in, n_out, 3).unwrap().as_ref(), "lora_A.weight")
    );
    assert_ne!(
        a,
        values(build(&BE, &cfg(Method::Lora(LoraMethod), 8, 0.0), n_in, n_out, 4).unwrap().as_ref(), "lora_A.weight")
    );
    // IEC: β_A = β_B = 0.
    let iec = build(&BE, &cfg(Method::IrQlora(IrQloraMethod), 8, 0.0), n_in, n_out, 3).unwrap();
    assert_eq!(values(iec.as_ref(), "lora_default_A_scale"), vec![0.0]);
    assert_eq!(values(iec.as_ref(), "lora_default_B_scale"), vec![0.0]);
    // QA-LoRA: xavier on A [8, 64/16 = 4]: bound √(6/12).
    let qa = build(&BE, &cfg(Method::QaLora(QaLoraMethod { group: 16 }), 4, 0.0), n_in, n_out, 3).unwrap();
    let a = values(qa.as_ref(), "lora_A.weight");
    assert_eq!(a.len(), 4 * 4);
    assert!(max_abs(&a) <= (6.0f64 / 8.0).sqrt() && max_abs(&a) > 0.5);
    // QA-HiRA: kaiming on C [32/2, 64/4] as published (Δ ≠ 0 at step 0), or zero.
    let hira = |zero_init| {
        build(&BE, &cfg(Method::QaHira(QaHiraMethod { l1: 4, l2: 2, zero_init }), 8, 0.0), n_in, n_out, 3).unwrap()
    };
    let c = values(hira(false).as_ref(), "lora_A.weight");
    assert_eq!(c.len(), 16 * 16);
    assert!(max_abs(&c) <= 0.25 && max_abs(&c) > 0.2);
    assert!(values(hira(true).as_ref(), "lora_A.weight").iter().all(|&v| v == 0.0));
}

#[test]
fn invalid_configurations_are_refused_with_the_value() {
    let err = |c: AdapterConfig, i: usize, o: usize| c.check(i, o).unwrap_err();
    assert!(err(cfg(Method::Lora(LoraMethod), 9, 0.0), 12, 8).contains("rank = 9"));
    assert!(err(cfg(Method::QBara(QBaraMethod { lambda: 5 }), 1, 0.0), 12, 8).contains("lambda = 5"));
    assert!(err(cfg(Method::QaHira(QaHiraMethod { l1: 5, l2: 2, zero_init: true }), 1, 0.0), 12, 8).contains("l1 = 5"));
    assert!(err(cfg(Method::QaHira(QaHiraMethod { l1: 4, l2: 3, zero_init: true }), 1, 0.0), 12, 8)
        .contains("l2 = 3 does not divide the output"));
    assert!(err(cfg(Method::QaLora(QaLoraMethod { group: 5 }), 1, 0.0), 12, 8).contains("group_size = 5"));
    assert!(err(cfg(Method::Lora(LoraMethod), 2, 1.0), 12, 8).contains("dropout"));
    let h = Method::Hierarchical(HierarchicalMethod {
        ranks: vec![4, 9],
        alphas: vec![1.0, 1.0],
        lr_scales: vec![1.0, 1.0],
    });
    assert!(err(cfg(h, 13, 0.0), 12, 8).contains("ranks entry 9"));
    assert!(build(&BE, &cfg(Method::Lora(LoraMethod), 9, 0.0), 12, 8, 0).is_err());
}

/// The terms an adapter hands its linear (`forward_term`, `backward_term`) are its `forward` and `backward`: the
/// term's product s·h·Fᵀ is Δ(x), and backward_term (given the forward term's h) leaves the same parameter gradients
/// as `backward` with h·F its dx.
/// LoRA and QA-LoRA give forward terms; LoRA without active dropout a backward term; every other case none, with
/// nothing accumulated.
#[test]
fn adapter_terms_are_the_forward_and_backward_they_replace() {
    let rows = 4;
    let mut seen = (0, 0);
    for ((c, n_in, n_out), training) in cases(0.3).into_iter().flat_map(|c| [(c.clone(), true), (c, false)]) {
        let name = c.method.name();
        let mut a = build(&BE, &c, n_in, n_out, 7).unwrap();
        randomise(a.as_mut(), 300);
        let (x, r) = (uniform(rows * n_in, 5), uniform(rows * n_out, 6));
        let pass = Pass { training, seed: 41, first_row: 0 };
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-12 * b.abs().max(1.0));
        let want_y = forward(a.as_ref(), &x, rows, n_out, pass);
        let mut kept = None;
        if let Some(t) = a.forward_term(&BE, &BE.operand(&x).unwrap(), rows, pass).unwrap() {
            assert_eq!((t.h.len(), t.factor.len()), (rows * t.rank, n_out * t.rank), "{name}");
            let y: Vec<f64> = (0..rows * n_out)
                .map(|i| {
                    (0..t.rank).map(|k| t.h[i / n_out * t.rank + k] * t.factor[i % n_out * t.rank + k]).sum::<f64>()
                })
                .map(|v| v * t.scale as f64)
                .collect();
            assert!(close(&y, &want_y), "{name}: forward term");
            seen.0 += 1;
            kept = Some(t.h);
        }
        let mut dx = vec![0.0; x.len()];
        a.backward(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, &mut dx, false).unwrap();
        let grads: Vec<Vec<f64>> = a.params_mut().into_iter().map(|p| std::mem::take(&mut p.grad)).collect();
        // The forward term's h, kept, stands in for the h backward_term would compute.
        let term = a.backward_term(&BE, &x, &BE.operand(&r).unwrap(), rows, pass, kept).unwrap().map(|t| {
            assert_eq!((t.h.len(), t.factor.len()), (rows * t.rank, t.rank * n_in), "{name}");
            (0..rows * n_in)
                .map(|i| (0..t.rank).map(|k| t.h[i / n_in * t.rank + k] * t.factor[k * n_in + i % n_in]).sum::<f64>())
                .map(|v| v * t.scale as f64)
                .collect::<Vec<f64>>()
        });
        let got: Vec<Vec<f64>> = a.params().iter().map(|p| p.grad.clone()).collect();
        match term {
            Some(term_dx) => {
                assert!(close(&term_dx, &dx), "{name}: backward term's dx");
                for (g, w) in got.iter().zip(&grads) {
                    assert!(close(g, w), "{name}: backward term's gradients");
                }
                seen.1 += 1;
            }
            None => assert!(got.iter().all(|g| g.is_empty()), "{name}: no term, yet gradients accumulated"),
        }
    }
    // LoRA and QA-LoRA in both passes; LoRA at inference only (dropout 0.3 is active in training).
    assert_eq!(seen, (4, 1));
}
