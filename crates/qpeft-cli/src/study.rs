//! `qpeft study plan|run|report`: the papers' experiment grids (variants × axes × seeds) as one command.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use qpeft::backend::Device;
use qpeft::plan::Counts;
use qpeft::study::run::{cell_state, run, CellState, Shard, StudyProgress};
use qpeft::study::{report, Study};
use qpeft::train::trainer::Progress;

use crate::progress::Display;

#[derive(Subcommand)]
pub enum StudyCommand {
    /// Every cell with its trainable parameters (total, attention, MLP, depth halves) and the change against the
    /// baseline, validated against the model (or a built-in shape) without reading weights.
    Plan(PlanArgs),
    /// Trains and evaluates the cells (finished ones are skipped, interrupted ones resumed).
    Run(RunArgs),
    /// Means with 95% intervals, paired differences against the baseline, tables and charts in DIR/report/.
    Report(ReportArgs),
}

#[derive(Args)]
pub struct PlanArgs {
    study: PathBuf,
    /// A built-in shape (llama-7b, …) instead of the cells' model.
    #[arg(long)]
    arch: Option<String>,
    /// Edits of every cell's config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    study: PathBuf,
    /// The study directory (default: runs/study-<file name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Devices, one cell at a time on each: cpu, cuda:0, or a list such as cuda:0,cuda:1. A device named twice runs
    /// two cells side by side on it (a small model leaves most of a GPU idle).
    #[arg(long, default_value = "cpu")]
    devices: String,
    /// This worker's share of the cells, K/N (workers sharing the directory take different K).
    #[arg(long, default_value = "1/1")]
    shard: String,
    /// Edits of every cell's config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
pub struct ReportArgs {
    /// The study directory.
    dir: PathBuf,
}

/// The file in a study directory naming the study file it runs.
const STUDY_PATH: &str = "study.path";

fn default_dir(study: &Path) -> PathBuf {
    let stem = study.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "study".into());
    PathBuf::from("runs").join(format!("study-{stem}"))
}

pub fn run_cmd(cmd: StudyCommand) -> Result<()> {
    match cmd {
        StudyCommand::Plan(a) => plan(a),
        StudyCommand::Run(a) => run_study(a),
        StudyCommand::Report(a) => report_cmd(a),
    }
}

fn change(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * (a as f64 - b as f64) / b as f64
    }
}

fn plan(a: PlanArgs) -> Result<()> {
    let study = Study::read(&a.study, &a.sets)?;
    let spec = study.model_spec(a.arch.as_deref())?;
    let counts = study.plan(&spec)?;
    let of = |id: &str| study.cells.iter().position(|c| c.id == id).map(|i| counts[i]);
    // One line per variant group (the seeds of a group have the same counts).
    let mut rows: Vec<(String, Counts, Option<Counts>)> = Vec::new();
    for (c, n) in study.cells.iter().zip(&counts) {
        if rows.iter().any(|r| r.0 == c.group()) {
            continue;
        }
        rows.push((c.group(), *n, study.baseline_of(c).and_then(|b| of(&b.id))));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(g, n, b)| {
                serde_json::json!({
                    "variant": g, "counts": n, "total": n.total(), "attention": n.attn(), "mlp": n.mlp(),
                    "first_half": n.first(), "second_half": n.second(),
                    "change_percent": b.map(|b| change(n.total(), b.total())),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"study": study.name, "cells": study.cells.len(), "variants": v})
            )?
        );
        return Ok(());
    }
    println!(
        "{} — {} cells ({} variant groups × {} seeds) on {} ({} layers)",
        study.name,
        study.cells.len(),
        rows.len(),
        study.seeds.len(),
        a.arch.as_deref().unwrap_or("the cells' model"),
        spec.num_layers
    );
    println!(
        "{:<28} {:>13} {:>13} {:>13} {:>13} {:>13} {:>9}",
        "variant", "total", "attention", "mlp", "1st half", "2nd half", "change"
    );
    for (g, n, b) in &rows {
        let ch = b.map_or("–".to_string(), |b| format!("{:+.2}%", change(n.total(), b.total())));
        println!(
            "{g:<28} {:>13} {:>13} {:>13} {:>13} {:>13} {ch:>9}",
            n.total(),
            n.attn(),
            n.mlp(),
            n.first(),
            n.second()
        );
    }
    Ok(())
}

impl StudyCommand {
    /// Whether `run` starts a thread per device (several devices).
    pub fn spawns_workers(&self) -> bool {
        matches!(self, StudyCommand::Run(a) if a.devices.contains(','))
    }
}

