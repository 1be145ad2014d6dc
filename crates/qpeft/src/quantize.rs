//! Quantizing a whole model: every linear layer of every block (the LM head, embeddings and norms stay in
//! floating point, as transformers does), with a per-layer report, written out as an HF directory. GPTQ
//! calibrates through a full-precision `Decoder`, which is why this sits above `model` and not in `quant`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::arch::{InputSite, Proj};
use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::formats::safetensors::{write_file, OwnedTensor};
use crate::model::checkpoint::{Checkpoint, Source};
use crate::model::decoder::{Decoder, Input};
use crate::quant::base::BaseWeight;
use crate::quant::gptq::{self, Factor, GptqConfig, Hessian};
use crate::quant::hf_dir::{write_linear, QuantizationConfig};
use crate::quant::icq::{self, find_int4_params, range_multipliers, TauSearch};
use crate::quant::int4::{quantize_rtn, quantize_rtn_with, GptqInt4, GroupParams};
use crate::quant::nf4::{check_finite, Bnb4, FourBit};
use crate::quant::recipe::{Format, QuantizeOptions, WeightDtype};

/// One linear layer's line of the quantization report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub name: String,
    pub shape: [usize; 2],
    pub format: String,
    /// ‖W − Ŵ‖_F / ‖W‖_F
    pub rel_error: f64,
    /// Entropy (bits, at most 4) of the histogram of the tensor's 4-bit codes.
    pub code_entropy: f64,
    /// ICQ only: mean per-block code entropy of plain NF4 and of ICQ (NF4), or of the code histogram without
    /// the range search (int4).
    pub icq_entropy_before: Option<f64>,
    pub icq_entropy_after: Option<f64>,
    pub bits_per_param: f64,
    pub bytes: usize,
    /// With calibration: ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² for this method and for round-to-nearest.
    pub output_error: Option<f64>,
    pub rtn_output_error: Option<f64>,
}

pub struct QuantizedModel {
    pub tensors: BTreeMap<String, OwnedTensor>,
    pub reports: Vec<LayerReport>,
    pub quantization_config: QuantizationConfig,
}

/// Checks `opts` against `ckpt` before any work is done.
pub fn validate(opts: &QuantizeOptions, ckpt: &Checkpoint) -> Result<()> {
    opts.check(&ckpt.spec)?;
    if ckpt.quant.is_some() {
        return Err(Error::Invalid(format!(
            "{} is already quantized; quantize the original model",
            ckpt.path.display()
        )));
    }
    Ok(())
}

/// Runs the calibration sequences through the full-precision model and accumulates the Hessian of every
/// linear layer's input (one per layer and input site). The inputs come from the unquantized model, not
/// from already-quantized earlier layers as in AutoGPTQ's sequential mode.
fn calibrate(
    ckpt: &Checkpoint,
    sequences: &[Vec<u32>],
    progress: &mut dyn FnMut(&str),
) -> Result<HashMap<(usize, InputSite), Hessian>> {
    let model = Decoder::load(ckpt, Cpu::new())?;
    let s = &model.spec;
    let mut hessians: HashMap<(usize, InputSite), Hessian> = HashMap::new();
    for (i, seq) in sequences.iter().enumerate() {
        progress(&format!("calibration sequence {}/{}", i + 1, sequences.len()));
        let mut cache = model.new_cache(1, seq.len())?;
        model.forward_with(&Input::single(seq), &mut cache, None, &mut |layer, site, x| {
            let dim = match site {
                InputSite::Attention | InputSite::Mlp => s.hidden_size,
                InputSite::AttentionOutput => s.q_dim(),
                InputSite::MlpOutput => s.intermediate_size,
            };
            let x = model.backend.download(x)?;
            hessians.entry((layer, site)).or_insert_with(|| Hessian::new(dim)).add(&x);
            Ok(())
        })?;
    }
    Ok(hessians)
}

