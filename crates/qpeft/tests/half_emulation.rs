//! `Cpu::bf16()` and `Cpu::f16()`, the CPU references for the CUDA backend's 16-bit modes: they round exactly where
//! those modes round — bf16 (nearest, ties to even), or fp16 (nearest even; inputs and gradients under a power-of-two
//! scale per tensor), for base weights, embedding tables, base-product inputs and their output gradients; bf16 for
//! checkpoints; inside attention, 16-bit for q, k, v, dO, the probabilities and the score gradients (the fused kernels,
//! heads up to 128) or TF32 (the GEMM path, larger heads); the adapters' products on a linear's input or output
//! gradient take it as the base product does and their other factor in the same 16-bit format under its own scale; the
//! tails of base products (`Tail`: h under its own scale, the factor under the operand's over h's);
//! TF32 (nearest, ties away) for the other products' operands — and nowhere else. Expected values are hand-derived
//! from the formats (bf16: 8 significant bits, fp16: 11 and subnormals below 2^-14, TF32: 11).

mod common;

use common::{batch, fixtures, methods, parity_step, qlora_nf4, randomize_adapters, rel_l2, smollm2_gguf, uniform};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::{f16_shift, AttentionShape, Backend, MatMul, Tail};
use qpeft::model::train::Checkpointing;
use qpeft::model::{Checkpoint, Decoder};
use qpeft::quant::base::BaseWeight;

const BE: Cpu = Cpu::bf16();

/// 1 + k·2^-e.
fn one_plus(k: f32, e: i32) -> f32 {
    1.0 + k * 2f32.powi(-e)
}

#[test]
fn weights_and_checkpoints_round_to_bf16_nearest_even() {
    // bf16 steps are 2^-7 in [1, 2) and 4 in [512, 1024): halfway goes to the even neighbour (1 and 1000 = 250·4
    // are even, 1004 odd), anything past halfway up.
    let dense = [
        one_plus(1.0, 8),
        one_plus(3.0, 8),
        one_plus(1.0, 8) + 2f32.powi(-20),
        -one_plus(1.0, 9),
        1002.0,
        1006.0,
        1000.3,
    ];
    let want = vec![1.0, one_plus(2.0, 7), one_plus(1.0, 7), -1.0, 1000.0, 1008.0, 1000.0];
    let w = BE.upload_weight(&BaseWeight::Dense, Some(&dense), 1, dense.len()).unwrap();
    let got = BE.weight_values(&w).unwrap();
    assert_eq!(got, want);
    assert_eq!(BE.restore(&BE.save(&dense.to_vec()).unwrap()).unwrap(), got);
    // The plain f32 backend keeps every bit.
    let cpu = Cpu::new();
    assert_eq!(cpu.restore(&cpu.save(&dense.to_vec()).unwrap()).unwrap(), dense.to_vec());
}

#[test]
fn base_products_round_their_inputs_and_output_gradients_to_bf16() {
    // y = x·w with x = 1 + 2^-8 + 2^-10 (bf16: 1 + 2^-7) and w = 1 + 2^-9 (bf16: 1): exactly 1 + 2^-7.
    let w = BE.upload_weight(&BaseWeight::Dense, Some(&[one_plus(1.0, 9)]), 1, 1).unwrap();
    let mut y = vec![0.0];
    BE.linear(&vec![one_plus(1.0, 8) + 2f32.powi(-10)], &w, 1, &mut y, false).unwrap();
    assert_eq!(y, vec![one_plus(1.0, 7)]);
    // Accumulation stays in f32: 0.25 + that product keeps all its bits.
    let mut y = vec![0.25];
    BE.linear(&vec![one_plus(1.0, 8) + 2f32.powi(-10)], &w, 1, &mut y, true).unwrap();
    assert_eq!(y, vec![1.25 + 2f32.powi(-7)]);
    // Backward rounds dy the same way.
    let mut dx = vec![0.0];
    BE.linear_backward(&vec![one_plus(3.0, 9)], &w, 1, &mut dx, false).unwrap();
    assert_eq!(dx, vec![one_plus(1.0, 7)]);
}

