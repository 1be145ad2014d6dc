//! `qpeft eval`: benchmark tasks (MMLU 5-shot, the seven zero-shot tasks) and held-out loss on a model with an
//! optional adapter; a table on stdout, every item's prediction in the JSON report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use qpeft::adapters::peft::read_adapter;
use qpeft::backend::{Backend, Device};
use qpeft::eval::suite::{self, TaskReport};
use qpeft::model::{Checkpoint, Decoder};
use qpeft::train::trainer::{heldout_loss, load_data};
use serde_json::json;

use crate::config_args::ConfigArgs;

#[derive(Args)]
pub struct EvalArgs {
    model: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated: mmlu, hellaswag, piqa, winogrande, arc_easy, arc_challenge, boolq, openbookqa, all, and
    /// heldout (the loss and perplexity on the held-out split of the run config given by --config).
    #[arg(long, default_value = "mmlu")]
    tasks: String,
    /// First N items of each zero-shot task and of the held-out split; first N questions of each MMLU subject.
    #[arg(long)]
    limit: Option<usize>,
    /// The datasets folder (mmlu/, hellaswag/, … inside it).
    #[arg(long, default_value = "../shared/datasets")]
    data_dir: PathBuf,
    /// MMLU split: test or val.
    #[arg(long, default_value = "test")]
    split: String,
    /// Longest MMLU prompt in tokens (shots are dropped to fit).
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Run config whose [data] section defines the held-out split (task `heldout`), with edits.
    #[command(flatten)]
    config: ConfigArgs,
    /// Write the report with every item's prediction here (JSON), rewritten as each task finishes.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One line of the summary table: task, items, (metric, value)s, seconds.
type Row = (String, usize, Vec<(&'static str, f64)>, f64);

pub fn run(args: EvalArgs, device: Device) -> Result<()> {
    crate::device::on_device!(device, be => run_on(args, be))
}

fn run_on<B: Backend + 'static>(args: EvalArgs, be: B) -> Result<()> {
    let heldout = args.tasks.split(',').any(|t| t.trim() == "heldout");
    let rest: Vec<&str> = args.tasks.split(',').map(str::trim).filter(|t| *t != "heldout").collect();
    let names = suite::parse_tasks(&rest.join(","))?;
    if heldout && !args.config.given() {
        bail!("task `heldout` needs --config RUN.toml (its [data] section defines the held-out split)");
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let tok = ckpt.tokenizer()?;
    let model = Decoder::load(&ckpt, be)?;
    let set = match &args.adapter {
        Some(d) => Some(read_adapter(d, &model.backend, &model.spec)?.0),
        None => None,
    };
    let opts = suite::Options {
        data_dir: args.data_dir.clone(),
        limit: args.limit,
        mmlu_split: args.split.clone(),
        mmlu_max_len: args.max_len,
        batch: args.batch,
    };
    let mut reports = serde_json::Map::new();
    // The report is rewritten after every task, so that a run stopped (or failing) part-way keeps what finished.
    let save = |reports: &serde_json::Map<String, serde_json::Value>| -> Result<()> {
        if let Some(path) = &args.json {
            qpeft::formats::write_atomic(path, &serde_json::to_vec_pretty(reports)?)?;
        }
        Ok(())
    };
    let mut table: Vec<Row> = Vec::new();
    for name in &names {
        let bar = indicatif::ProgressBar::new(0);
        let unit = if name == "mmlu" { "questions" } else { "choices" };
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{name:<13} {{bar:30}} {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"
            ))
            .expect("valid template"),
        );
        let start = Instant::now();
        let r = suite::run(&model, set.as_ref(), &tok, name, &opts, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        if let TaskReport::Mmlu(m) = &r {
            println!("MMLU {} by category:", m.split);
            for (cat, a) in &m.categories {
                println!("  {cat:<34} {:>6.2}%  ({}/{})", 100.0 * a.value(), a.correct, a.total);
            }
        }
        table.push((name.clone(), r.items(), r.metrics(), secs));
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = json!(secs);
        reports.insert(name.clone(), v);
        save(&reports)?;
    }
    if heldout {
        let cfg = args.config.run_config()?;
        let (_, mut held) =
            load_data(&cfg, &tok).with_context(|| format!("loading the data of {}", cfg.file.display()))?;
        held.truncate(args.limit.unwrap_or(usize::MAX));
        let start = Instant::now();
        let (loss, tokens) = heldout_loss(&model, set.as_ref(), &tok, &cfg, &held, args.batch)?;
        let secs = start.elapsed().as_secs_f64();
        table.push(("heldout".into(), held.len(), vec![("loss", loss), ("perplexity", loss.exp())], secs));
        reports.insert("heldout".into(), json!({"examples": held.len(), "target_tokens": tokens, "loss": loss, "perplexity": loss.exp(), "seconds": secs}));
        save(&reports)?;
    }
    println!("{:<14} {:>6}  {:<40} {:>8}", "task", "items", "metrics", "seconds");
    for (name, n, metrics, secs) in &table {
        let m: Vec<String> = metrics
            .iter()
            .map(|(k, v)| if k.starts_with("acc") { format!("{k} {:.2}%", 100.0 * v) } else { format!("{k} {v:.4}") })
            .collect();
        println!("{name:<14} {n:>6}  {:<40} {secs:>8.1}", m.join("  "));
    }
    Ok(())
}