fn histogram_entropy(codes: impl Iterator<Item = u8>) -> f64 {
    let mut counts = [0u32; 16];
    let mut total = 0;
    for c in codes {
        counts[c as usize] += 1;
        total += 1;
    }
    icq::entropy(&counts, total)
}

fn packed_bytes(base: &BaseWeight) -> usize {
    let mut m = BTreeMap::new();
    write_linear(&mut m, "x", base, "float32");
    m.values().map(|t| t.bytes.len()).sum()
}

/// Quantizes every block linear of `ckpt`. `progress` receives a line per step.
pub fn quantize_model(
    ckpt: &Checkpoint,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<QuantizedModel> {
    validate(opts, ckpt)?;
    let s = ckpt.spec.clone();
    let hessians = match &opts.calibration {
        Some(seqs) if opts.format == Format::Int4 => Some(calibrate(ckpt, seqs, progress)?),
        _ => None,
    };
    let mut tensors = BTreeMap::new();
    let mut reports = Vec::new();
    let dtype_name = opts.dtype.torch_name();
    let multipliers = range_multipliers(0.1, 50);
    for layer in 0..s.num_layers {
        // Linears sharing an input share the GPTQ factorization.
        let mut factors: HashMap<InputSite, Factor> = HashMap::new();
        for p in Proj::ALL {
            let name = format!("model.layers.{layer}.{}", p.module());
            let (out_dim, in_dim) = p.dims(&s);
            let (w, _) = ckpt.linear(&name, out_dim, in_dim)?;
            let mut w = w.data;
            opts.dtype.round(&mut w);
            check_finite(&w, &[out_dim, in_dim]).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
            let hessian = hessians.as_ref().map(|h| &h[&(layer, p.site())]);
            let mut report = LayerReport {
                name: name.clone(),
                shape: [out_dim, in_dim],
                format: String::new(),
                rel_error: 0.0,
                code_entropy: 0.0,
                icq_entropy_before: None,
                icq_entropy_after: None,
                bits_per_param: 0.0,
                bytes: 0,
                output_error: None,
                rtn_output_error: None,
            };
            let base = match opts.format {
                Format::Nf4 | Format::Fp4 if opts.icq => {
                    let (q, stats) =
                        icq::quantize_nf4(&w, &[out_dim, in_dim], opts.double_quant, TauSearch::default())?;
                    report.icq_entropy_before = Some(stats.entropy_plain);
                    report.icq_entropy_after = Some(stats.entropy_icq);
                    report.code_entropy = histogram_entropy((0..w.len()).map(|i| q.nf4.code(i)));
                    BaseWeight::IcqNf4(q)
                }
                Format::Nf4 | Format::Fp4 => {
                    let kind = if opts.format == Format::Nf4 { FourBit::Nf4 } else { FourBit::Fp4 };
                    let q = Bnb4::quantize(&w, &[out_dim, in_dim], kind, opts.block, opts.double_quant)?;
                    report.code_entropy = histogram_entropy((0..w.len()).map(|i| q.code(i)));
                    BaseWeight::Bnb4(q)
                }
                Format::Int4 => {
                    let sym = opts.sym;
                    let find = |row: &[f32]| {
                        if opts.icq {
                            find_int4_params(row, sym, &multipliers)
                        } else {
                            GroupParams::find(row, sym, 1.0)
                        }
                    };
                    let (codes, params) = match hessian {
                        Some(h) => {
                            if let std::collections::hash_map::Entry::Vacant(e) = factors.entry(p.site()) {
                                e.insert(Factor::new(h, 0.01).map_err(|e| Error::Invalid(format!("{name}: {e}")))?);
                            }
                            gptq::quantize(&w, out_dim, &factors[&p.site()], GptqConfig::new(opts.group, sym), find)?
                        }
                        None => quantize_rtn_with(&w, in_dim, opts.group, &find),
                    };
                    if opts.icq {
                        let (plain, _) = quantize_rtn(&w, out_dim, in_dim, opts.group, sym);
                        report.icq_entropy_before = Some(histogram_entropy(plain.into_iter()));
                        report.icq_entropy_after = Some(histogram_entropy(codes.iter().copied()));
                    }
                    report.code_entropy = histogram_entropy(codes.iter().copied());
                    BaseWeight::Int4(GptqInt4::pack(&codes, &params, out_dim, in_dim, opts.group, sym)?)
                }
            };
            let w_hat = base.dequantize().expect("quantized");
            let diff: Vec<f32> = w.iter().zip(&w_hat).map(|(a, b)| a - b).collect();
            let norm = |v: &[f32]| v.par_iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            report.rel_error = norm(&diff) / norm(&w);
            if let Some(h) = hessian {
                let reference = h.quadratic(&w);
                report.output_error = Some(h.quadratic(&diff) / reference);
                let (rc, rp) = quantize_rtn(&w, out_dim, in_dim, opts.group, opts.sym);
                let groups = in_dim / opts.group;
                let rtn_diff: Vec<f32> = (0..w.len())
                    .map(|k| w[k] - rp[k / in_dim * groups + k % in_dim / opts.group].dequantize(rc[k]))
                    .collect();
                report.rtn_output_error = Some(h.quadratic(&rtn_diff) / reference);
            }
            report.format = base.name();
            report.bits_per_param = base.bits_per_param();
            report.bytes = packed_bytes(&base);
            write_linear(&mut tensors, &name, &base, dtype_name);
            progress(&format!("{name}: rel error {:.4}", report.rel_error));
            reports.push(report);
        }
    }
    // Everything else stays in floating point.
    let h = s.hidden_size;
    let mut dense =
        vec![("model.embed_tokens.weight".to_string(), vec![s.vocab_size, h]), ("model.norm.weight".into(), vec![h])];
    if !s.tie_word_embeddings {
        dense.push(("lm_head.weight".into(), vec![s.vocab_size, h]));
    }
    for layer in 0..s.num_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            dense.push((format!("model.layers.{layer}.{norm}.weight"), vec![h]));
        }
        for p in Proj::ALL {
            if p.has_bias(&s) {
                dense.push((format!("model.layers.{layer}.{}.bias", p.module()), vec![p.dims(&s).0]));
            }
        }
    }
    for (name, shape) in dense {
        let mut t = ckpt.require(&name, &shape)?;
        // GGUF Gemma norms are stored as w (not w - 1) in HF checkpoints; `read` already converted them.
        opts.dtype.round(&mut t.data);
        tensors.insert(name, opts.dtype.tensor(shape, &t.data));
    }
    Ok(QuantizedModel { tensors, reports, quantization_config: opts.quantization_config() })
}