#[test]
fn f16_weights_round_to_nearest_even_and_checkpoints_stay_bf16() {
    // fp16 steps are 2^-10 in [1, 2), 1 in [1024, 2048) and 2^-24 below 2^-14 (subnormals): halfway goes to the even
    // neighbour, past halfway up; 0.75·2^-24 rounds to the smallest subnormal.
    let f16 = Cpu::f16();
    let dense = [
        one_plus(1.0, 11),
        one_plus(3.0, 11),
        one_plus(1.0, 11) + 2f32.powi(-20),
        -one_plus(1.0, 12),
        1024.5,
        1025.5,
        2f32.powi(-20),
        3.0 * 2f32.powi(-26),
    ];
    let want = vec![1.0, one_plus(1.0, 9), one_plus(1.0, 10), -1.0, 1024.0, 1026.0, 2f32.powi(-20), 2f32.powi(-24)];
    let w = f16.upload_weight(&BaseWeight::Dense, Some(&dense), 1, dense.len()).unwrap();
    assert_eq!(f16.weight_values(&w).unwrap(), want);
    // Checkpoints keep bf16's range: 1 + 2^-8 is a bf16 tie (to 1), 1 + 3·2^-8 goes up to 1 + 2^-6.
    let saved = f16.restore(&f16.save(&vec![one_plus(1.0, 8), one_plus(3.0, 8), 1e30]).unwrap()).unwrap();
    assert_eq!(saved, vec![1.0, one_plus(1.0, 6), half::bf16::from_f32(1e30).to_f32()]);
    // A weight beyond fp16's largest finite value would become ∞: refused.
    let e = f16
        .upload_weight(&BaseWeight::Dense, Some(&[1.0, 70000.0]), 1, 2)
        .map(|_| ())
        .expect_err("70000 exceeds fp16")
        .to_string();
    assert!(e.contains("65504") && e.contains("cuda:bf16"), "{e}");
}

#[test]
fn f16_scales_follow_the_binary_exponent_of_the_largest_magnitude() {
    // s with amax·2^s in [2^14, 2^15): 1 ∈ [2^0, 2^1) → 14; 0.999 → 15; 65504 ∈ [2^15, 2^16) → −1; 3·2^-20 → 33.
    for (amax, s) in [(1.0, 14), (0.999, 15), (65504.0, -1), (3.0 * 2f32.powi(-20), 33), (1e30, -85)] {
        assert_eq!(f16_shift(amax), s, "f16_shift({amax})");
    }
    // Zero and subnormal maxima clamp at 2^120; ∞ and NaN leave the tensor unscaled.
    for (amax, s) in [(0.0, 120), (1e-40, 120), (f32::INFINITY, 0), (f32::NAN, 0)] {
        assert_eq!(f16_shift(amax), s, "f16_shift({amax})");
    }
}

#[test]
fn f16_base_products_scale_their_inputs_and_output_gradients() {
    let f16 = Cpu::f16();
    let w = f16.upload_weight(&BaseWeight::Dense, Some(&[1.0]), 1, 1).unwrap();
    let product = |x: Vec<f32>, backward: bool| {
        let mut y = vec![0.0; x.len()];
        if backward {
            f16.linear_backward(&x, &w, x.len(), &mut y, false).unwrap();
        } else {
            f16.linear(&x, &w, x.len(), &mut y, false).unwrap();
        }
        y
    };
    // amax 3·2^-20: scaled by 2^33 to 24576. 2^-20·(1 + 2^-10) becomes 2^13 + 8, exact (unscaled it would be a
    // subnormal, 2^-20); 2^-20·(1 + 2^-11) becomes 2^13 + 4, a tie, to 2^13.
    let x = vec![3.0 * 2f32.powi(-20), one_plus(1.0, 10) * 2f32.powi(-20), one_plus(1.0, 11) * 2f32.powi(-20)];
    assert_eq!(product(x.clone(), false), vec![x[0], x[1], 2f32.powi(-20)]);
    // Beyond fp16's range: 69632 = 2^16 + 2^12 scales by 2^-2 to 17408, exact (70000 would round to 70016: fp16
    // steps are 16 there); 1 + 2^-12 to 2^-2·(1 + 2^-12), less than half a step (2^-12) above 2^-2, so 1.
    assert_eq!(product(vec![69632.0, one_plus(1.0, 12)], false), vec![69632.0, 1.0]);
    assert_eq!(product(vec![70000.0], false), vec![70016.0]);
    // Gradients the same way: 2^-30·(1 + 2^-10) (bf16 would give 2^-30) and 2^-31 come through exactly.
    let dy = vec![one_plus(1.0, 10) * 2f32.powi(-30), 2f32.powi(-31)];
    assert_eq!(product(dy.clone(), true), dy);
}

