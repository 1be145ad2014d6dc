//! Prompt processing and generation throughput on a real model (not a test).
//!
//!     cargo bench -p qpeft --bench inference [-- MODEL PROMPT_TOKENS GEN_TOKENS]
//!
//! Prompt: the first PROMPT_TOKENS tokens of tests/fixtures/smollm2/alpaca.txt. Prefill is timed as
//! one forward of the whole prompt (KV cache filled, last-position logits); generation as GEN_TOKENS
//! single-token greedy steps after it. Medians of 3 runs. scripts/bench/transformers_inference.py
//! measures transformers the same way.

use std::time::Instant;

use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::generate::argmax;
use qpeft::model::{Checkpoint, Decoder, Input};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> qpeft::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model_path =
        args.first().map(Into::into).unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let n_prompt: usize = args.get(1).map_or(512, |s| s.parse().expect("PROMPT_TOKENS"));
    let n_gen: usize = args.get(2).map_or(128, |s| s.parse().expect("GEN_TOKENS"));
    let ckpt = Checkpoint::open(&model_path)?;
    let tok = ckpt.tokenizer()?;
    let text = std::fs::read_to_string(root.join("tests/fixtures/smollm2/alpaca.txt")).expect("prompt text");
    let mut prompt = tok.encode(&text, true)?;
    prompt.truncate(n_prompt);
    let model = Decoder::load(&ckpt, Cpu::new())?;
    let h = model.spec.hidden_size;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut cache = model.new_cache(1, prompt.len() + n_gen)?;
        let t = Instant::now();
        let hidden = Cpu::new().download(&model.forward(&Input::single(&prompt), &mut cache)?)?;
        let logits = model.logits(&hidden[hidden.len() - h..].to_vec(), 1)?;
        pp.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let mut next = argmax(&logits);
        let t = Instant::now();
        for _ in 0..n_gen {
            let hidden = model.forward(&Input::single(&[next]), &mut cache)?;
            next = argmax(&model.logits(&hidden, 1)?);
        }
        tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "qpeft {} threads={} prompt={} gen={}: prefill {:.1} tok/s, generation {:.1} tok/s",
        Cpu::new().name(),
        rayon::current_num_threads(),
        prompt.len(),
        n_gen,
        median(pp),
        median(tg)
    );
    Ok(())
}
