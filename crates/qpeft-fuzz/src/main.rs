//! `qpeft-fuzz [TARGET,…|all] [--inputs N] [--seed S]`: runs the fuzz targets (see the library's documentation)
//! and prints a table of what their inputs did. Exit status 1 if any input panicked or held more memory than its size
//! justifies; a hang or an oversized allocation stops the run (status 3, or an abort) naming the case.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qpeft_fuzz::{run_target, targets, Env, Options, Tally};

#[derive(Parser)]
#[command(name = "qpeft-fuzz", about = "Fuzz every input format qpeft reads")]
struct Args {
    /// Targets, comma-separated, or `all` (`--list` names them).
    #[arg(default_value = "all")]
    targets: String,
    /// Inputs per target.
    #[arg(long, default_value_t = 1000)]
    inputs: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replay one case (its number from a failure report) and print its outcome.
    #[arg(long)]
    case: Option<u64>,
    /// A case running longer than this is a hang.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Scratch folder for the cases (default: a temporary folder).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Copy failing inputs here.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// The benchmark datasets (default: ../shared/datasets beside the repository).
    #[arg(long)]
    datasets: Option<PathBuf>,
    /// Also write the tallies as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    list: bool,
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    if args.list {
        for t in targets::ALL {
            println!("{:<20} {}", t.name, t.files.join(", "));
        }
        return Ok(true);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize()?;
    let datasets = args.datasets.clone().unwrap_or_else(|| root.join("../shared/datasets"));
    let tmp = tempfile::tempdir()?;
    let work = args.work.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let env = Env::new(&root, &datasets, &work)?;
    let chosen: Vec<&targets::Target> = if args.targets == "all" {
        targets::ALL.iter().collect()
    } else {
        args.targets
            .split(',')
            .map(|n| targets::find(n.trim()).ok_or_else(|| format!("unknown target `{n}` (--list names them)")))
            .collect::<Result<_, _>>()?
    };
    let opts = Options {
        seed: args.seed,
        timeout: Duration::from_millis(args.timeout_ms),
        first: args.case.unwrap_or(0),
        count: if args.case.is_some() { 1 } else { args.inputs },
        keep: args.keep.clone(),
    };
    let mut tallies: Vec<Tally> = Vec::new();
    for t in chosen {
        if t.needs_datasets && !env.has_datasets() {
            eprintln!("{}: skipped (no datasets in {})", t.name, datasets.display());
            continue;
        }
        let tally = run_target(&env, t, &work, &opts, &mut |p| {
            eprint!("\r{}: {} inputs, {:.0} s   ", p.target, p.inputs, p.seconds)
        })?;
        eprintln!("\r{}: {} inputs in {:.1} s{}", t.name, tally.inputs, tally.seconds, " ".repeat(20));
        if args.case.is_some() {
            let input = work.join(t.name);
            println!("case {} of {} (seed {}): input in {}", opts.first, t.name, opts.seed, input.display());
        }
        tallies.push(tally);
    }
    println!(
        "\n| target | inputs | loads | errors | errors naming no input file | panics | over memory | slowest input | most memory | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for t in &tallies {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} ms | {:.1} MiB | {:.1} s |",
            t.target,
            t.inputs,
            t.loads,
            t.errors,
            t.unnamed,
            t.panics,
            t.over_memory,
            t.max_case_ms,
            t.max_case_bytes as f64 / (1 << 20) as f64,
            t.seconds
        );
    }
    let mut ok = true;
    for t in &tallies {
        for (case, what) in &t.failures {
            ok = false;
            println!(
                "FAIL {} case {case}: {what}  (replay: qpeft-fuzz {} --seed {} --case {case})",
                t.target, t.target, args.seed
            );
        }
        for e in &t.unnamed_examples {
            println!("note {}: an error names no input file: {e}", t.target);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&tallies)?)?;
    }
    Ok(ok)
}
