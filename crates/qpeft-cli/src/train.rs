//! `qpeft train`: one run from a TOML config (or `--resume RUN_DIR`), with a progress bar and a summary.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config_args::ConfigArgs;
use clap::Args;
use qpeft::backend::{Backend, Device};
use qpeft::train::config::RunConfig;
use qpeft::train::metrics::Evaluation;
use qpeft::train::run_dir::RunDir;
use qpeft::train::trainer::{load_model, Trainer};

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
    let spinner = indicatif::ProgressBar::new_spinner();
    let (model, tok, _) = load_model(cfg, be, &mut |name| spinner.set_message(format!("quantizing {name}")))?;
    spinner.finish_and_clear();
    let mut trainer = Trainer::new(cfg, &model, &tok, run, args.resume.is_some())?;
    eprintln!(
        "{}: {} ({}), {} trainable parameters, {} training / {} held-out examples, {} steps of {} × {}{}",
        trainer.run.path.display(),
        cfg.model.path.display(),
        cfg.quant.format,
        trainer.set.trainable(),
        trainer.train.len(),
        trainer.eval.len(),
        cfg.train.steps,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        if trainer.state.step > 0 { format!(", resuming after step {}", trainer.state.step) } else { String::new() }
    );
    let bar = indicatif::ProgressBar::new(cfg.train.steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
            .expect("valid template"),
    );
    bar.set_position(trainer.state.step);
    bar.reset_eta();
    let summary = trainer.run(&mut |p| {
        bar.set_position(p.step);
        match &p.message {
            Some(m) => bar.set_message(m.clone()),
            None => bar.set_message(format!("loss {:.4}  {:.0} tok/s", p.loss, p.tokens_per_s)),
        }
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("before: {}", describe(&summary.first));
        println!("after:  {}", describe(&summary.last));
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
