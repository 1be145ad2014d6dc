//! The real models of scripts/fetch-model.sh (SmolLM2-135M-Instruct, GGUF Q4_1; Qwen2.5-Coder-1.5B-Instruct, GGUF
//! Q4_K_M) against transformers loading the same file (fixtures by scripts/reference/model_reference.py):
//! tokenization of tricky strings, chat rendering, greedy generation token for token, perplexity within 0.1%, and
//! logits within 1e-4 of each row's largest magnitude.

mod common;

use std::path::PathBuf;

use common::fixtures;
use qpeft::arch::{ModelSpec, Proj};
use qpeft::backend::cpu::{Cpu, CpuWeight, PackedRows};
use qpeft::backend::Backend;
use qpeft::eval::perplexity::perplexity;
use qpeft::generate::{generate, GenerateOptions};
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::tokenizer::{Message, Tokenizer};
use serde_json::Value;

struct Real {
    ckpt: Checkpoint,
    tok: Tokenizer,
    reference: Value,
    fixtures: PathBuf,
}

/// The model `file` under models/ (fetched by `scripts/fetch-model.sh name`) and its fixtures.
fn real(name: &str, file: &str, fixture_dir: &str) -> Real {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(file);
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh {name}", path.display());
    let ckpt = Checkpoint::open(&path).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let fixtures = fixtures().join(fixture_dir);
    let reference = serde_json::from_str(&std::fs::read_to_string(fixtures.join("reference.json")).unwrap()).unwrap();
    Real { ckpt, tok, reference, fixtures }
}