#[test]
fn adapter_products_on_an_operand_take_the_other_factor_in_16_bits_under_its_own_scale() {
    let product = |be: Cpu, a: f32, b: f32| {
        let (a, b) = (vec![a], vec![b]);
        let mut out = vec![1.0];
        be.matmul_from(&be.operand(&a).unwrap(), &b, &mut out, MatMul::new(1, 1, 1).scaled(0.5).acc(true)).unwrap();
        out[0]
    };
    // f16: 1 + 2^-11 is a tie between fp16 neighbours 1 and 1 + 2^-10 and goes to 1 (TF32 would go away, up);
    // 2^-30·(1 + 2^-10) stays exact under its own scale 2^44 (under none it would be below fp16's subnormals: 0).
    let b = one_plus(1.0, 10) * 2f32.powi(-30);
    assert_eq!(product(Cpu::f16(), one_plus(1.0, 11), b), 1.0 + 0.5 * b);
    // bf16: 1 + 2^-8 and 1 + 2^-9 both round to 1.
    assert_eq!(product(Cpu::bf16(), one_plus(1.0, 8), one_plus(1.0, 9)), 1.5);
    // f32 rounds nothing.
    assert_eq!(product(Cpu::new(), one_plus(1.0, 11), 2.0), 1.0 + one_plus(1.0, 11));
}

#[test]
fn adapter_tails_round_h_under_its_scale_and_the_factor_under_the_operands() {
    // out = x·Wᵀ + s·h·Fᵀ with W = 0 (forward) or dx = dy·W + s·h·F (backward), one row, rank 1.
    let tail = |be: Cpu, x: f32, h: f32, f: [f32; 2], forward: bool| {
        let (x, h, f) = (vec![x], vec![h], f.to_vec());
        let t = Tail { h: &h, factor: &f, rank: 1, scale: 0.5 };
        if forward {
            let w = be.upload_weight(&BaseWeight::Dense, Some(&[0.0; 2]), 2, 1).unwrap();
            let mut out = vec![0.0; 2];
            be.linear_from(&be.operand(&x).unwrap(), &w, Some(t), 1, &mut out, false).unwrap();
            out
        } else {
            let w = be.upload_weight(&BaseWeight::Dense, Some(&[0.0; 2]), 1, 2).unwrap();
            let mut dx = vec![0.0; 2];
            be.linear_backward_from(&be.operand(&x).unwrap(), &w, Some(t), 1, &mut dx, false).unwrap();
            dx
        }
    };
    // f16: x = 3 < 2^2 has shift u = 13, h = 1000 < 2^10 shift t = 5 (1000·2^5 = 32000, exact in fp16). s·F = 5·10⁻⁸
    // is scaled by 2^(u−t) = 2^8 to 1.28·10⁻⁵, a subnormal (steps of 2^-24): 214.7 steps, so 215·2^-24, unscaled
    // 215·2^-32; 0.5·2^-20 = 2^-21 becomes 2^-13, exact. The term: 1000·215·2^-32 and 1000·2^-21.
    let want = vec![215_000.0 * 2f32.powi(-32), 1000.0 * 2f32.powi(-21)];
    for forward in [true, false] {
        assert_eq!(tail(Cpu::f16(), 3.0, 1000.0, [1e-7, 2f32.powi(-20)], forward), want, "forward {forward}");
    }
    // The factor's scale follows the operand's: with x = 3·2^10 (u = 3) it is 2^(3−5) = 2^-2, and 5·10⁻⁸·2^-2 is below
    // half the smallest subnormal (2^-25): 0; 2^-21·2^-2 = 2^-23 is a subnormal, exact.
    assert_eq!(tail(Cpu::f16(), 3072.0, 1000.0, [1e-7, 2f32.powi(-20)], true), vec![0.0, 1000.0 * 2f32.powi(-21)]);
    // h = 0 has shift 120 and x = 3·2^21 shift −7: u − t = −127 is clamped to −120 as every shift is, and the term
    // is 0 (unclamped, 2^−127 is no f32 power of two and the factor came out infinite: 0·∞).
    assert_eq!(tail(Cpu::f16(), 3.0 * 2f32.powi(21), 0.0, [1.0, 1.0], true), vec![0.0, 0.0]);
    // bf16 (steps of 2^-7 in [1, 2), 2^-8 in [0.5, 1)): h = 1 + 2^-8 is a tie and goes to 1 (even); s·F =
    // 0.5 + 2^-9 + 2^-11 is past halfway to 0.5 + 2^-8 and goes up to it.
    let got = tail(Cpu::bf16(), 1.0, one_plus(1.0, 8), [one_plus(1.0, 8) + 2f32.powi(-10), 1.0], true);
    assert_eq!(got, vec![0.5 * one_plus(1.0, 7), 0.5]);
    // f32 rounds nothing and applies s as the product's alpha.
    assert_eq!(
        tail(Cpu::new(), 1.0, one_plus(1.0, 20), [3.0, 1.0], true),
        vec![1.5 * one_plus(1.0, 20), 0.5 * one_plus(1.0, 20)]
    );
}

