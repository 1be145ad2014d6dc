//! GGUF reading against gguf-py and transformers (fixtures by scripts/reference/make_gguf_fixtures.py).

mod common;

use common::{fixtures, read_expected, rel_err};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::formats::gguf::GgufFile;
use qpeft::model::{Checkpoint, Decoder, Input};

#[test]
fn every_supported_type_dequantizes_bit_exactly_like_gguf_py() {
    let dir = fixtures().join("gguf");
    let g = GgufFile::open(&dir.join("quants.gguf")).unwrap();
    let expected = read_expected(&dir.join("quants_expected.safetensors"));
    assert_eq!(expected.len(), 9);
    for (name, want) in &expected {
        let info = g.tensor_info(name).unwrap_or_else(|| panic!("tensor {name} missing"));
        let got = g.read_f32(info).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        let mismatches = got.data.iter().zip(&want.data).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(mismatches, 0, "{name}: {mismatches} values differ from gguf-py");
    }
}

#[test]
fn tiny_llama_gguf_with_permuted_qk_matches_transformers() {
    let dir = fixtures().join("gguf");
    let expected = read_expected(&dir.join("tiny-llama-spm.expected.safetensors"));
    let (batch, seq) = (expected["input_ids"].shape[0], expected["input_ids"].shape[1]);
    let tokens: Vec<u32> = expected["input_ids"].data.iter().map(|&t| t as u32).collect();
    let mask: Vec<u32> = expected["attention_mask"].data.iter().map(|&m| m as u32).collect();
    let ckpt = Checkpoint::open(&dir.join("tiny-llama-spm.gguf")).unwrap();
    let vocab = ckpt.spec.vocab_size;
    let model = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let mut cache = model.new_cache(batch, seq).unwrap();
    let hidden = model.forward(&Input { batch, seq, tokens, mask: mask.clone() }, &mut cache).unwrap();
    let got = Cpu::new().download(&model.logits(&hidden, batch * seq).unwrap()).unwrap();
    let err = rel_err(&got, &expected["logits"].data, |i| mask[i / vocab] == 1);
    println!("tiny llama gguf rel err {err:.2e}");
    assert!(err < 1e-4, "logits differ from transformers by {err:e}");
}

#[test]
fn sentencepiece_tokenizer_from_gguf_matches_transformers() {
    let dir = fixtures().join("gguf");
    let ckpt = Checkpoint::open(&dir.join("tiny-llama-spm.gguf")).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let text = std::fs::read_to_string(dir.join("tiny-llama-spm.tokenizer.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got, want, "token ids of {text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), case["decoded"].as_str().unwrap(), "decoding of {text:?}");
    }
}
