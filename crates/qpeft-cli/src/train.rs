//! `qpeft train`: one run from a TOML config (or `--resume RUN_DIR`), with a progress bar and a summary.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config_args::ConfigArgs;
use crate::progress::Display;
use clap::Args;
use qpeft::backend::{Backend, Device};
use qpeft::train::base::{describe as describe_recipe, load_model, quantize_options};
use qpeft::train::config::RunConfig;
use qpeft::train::metrics::Evaluation;
use qpeft::train::run_dir::RunDir;
use qpeft::train::trainer::{Progress, Trainer};

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue the run in RUN_DIR from its newest checkpoint (its config.toml, plus any --set / --unset).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Replace an existing run directory (only one qpeft created).
    #[arg(long)]
    overwrite: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn describe(e: &Option<Evaluation>) -> String {
    match e {
        None => "-".into(),
        Some(e) => {
            let mut s = format!("held-out loss {:.4} ({} tokens)", e.eval_loss, e.eval_tokens);
            if let Some((c, n)) = e.exact_match_counts() {
                s += &format!(", exact match {c}/{n} = {:.1}%", 100.0 * c as f64 / n.max(1) as f64);
            }
            for (name, v) in &e.tasks {
                s += &format!(", {name} {:.2}%", 100.0 * v);
            }
            s
        }
    }
}

pub fn run(args: TrainArgs, device: Option<Device>) -> Result<()> {
    let (cfg, run) = match &args.resume {
        Some(_) if args.config.given() => bail!("--resume takes the run's own config.toml; give no --config"),
        Some(dir) => {
            let (run, cfg) = RunDir::resume(dir, &args.config.edits())?;
            (cfg, run)
        }
        None => {
            let cfg = args.config.run_config()?;
            let run = RunDir::start(&cfg, args.overwrite)?;
            (cfg, run)
        }
    };
    let device = match device {
        Some(d) => d,
        None => cfg.device.name.parse()?,
    };
    crate::device::on_device!(device, be => train_on(&args, &cfg, run, be))
}

fn train_on<B: Backend + 'static>(args: &TrainArgs, cfg: &RunConfig, run: RunDir, be: B) -> Result<()> {
    let mut display = Display::new();
    let (model, tok, ckpt) =
        load_model(cfg, be, &mut |done, total| display.update("loading blocks", done as u64, total as u64, ""))?;
    display.finish();
    let base = match quantize_options(cfg, &ckpt)? {
        Some(o) => format!("{} {}", cfg.model.path.display(), describe_recipe(&o)),
        None => format!("{} as stored (quant.format = none)", cfg.model.path.display()),
    };
    let mut trainer = Trainer::new(cfg, &model, &tok, run, args.resume.is_some())?;
    display.say(&format!(
        "{}: base {base}; {} trainable parameters, {} training / {} held-out examples, {} steps of {} × {}{}",
        trainer.run.path.display(),
        trainer.set.trainable(),
        trainer.train.len(),
        trainer.eval.len(),
        cfg.train.steps,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        if trainer.state.step > 0 { format!(", resuming after step {}", trainer.state.step) } else { String::new() }
    ));
    // SIGINT / SIGTERM: the step in flight finishes and is checkpointed; a second signal ends the process at once.
    let interrupt = crate::interrupt::Interrupt::install("finishing the current step and saving a checkpoint")?;
    let summary = trainer.run(
        &mut |p| match p {
            Progress::Evaluating { step, what, done, total } => {
                display.update(&format!("evaluating at step {step}: {what}"), *done as u64, *total as u64, "")
            }
            Progress::Step { step, steps, loss, tokens_per_s } => {
                display.update("training steps", *step, *steps, &format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"))
            }
        },
        &interrupt.stop,
    )?;
    display.finish();
    if summary.interrupted {
        if summary.steps == 0 {
            eprintln!("stopped before the first step; nothing to resume");
        } else {
            eprintln!(
                "stopped after step {} of {}; the checkpoint of that step is saved. Continue with:\n  qpeft train --resume {}",
                summary.steps,
                cfg.train.steps,
                summary.run_dir.display()
            );
        }
        std::process::exit(interrupt.exit_code());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("before: {}", describe(&summary.first));
        println!("after:  {}", describe(&summary.last));
        println!("(both on the base {base})");
        println!(
            "{} steps, {:.1} tokens/s (steady state), peak RSS {}, {:.0} s; adapter in {}",
            summary.steps,
            summary.tokens_per_s,
            summary.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
            summary.seconds,
            summary.run_dir.join("adapter").display()
        );
    }
    Ok(())
}