fn run_study(a: RunArgs) -> Result<()> {
    let study = Study::read(&a.study, &a.sets)?;
    let shard: Shard = a.shard.parse()?;
    let devices: Vec<Device> =
        a.devices.split(',').map(|d| d.trim().parse::<Device>()).collect::<std::result::Result<_, _>>()?;
    let dir = a.out.clone().unwrap_or_else(|| default_dir(&a.study));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let abs = std::fs::canonicalize(&a.study)?;
    qpeft::formats::write_atomic(&dir.join(STUDY_PATH), abs.to_string_lossy().as_bytes())?;
    let interrupt =
        crate::interrupt::Interrupt::install("finishing the current step of each cell and checkpointing it")?;
    let stop = &interrupt.stop;
    let total = study.cells.len();
    let done0 = study.cells.iter().filter(|c| cell_state(&dir, c) == CellState::Done).count();
    eprintln!("{}: {total} cells in {} ({done0} done); shard {}/{}", study.name, dir.display(), shard.k, shard.n);
    let tagged = devices.len() > 1;
    // One device runs on this thread, which is one of the thread pool's (see `main`); several run one thread each.
    let outcomes: Vec<Result<(Vec<String>, bool)>> = if let [device] = devices[..] {
        vec![worker(&study, &dir, shard, device, stop, tagged)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .map(|&device| {
                    let (study, dir) = (&study, &dir);
                    s.spawn(move || worker(study, dir, shard, device, stop, tagged))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a worker panicked")).collect()
        })
    };
    let mut interrupted = false;
    for o in outcomes {
        let (ran, stopped) = o?;
        interrupted |= stopped;
        eprintln!("ran {} cells: {}", ran.len(), ran.join(", "));
    }
    let done = study.cells.iter().filter(|c| cell_state(&dir, c) == CellState::Done).count();
    if interrupted {
        eprintln!("stopped with {done} of {total} cells done; run the same command again to continue");
        std::process::exit(interrupt.exit_code());
    }
    eprintln!("{done} of {total} cells done; report with: qpeft study report {}", dir.display());
    Ok(())
}

/// One device's worker: its cells one after the other, with a progress display (plain lines when several workers
/// share the terminal).
fn worker(
    study: &Study,
    dir: &Path,
    shard: Shard,
    device: Device,
    stop: &AtomicBool,
    tagged: bool,
) -> Result<(Vec<String>, bool)> {
    let mut display = if tagged { Display::plain() } else { Display::new() };
    let tag = if tagged { format!("[{device:?}] ") } else { String::new() };
    let mut cell = String::new();
    let mut progress = |p: StudyProgress| match p {
        StudyProgress::Cell { index, total, id, done } => {
            display.finish();
            display.say(&format!("{tag}cell {}/{total}: {id} ({done} done)", index + 1));
            cell = id.to_string();
        }
        StudyProgress::Train(Progress::Step { step, steps, loss, tokens_per_s }) => display.update(
            &format!("{tag}{cell}: training steps"),
            *step,
            *steps,
            &format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"),
        ),
        StudyProgress::Train(Progress::Evaluating { step, what, done, total }) => {
            display.update(&format!("{tag}{cell}: evaluating at step {step}: {what}"), *done as u64, *total as u64, "")
        }
    };
    let numerics = &device.numerics();
    let outcome = match device {
        Device::Cpu => run(study, dir, shard, numerics, &|| Ok(qpeft::backend::cpu::Cpu::new()), &mut progress, stop)?,
        Device::CpuBf16 => {
            run(study, dir, shard, numerics, &|| Ok(qpeft::backend::cpu::Cpu::bf16_native()), &mut progress, stop)?
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n, precision) => {
            run(study, dir, shard, numerics, &|| qpeft::backend::cuda::Cuda::new(n, precision), &mut progress, stop)?
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(..) => {
            bail!("this qpeft was built without CUDA support: rebuild with `cargo build --release --features cuda`")
        }
    };
    display.finish();
    Ok((outcome.ran, outcome.interrupted))
}

fn report_cmd(a: ReportArgs) -> Result<()> {
    let path = a.dir.join(STUDY_PATH);
    let file = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a study directory (no {STUDY_PATH})", a.dir.display()))?;
    let study = Study::read(Path::new(file.trim()), &[])?;
    let r = report::build(&study, &a.dir)?;
    if r.cells_done == 0 {
        bail!("no cell of {} has finished yet", a.dir.display());
    }
    let files = report::write(&study, &a.dir, &r)?;
    println!(
        "{}: {} of {} cells; wrote {}",
        study.name,
        r.cells_done,
        r.cells,
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    for f in &r.findings {
        println!("- {}: {}", f.text, f.verdict);
    }
    Ok(())
}