#[test]
fn other_products_round_their_operands_to_tf32_nearest_away() {
    // TF32 steps are 2^-10 in [1, 2): 1 + 2^-11 is halfway and goes away from zero; less than halfway goes down.
    let cases = [
        (one_plus(1.0, 11), one_plus(1.0, 10)),
        (-one_plus(1.0, 11), -one_plus(1.0, 10)),
        (one_plus(1.0, 12), 1.0),
        (one_plus(3.0, 12), one_plus(1.0, 10)),
    ];
    for (x, want) in cases {
        let mut out = vec![0.0];
        BE.matmul(&vec![x], &vec![1.0], &mut out, MatMul::new(1, 1, 1)).unwrap();
        assert_eq!(out[0], want, "tf32({x})");
    }
    let mut out = vec![0.0];
    Cpu::new().matmul(&vec![one_plus(1.0, 12)], &vec![1.0], &mut out, MatMul::new(1, 1, 1)).unwrap();
    assert_eq!(out[0], one_plus(1.0, 12), "the f32 backend does not round");
}

#[test]
fn attention_rounds_like_the_path_the_gpu_takes() {
    // One query that sees three keys with equal scores (q = 0): P = 1/3 each; v = (1 + 2^-10, 0, 0) in every column.
    // bf16 fused kernels (head_dim ≤ 128): v → bf16 1, P → bf16 1/3 = 0.333984375 (1.0101011·2^-2, rounded up), out =
    // 0.333984375. GEMM path (head_dim 256): TF32 keeps v, P → 1.0101010101·2^-2 (rounded down): out = that·v. f16
    // fused kernels: v scales by 2^14 exactly, P (unscaled) rounds to fp16 1.0101010101·2^-2 as TF32 does here.
    // Backward with dO = (1, 0, …) (exact in every format): dV[0] = P[0]·dO, rounded as P.
    const BF16_THIRD: f32 = 171.0 / 512.0; // 1.0101011b · 2^-2
    let tf32_third = (1.0 + 1.0 / 4.0 + 1.0 / 16.0 + 1.0 / 64.0 + 1.0 / 256.0 + 1.0 / 1024.0) / 4.0;
    let cases = [
        ("bf16", BE, 64, BF16_THIRD, BF16_THIRD),
        ("bf16", BE, 256, tf32_third * one_plus(1.0, 10), tf32_third),
        ("f16", Cpu::f16(), 64, tf32_third * one_plus(1.0, 10), tf32_third),
    ];
    for (mode, be, head_dim, want_out, want_dv) in cases {
        let s = AttentionShape {
            batch: 1,
            q_len: 1,
            kv_len: 3,
            kv_capacity: 3,
            heads: 1,
            kv_heads: 1,
            head_dim,
            scale: 1.0,
            window: None,
        };
        let q = vec![0.0; head_dim];
        let mut v = vec![0.0; 3 * head_dim];
        v[..head_dim].fill(one_plus(1.0, 10));
        let mask = vec![1u32; 3];
        let mut out = vec![0.0; head_dim];
        be.attention(&q, &q.repeat(3), &v, &mask, s, &mut out).unwrap();
        assert_eq!(out[0], want_out, "{mode} attention output, head_dim {head_dim}");
        let mut dout = vec![0.0; head_dim];
        dout[0] = 1.0;
        let (mut dq, mut dk, mut dv) = (vec![0.0; head_dim], vec![0.0; 3 * head_dim], vec![0.0; 3 * head_dim]);
        be.attention_backward(&q, &q.repeat(3), &v, &mask, s, &out, &dout, &mut dq, &mut dk, &mut dv, None).unwrap();
        assert_eq!(dv[0], want_dv, "{mode} dV, head_dim {head_dim}");
    }
}

