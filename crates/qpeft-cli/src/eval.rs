//! `qpeft eval`: benchmark tasks (MMLU 5-shot, the seven zero-shot tasks) and held-out loss on a model with an
//! optional adapter; a table on stdout, every item's prediction in the JSON report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use qpeft::backend::{Backend, Device};
use qpeft::eval::suite::{self, TaskReport};
use qpeft::train::base::Adapted;
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
    /// Without --tasks, the tasks are listed with their sizes.
    #[arg(long)]
    tasks: Option<String>,
    /// First N items of each zero-shot task and of the held-out split (default there: the config's
    /// eval.max_samples, as the trainer measures it); first N questions of each MMLU subject.
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
    /// Sequences per forward pass (default 8; for `heldout`, the config's eval.batch_size).
    #[arg(long)]
    batch: Option<usize>,
    /// Run config whose [data] section defines the held-out split (task `heldout`), with edits.
    #[command(flatten)]
    config: ConfigArgs,
    /// Write the report with every item's prediction here (JSON), rewritten as each task finishes.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One line of the summary table: task, items, (metric, value)s, seconds.
type Row = (String, usize, Vec<(&'static str, f64)>, f64);

pub fn run(args: EvalArgs, device: Device, other_base: bool) -> Result<()> {
    crate::device::on_device!(device, be => run_on(args, be, other_base))
}

fn run_on<B: Backend + 'static>(args: EvalArgs, be: B, other_base: bool) -> Result<()> {
    let Some(tasks) = &args.tasks else {
        println!("Tasks in {} (choose with --tasks NAME[,NAME…]; all = every benchmark):", args.data_dir.display());
        for (name, n, what) in suite::sizes(&args.data_dir, &args.split)? {
            println!("  {name:<14} {n:>6} {what}");
        }
        println!("  {:<14} {:>6} the run config's held-out examples (needs --config RUN.toml)", "heldout", "");
        return Ok(());
    };
    let names = suite::parse_tasks(tasks, &["heldout"])?;
    let heldout = names.iter().any(|t| t == "heldout");
    let names: Vec<String> = names.into_iter().filter(|t| t != "heldout").collect();
    if heldout && !args.config.given() {
        bail!("task `heldout` needs --config RUN.toml (its [data] section defines the held-out split)");
    }
    let Adapted { ckpt, model, set, .. } = crate::adapted(be, &args.model, args.adapter.as_deref(), other_base)?;
    let tok = ckpt.tokenizer()?;
    let opts = suite::Options {
        data_dir: args.data_dir.clone(),
        limit: args.limit,
        mmlu_limit: None,
        mmlu_split: args.split.clone(),
        mmlu_max_len: args.max_len,
        batch: args.batch.unwrap_or(8),
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
        // As the trainer measures it: the first eval.max_samples held-out examples in batches of eval.batch_size.
        held.truncate(args.limit.unwrap_or(cfg.eval.max_samples.max(1)));
        let start = Instant::now();
        let (loss, tokens) =
            heldout_loss(&model, set.as_ref(), &tok, &cfg, &held, args.batch.unwrap_or(cfg.eval.batch_size))?;
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
