//! Full QLoRA training steps of a real model (not a test): NF4 + double-quant base, LoRA r 64, α 16 on all seven
//! linears of every layer; each step is forward with loss, backward, global-norm clipping (0.3) and a 32-bit
//! AdamW update — what `qpeft train` does per optimizer step, and what scripts/bench/peft_train.py does with
//! transformers + peft + bitsandbytes.
//!
//!     cargo bench -p qpeft --bench train_step -- MODEL BATCH SEQ STEPS [--checkpointing]
//!
//! Tokens: random ids (seeded), labels = ids, no padding. Reports the median tokens/s over STEPS steps after
//! one warm-up step and the process's peak resident memory (run one configuration per process).

use std::time::Instant;

use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::model::train::{Batch, StepOptions};
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::quant::model::{Format, QuantizeOptions, WeightDtype};
use qpeft::train::optimizer::{clip_coefficient, grad_norm, AdamW, OptimizerState, StateBits, MIN_8BIT_SIZE};
use qpeft::train::trainer::peak_rss_mib;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> qpeft::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let checkpointing = std::env::args().any(|a| a == "--checkpointing");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model_path = args.first().map(Into::into).unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let batch: usize = args.get(1).map_or(4, |s| s.parse().expect("BATCH"));
    let seq: usize = args.get(2).map_or(256, |s| s.parse().expect("SEQ"));
    let steps: usize = args.get(3).map_or(5, |s| s.parse().expect("STEPS"));
    let ckpt = Checkpoint::open(&model_path)?;
    let mut model = Decoder::load(&ckpt, Cpu::new())?;
    let nf4 = QuantizeOptions { format: Format::Nf4, double_quant: true, block: 64, group: 128, sym: false, icq: false, calibration: None, dtype: WeightDtype::F32 };
    model.quantize_in_place(&nf4, &mut |_| {})?;
    let after_load = peak_rss_mib();
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
    let opts = StepOptions { checkpointing, ..StepOptions::default() };
    let adamw = AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, bits: StateBits::B32, min_8bit_size: MIN_8BIT_SIZE };
    let mut state = OptimizerState::new();
    let be = model.backend;
    let mut rates = Vec::new();
    let mut loss = 0.0;
    for step in 0..=steps {
        let t = Instant::now();
        set.zero_grads(&be)?;
        loss = model.loss_and_backward(&b, &mut set, &opts)?.loss;
        let norm = grad_norm(&be, set.named_params().into_iter().map(|(_, p)| p))?;
        adamw.step(&be, &mut state, set.named_params_mut(), 2e-4, clip_coefficient(norm, 0.3))?;
        if step > 0 {
            rates.push((batch * seq) as f64 / t.elapsed().as_secs_f64());
        }
    }
    println!(
        "qpeft {} nf4 batch={batch} seq={seq} lora r64 all linears ({} trainable) checkpointing={checkpointing}: {:.1} tok/s, peak RSS {:.0} MiB (after load {:.0} MiB), loss {loss:.4}",
        be.name(),
        set.trainable(),
        median(rates),
        peak_rss_mib().unwrap_or(f64::NAN),
        after_load.unwrap_or(f64::NAN)
    );
    Ok(())
}