/// A whole model in either emulation stays close to f32 (16-bit noise, not a different function) but not equal to it,
/// and fp16's 3 more bits bring it closer.
#[test]
fn the_emulated_models_are_f32_up_to_16_bit_noise() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let logits = |be: Cpu| {
        let m = Decoder::load(&ckpt, be).unwrap();
        let b = batch(m.spec.vocab_size);
        let mut cache = m.new_cache(2, 7).unwrap();
        let h = m.forward(&b.input, &mut cache).unwrap();
        m.logits(&h, 14).unwrap()
    };
    let exact = logits(Cpu::new());
    let (bf16, f16) = (rel_l2(&logits(Cpu::bf16()), &exact), rel_l2(&logits(Cpu::f16()), &exact));
    eprintln!("relative logit distance from f32: bf16 {bf16:.2e}, f16 {f16:.2e}");
    assert!(bf16 > 1e-4 && bf16 < 2e-2, "bf16: {bf16:e}");
    assert!(f16 > 1e-5 && f16 < bf16 / 3.0, "f16: {f16:e}");
}

/// Why bf16 results of the full SmolLM2 cannot be compared below ~1e-2, and fp16 ones can: changing every norm weight
/// of the emulated model by about one f32 ulp (a difference of the size f32 summation order makes) moves its adapter
/// gradients by ≈ 1e-2 in bf16, because each rounding to bf16 turns a difference δ into ≈ √(δ·2⁻⁸), but by ≈ 2.4e-3
/// with fp16's 3 more bits (2.2e-2 and 4.9e-3 from f32 on this batch). The same change moves f32 gradients by ≈ 1e-6.
/// (The GPU's 16-bit parity tolerances in cuda_parity.rs rest on this.)
#[test]
fn a_one_ulp_change_moves_the_emulated_smollm2_gradients_by_16_bit_noise() {
    let gradients = |be: Cpu, ulps: f32| {
        let mut m = Decoder::load_quantized(
            &Checkpoint::open(&smollm2_gguf()).unwrap(),
            be,
            Some(&qlora_nf4()),
            &mut |_, _| (),
        )
        .unwrap();
        for (i, blk) in m.blocks.iter_mut().enumerate() {
            for (j, w) in [&mut blk.attn_norm, &mut blk.mlp_norm].into_iter().enumerate() {
                let shifts = uniform(w.len(), 500 + 2 * i as u64 + j as u64);
                for (x, u) in w.iter_mut().zip(shifts) {
                    *x *= 1.0 + ulps * f32::EPSILON * u as f32;
                }
            }
        }
        let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(methods()[0].clone())).unwrap();
        randomize_adapters(&m.backend, &mut set, 0.02);
        m.loss_and_backward(&batch(m.spec.vocab_size), &mut set, &parity_step(Checkpointing::Full)).unwrap();
        set.named_params().into_iter().flat_map(|(_, p)| p.grad.clone()).collect::<Vec<f32>>()
    };
    let moved = |be: Cpu| rel_l2(&gradients(be, 1.0), &gradients(be, 0.0));
    let (f32_moved, bf16_moved, f16_moved) = (moved(Cpu::new()), moved(Cpu::bf16()), moved(Cpu::f16()));
    eprintln!("one ulp moves the gradients by {f32_moved:.2e} in f32, {bf16_moved:.2e} in the bf16 emulation, {f16_moved:.2e} in the f16 one");
    assert!(f32_moved < 1e-4, "f32: {f32_moved:e}");
    assert!(bf16_moved > 3e-3, "bf16: {bf16_moved:e}");
    assert!(f16_moved < 4e-3 && f16_moved < bf16_moved / 2.0, "f16: {f16_moved:e}");
}
