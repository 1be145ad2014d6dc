//! `qpeft eval`: benchmark tasks (MMLU 5-shot, the seven zero-shot tasks) and held-out loss on a model with an
//! optional adapter; a table on stdout, every item's prediction in the JSON report. The report is rewritten as each
//! task finishes and records the settings it ran with, so a run stopped part-way (SIGINT, SIGTERM, a crash) and
//! started again with the same command keeps the finished tasks and runs the rest.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use qpeft::backend::{Backend, Device};
use qpeft::eval::suite::{self, TaskReport};
use qpeft::train::base::{describe, quantize_options, Adapted};
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
    /// Write the report with every item's prediction here (JSON), rewritten as each task finishes. If the file
    /// exists from an earlier run with the same settings, its finished tasks are kept and not run again.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One line of the summary table: task, items, (metric, value)s, seconds.
type Row = (String, usize, Vec<(&'static str, f64)>, f64);

pub fn run(args: EvalArgs, device: Device, other_base: bool) -> Result<()> {
    crate::device::on_device!(device, be => run_on(args, be, device, other_base))
}

/// What a task's result depends on besides the task: kept in the report, and compared when a report is resumed.
fn settings(args: &EvalArgs, device: Device) -> serde_json::Value {
    json!({
        "model": args.model, "adapter": args.adapter, "device": device.to_string(), "limit": args.limit,
        "data_dir": args.data_dir, "split": args.split, "max_len": args.max_len, "batch": args.batch,
    })
}

/// The finished tasks of an earlier report at `path` made with `ours` settings; an error if it holds results made
/// with other settings (they are the user's: never overwritten without asking).
fn finished(path: &std::path::Path, ours: &serde_json::Value) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let reports: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{} is not a qpeft eval report", path.display()))?;
    for (task, r) in &reports {
        let theirs = r.get("settings").unwrap_or(&serde_json::Value::Null);
        if theirs != ours {
            bail!(
                "{} holds a result of `{task}` made with other settings ({theirs}; now {ours}): give another --json, \
                 or remove it to start over",
                path.display()
            );
        }
    }
    Ok(reports)
}

fn run_on<B: Backend + 'static>(args: EvalArgs, be: B, device: Device, other_base: bool) -> Result<()> {
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
    let (ckpt, model, set) = match (&args.adapter, args.config.given()) {
        // Without an adapter, a run config's [quant] says what base its runs train on: evaluate that base (as the
        // trainer's evaluation before training does), not the file as stored.
        (None, true) => {
            let cfg = args.config.run_config()?;
            let ckpt = qpeft::model::Checkpoint::open(&args.model)?;
            let opts = quantize_options(&cfg, &ckpt)?;
            if let Some(o) = &opts {
                eprintln!("base: {} {}, as {}'s [quant] says", args.model.display(), describe(o), cfg.file.display());
            }
            let model = qpeft::model::Decoder::load_quantized(&ckpt, be, opts.as_ref(), &mut |_, _| ())?;
            (ckpt, model, None)
        }
        _ => {
            let Adapted { ckpt, model, set, .. } =
                crate::adapted(be, &args.model, args.adapter.as_deref(), other_base)?;
            (ckpt, model, set)
        }
    };
    let tok = ckpt.tokenizer()?;
    let opts = suite::Options {
        data_dir: args.data_dir.clone(),
        limit: args.limit,
        mmlu_limit: None,
        mmlu_split: args.split.clone(),
        mmlu_max_len: args.max_len,
        batch: args.batch.unwrap_or(8),
    };
    let ours = settings(&args, device);
    let mut reports = match &args.json {
        Some(path) => finished(path, &ours)?,
        None => Default::default(),
    };
    let interrupt = crate::interrupt::Interrupt::install("stopping the task in flight; finished tasks are kept")?;
    let stopped = |task: &str| -> ! {
        match &args.json {
            Some(path) => eprintln!(
                "stopped during {task}; the finished tasks are in {}: the same command continues with the rest",
                path.display()
            ),
            None => eprintln!("stopped during {task} (with --json OUT, the finished tasks are kept for a rerun)"),
        }
        std::process::exit(interrupt.exit_code())
    };
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
        if let Some(r) = reports.get(name) {
            let r: TaskReport = serde_json::from_value(r.clone())
                .with_context(|| format!("the report of `{name}` in {}", args.json.as_ref().unwrap().display()))?;
            let secs = reports[name]["seconds"].as_f64().unwrap_or(0.0);
            eprintln!("{name}: finished in an earlier run (kept from the report)");
            table.push((name.clone(), r.items(), r.metrics(), secs));
            continue;
        }
        let start = Instant::now();
        let r = suite::run(&model, set.as_ref(), &tok, name, &opts, |done, total| {
            if interrupt.stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(qpeft::Error::Interrupted);
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            Ok(())
        });
        bar.finish_and_clear();
        let r = match r {
            Err(qpeft::Error::Interrupted) => stopped(name),
            r => r?,
        };
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
        v["settings"] = ours.clone();
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
        reports.insert("heldout".into(), json!({"examples": held.len(), "target_tokens": tokens, "loss": loss, "perplexity": loss.exp(), "seconds": secs, "settings": ours}));
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
