//! `qpeft params`: trainable parameters of a run config's adapter plan, per module kind and depth half, and
//! their change against a baseline (by default the same config without its overrides).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config_args::ConfigArgs;
use clap::Args;
use qpeft::arch::ModelSpec;
use qpeft::arch::BUILTIN;
use qpeft::model::Checkpoint;
use qpeft::plan::{count, Counts, Plan};

#[derive(Args)]
pub struct ParamsArgs {
    /// HF model directory or .gguf file (or give --arch).
    model: Option<PathBuf>,
    /// A built-in architecture shape instead of a model.
    #[arg(long, conflicts_with = "model")]
    arch: Option<String>,
    /// The run config (its [adapter] section is enough), with --set / --unset edits.
    #[command(flatten)]
    config: ConfigArgs,
    /// Baseline config (default: --config without its [[adapter.override]] rules).
    #[arg(long)]
    baseline: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: ParamsArgs) -> Result<()> {
    let (spec, model_name) = match (&args.model, &args.arch) {
        (Some(m), None) => (Checkpoint::open(m)?.spec, m.display().to_string()),
        (None, Some(a)) => match ModelSpec::builtin(a) {
            Some(s) => (s, a.clone()),
            None => bail!("--arch `{a}` is not built in (known: {})", BUILTIN.join(", ")),
        },
        _ => bail!("give a MODEL or --arch NAME"),
    };
    let plan = args.config.plan()?;
    let base_plan = match &args.baseline {
        Some(b) => Plan::read(b)?,
        None => plan.baseline(),
    };
    let (this, base) = (count(&plan, &spec)?, count(&base_plan, &spec)?);
    let rows = groups(&this)
        .into_iter()
        .zip(groups(&base))
        .map(|((name, a), (_, b))| (name, a, b, change(a, b)))
        .collect::<Vec<_>>();
    if args.json {
        let groups: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, a, b, c)| {
                (name.to_string(), serde_json::json!({"params": a, "baseline": b, "change_percent": c}))
            })
            .collect();
        let out = serde_json::json!({"model": model_name, "config": args.config.configs, "counts": this, "baseline_counts": base, "groups": groups});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let files: Vec<String> = args.config.configs.iter().map(|f| f.display().to_string()).collect();
    println!("trainable parameters: {model_name}, {} ({} layers)", files.join(" + "), spec.num_layers);
    println!("{:<20} {:>16} {:>16} {:>9}", "group", "this config", "baseline", "change");
    for (name, a, b, c) in rows {
        let c = c.map_or("n/a".to_string(), |c| format!("{c:+.2}%"));
        println!("{name:<20} {:>16} {:>16} {c:>9}", thousands(a), thousands(b));
    }
    Ok(())
}

fn groups(c: &Counts) -> Vec<(&'static str, usize)> {
    vec![
        ("attention, 1st half", c.attn_first),
        ("attention, 2nd half", c.attn_second),
        ("mlp, 1st half", c.mlp_first),
        ("mlp, 2nd half", c.mlp_second),
        ("attention", c.attn()),
        ("mlp", c.mlp()),
        ("1st half", c.first()),
        ("2nd half", c.second()),
        ("total", c.total()),
    ]
}

fn change(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| 100.0 * (a as f64 - b as f64) / b as f64)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
