//! The real default model, SmolLM2-135M-Instruct (GGUF Q4_1), against transformers loading the same
//! file (fixtures by scripts/reference/smollm2_reference.py). Needs scripts/fetch-smollm2.sh and, for
//! the last test, scripts/reference/gguf_to_hf.py (both run by .ci/run).

mod common;

use std::path::PathBuf;

use common::{fixtures, rel_err, smollm2_gguf};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::eval::perplexity::perplexity;
use qpeft::generate::{generate, GenerateOptions};
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::tokenizer::Message;
use serde_json::Value;

fn open() -> Checkpoint {
    let path = smollm2_gguf();
    assert!(path.exists(), "{} is missing: run scripts/fetch-smollm2.sh", path.display());
    Checkpoint::open(&path).unwrap()
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn chat_template_and_greedy_generation_match_transformers() {
    let ckpt = open();
    let tok = ckpt.tokenizer().unwrap();
    let model = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let r = reference();
    let gens = r["generations"].as_array().unwrap();
    assert!(gens.len() >= 5);
    for g in gens {
        let prompt = g["prompt"].as_str().unwrap();
        let chat = tok.apply_chat_template(&[Message { role: "user".into(), content: prompt.into() }], true).unwrap();
        assert_eq!(chat, g["chat"].as_str().unwrap(), "chat rendering of {prompt:?}");
        let prompt_ids = tok.encode(&chat, false).unwrap();
        assert_eq!(prompt_ids, ids(&g["prompt_ids"]), "prompt ids of {prompt:?}");
        let want = ids(&g["generated_ids"]);
        let opts =
            GenerateOptions { max_new_tokens: 48, stop_tokens: ckpt.spec.eos_token_ids.clone(), ..Default::default() };
        let got = generate(&model, None, &prompt_ids, &opts, |_| Ok(())).unwrap();
        assert_eq!(got, want, "greedy generation for {prompt:?}: got {:?}", tok.decode(&got, true));
        assert_eq!(tok.decode(&got, true).unwrap(), g["text"].as_str().unwrap());
    }
}

#[test]
fn perplexity_matches_transformers_within_0_1_percent() {
    let ckpt = open();
    let tok = ckpt.tokenizer().unwrap();
    let model = Decoder::load(&ckpt, Cpu::new()).unwrap();
    for case in reference()["perplexity"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let text = std::fs::read_to_string(fixtures().join("smollm2").join(file)).unwrap();
        let tokens = tok.encode(&text, true).unwrap();
        assert_eq!(tokens, ids(&case["ids"]), "tokenization of {file}");
        let p = perplexity(&model, &tokens, 2048, |_| {}).unwrap();
        let want = case["perplexity"].as_f64().unwrap();
        let rel = (p.perplexity - want).abs() / want;
        println!("{file}: perplexity {:.5} vs transformers {want:.5} (rel {rel:.1e})", p.perplexity);
        assert!(rel < 1e-3, "{file}: perplexity {} vs transformers {want}", p.perplexity);
    }
}

#[test]
fn hf_directory_converted_from_the_gguf_gives_the_same_logits() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-hf");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/reference/gguf_to_hf.py",
        dir.display()
    );
    let gguf = open();
    let hf = Checkpoint::open(&dir).unwrap();
    assert_eq!(gguf.spec, hf.spec);
    let tokens: Vec<u32> =
        reference()["perplexity"][2]["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let logits = |ckpt: &Checkpoint| {
        let m = Decoder::load(ckpt, Cpu::new()).unwrap();
        let mut cache = m.new_cache(1, tokens.len()).unwrap();
        let h = m.forward(&Input::single(&tokens), &mut cache).unwrap();
        Cpu::new().download(&m.logits(&h, tokens.len()).unwrap()).unwrap()
    };
    let (a, b) = (logits(&gguf), logits(&hf));
    let err = rel_err(&a, &b, |_| true);
    println!("GGUF vs HF directory: rel err {err:e}");
    assert!(err == 0.0, "GGUF and HF paths differ by {err:e}");
}