/// Writes `q` as an HF directory: model.safetensors, config.json (with `quantization_config`), the tokenizer
/// files of an HF source, and quantize_report.json. Refuses to write into a directory that already holds a
/// model, so nothing of the user's is overwritten.
pub fn write_model_dir(ckpt: &Checkpoint, q: &QuantizedModel, dtype: WeightDtype, out: &Path) -> Result<()> {
    if out.join("model.safetensors").exists() || out.join("config.json").exists() {
        return Err(Error::Invalid(format!(
            "{} already contains a model; choose a new output directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut config: Value = match &ckpt.source {
        Source::Hf { dir, .. } => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?
        }
        Source::Gguf(_) | Source::Random { .. } => ckpt.spec.to_hf_config(&ckpt.path)?,
    };
    config["quantization_config"] = q.quantization_config.to_json();
    config["torch_dtype"] = Value::from(dtype.torch_name());
    config["dtype"] = Value::from(dtype.torch_name());
    ckpt.write_tokenizer(out)?;
    write_file(&out.join("model.safetensors"), &q.tensors)?;
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON serializes");
    crate::formats::write_atomic(&out.join("config.json"), &pretty(&config))?;
    let report = serde_json::to_value(&q.reports).expect("report serializes");
    crate::formats::write_atomic(&out.join("quantize_report.json"), &pretty(&report))?;
    Ok(())
}
