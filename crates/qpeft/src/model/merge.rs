//! Folding trained adapters into the base weights: W ← Ŵ + ΔW for every adapted linear (exact in f32; the
//! merged layer becomes dense). Writing the merged model as a 16-bit HF directory, and QA-LoRA's exact merge
//! into GPTQ zero points (`GptqInt4::merge_into_zeros`), build on this.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::checkpoint::{Checkpoint, Source};
use super::decoder::Decoder;
use crate::adapters::set::AdapterSet;
use crate::arch::Proj;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::formats::safetensors::{write_file, OwnedTensor};
use crate::quant::base::BaseWeight;
use crate::quant::hf_dir::write_linear;

/// Storage dtype of a merged model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergedDtype {
    Bf16,
    F16,
    F32,
}

impl MergedDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            MergedDtype::Bf16 => "bfloat16",
            MergedDtype::F16 => "float16",
            MergedDtype::F32 => "float32",
        }
    }
    fn tensor(self, shape: Vec<usize>, data: &[f32]) -> OwnedTensor {
        match self {
            MergedDtype::Bf16 => OwnedTensor::bf16(shape, data),
            MergedDtype::F16 => {
                OwnedTensor::f16(shape, &data.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>())
            }
            MergedDtype::F32 => OwnedTensor::f32(shape, data),
        }
    }
}

impl std::str::FromStr for MergedDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" | "bfloat16" => Ok(MergedDtype::Bf16),
            "f16" | "float16" => Ok(MergedDtype::F16),
            "f32" | "float32" => Ok(MergedDtype::F32),
            other => Err(Error::Invalid(format!("dtype `{other}` is not one of bf16, f16, f32"))),
        }
    }
}

impl<B: Backend> Decoder<B> {
    /// Adds every adapter's ΔW to its linear's weight; the merged decoder needs no adapters.
    pub fn merge_adapters(&mut self, set: &AdapterSet<B>) -> Result<()> {
        for l in 0..self.blocks.len() {
            for p in Proj::ALL {
                let Some(a) = set.get(l, p) else { continue };
                let delta = a.delta_weight(&self.backend)?;
                let lin = self.blocks[l].proj_mut(p);
                let mut w = self.backend.download(&self.backend.weight_values(&lin.weight)?)?;
                w.iter_mut().zip(&delta).for_each(|(w, d)| *w += d);
                lin.base = BaseWeight::Dense;
                lin.weight = self.backend.upload_weight(&lin.base, Some(&w), lin.out_dim, lin.in_dim)?;
            }
        }
        Ok(())
    }

    /// QA-LoRA's exact merge: every adapter's group-constant ΔW goes into the fp16 zero points of its GPTQ int4
    /// base (codes and scales unchanged), so the merged model stays 4-bit. Fails for a module whose base is not
    /// int4 or whose ΔW varies inside a group (any other method).
    pub fn merge_into_int4_zeros(&mut self, set: &AdapterSet<B>) -> Result<()> {
        for l in 0..self.blocks.len() {
            for p in Proj::ALL {
                let Some(a) = set.get(l, p) else { continue };
                let delta = a.delta_weight(&self.backend)?;
                let name = p.path(l);
                let lin = self.blocks[l].proj_mut(p);
                let BaseWeight::Int4(q) = &mut lin.base else {
                    return Err(Error::Invalid(format!(
                        "{name}: its base is {}, not GPTQ int4: merge into 16-bit weights instead",
                        lin.base.name()
                    )));
                };
                let zeros = q.merge_into_zeros(&delta).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
                q.float_zeros = Some(zeros);
                q.qzeros.clear();
                lin.weight = self.backend.upload_weight(&lin.base, None, lin.out_dim, lin.in_dim)?;
            }
        }
        Ok(())
    }

    /// Writes this decoder (e.g. after `merge_adapters`) as an HF directory: model.safetensors with the
    /// non-linear tensors in `dtype`, config.json and the tokenizer. Linears are written in `dtype` (no
    /// quantization_config), or with `keep_int4` GPTQ int4 linears in their GPTQ layout (after
    /// `merge_into_int4_zeros`, with fp16 `zeros`) and the source's quantization_config. Refuses a directory that
    /// holds a model.
    pub fn write_hf_dir(&self, ckpt: &Checkpoint, dtype: MergedDtype, keep_int4: bool, out: &Path) -> Result<()> {
        if out.join("model.safetensors").exists() || out.join("config.json").exists() {
            return Err(Error::Invalid(format!(
                "{} already contains a model; choose a new output directory",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let (be, s) = (&self.backend, &self.spec);
        let h = s.hidden_size;
        let mut tensors = BTreeMap::new();
        let put = |tensors: &mut BTreeMap<String, OwnedTensor>,
                   name: String,
                   shape: Vec<usize>,
                   buf: &B::Buf|
         -> Result<()> {
            tensors.insert(name, dtype.tensor(shape, &be.download(buf)?));
            Ok(())
        };
        put(&mut tensors, "model.embed_tokens.weight".into(), vec![s.vocab_size, h], &be.weight_values(&self.embed)?)?;
        put(&mut tensors, "model.norm.weight".into(), vec![h], &self.norm)?;
        if let Some(head) = &self.lm_head {
            put(&mut tensors, "lm_head.weight".into(), vec![s.vocab_size, h], &be.weight_values(&head.weight)?)?;
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            put(&mut tensors, format!("{p}.input_layernorm.weight"), vec![h], &block.attn_norm)?;
            put(&mut tensors, format!("{p}.post_attention_layernorm.weight"), vec![h], &block.mlp_norm)?;
            for pr in Proj::ALL {
                let lin = block.proj(pr);
                let name = format!("{p}.{}", pr.module());
                match &lin.base {
                    BaseWeight::Int4(_) if keep_int4 => {
                        write_linear(&mut tensors, &name, &lin.base, dtype.torch_name())
                    }
                    _ if keep_int4 => {
                        return Err(Error::Invalid(format!("{name}: base {} is not GPTQ int4", lin.base.name())))
                    }
                    _ => put(
                        &mut tensors,
                        format!("{name}.weight"),
                        vec![lin.out_dim, lin.in_dim],
                        &be.weight_values(&lin.weight)?,
                    )?,
                }
                if let Some(b) = &lin.bias {
                    put(&mut tensors, format!("{name}.bias"), vec![lin.out_dim], b)?;
                }
            }
        }
        let mut config: Value = match &ckpt.source {
            Source::Hf { dir, .. } => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("invalid JSON: {e}")))?
            }
            Source::Gguf(_) | Source::Random { .. } => s.to_hf_config(&ckpt.path)?,
        };
        if let Some(o) = config.as_object_mut() {
            if keep_int4 {
                if let Some(q) = o.get_mut("quantization_config").and_then(Value::as_object_mut) {
                    // Marks the fp16 `zeros` (qpeft reads them; AutoGPTQ loaders find no `qzeros` and refuse).
                    q.insert("qpeft_float_zeros".into(), Value::Bool(true));
                }
            } else {
                o.remove("quantization_config");
            }
            o.insert("torch_dtype".into(), dtype.torch_name().into());
            o.insert("dtype".into(), dtype.torch_name().into());
        }
        let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON serializes");
        ckpt.write_tokenizer(out)?;
        write_file(&out.join("model.safetensors"), &tensors)?;
        crate::formats::write_atomic(&out.join("config.json"), &pretty(&config))
    }
}
