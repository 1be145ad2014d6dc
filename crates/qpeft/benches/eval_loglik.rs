//! Zero-shot log-likelihood scoring throughput (not a test): the first N items of a task from ../shared/datasets,
//! scored as `qpeft eval` scores them (contexts shared across a question's choices, right-padded batches).
//!
//!     cargo bench -p qpeft --bench eval_loglik -- MODEL TASK N BATCH
//!
//! Scored tokens = Σ over requests of |context| + |continuation| tokens, the work of one pass per choice (what
//! scripts/bench/eval_peer.py measures with transformers on the same requests); computed tokens are what
//! qpeft ran after sharing contexts.

use std::time::Instant;

use qpeft::backend::cpu::Cpu;
use qpeft::eval::tasks::Task;
use qpeft::eval::zero_shot;
use qpeft::model::{Checkpoint, Decoder};

fn main() -> qpeft::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model_path =
        args.first().map(Into::into).unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let task = args
        .get(1)
        .map_or(Some(Task::ArcEasy), |s| Task::parse(s))
        .expect("TASK: hellaswag, piqa, winogrande, arc_easy, arc_challenge, boolq or openbookqa");
    let n: usize = args.get(2).map_or(200, |s| s.parse().expect("N"));
    let batch: usize = args.get(3).map_or(8, |s| s.parse().expect("BATCH"));
    let ckpt = Checkpoint::open(&model_path)?;
    let tok = ckpt.tokenizer()?;
    let model = Decoder::load(&ckpt, Cpu::new())?;
    let mut items = task.load(&root.join("../shared/datasets"))?;
    items.truncate(n);
    let reqs = zero_shot::requests(&tok, &items)?;
    // Distinct (context minus its last token) prefixes run once; every request runs its suffix.
    let mut prefixes = std::collections::HashSet::new();
    let mut computed = 0;
    for r in &reqs {
        if prefixes.insert(&r.context[..r.context.len() - 1]) {
            computed += r.context.len() - 1;
        }
        computed += r.continuation.len();
    }
    let start = Instant::now();
    let report = zero_shot::evaluate(&model, None, &tok, task, &items, batch, |_| Ok(()))?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} items {} requests {}: {:.1} s, {:.0} scored tokens/s ({} scored, {} computed after sharing contexts), acc {:.4}",
        task.name(),
        items.len(),
        reqs.len(),
        secs,
        report.scored_tokens as f64 / secs,
        report.scored_tokens,
        computed,
        report.acc
    );
    Ok(())
}