fn smollm2() -> Real {
    real("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

fn qwen() -> Real {
    real("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-1.5b")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_tokenization(m: &Real) {
    let cases = m.reference["tokenization"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = m.tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&c["ids"]), "token ids of {text:?}");
        assert_eq!(m.tok.decode(&got, false).unwrap(), c["decoded"].as_str().unwrap(), "decoding of {text:?}");
    }
}

fn check_generation(m: &Real, model: &Decoder<Cpu>) {
    let gens = m.reference["generations"].as_array().unwrap();
    assert!(gens.len() >= 3);
    for g in gens {
        let prompt = g["prompt"].as_str().unwrap();
        let messages = [Message { role: "user".into(), content: prompt.into() }];
        let chat = m.tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(chat, g["chat"].as_str().unwrap(), "chat rendering of {prompt:?}");
        let prompt_ids = m.tok.encode(&chat, false).unwrap();
        assert_eq!(prompt_ids, ids(&g["prompt_ids"]), "prompt ids of {prompt:?}");
        let want = ids(&g["generated_ids"]);
        let opts = GenerateOptions {
            max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
            stop_tokens: m.ckpt.spec.eos_token_ids.clone(),
            ..Default::default()
        };
        let got = generate(model, None, &prompt_ids, &opts, |_| Ok(())).unwrap();
        assert_eq!(got, want, "greedy generation for {prompt:?}: got {:?}", m.tok.decode(&got, true));
        assert_eq!(m.tok.decode(&got, true).unwrap(), g["text"].as_str().unwrap());
    }
}

fn check_perplexity(m: &Real, model: &Decoder<Cpu>) {
    for case in m.reference["perplexity"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let text = std::fs::read_to_string(m.fixtures.join(file)).unwrap();
        let tokens = m.tok.encode(&text, true).unwrap();
        assert_eq!(tokens, ids(&case["ids"]), "tokenization of {file}");
        let p = perplexity(model, &tokens, 2048, |_| {}).unwrap();
        let want = case["perplexity"].as_f64().unwrap();
        let rel = (p.perplexity - want).abs() / want;
        println!("{file}: perplexity {:.5} vs transformers {want:.5} (rel {rel:.1e})", p.perplexity);
        assert!(rel < 1e-3, "{file}: perplexity {} vs transformers {want}", p.perplexity);
    }
}

/// Every position of each prompt: the sampled logits and the row's maximum within 1e-4 of the row's largest
/// magnitude, the same argmax, and the log-sum-exp over the whole vocabulary within 1e-4 relative.
fn check_logits(m: &Real, model: &Decoder<Cpu>) {
    let v = model.spec.vocab_size;
    let mut worst = 0f64;
    for case in m.reference["logits"].as_array().unwrap() {
        let tokens = ids(&case["ids"]);
        let mut cache = model.new_cache(1, tokens.len()).unwrap();
        let h = model.forward(&Input::single(&tokens), &mut cache).unwrap();
        let logits = model.backend.download(&model.logits(&h, tokens.len()).unwrap()).unwrap();
        let sampled = ids(&case["sampled_ids"]);
        for (pos, row) in logits.chunks(v).enumerate() {
            let max = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let argmax = row.iter().enumerate().fold(0, |a, (i, &x)| if x > row[a] { i } else { a });
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let scale = row.iter().fold(0f32, |a, &b| a.max(b.abs())) as f64;
            let want_max = case["max"][pos].as_f64().unwrap();
            assert_eq!(argmax as u64, case["argmax"][pos].as_u64().unwrap(), "argmax at position {pos}");
            let mut err = (max - want_max).abs() / scale;
            for (k, &id) in sampled.iter().enumerate() {
                err = err.max((row[id as usize] as f64 - case["sampled"][pos][k].as_f64().unwrap()).abs() / scale);
            }
            let want_lse = case["logsumexp"][pos].as_f64().unwrap();
            err = err.max((lse - want_lse).abs() / want_lse.abs());
            assert!(err < 1e-4, "{:?} position {pos}: relative error {err:e}", case["prompt"]);
            worst = worst.max(err);
        }
    }
    println!("logits: largest relative error {worst:.2e}");
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    check_tokenization(&smollm2());
}

#[test]
fn smollm2_generation_perplexity_and_logits_match_transformers() {
    let m = smollm2();
    let model = Decoder::load(&m.ckpt, Cpu::new()).unwrap();
    check_logits(&m, &model);
    check_generation(&m, &model);
    check_perplexity(&m, &model);
}

#[test]
fn qwen_tokenizer_matches_transformers() {
    check_tokenization(&qwen());
}

#[test]
fn qwen_generation_perplexity_and_logits_match_transformers() {
    let m = qwen();
    let model = Decoder::load(&m.ckpt, Cpu::new()).unwrap();
    check_logits(&m, &model);
    check_generation(&m, &model);
    check_perplexity(&m, &model);
}

/// SmolLM2 read from the HF directory that scripts/reference/gguf_to_hf.py converts from the GGUF (run by .ci/run)
/// has the GGUF's weights bit for bit, and so its logits up to summation order: the GGUF's weights stay packed and
/// are multiplied a tile of rows at a time.
#[test]
fn smollm2_hf_directory_converted_from_the_gguf_gives_the_same_model() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-hf");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/reference/gguf_to_hf.py",
        dir.display()
    );
    let m = smollm2();
    let hf = Checkpoint::open(&dir).unwrap();
    assert_eq!(m.ckpt.spec, hf.spec);
    let (a, b) = (Decoder::load(&m.ckpt, Cpu::new()).unwrap(), Decoder::load(&hf, Cpu::new()).unwrap());
    let be = Cpu::new();
    assert!(matches!(a.embed, CpuWeight::Packed(PackedRows::Ggml(_))), "the GGUF's embedding is kept packed");
    assert!(be.weight_values(&a.embed).unwrap() == be.weight_values(&b.embed).unwrap(), "embedding");
    for (l, (x, y)) in a.blocks.iter().zip(&b.blocks).enumerate() {
        for p in Proj::ALL {
            let (x, y) = (be.weight_values(&x.proj(p).weight).unwrap(), be.weight_values(&y.proj(p).weight).unwrap());
            assert!(x == y, "layer {l} {p:?}: weights differ");
        }
    }
    let tokens = ids(&m.reference["perplexity"][2]["ids"]);
    let logits = |model: &Decoder<Cpu>| {
        let mut cache = model.new_cache(1, tokens.len()).unwrap();
        let h = model.forward(&Input::single(&tokens), &mut cache).unwrap();
        be.download(&model.logits(&h, tokens.len()).unwrap()).unwrap()
    };
    let err = common::rel_err(&logits(&a), &logits(&b), |_| true);
    println!("GGUF vs HF directory: logits rel err {err:e}");
    assert!(err < 1e-5, "GGUF and HF paths differ by {err:e}");
}

/// The built-in shape `qwen2.5-1.5b` (`bench train --arch`, `params --arch`) is the real model's.
#[test]
fn qwen_builtin_shape_is_the_real_models() {
    let real = qwen().ckpt.spec;
    let mut builtin = ModelSpec::builtin("qwen2.5-1.5b").unwrap();
    // Not part of the shape: the real model's context length and special tokens.
    builtin.max_position_embeddings = real.max_position_embeddings;
    builtin.bos_token_id = real.bos_token_id;
    builtin.eos_token_ids = real.eos_token_ids.clone();
    assert_eq!(builtin, real);
}
