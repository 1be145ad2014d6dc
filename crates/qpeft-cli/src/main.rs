//! The `qpeft` command line: parses arguments and calls the library.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use qpeft::backend::{Backend, Device};
use qpeft::eval::perplexity::perplexity;
use qpeft::generate::{generate, GenerateOptions};
use qpeft::model::merge::MergedDtype;
use qpeft::tokenizer::Message;
use qpeft::train::base::{load_adapted, merge, Adapted};

mod bench;
mod config_args;
mod device;
mod eval;
mod info;
mod interrupt;
mod params;
mod progress;
mod quantize;
mod study;
mod train;

#[derive(Parser)]
#[command(
    name = "qpeft",
    version,
    about = "Fine-tune 4-bit-quantized LLMs with LoRA-family adapters, and evaluate them"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Where models run: cpu (the CPU's default: cpu:bf16 where it has AMX-BF16 or AVX512-BF16, else cpu:f32;
    /// `generate` defaults to cpu:f32, which reads packed 4-bit blocks token by token), cpu:f32,
    /// cpu:bf16 (bf16 base products on the CPU's AMX tiles or AVX512-BF16 instructions), or
    /// cuda[:N][:f16|:bf16|:f32] (GPU N, default 0; scaled fp16 tensor-core products unless bf16 or f32 is asked
    /// for; `train` defaults to the config's [device]). `train` also takes a comma-separated list of one kind, one
    /// data-parallel rank each: cuda:0,cuda:1 or cuda:all (NCCL), cpu:f32,cpu:f32 (threads of this process).
    #[arg(long, global = true)]
    device: Option<String>,
    /// With --adapter: run the adapter on MODEL even if MODEL is not the base it was trained on (its recorded
    /// fingerprint differs). By default the recorded base is required and rebuilt as trained.
    #[arg(long, global = true)]
    other_base: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, shapes, parameter counts and dtypes of a model (HF directory or .gguf file).
    Info {
        model: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt (greedy unless --temperature > 0).
    Generate {
        model: PathBuf,
        /// An adapter directory (qpeft or PEFT LoRA) applied to the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// System message for --chat (default: the template's own).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Quantize every block linear to 4 bits (NF4/FP4 bitsandbytes layout or GPTQ int4) into an HF directory.
    Quantize(quantize::QuantizeArgs),
    /// Trainable adapter parameters of a run config per module kind and depth, against a baseline.
    Params(params::ParamsArgs),
    /// Mean negative log-likelihood per predicted token and perplexity of a text file.
    Perplexity {
        model: PathBuf,
        file: PathBuf,
        /// An adapter directory, folded into the weights (exact in f32).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Tokens per independently scored window (default: the model's context, at most 2048).
        #[arg(long)]
        window: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmark tasks (MMLU 5-shot) on a model, optionally with an adapter.
    Eval(eval::EvalArgs),
    /// Fine-tune with adapters: one run from a TOML config, resumable.
    Train(train::TrainArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The papers' experiment grids: plan, run and report a study (variants × axes × seeds).
    #[command(subcommand)]
    Study(study::StudyCommand),
    /// Fold an adapter into the model's weights and write a 16-bit HF directory.
    Merge {
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(short, long)]
        out: PathBuf,
        /// bf16, f16 or f32 (non-quantized tensors; all of them unless the model stays int4).
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Write 16-bit linears even for QA-LoRA on a GPTQ base (which otherwise stays int4, merged exactly
        /// into the zero points).
        #[arg(long)]
        to_16bit: bool,
    },
    /// Logits of a text (with an optional adapter) as safetensors `input_ids` [n] and `logits` [n, vocab], for
    /// parity checks against other implementations.
    Logits {
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(short, long)]
        out: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    // The main thread's stack size: the command runs on a pool thread (below).
    let mut pool = rayon::ThreadPoolBuilder::new().stack_size(8 << 20);
    if let Some(n) = cli.threads {
        pool = pool.num_threads(n);
    }
    pool.build_global().expect("thread pool is configured once");
    let devices = match cli.device.as_deref().map(Device::parse_list).transpose() {
        Ok(Some(list)) if list.len() > 1 && !matches!(cli.command, Command::Train(_)) => {
            eprintln!("error: --device: only `train` runs on several devices (data-parallel)");
            std::process::exit(2);
        }
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --device: {e}");
            std::process::exit(2);
        }
    };
    // The command runs on one of the pool's threads: a parallel loop started outside the pool hands its work over
    // and sleeps until it is done (two context switches per loop: ~15% of an evaluation's time on 2 cores went to
    // them); started inside, the calling thread takes its share at once. A study over several devices waits for a
    // thread per device, and a pool thread that waits would hold the only worker of `--threads 1`: it stays outside.
    let result = if cli.command.spawns_workers() {
        run(cli.command, devices, cli.other_base)
    } else {
        rayon::scope(|_| run(cli.command, devices, cli.other_base))
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

impl Command {
    /// Whether the command runs its work on threads of its own (a study over several devices, one per device;
    /// `train`, whose data-parallel ranks may come from its config: it enters the pool itself with one rank).
    fn spawns_workers(&self) -> bool {
        match self {
            Command::Study(cmd) => cmd.spawns_workers(),
            Command::Train(_) => true,
            _ => false,
        }
    }
}

fn run(command: Command, devices: Option<Vec<Device>>, other_base: bool) -> Result<()> {
    let device = devices.as_ref().map(|d| d[0]);
    let on = device.unwrap_or_else(Device::cpu_default);
    match command {
        Command::Info { model, tensors, json } => info::run(&model, tensors, json),
        Command::Quantize(args) => quantize::run(args),
        Command::Params(args) => params::run(args),
        Command::Train(args) => train::run(args, devices),
        Command::Eval(args) => eval::run(args, on, other_base),
        Command::Bench(cmd) => bench::run(cmd, on),
        Command::Study(cmd) => study::run_cmd(cmd),
        Command::Merge { model, adapter, out, dtype, to_16bit } => {
            let dtype: MergedDtype = dtype.parse().context("--dtype")?;
            let (merged, note) = merge(&model, &adapter, other_base, dtype, to_16bit, &out)?;
            eprintln!("{note}");
            let kind = if merged.kept_int4 { "GPTQ int4 with merged fp16 zero points" } else { dtype.torch_name() };
            eprintln!("merged {} ({} parameters) into {} ({kind})", adapter.display(), merged.trainable, out.display());
            Ok(())
        }
        Command::Logits { model, adapter, prompt, out } => {
            device::on_device!(on, be => logits(adapted(be, &model, adapter.as_deref(), other_base)?, &prompt, &out))
        }
        Command::Generate { model, adapter, prompt, chat, system, max_new_tokens, temperature, top_p, seed } => {
            let opts = GenerateOptions { max_new_tokens, temperature, top_p, seed, stop_tokens: Vec::new() };
            // Token by token the products have one row and are bound by memory: f32 through the fused dot products
            // of the packed blocks reads 4-bit weights where the bf16 kernels read bf16 ones (and pack them first).
            // SmolLM2 Q4_1: 75 against 53 tok/s at 181 against 500 MB; Qwen 1.5B Q4_K_M: 7.6 against 6.7 tok/s,
            // 5 against 19 s, 1.2 against 5.5 GB.
            let on = device.unwrap_or(Device::Cpu);
            device::on_device!(on, be => generate_cmd(adapted(be, &model, adapter.as_deref(), other_base)?, prompt, chat, system, opts))
        }
        Command::Perplexity { model, file, adapter, window, json } => {
            device::on_device!(on, be => perplexity_cmd(adapted(be, &model, adapter.as_deref(), other_base)?, &file, window, json))
        }
    }
}

/// `model`, with the adapter in `adapter` (if given) on the base it was trained on; says which base in one line.
pub fn adapted<B: Backend + 'static>(
    be: B,
    model: &Path,
    adapter: Option<&Path>,
    other_base: bool,
) -> Result<Adapted<B>> {
    let a = load_adapted(model, adapter, other_base, be)?;
    if let Some(note) = &a.note {
        eprintln!("{note}");
    }
    Ok(a)
}

fn logits<B: Backend + 'static>(a: Adapted<B>, prompt: &str, out: &Path) -> Result<()> {
    let Adapted { ckpt, model: m, set, .. } = a;
    let ids = ckpt.tokenizer()?.encode(prompt, true)?;
    let mut cache = m.new_cache(1, ids.len())?;
    let hidden = m.forward_with(&qpeft::model::Input::single(&ids), &mut cache, set.as_ref(), &mut |_, _, _| Ok(()))?;
    let logits = m.backend.download(&m.logits(&hidden, ids.len())?)?;
    use qpeft::formats::safetensors::{write_file, OwnedTensor};
    let ints: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let tensors = std::collections::BTreeMap::from([
        ("input_ids".to_string(), OwnedTensor::i32(vec![ids.len()], &ints)),
        ("logits".to_string(), OwnedTensor::f32(vec![ids.len(), m.spec.vocab_size], &logits)),
    ]);
    write_file(out, &tensors)?;
    eprintln!("{} tokens → {}", ids.len(), out.display());
    Ok(())
}

fn generate_cmd<B: Backend + 'static>(
    a: Adapted<B>,
    prompt: String,
    chat: bool,
    system: Option<String>,
    mut opts: GenerateOptions,
) -> Result<()> {
    let Adapted { ckpt, model, set, .. } = a;
    let tok = ckpt.tokenizer()?;
    let text = if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message { role: "system".into(), content: s });
        }
        messages.push(Message { role: "user".into(), content: prompt });
        tok.apply_chat_template(&messages, true)?
    } else {
        prompt
    };
    // A chat template writes its own special tokens; a raw prompt gets the tokenizer's defaults.
    let ids = tok.encode(&text, !chat)?;
    opts.stop_tokens = ckpt.spec.eos_token_ids.clone();
    opts.stop_tokens.extend(tok.eos_token.as_deref().and_then(|t| tok.token_id(t)));
    let mut generated = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    let start = std::time::Instant::now();
    generate(&model, set.as_ref(), &ids, &opts, |t| {
        generated.push(t);
        let text = tok.decode(&generated, true)?;
        // Hold back a trailing partial UTF-8 sequence until it completes.
        if !text.ends_with('\u{FFFD}') {
            let _ = write!(stdout, "{}", &text[printed.min(text.len())..]);
            let _ = stdout.flush();
            printed = text.len();
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated, {:.1} tokens/s]",
        ids.len(),
        generated.len(),
        generated.len() as f64 / secs
    );
    Ok(())
}

fn perplexity_cmd<B: Backend + 'static>(a: Adapted<B>, file: &Path, window: Option<usize>, json: bool) -> Result<()> {
    let Adapted { ckpt, mut model, set, .. } = a;
    let tok = ckpt.tokenizer()?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let ids = tok.encode(&text, true)?;
    let window = window.unwrap_or(ckpt.spec.max_position_embeddings.min(2048));
    if let Some(set) = &set {
        model.merge_adapters(set)?;
    }
    let bar = indicatif::ProgressBar::new(ids.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let p = perplexity(&model, &ids, window, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!(
            "{}: {} tokens, {} predicted in {} window(s): mean NLL {:.6}, perplexity {:.4}",
            file.display(),
            p.tokens,
            p.predicted,
            p.windows,
            p.mean_nll,
            p.perplexity
        );
    }
    Ok(())
}
