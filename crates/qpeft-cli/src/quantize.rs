//! `qpeft quantize`: 4-bit quantization of a model into an HF directory, with a per-layer report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use qpeft::model::Checkpoint;
use qpeft::quant::recipe::{Format, QuantizeOptions, WeightDtype};
use qpeft::quantize::{quantize_model, write_model_dir};

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Nf4,
    Fp4,
    Int4,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Float32,
    Bfloat16,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// HF model directory or .gguf file (unquantized weights are read as f32).
    model: PathBuf,
    #[arg(long, value_enum)]
    format: FormatArg,
    /// Double quantization of the NF4/FP4 absmax (QLoRA's default).
    #[arg(long)]
    double_quant: bool,
    /// NF4/FP4 block size: a power of two in 32..=4096.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Int4 group size (must divide every layer's input dimension).
    #[arg(long, default_value_t = 32)]
    group: usize,
    /// Symmetric int4 (zero point fixed at 8) instead of min-max asymmetric.
    #[arg(long)]
    sym: bool,
    /// Run GPTQ with calibration text from --calib (int4 only); without it int4 is round-to-nearest.
    #[arg(long, requires = "calib")]
    gptq: bool,
    /// Text file for GPTQ calibration.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration sequences and their length in tokens.
    #[arg(long, default_value_t = 128)]
    calib_samples: usize,
    #[arg(long, default_value_t = 512)]
    calib_seq: usize,
    /// IR-QLoRA's information calibration (NF4: per-block τ shift; int4: range multipliers).
    #[arg(long)]
    icq: bool,
    /// Round weights to this dtype before quantizing and store unquantized tensors in it (transformers
    /// quantizes from the dtype it loads).
    #[arg(long, value_enum, default_value = "float32")]
    dtype: DtypeArg,
    /// Output directory (must not already hold a model).
    #[arg(short, long)]
    output: PathBuf,
}

/// Splits the calibration text into `samples` windows of `seq` tokens, evenly spaced over the text.
fn calibration(ckpt: &Checkpoint, file: &Path, samples: usize, seq: usize) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading calibration text {}", file.display()))?;
    let ids = ckpt.tokenizer()?.encode(&text, true)?;
    if seq == 0 || samples == 0 {
        bail!("--calib-seq and --calib-samples must be positive");
    }
    if ids.len() < seq {
        bail!("{}: {} tokens, fewer than one calibration sequence of {seq}", file.display(), ids.len());
    }
    let windows = (ids.len() / seq).min(samples);
    Ok((0..windows).map(|w| ids[w * seq..(w + 1) * seq].to_vec()).collect())
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    let calibration = match (&a.calib, a.gptq) {
        (Some(f), true) => Some(calibration(&ckpt, f, a.calib_samples, a.calib_seq)?),
        (Some(_), false) => bail!("--calib is only used with --gptq"),
        _ => None,
    };
    let opts = QuantizeOptions {
        format: match a.format {
            FormatArg::Nf4 => Format::Nf4,
            FormatArg::Fp4 => Format::Fp4,
            FormatArg::Int4 => Format::Int4,
        },
        double_quant: a.double_quant,
        block: a.block,
        group: a.group,
        sym: a.sym,
        icq: a.icq,
        calibration,
        dtype: match a.dtype {
            DtypeArg::Float32 => WeightDtype::F32,
            DtypeArg::Bfloat16 => WeightDtype::Bf16,
        },
    };
    qpeft::quantize::validate(&opts, &ckpt)?;
    let layers = (ckpt.spec.num_layers * 7) as u64;
    let bar = indicatif::ProgressBar::new(layers);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} eta {eta}").expect("valid template"),
    );
    let q = quantize_model(&ckpt, &opts, &mut |msg| {
        if !msg.starts_with("calibration") {
            bar.inc(1);
        }
        bar.set_message(msg.to_string());
    })?;
    bar.finish_and_clear();
    write_model_dir(&ckpt, &q, opts.dtype, &a.output)?;

    println!(
        "{:<36} {:>11} {:>12} {:>9} {:>8} {:>6} {:>9}",
        "layer", "shape", "format", "rel err", "entropy", "bits", "bytes"
    );
    for r in &q.reports {
        let mut line = format!(
            "{:<36} {:>11} {:>12} {:>9.5} {:>8.4} {:>6.3} {:>9}",
            r.name.trim_start_matches("model."),
            format!("{}x{}", r.shape[0], r.shape[1]),
            r.format,
            r.rel_error,
            r.code_entropy,
            r.bits_per_param,
            r.bytes
        );
        if let (Some(b), Some(c)) = (r.icq_entropy_before, r.icq_entropy_after) {
            line += &format!("  icq entropy {b:.4} -> {c:.4}");
        }
        if let (Some(e), Some(rtn)) = (r.output_error, r.rtn_output_error) {
            line += &format!("  output err {e:.3e} (rtn {rtn:.3e})");
        }
        println!("{line}");
    }
    let params: usize = q.reports.iter().map(|r| r.shape[0] * r.shape[1]).sum();
    let bytes: usize = q.reports.iter().map(|r| r.bytes).sum();
    println!(
        "{} linear layers, {params} weights in {bytes} bytes ({:.3} bits/weight); written to {} (report: quantize_report.json)",
        q.reports.len(),
        8.0 * bytes as f64 / params as f64,
        a.output.display()
    );
    Ok(())
}
