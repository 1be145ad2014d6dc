//! NF4 + double-quantization throughput on the block linears of a real model (not a test).
//!
//!     cargo bench -p qpeft --bench quantize [-- HF_MODEL_DIR]
//!
//! Default model: models/smollm2-hf (the f32 HF copy of SmolLM2 that scripts/test.sh builds). Times
//! `Bnb4::quantize` (block 64, double quant) over every q/k/v/o/gate/up/down weight, weights already in
//! memory; median of 5 passes. scripts/bench/bnb_quantize.py times bitsandbytes' CPU `quantize_4bit` on the
//! same tensors.

use std::time::Instant;

use qpeft::formats::safetensors::SafetensorsStore;
use qpeft::quant::nf4::{Bnb4, FourBit};

fn main() -> qpeft::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let dir = args.first().map(Into::into).unwrap_or_else(|| root.join("models/smollm2-hf"));
    let store = SafetensorsStore::open_dir(&dir)?;
    let mut weights = Vec::new();
    for (name, shape, _) in store.list() {
        if name.contains("_proj.weight") {
            weights.push((store.read_f32(&name)?.expect("listed").data, shape));
        }
    }
    let total: usize = weights.iter().map(|(w, _)| w.len()).sum();
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for (w, shape) in &weights {
            std::hint::black_box(Bnb4::quantize(w, shape, FourBit::Nf4, 64, true)?);
        }
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let t = times[2];
    println!(
        "qpeft NF4+DQ quantize: {} tensors, {total} weights, {:.1} ms, {:.1} M weights/s ({} threads)",
        weights.len(),
        t * 1e3,
        total as f64 / t / 1e6,
        rayon::current_num_threads()
    );
    Ok(())
}
