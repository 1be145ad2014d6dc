//! `qpeft bench train`: steady-state training throughput of a run config's model, base quantization and adapter
//! on random tokens — real weights, or a built-in shape with seeded random weights (`--arch llama-7b`).

use anyhow::Result;

use crate::config_args::ConfigArgs;
use clap::{Args, Subcommand};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::{Backend, Device};
use qpeft::model::{Checkpoint, Decoder};
use qpeft::train::base::quantize_options;
use qpeft::train::bench::{train_steps, BenchOptions};
use qpeft::train::step::StepRecipe;
use qpeft::train::trainer::resolve_modules;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Full optimizer steps (forward, backward, clipping, AdamW) on a fixed random batch.
    Train(TrainBench),
}

#[derive(Args)]
pub struct TrainBench {
    /// Run config: [quant], [adapter] and the optimizer of [train] (e.g. configs/qlora.toml), with edits.
    #[command(flatten)]
    config: ConfigArgs,
    /// A built-in shape with seeded random weights instead of the config's model: llama-7b, llama-13b, llama2-7b,
    /// llama2-13b, llama3-8b, gemma-2b, gemma-7b, smollm2-135m, qwen2.5-1.5b.
    #[arg(long)]
    arch: Option<String>,
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand, device: Device) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => crate::device::on_device!(device, be => train_on(&args, be)),
    }
}

fn train_on<B: Backend + 'static>(args: &TrainBench, be: B) -> Result<()> {
    let mut config = args.config.clone();
    if let Some(arch) = &args.arch {
        config.sets.push(format!("model.path=\"random:{arch}\""));
    }
    let cfg = config.run_config()?;
    let ckpt = Checkpoint::open(&cfg.model.path)?;
    let start = std::time::Instant::now();
    let model = Decoder::load_quantized(&ckpt, be, quantize_options(&cfg, &ckpt)?.as_ref(), &mut |_, _| {})?;
    let modules = resolve_modules(&cfg, &model)?;
    let mut set =
        AdapterSet::build(&model.backend, &model.spec, cfg.train.seed, |l, p| modules[l][p as usize].clone())?;
    let load_s = start.elapsed().as_secs_f64();
    let t = &cfg.train;
    let opts = BenchOptions {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        recipe: StepRecipe::from_config(&cfg),
    };
    let r = train_steps(&model, &mut set, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} on {}: {} {} base, {} trainable, batch {} × {} tokens, checkpointing {} (loaded in {load_s:.0} s)",
            ckpt.path.display(),
            r.device,
            cfg.quant.format,
            if cfg.quant.double_quant { "+ double quant" } else { "" },
            r.trainable,
            r.batch,
            r.seq,
            t.checkpointing
        );
        println!(
            "{:.1} tokens/s; step {:.3} s = forward+backward {:.3} s + clip/optimizer {:.3} s; loss {:.4}; peak device memory {} allocated ({} before the first step), {} reserved; peak RSS {}",
            r.tokens_per_s,
            r.step_s,
            r.forward_backward_s,
            r.optimizer_s,
            r.loss,
            r.peak_allocated_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
            r.loaded_allocated_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
            r.peak_reserved_mib.map_or("-".into(), |m| format!("{m:.0} MiB")),
            r.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0} MiB"))
        );
        for k in &r.kernels {
            println!(
                "  {:<40} {:>7} calls {:>10.2} ms per step",
                k.name,
                k.calls / args.steps.max(1),
                k.ms / args.steps.max(1) as f64
            );
        }
    }
    Ok(())
}
