//! `Cpu::bf16()`, the CPU reference for the CUDA backend's bf16 mode: it rounds exactly where that mode rounds —
//! bf16 (nearest, ties to even) for base weights, embedding tables, base-product inputs, their output gradients
//! and checkpoints; inside attention, bf16 for q, k, v, dO, the probabilities and the score gradients (the fused kernels,
//! heads up to 128) or TF32 (the GEMM path, larger heads); TF32 (nearest, ties away) for the other products' operands —
//! and nowhere else. Expected values
//! are hand-derived from the formats (bf16: 8 significant bits, TF32: 11).

mod common;

use common::{batch, fixtures, methods, parity_step, qlora_nf4, randomize_adapters, rel_l2, smollm2_gguf, uniform};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::{AttentionShape, Backend, MatMul};
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
    let dense = [one_plus(1.0, 8), one_plus(3.0, 8), one_plus(1.0, 8) + 2f32.powi(-20), -one_plus(1.0, 9), 1002.0, 1006.0, 1000.3];
    let want = vec![1.0, one_plus(2.0, 7), one_plus(1.0, 7), -1.0, 1000.0, 1008.0, 1000.0];
    let w = BE.upload_weight(&dense, &BaseWeight::Dense, 1, dense.len()).unwrap();
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
    let w = BE.upload_weight(&[one_plus(1.0, 9)], &BaseWeight::Dense, 1, 1).unwrap();
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
fn other_products_round_their_operands_to_tf32_nearest_away() {
    // TF32 steps are 2^-10 in [1, 2): 1 + 2^-11 is halfway and goes away from zero; less than halfway goes down.
    let cases = [(one_plus(1.0, 11), one_plus(1.0, 10)), (-one_plus(1.0, 11), -one_plus(1.0, 10)), (one_plus(1.0, 12), 1.0), (one_plus(3.0, 12), one_plus(1.0, 10))];
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
    // Fused kernels (head_dim ≤ 128): v → bf16 1, P → bf16 1/3 = 0.333984375 (1.0101011·2^-2, rounded up), out =
    // 0.333984375. GEMM path (head_dim 256): TF32 keeps v, P → 1.0101010101·2^-2 (rounded down): out = that·v.
    // Backward with dO = (1, 0, …): dV[0] = P[0]·dO, rounded as P.
    const BF16_THIRD: f32 = 171.0 / 512.0; // 1.0101011b · 2^-2
    let tf32_third = (1.0 + 1.0 / 4.0 + 1.0 / 16.0 + 1.0 / 64.0 + 1.0 / 256.0 + 1.0 / 1024.0) / 4.0;
    for (head_dim, want_out, want_dv) in [(64, BF16_THIRD, BF16_THIRD), (256, tf32_third * one_plus(1.0, 10), tf32_third)] {
        let s = AttentionShape { batch: 1, q_len: 1, kv_len: 3, kv_capacity: 3, heads: 1, kv_heads: 1, head_dim, scale: 1.0, window: None };
        let q = vec![0.0; head_dim];
        let mut v = vec![0.0; 3 * head_dim];
        v[..head_dim].fill(one_plus(1.0, 10));
        let mask = vec![1u32; 3];
        let mut out = vec![0.0; head_dim];
        BE.attention(&q, &q.repeat(3), &v, &mask, s, &mut out).unwrap();
        assert_eq!(out[0], want_out, "attention output, head_dim {head_dim}");
        let mut dout = vec![0.0; head_dim];
        dout[0] = 1.0;
        let (mut dq, mut dk, mut dv) = (vec![0.0; head_dim], vec![0.0; 3 * head_dim], vec![0.0; 3 * head_dim]);
        BE.attention_backward(&q, &q.repeat(3), &v, &mask, s, &out, &dout, &mut dq, &mut dk, &mut dv).unwrap();
        assert_eq!(dv[0], want_dv, "dV, head_dim {head_dim}");
    }
}

/// A whole model in the emulation stays close to f32 (bf16 noise, not a different function) but not equal to it.
#[test]
fn the_emulated_model_is_f32_up_to_bf16_noise() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let logits = |be: Cpu| {
        let m = Decoder::load(&ckpt, be).unwrap();
        let b = batch(m.spec.vocab_size);
        let mut cache = m.new_cache(2, 7).unwrap();
        let h = m.forward(&b.input, &mut cache).unwrap();
        m.logits(&h, 14).unwrap()
    };
    let (a, b) = (logits(Cpu::bf16()), logits(Cpu::new()));
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt() / b.iter().map(|y| y * y).sum::<f32>().sqrt();
    assert!(err > 1e-4 && err < 2e-2, "relative logit distance {err:e}");
}

/// Why bf16 results of the full SmolLM2 cannot be compared below ~1e-2: changing every norm weight of the emulated
/// model by about one f32 ulp (a difference of the size f32 summation order makes) moves its adapter gradients by
/// ≈ 1e-2, because each rounding to bf16 turns a difference δ into ≈ √(δ·2⁻⁸). The same change moves f32 gradients by
/// ≈ 1e-6. (The GPU's bf16 parity tolerance in cuda_parity.rs rests on this.)
#[test]
fn a_one_ulp_change_moves_the_emulated_smollm2_gradients_by_bf16_noise() {
    let gradients = |be: Cpu, ulps: f32| {
        let mut m = Decoder::load_quantized(&Checkpoint::open(&smollm2_gguf()).unwrap(), be, Some(&qlora_nf4()), &mut |_| ()).unwrap();
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
        m.loss_and_backward(&batch(m.spec.vocab_size), &mut set, &parity_step(true)).unwrap();
        set.named_params().into_iter().flat_map(|(_, p)| p.grad.clone()).collect::<Vec<f32>>()
    };
    let moved = |be: Cpu| rel_l2(&gradients(be, 1.0), &gradients(be, 0.0));
    let (f32_moved, bf16_moved) = (moved(Cpu::new()), moved(Cpu::bf16()));
    eprintln!("one ulp moves the gradients by {f32_moved:.2e} in f32, {bf16_moved:.2e} in the bf16 emulation");
    assert!(f32_moved < 1e-4, "f32: {f32_moved:e}");
    assert!(bf16_moved > 3e-3, "bf16: {bf16_moved:e}");
}
