//! `qpeft train`: one run from a TOML config (or `--resume RUN_DIR`), with a progress bar and a summary.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::config_args::ConfigArgs;
use crate::progress::Display;
use clap::Args;
use qpeft::backend::collective::{Collective, Tcp, Threads};
use qpeft::backend::{Backend, Device};
use qpeft::model::{Checkpoint, Decoder};
use qpeft::tokenizer::Tokenizer;
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

/// One rank of a torchrun-style launch: the process's RANK of WORLD_SIZE (> 1), the GPU LOCAL_RANK (default: RANK)
/// and rank 0's MASTER_ADDR:MASTER_PORT (defaults 127.0.0.1 and 29500, torchrun's).
struct Launch {
    rank: usize,
    world: usize,
    local_rank: usize,
    addr: String,
}

impl Launch {
    fn from_env() -> Result<Option<Launch>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str, v: String| v.parse::<usize>().with_context(|| format!("{k}={v} is not a number"));
        let Some(world) = var("WORLD_SIZE").map(|v| num("WORLD_SIZE", v)).transpose()?.filter(|&w| w > 1) else {
            return Ok(None);
        };
        let rank = num("RANK", var("RANK").context("WORLD_SIZE is set but RANK is not")?)?;
        let local_rank = var("LOCAL_RANK").map(|v| num("LOCAL_RANK", v)).transpose()?.unwrap_or(rank);
        let addr = format!(
            "{}:{}",
            var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            var("MASTER_PORT").unwrap_or_else(|| "29500".into())
        );
        Ok(Some(Launch { rank, world, local_rank, addr }))
    }
}

/// The config and run directory of the process that writes the run: a new run from --config, or --resume's.
fn writer_run(args: &TrainArgs) -> Result<(RunConfig, RunDir)> {
    match &args.resume {
        Some(_) if args.config.given() => bail!("--resume takes the run's own config.toml; give no --config"),
        Some(dir) => {
            let (run, cfg) = RunDir::resume(dir, &args.config.edits())?;
            Ok((cfg, run))
        }
        None => {
            let cfg = args.config.run_config()?;
            let run = RunDir::start(&cfg, args.overwrite)?;
            Ok((cfg, run))
        }
    }
}

pub fn run(args: TrainArgs, devices: Option<Vec<Device>>) -> Result<()> {
    if let Some(launch) = Launch::from_env()? {
        return train_launched(&args, devices, launch);
    }
    let (cfg, run) = writer_run(&args)?;
    let devices = match devices {
        Some(d) => d,
        None => Device::parse_list(&cfg.device.name)?,
    };
    match devices[..] {
        // One rank: the work runs on a pool thread (see main).
        [device] => rayon::scope(|_| crate::device::on_device!(device, be => train_on(&args, &cfg, run, be))),
        [Device::Cpu | Device::CpuBf16, ..] => {
            crate::device::on_device!(devices[0], be => train_threads(&args, &cfg, run, be, devices.len()))
        }
        _ => train_gpus(&args, &cfg, run, &devices),
    }
}

fn train_on<B: Backend + 'static>(args: &TrainArgs, cfg: &RunConfig, run: RunDir, be: B) -> Result<()> {
    let mut display = Display::new();
    let (model, tok, ckpt) =
        load_model(cfg, be, &mut |done, total| display.update("loading blocks", done as u64, total as u64, ""))?;
    display.finish();
    let trainer = Trainer::new(cfg, &model, &tok, run, args.resume.is_some())?;
    report(args, cfg, &ckpt, trainer, 1)
}

/// `world` data-parallel ranks as threads of this process, sharing one model (its weights are only read).
fn train_threads<B: Backend + 'static>(
    args: &TrainArgs,
    cfg: &RunConfig,
    run: RunDir,
    be: B,
    world: usize,
) -> Result<()> {
    let mut display = Display::new();
    let (model, tok, ckpt) =
        load_model(cfg, be, &mut |done, total| display.update("loading blocks", done as u64, total as u64, ""))?;
    display.finish();
    on_rank_threads(run, Threads::group(world), |comm, dir| {
        run_rank(args, cfg, (&model, &tok, &ckpt), dir, world, false, &comm)?;
        Collective::<B>::finish(&comm);
        Ok(())
    })
}

