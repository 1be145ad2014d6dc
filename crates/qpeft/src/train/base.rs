//! The frozen base of a run: the checkpoint with its block linears quantized as `[quant]` says (`load_model`); the
//! record of it that the run's adapters keep (`base_record`: the model, a fingerprint of its weights, the recipe);
//! and that base rebuilt under an adapter for evaluation, generation and merging (`load_adapted`), so an adapter is
//! never silently run on weights other than those it was trained on.

use std::path::Path;

use super::config::{QuantSection, RunConfig};
use crate::adapters::peft::{read_adapter, read_base, read_modules, BaseRecord};
use crate::adapters::set::AdapterSet;
use crate::arch::Proj;
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::merge::MergedDtype;
use crate::model::{Checkpoint, Decoder};
use crate::quant::base::BaseWeight;
use crate::quant::recipe::{Format, QuantizeOptions, WeightDtype};
use crate::tokenizer::Tokenizer;

/// Loads the model and quantizes its base as `[quant]` says; `progress(done, total)` counts the blocks loaded.
pub fn load_model<B: Backend>(
    cfg: &RunConfig,
    backend: B,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Decoder<B>, Tokenizer, Checkpoint)> {
    let ckpt = Checkpoint::open(&cfg.model.path)?;
    let tok = ckpt.tokenizer()?;
    let model = Decoder::load_quantized(&ckpt, backend, quantize_options(cfg, &ckpt)?.as_ref(), progress)?;
    Ok((model, tok, ckpt))
}

/// How `[quant]` quantizes the block linears of `ckpt` (None: keep them as stored), checked against the checkpoint.
pub fn quantize_options(cfg: &RunConfig, ckpt: &Checkpoint) -> Result<Option<QuantizeOptions>> {
    recipe(&cfg.quant, &cfg.file, ckpt)
}

/// `q` as quantization options for `ckpt`; errors name `file`, where `q` came from.
fn recipe(q: &QuantSection, file: &Path, ckpt: &Checkpoint) -> Result<Option<QuantizeOptions>> {
    if let Some(format) = q.format.format() {
        if ckpt.quant.is_some() {
            return Err(Error::config(
                file,
                "quant.format",
                format!(
                    "{} is already quantized; set quant.format = \"none\" to train on its stored base",
                    ckpt.path.display()
                ),
            ));
        }
        if q.icq && format == Format::Fp4 {
            return Err(Error::config(file, "quant.icq", "ICQ is defined for nf4 and int4, not fp4"));
        }
        if q.icq && format == Format::Nf4 && q.block != 64 {
            return Err(Error::config(
                file,
                "quant.block",
                format!("{}: ICQ quantizes NF4 in bitsandbytes' blocks of 64 (leave quant.block at 64)", q.block),
            ));
        }
        let opts = QuantizeOptions {
            format,
            double_quant: q.double_quant,
            block: q.block,
            group: q.group,
            sym: q.sym,
            icq: q.icq,
            calibration: None,
            dtype: WeightDtype::F32,
        };
        if format != Format::Int4 {
            crate::quant::nf4::check_block(q.block).map_err(|e| Error::config(file, "quant.block", e.to_string()))?;
        }
        return Ok(Some(opts));
    }
    Ok(None)
}

/// What the run's adapters record of their base.
pub fn base_record(cfg: &RunConfig, ckpt: &Checkpoint) -> Result<BaseRecord> {
    Ok(BaseRecord {
        model: cfg.model.path.display().to_string(),
        fingerprint: ckpt.fingerprint()?,
        quant: serde_json::to_value(&cfg.quant).expect("[quant] serializes"),
    })
}

/// A model, with an adapter on the base that adapter was trained on.
pub struct Adapted<B: Backend> {
    pub ckpt: Checkpoint,
    pub model: Decoder<B>,
    pub set: Option<AdapterSet<B>>,
    /// One line on the base that was built (None without an adapter).
    pub note: Option<String>,
}

