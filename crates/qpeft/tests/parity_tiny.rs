//! Logits of tiny random models of each family against transformers (fixtures made by
//! scripts/reference/make_tiny_models.py): a left-padded batch through the padded forward, and the
//! same rows token by token through the KV cache.

mod common;

use common::{fixtures, read_expected, rel_err};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::model::{Checkpoint, Decoder, Input};

const TOL: f32 = 1e-4;

fn check_family(name: &str) {
    let dir = fixtures().join(name);
    let expected = read_expected(&dir.join("expected.safetensors"));
    let ids = &expected["input_ids"];
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    let want = &expected["logits"].data;
    let mask: Vec<u32> = expected["attention_mask"].data.iter().map(|&m| m as u32).collect();
    let tokens: Vec<u32> = ids.data.iter().map(|&t| t as u32).collect();

    let ckpt = Checkpoint::open(&dir).unwrap();
    let vocab = ckpt.spec.vocab_size;
    let model = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let input = Input { batch, seq, tokens: tokens.clone(), mask: mask.clone() };
    let mut cache = model.new_cache(batch, seq).unwrap();
    let hidden = model.forward(&input, &mut cache).unwrap();
    let got = Cpu::new().download(&model.logits(&hidden, batch * seq).unwrap()).unwrap();
    let real = |i: usize| mask[i / vocab] == 1;
    let err = rel_err(&got, want, real);
    println!("{name}: padded batch rel err {err:.2e}");
    assert!(err < TOL, "{name}: logits differ from transformers by {err:e} (relative to max |logit|)");

    // Incremental decoding through the cache: one token per step, both rows at once.
    let mut cache = model.new_cache(batch, seq).unwrap();
    let mut stepped = vec![0f32; got.len()];
    for t in 0..seq {
        let step = Input {
            batch,
            seq: 1,
            tokens: (0..batch).map(|b| tokens[b * seq + t]).collect(),
            mask: (0..batch).map(|b| mask[b * seq + t]).collect(),
        };
        let h = model.forward(&step, &mut cache).unwrap();
        let l = Cpu::new().download(&model.logits(&h, batch).unwrap()).unwrap();
        for b in 0..batch {
            stepped[(b * seq + t) * vocab..(b * seq + t + 1) * vocab].copy_from_slice(&l[b * vocab..(b + 1) * vocab]);
        }
    }
    let err = rel_err(&stepped, want, real);
    println!("{name}: KV-cache decoding rel err {err:.2e}");
    assert!(err < TOL, "{name}: cached decoding differs from transformers by {err:e}");
}

#[test]
fn llama_matches_transformers() {
    check_family("tiny-llama");
}

#[test]
fn llama3_rope_scaling_tied_biases_match_transformers() {
    check_family("tiny-llama3");
}

#[test]
fn mistral_sliding_window_sharded_f16_matches_transformers() {
    check_family("tiny-mistral");
}

#[test]
fn qwen2_qkv_bias_bf16_matches_transformers() {
    check_family("tiny-qwen2");
}

#[test]
fn gemma_matches_transformers() {
    check_family("tiny-gemma");
}
