//! One training step (forward with loss + backward, no optimizer) of a real model with LoRA r 64, α 16 on all
//! seven linears of every layer (not a test).
//!
//!     cargo bench -p qpeft --bench train_step [-- MODEL BATCH SEQ STEPS]
//!
//! Tokens: random ids (seeded), labels = ids, no padding — what scripts/bench/peft_train_step.py feeds
//! transformers + peft. Reports median tokens/s over STEPS steps after one warm-up, without and with
//! activation checkpointing.

use std::time::Instant;

use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::model::train::{Batch, StepOptions};
use qpeft::model::{Checkpoint, Decoder, Input};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> qpeft::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model_path = args.first().map(Into::into).unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let batch: usize = args.get(1).map_or(1, |s| s.parse().expect("BATCH"));
    let seq: usize = args.get(2).map_or(256, |s| s.parse().expect("SEQ"));
    let steps: usize = args.get(3).map_or(3, |s| s.parse().expect("STEPS"));
    let ckpt = Checkpoint::open(&model_path)?;
    let model = Decoder::load(&ckpt, Cpu::new())?;
    let cfg = AdapterConfig { method: Method::Lora, rank: 64, alpha: 16.0, dropout: 0.0 };
    let mut set = AdapterSet::build(&model.backend, &model.spec, 0, |_, _| Some(cfg.clone()))?;
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let tokens: Vec<u32> = (0..batch * seq)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % model.spec.vocab_size as u64) as u32
        })
        .collect();
    let b = Batch { input: Input { batch, seq, tokens: tokens.clone(), mask: vec![1; batch * seq] }, labels: tokens };
    for checkpointing in [false, true] {
        let opts = StepOptions { checkpointing, ..StepOptions::default() };
        let mut rates = Vec::new();
        let mut loss = 0.0;
        for step in 0..=steps {
            set.zero_grads(&model.backend)?;
            let t = Instant::now();
            loss = model.loss_and_backward(&b, &mut set, &opts)?.loss;
            if step > 0 {
                rates.push((batch * seq) as f64 / t.elapsed().as_secs_f64());
            }
        }
        println!(
            "qpeft {} batch={batch} seq={seq} lora r64 all linears ({} trainable) checkpointing={checkpointing}: {:.1} tok/s (loss {loss:.4})",
            Cpu::new().name(),
            set.trainable(),
            median(rates)
        );
    }
    Ok(())
}