/// Loads `model` and, with `adapter`, the adapter on the base it records: `model` must have the recorded
/// fingerprint (unless `other_base`), and its linears are quantized by the recorded recipe. An adapter that records
/// no base (PEFT's own) runs on `model` as stored.
pub fn load_adapted<B: Backend + 'static>(
    model: &Path,
    adapter: Option<&Path>,
    other_base: bool,
    backend: B,
) -> Result<Adapted<B>> {
    let ckpt = Checkpoint::open(model)?;
    let Some(dir) = adapter else {
        let model = Decoder::load(&ckpt, backend)?;
        return Ok(Adapted { ckpt, model, set: None, note: None });
    };
    let (opts, note) = match read_base(dir)? {
        None => {
            let note = format!(
                "{} records no base (a PEFT adapter?): it runs on {} as stored",
                dir.display(),
                model.display()
            );
            (None, note)
        }
        Some(base) => {
            let config = dir.join(crate::adapters::peft::CONFIG);
            let fingerprint = ckpt.fingerprint()?;
            if fingerprint != base.fingerprint && !other_base {
                return Err(Error::Invalid(format!(
                    "{} was trained on {} (fingerprint {}), but {} has fingerprint {fingerprint}: give the model it was \
                     trained on, or pass --other-base to run it on this one anyway",
                    dir.display(),
                    base.model,
                    base.fingerprint,
                    model.display()
                )));
            }
            let q: QuantSection = serde_json::from_value(base.quant.clone())
                .map_err(|e| Error::config(&config, "qpeft.base.quant", e.to_string()))?;
            let opts = recipe(&q, &config, &ckpt)?;
            let how = match &opts {
                None => "as stored (quant.format = none)".to_string(),
                Some(o) => describe(o),
            };
            let other =
                if fingerprint != base.fingerprint { " (--other-base: not the model it was trained on)" } else { "" };
            (opts, format!("base: {} {how}, as {} was trained{other}", model.display(), dir.display()))
        }
    };
    let model = Decoder::load_quantized(&ckpt, backend, opts.as_ref(), &mut |_, _| {})?;
    let set = read_adapter(dir, &model.backend, &model.spec)?.0;
    Ok(Adapted { ckpt, model, set: Some(set), note: Some(note) })
}

/// "re-quantized to nf4 (block 64, double quant)" and the like.
pub fn describe(o: &QuantizeOptions) -> String {
    let icq = if o.icq { ", ICQ" } else { "" };
    match o.format {
        Format::Nf4 | Format::Fp4 => {
            let name = if o.format == Format::Nf4 { "nf4" } else { "fp4" };
            let dq = if o.double_quant { ", double quant" } else { "" };
            format!("re-quantized to {name} (block {}{dq}{icq})", o.block)
        }
        Format::Int4 => {
            format!("re-quantized to int4 (group {}, {}{icq})", o.group, if o.sym { "symmetric" } else { "asymmetric" })
        }
    }
}

/// What `merge` wrote.
pub struct Merged {
    /// The adapter's trainable parameters.
    pub trainable: usize,
    /// Whether the linears stayed GPTQ int4 (QA-LoRA folded into the zero points).
    pub kept_int4: bool,
}

/// Merges the adapter in `adapter_dir` into `model` rebuilt as the base it was trained on (`load_adapted`) and
/// writes the merged model as an HF directory `out`. QA-LoRA on a GPTQ int4 checkpoint folds exactly into the zero
/// points and stays 4-bit (unless `to_16bit`); everything else is merged into `dtype` weights. Returns what it did and
/// `load_adapted`'s note.
pub fn merge(
    model: &Path,
    adapter_dir: &Path,
    other_base: bool,
    dtype: MergedDtype,
    to_16bit: bool,
    out: &Path,
) -> Result<(Merged, String)> {
    let Adapted { ckpt, model: mut m, set, note } = load_adapted(model, Some(adapter_dir), other_base, Cpu::new())?;
    let set = set.expect("an adapter was given");
    let modules = read_modules(adapter_dir, &m.spec)?;
    // Only a checkpoint stored as GPTQ int4 stays int4 (its quantization_config carries over); an int4 base that the
    // recipe made from 16-bit or GGUF weights is merged into `dtype` weights like any other.
    let int4_base = ckpt.quant.is_some()
        && m.blocks.iter().all(|b| Proj::ALL.iter().all(|&p| matches!(b.proj(p).base, BaseWeight::Int4(_))));
    let folds = modules.iter().flatten().flatten().all(|c| c.method.merges_into_int4_zeros());
    let kept_int4 = int4_base && folds && !to_16bit;
    if kept_int4 {
        m.merge_into_int4_zeros(&set)?;
    } else {
        m.merge_adapters(&set)?;
    }
    m.write_hf_dir(&ckpt, dtype, kept_int4, out)?;
    Ok((Merged { trainable: set.trainable(), kept_int4 }, note.unwrap_or_default()))
}
