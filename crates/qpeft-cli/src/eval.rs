//! `qpeft eval`: benchmark tasks on a model (with an optional adapter); a table on stdout, per-item results
//! in the JSON report. MMLU is in; the zero-shot tasks are being added (issue 7).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use qpeft::backend::cpu::Cpu;
use qpeft::eval::mmlu;
use qpeft::formats::peft::read_adapter;
use qpeft::model::{Checkpoint, Decoder};

#[derive(Args)]
pub struct EvalArgs {
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated tasks: mmlu.
    #[arg(long, default_value = "mmlu")]
    tasks: String,
    /// First N items per MMLU subject.
    #[arg(long)]
    limit: Option<usize>,
    /// The datasets folder (mmlu/ inside it).
    #[arg(long, default_value = "../shared/datasets")]
    data_dir: PathBuf,
    /// MMLU split: test or val.
    #[arg(long, default_value = "test")]
    split: String,
    /// Longest prompt in tokens (shots are dropped to fit).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Write the report with every item's prediction here (JSON).
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let tok = ckpt.tokenizer()?;
    let model = Decoder::load(&ckpt, Cpu::new())?;
    let set = match &args.adapter {
        Some(d) => Some(read_adapter(d, &model.backend, &model.spec)?.0),
        None => None,
    };
    let mut reports = serde_json::Map::new();
    for task in args.tasks.split(',').map(str::trim) {
        match task {
            "mmlu" => {
                let opts = mmlu::Options { split: args.split.clone(), limit: args.limit, shots: 5, max_len: args.max_len, batch: args.batch };
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(indicatif::ProgressStyle::with_template("mmlu {bar:30} {pos}/{len} questions {per_sec} eta {eta}").expect("valid template"));
                let start = std::time::Instant::now();
                let r = mmlu::evaluate(&model, set.as_ref(), &tok, &args.data_dir.join("mmlu"), &opts, |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })?;
                bar.finish_and_clear();
                println!("MMLU {} ({} questions, {:.0} s)", r.split, r.items.len(), start.elapsed().as_secs_f64());
                for (name, a) in &r.categories {
                    println!("  {name:<34} {:>6.2}%  ({}/{})", 100.0 * a.value(), a.correct, a.total);
                }
                println!("  {:<34} {:>6.2}%", "overall (micro, over questions)", 100.0 * r.micro);
                println!("  {:<34} {:>6.2}%", "overall (macro, over subjects)", 100.0 * r.macro_avg);
                reports.insert("mmlu".into(), serde_json::to_value(&r)?);
            }
            other => bail!("task `{other}` is not available yet (available: mmlu)"),
        }
    }
    if let Some(path) = &args.json {
        qpeft::formats::write_atomic(path, &serde_json::to_vec_pretty(&serde_json::Value::Object(reports))?)?;
    }
    Ok(())
}