/// Runs `body` on a thread per rank, each with its item of `ranks` (rank i takes item i) and its run directory: rank
/// 0 the run it started or resumed, the others the same run opened to read. The outcome is the first error that is not
/// another rank's stop (which only echoes it), else any error.
fn on_rank_threads<T: Send>(run: RunDir, ranks: Vec<T>, body: impl Fn(T, RunDir) -> Result<()> + Sync) -> Result<()> {
    let path = run.path.clone();
    let mut run = Some(run);
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|item| {
                let (dir, path, body) = (run.take(), &path, &body);
                s.spawn(move || {
                    let dir = match dir {
                        Some(d) => d,
                        None => RunDir::open(path)?,
                    };
                    body(item, dir)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    });
    let echo = |e: &anyhow::Error| e.to_string().contains("data-parallel rank");
    let mut errors: Vec<anyhow::Error> = results.into_iter().filter_map(|r| r.err()).collect();
    match errors.iter().position(|e| !echo(e)) {
        Some(i) => Err(errors.swap_remove(i)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// This process as one rank of a torchrun-style launch. Rank 0 starts (or resumes) the run directory and then listens
/// for the others, which open it once they have joined; the ranks sum through `Tcp` (on the CPU) or NCCL with rank 0's
/// group id sent over it (on GPUs: cuda:LOCAL_RANK, in the precision --device or [device] names).
fn train_launched(args: &TrainArgs, devices: Option<Vec<Device>>, launch: Launch) -> Result<()> {
    let Launch { rank, world, local_rank, addr } = launch;
    let (cfg, run, tcp) = if rank == 0 {
        let (cfg, run) = writer_run(args)?;
        let tcp = Tcp::join(rank, world, &addr)?;
        (cfg, run, tcp)
    } else {
        let tcp = Tcp::join(rank, world, &addr)?;
        let (cfg, path) = match &args.resume {
            Some(dir) => (RunConfig::compose(&[dir.join("config.toml")], &args.config.edits())?, dir.clone()),
            None => {
                let cfg = args.config.run_config()?;
                let path = cfg.train.out_dir.clone();
                (cfg, path)
            }
        };
        (cfg, RunDir::open(&path)?, tcp)
    };
    let device = match devices {
        Some(d) => d[0],
        None => Device::parse_list(&cfg.device.name)?[0],
    };
    let body = || -> Result<()> {
        match device {
            Device::Cuda(_, precision) => launched_gpu(args, &cfg, run, local_rank, precision, tcp),
            _ => crate::device::on_device!(device, be => {
                let (model, tok, ckpt) = load_model(&cfg, be, &mut |_, _| {})?;
                run_rank(args, &cfg, (&model, &tok, &ckpt), run, world, true, &tcp)
            }),
        }
    };
    rayon::scope(|_| body())
}

#[cfg(feature = "cuda")]
fn launched_gpu(
    args: &TrainArgs,
    cfg: &RunConfig,
    run: RunDir,
    local_rank: usize,
    precision: qpeft::backend::Precision,
    tcp: Tcp,
) -> Result<()> {
    use qpeft::backend::cuda::nccl::{GroupId, Nccl};
    use qpeft::backend::cuda::Cuda;
    let world = Collective::<Cuda>::world(&tcp);
    let mut id = if Collective::<Cuda>::rank(&tcp) == 0 { Nccl::id()?.to_bytes() } else { [0u8; 128] };
    tcp.broadcast(&mut id)?;
    let be = Cuda::new(local_rank, precision)?;
    let comm = Nccl::join(&be, Box::new(tcp), GroupId::from_bytes(id))?;
    let (model, tok, ckpt) = load_model(cfg, be, &mut |_, _| {})?;
    run_rank(args, cfg, (&model, &tok, &ckpt), run, world, true, &comm)?;
    comm.finish();
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn launched_gpu(_: &TrainArgs, _: &RunConfig, _: RunDir, _: usize, _: qpeft::backend::Precision, _: Tcp) -> Result<()> {
    bail!("this qpeft was built without CUDA support: rebuild with `cargo build --release --features cuda`")
}

/// One data-parallel rank per GPU, each a thread of this process with its own backend and model, summing gradients
/// through NCCL.
#[cfg(feature = "cuda")]
fn train_gpus(args: &TrainArgs, cfg: &RunConfig, run: RunDir, devices: &[Device]) -> Result<()> {
    use qpeft::backend::cuda::nccl::Nccl;
    use qpeft::backend::cuda::Cuda;
    let world = devices.len();
    let id = Nccl::id()?;
    let ranks: Vec<(Device, Threads)> = devices.iter().copied().zip(Threads::group(world)).collect();
    on_rank_threads(run, ranks, |(device, host), dir| {
        let Device::Cuda(ordinal, precision) = device else { unreachable!("a list of GPUs") };
        let be = Cuda::new(ordinal, precision)?;
        let comm = Nccl::join(&be, Box::new(host), id)?;
        let (model, tok, ckpt) = load_model(cfg, be, &mut |_, _| {})?;
        run_rank(args, cfg, (&model, &tok, &ckpt), dir, world, false, &comm)?;
        comm.finish();
        Ok(())
    })
}

#[cfg(not(feature = "cuda"))]
fn train_gpus(_: &TrainArgs, _: &RunConfig, _: RunDir, _: &[Device]) -> Result<()> {
    bail!("this qpeft was built without CUDA support: rebuild with `cargo build --release --features cuda`")
}

/// One data-parallel rank: rank 0 writes `dir` (the run it started or resumed) and reports; the others read its
/// checkpoint and train their share. `own_process`: a rank launched as a process of its own hears its signals.
fn run_rank<B: Backend + 'static>(
    args: &TrainArgs,
    cfg: &RunConfig,
    (model, tok, ckpt): (&Decoder<B>, &Tokenizer, &Checkpoint),
    dir: RunDir,
    world: usize,
    own_process: bool,
    comm: &dyn Collective<B>,
) -> Result<()> {
    let mut trainer = Trainer::for_rank(cfg, model, tok, dir, args.resume.is_some(), comm)?;
    if comm.rank() == 0 {
        return report(args, cfg, ckpt, trainer, world);
    }
    if !own_process {
        // Rank 0 hears this process's signals and tells the others at the next step (`Collective::any`).
        trainer.run(&mut |_| {}, &std::sync::atomic::AtomicBool::new(false))?;
        return Ok(());
    }
    // A rank of its own process hears its signals too: every rank stops after the same step.
    let interrupt = crate::interrupt::Interrupt::install("finishing the current step (rank 0 saves the checkpoint)")?;
    if trainer.run(&mut |_| {}, &interrupt.stop)?.interrupted {
        std::process::exit(interrupt.exit_code());
    }
    Ok(())
}

/// Rank 0's trainer: the run's description, progress bars, the signal handling, and the summary.
fn report<B: Backend + 'static>(
    args: &TrainArgs,
    cfg: &RunConfig,
    ckpt: &Checkpoint,
    mut trainer: Trainer<'_, B>,
    world: usize,
) -> Result<()> {
    let mut display = Display::new();
    let base = match quantize_options(cfg, ckpt)? {
        Some(o) => format!("{} {}", cfg.model.path.display(), describe_recipe(&o)),
        None => format!("{} as stored (quant.format = none)", cfg.model.path.display()),
    };
    display.say(&format!(
        "{}: base {base}; {} trainable parameters, {} training / {} held-out examples, {} steps of {} × {}{}{}",
        trainer.run.path.display(),
        trainer.set.trainable(),
        trainer.train.len(),
        trainer.eval.len(),
        cfg.train.steps,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        if world > 1 { format!(" × {world} ranks") } else { String::new() },
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
