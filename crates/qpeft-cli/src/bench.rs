//! `qpeft bench train`: steady-state training throughput of a run config's model, base quantization and adapter
//! on random tokens — real weights, or a built-in shape with seeded random weights (`--arch llama-7b`).

use anyhow::{Context, Result};

use crate::config_args::ConfigArgs;
use clap::{Args, Subcommand};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::{Backend, Device};
use qpeft::data::collate::{pack, pad, Tokenized};
use qpeft::model::train::{Batch, IGNORE};
use qpeft::model::{Checkpoint, Decoder};
use qpeft::train::base::quantize_options;
use qpeft::train::bench::{train_steps, BenchOptions};
use qpeft::train::step::StepRecipe;
use qpeft::train::trainer::{first_micro_batches, resolve_modules};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Full optimizer steps (forward, backward, clipping, AdamW) on a fixed random batch, or on real batches
    /// (`--batches`).
    Train(TrainBench),
    /// Writes the first micro-batches a run trains on (its [data], tokenizer and order; batch_size examples each) as
    /// JSON lines {"ids", "labels"} (labels −100 where ignored), one example per line, for `bench train --batches`
    /// and the peer scripts.
    Batches(BatchesArgs),
}

#[derive(Args)]
pub struct BatchesArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Micro-batches to write.
    #[arg(long, default_value_t = 32)]
    micro_batches: usize,
    #[arg(short, long)]
    out: std::path::PathBuf,
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
    /// Real micro-batches (from `bench batches`) instead of random tokens: train.batch_size examples per step, in
    /// turn, padded — or packed into one row with data.packing = true; tokens/s then counts real tokens.
    #[arg(long)]
    batches: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand, device: Device) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => crate::device::on_device!(device, be => train_on(&args, be)),
        BenchCommand::Batches(args) => write_batches(&args),
    }
}

fn write_batches(args: &BatchesArgs) -> Result<()> {
    if args.out.exists() {
        anyhow::bail!("{} exists: remove it or choose another -o", args.out.display());
    }
    let cfg = args.config.run_config()?;
    let tok = Checkpoint::open(&cfg.model.path)?.tokenizer()?;
    let micro = first_micro_batches(&cfg, &tok, args.micro_batches)?;
    let label = |l: u32| if l == IGNORE { -100 } else { l as i64 };
    let mut text = String::new();
    for t in micro.iter().flatten() {
        let labels: Vec<i64> = t.labels.iter().map(|&l| label(l)).collect();
        text += &serde_json::json!({ "ids": t.ids, "labels": labels }).to_string();
        text.push('\n');
    }
    qpeft::formats::write_atomic(&args.out, text.as_bytes())?;
    let tokens: usize = micro.iter().flatten().map(|t| t.ids.len()).sum();
    eprintln!(
        "{} micro-batches of {} examples ({tokens} tokens) into {}",
        micro.len(),
        cfg.train.batch_size,
        args.out.display()
    );
    Ok(())
}

/// The micro-batches of a `bench batches` file: `batch` examples each, padded (pad id 0) or packed.
fn read_batches(path: &std::path::Path, batch: usize, packing: bool) -> Result<Vec<Batch>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| anyhow::anyhow!("{}:{}: {what}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let ints = |key: &str| -> Result<Vec<i64>> {
            v[key]
                .as_array()
                .ok_or_else(|| bad(&format!("no `{key}` list")))?
                .iter()
                .map(|x| x.as_i64().ok_or_else(|| bad(&format!("`{key}` holds {x}, not an integer"))))
                .collect()
        };
        let (ids, labels) = (ints("ids")?, ints("labels")?);
        if ids.len() != labels.len() || ids.is_empty() || ids.iter().any(|&t| t < 0 || t > u32::MAX as i64) {
            return Err(bad("`ids` must be non-empty token ids with as many `labels`"));
        }
        let labels = labels.iter().map(|&l| if l < 0 { IGNORE } else { l as u32 }).collect();
        items.push(Tokenized { ids: ids.iter().map(|&t| t as u32).collect(), labels });
    }
    if items.is_empty() {
        anyhow::bail!("{}: no examples", path.display());
    }
    Ok(items
        .chunks(batch.max(1))
        .map(|c| {
            let refs: Vec<&Tokenized> = c.iter().collect();
            if packing {
                pack(&refs)
            } else {
                pad(&refs, 0)
            }
        })
        .collect())
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
    let batches = match &args.batches {
        Some(path) => read_batches(path, t.batch_size, cfg.data.packing)?,
        None => Vec::new(),
    };
    if let Some(b) = batches.iter().flat_map(|b| &b.input.tokens).find(|&&id| id as usize >= model.spec.vocab_size) {
        anyhow::bail!("--batches: token id {b} is outside the model's vocabulary of {}", model.spec.vocab_size);
    }
    let opts = BenchOptions {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        warmup: args.warmup,
        recipe: StepRecipe::from_config(&cfg),
        batches,
    };
    let r = train_steps(&model, &mut set, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let shape = match &args.batches {
            Some(path) => format!(
                "real batches of {} from {} ({})",
                t.batch_size,
                path.display(),
                if cfg.data.packing { "packed" } else { "padded" }
            ),
            None => format!("batch {} × {} tokens", r.batch, r.seq),
        };
        println!(
            "{} on {}: {} {} base, {} trainable, {shape}, checkpointing {}{} (loaded in {load_s:.0} s)",
            ckpt.path.display(),
            r.device,
            cfg.quant.format,
            if cfg.quant.double_quant { "+ double quant" } else { "" },
            r.trainable,
            t.checkpointing.name(),
            if t.checkpointing.name() == r.checkpointing { String::new() } else { format!(": {}", r.checkpointing) }
        );
        println!(
            "{:.1} tokens/s ({:.1} loss targets/s); step {:.3} s = forward+backward {:.3} s + clip/optimizer {:.3} s; loss {:.4}; peak device memory {} allocated ({} before the first step), {} reserved; peak RSS {}",
            r.tokens_per_s,
            r.target_tokens_per_s,
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
