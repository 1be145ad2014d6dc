//! The run config: one TOML file per run with `[model]`, `[quant]`, `[adapter]` (per-layer rules, see `plan`),
//! `[data]`, `[train]`, `[eval]` and `[device]`. Unknown keys and invalid values are refused with the file, the
//! field and the value. `--set section.key=value` edits the parsed document before it is read, and the run
//! directory keeps the result as `config.toml`.
//!
//! Relative paths (model, data, out_dir) are taken from the working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::optimizer::StateBits;
use super::schedule::Schedule;
use crate::data::DataFormat;
use crate::error::{Error, Result};
use crate::plan::Plan;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An HF directory or a .gguf file.
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSection {
    /// `nf4`, `fp4`, `int4` (round-to-nearest GPTQ layout, for QA-LoRA) or `none` (train on the checkpoint's
    /// own weights: 16/32-bit, or an already quantized directory).
    pub format: String,
    pub double_quant: bool,
    pub block: usize,
    pub group: usize,
    pub sym: bool,
    /// IR-QLoRA's information-calibrated quantization (ICQ) of the base.
    pub icq: bool,
}

impl Default for QuantSection {
    fn default() -> Self {
        QuantSection { format: "nf4".into(), double_quant: true, block: 64, group: 128, sym: false, icq: false }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A data file (Alpaca .json/.json.gz/.jsonl, OASST1 .jsonl, generic .jsonl) …
    pub path: Option<PathBuf>,
    /// … in this layout (default: detected from the file) …
    pub format: Option<DataFormat>,
    /// … or a built-in task (`dates`) of `builtin_size` generated examples.
    pub builtin: Option<String>,
    pub builtin_size: usize,
    pub source_max_len: usize,
    pub target_max_len: usize,
    pub train_on_source: bool,
    /// Held-out examples split off at random (QLoRA: 1024).
    pub eval_size: usize,
    /// Seed of the split and the example order (QLoRA's data_seed).
    pub seed: u64,
    /// Use at most this many training examples (after the split).
    pub max_train_examples: Option<usize>,
    pub group_by_length: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            path: None,
            format: None,
            builtin: None,
            builtin_size: 2000,
            source_max_len: 384,
            target_max_len: 128,
            train_on_source: false,
            eval_size: 1024,
            seed: 42,
            max_train_examples: None,
            group_by_length: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub out_dir: PathBuf,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step; each one's loss is divided by this (HF Trainer of the papers' era).
    pub grad_accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    /// Warm-up steps; default ⌈steps · warmup_ratio⌉.
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: f64,
    /// `adamw-32bit` or `adamw-8bit` (`paged_` prefixes accepted: paging changes no arithmetic).
    pub optimizer: String,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 8-bit optimizers keep 32-bit states for tensors smaller than this (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: usize,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Seed of adapter init and dropout.
    pub seed: u64,
    /// Per-block activation checkpointing.
    pub checkpointing: bool,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep the newest N checkpoints (0: all).
    pub keep_checkpoints: usize,
    /// Rows per LM-head chunk of the loss.
    pub loss_chunk: usize,
    /// Most rows per MLP chunk with checkpointing (unset: chunks of about 32 MiB of f32 intermediate
    /// activations, `model::block::mlp_chunk`). Larger chunks use more memory and re-dequantize the MLP weights
    /// less often.
    pub mlp_chunk: Option<usize>,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            out_dir: PathBuf::from("runs/run"),
            steps: 100,
            batch_size: 1,
            grad_accum: 16,
            lr: 2e-4,
            schedule: Schedule::Constant,
            warmup_steps: None,
            warmup_ratio: 0.03,
            optimizer: "adamw-32bit".into(),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            min_8bit_size: super::optimizer::MIN_8BIT_SIZE,
            max_grad_norm: 0.3,
            seed: 0,
            checkpointing: true,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            loss_chunk: 256,
            mlp_chunk: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Held-out loss every N optimizer steps (0: only before and after training).
    pub every: u64,
    /// Held-out examples the loss is measured on (at most `data.eval_size`).
    pub max_samples: usize,
    pub batch_size: usize,
    /// Also judge this many held-out examples by exact match of the greedy answer (0: off).
    pub exact_match: usize,
    pub max_new_tokens: usize,
    /// Benchmark tasks run at every evaluation (mmlu, hellaswag, piqa, winogrande, arc_easy, arc_challenge, boolq,
    /// openbookqa, or all); scores go to metrics.jsonl, every item's prediction to evals/step-N.json.
    pub tasks: Vec<String>,
    /// First N items of each zero-shot task, first N questions of each MMLU subject (unset: all).
    pub task_limit: Option<usize>,
    /// MMLU split during training: val (as QLoRA's callback) or test.
    pub mmlu_split: String,
    /// The datasets folder (mmlu/, hellaswag/, … inside it).
    pub data_dir: PathBuf,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 0,
            max_samples: 200,
            batch_size: 4,
            exact_match: 0,
            max_new_tokens: 32,
            tasks: Vec::new(),
            task_limit: None,
            mmlu_split: "val".into(),
            data_dir: PathBuf::from("../shared/datasets"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    /// `cpu` or `cuda[:N][:f16|:bf16|:f32]` (`qpeft train --device` overrides it).
    pub name: String,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection { name: "cpu".into() }
    }
}

/// The sections a run config may have.
const SECTIONS: [&str; 7] = ["model", "quant", "adapter", "data", "train", "eval", "device"];

/// Section `name` of `doc` as `T` (its defaults when absent, an error when required); errors name the section.
fn section<T: for<'de> Deserialize<'de> + Default>(file: &Path, doc: &toml::Table, name: &str) -> Result<T> {
    match doc.get(name) {
        None => Ok(T::default()),
        Some(v) => {
            v.clone().try_into().map_err(|e: toml::de::Error| Error::config(file, name, e.message().to_string()))
        }
    }
}

/// A parsed and checked run config.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub file: PathBuf,
    /// The TOML text after `--set` edits (what the run directory keeps).
    pub text: String,
    pub model: ModelSection,
    pub quant: QuantSection,
    pub plan: Plan,
    pub data: DataSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub device: DeviceSection,
}

/// Applies `key.path=value` edits to a TOML document; a value that is not valid TOML is taken as a string.
pub fn apply_sets(file: &Path, doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, raw) =
            set.split_once('=').ok_or_else(|| Error::config(file, set.clone(), "--set needs key=value"))?;
        let key = key.trim();
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed key"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let parts: Vec<&str> = key.split('.').collect();
        let (last, sections) = parts.split_last().expect("split yields one part");
        let mut table = &mut *doc;
        for (i, part) in sections.iter().enumerate() {
            let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| Error::config(file, parts[..=i].join("."), format!("--set {set}: not a table")))?;
        }
        table.insert(last.to_string(), value);
    }
    Ok(())
}

impl RunConfig {
    /// Reads `file` and applies `sets`.
    pub fn read(file: &Path, sets: &[String]) -> Result<RunConfig> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        RunConfig::parse(file, &text, sets)
    }

    pub fn parse(file: &Path, text: &str, sets: &[String]) -> Result<RunConfig> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| Error::format(file, e.to_string().trim_end()))?;
        apply_sets(file, &mut doc, sets)?;
        let text = toml::to_string(&doc).map_err(|e| Error::format(file, e.to_string()))?;
        if let Some(k) = doc.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
            return Err(Error::config(file, k.clone(), format!("unknown section (known: {})", SECTIONS.join(", "))));
        }
        for required in ["model", "adapter", "data"] {
            if !doc.contains_key(required) {
                return Err(Error::config(file, required, "missing section"));
            }
        }
        let model: ModelSection = doc["model"]
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(file, "model", e.message().to_string()))?;
        let cfg = RunConfig {
            file: file.to_path_buf(),
            plan: Plan::from_toml(file, &text)?,
            text,
            model,
            quant: section(file, &doc, "quant")?,
            data: section(file, &doc, "data")?,
            train: section(file, &doc, "train")?,
            eval: section(file, &doc, "eval")?,
            device: section(file, &doc, "device")?,
        };
        cfg.check()?;
        Ok(cfg)
    }

    pub fn state_bits(&self) -> StateBits {
        if self.train.optimizer.trim_start_matches("paged_").contains("8bit") {
            StateBits::B8
        } else {
            StateBits::B32
        }
    }

    pub fn warmup(&self) -> u64 {
        self.train
            .warmup_steps
            .unwrap_or_else(|| super::schedule::warmup_from_ratio(self.train.steps, self.train.warmup_ratio))
    }

    /// Values that are wrong whatever the model.
    fn check(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(&self.file, field, msg));
        let (t, d, e) = (&self.train, &self.data, &self.eval);
        if !["none", "nf4", "fp4", "int4"].contains(&self.quant.format.as_str()) {
            return bad("quant.format", format!("`{}` is not one of none, nf4, fp4, int4", self.quant.format));
        }
        let optimizers = ["adamw-32bit", "adamw-8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"];
        if !optimizers.contains(&t.optimizer.as_str()) {
            return bad("train.optimizer", format!("`{}` is not one of {}", t.optimizer, optimizers.join(", ")));
        }
        for (field, v) in
            [("train.steps", t.steps as usize), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum)]
        {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        for (field, v) in [
            ("data.source_max_len", d.source_max_len),
            ("data.target_max_len", d.target_max_len),
            ("train.loss_chunk", t.loss_chunk),
            ("train.mlp_chunk", t.mlp_chunk.unwrap_or(1)),
            ("eval.batch_size", e.batch_size),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", format!("{} is not a positive learning rate", t.lr));
        }
        for (field, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, format!("{b} is outside [0, 1)"));
            }
        }
        if !(t.eps > 0.0 && t.eps.is_finite()) {
            return bad("train.eps", format!("{} must be positive", t.eps));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return bad("train.weight_decay", format!("{} must be ≥ 0", t.weight_decay));
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return bad("train.max_grad_norm", format!("{} must be ≥ 0 (0 turns clipping off)", t.max_grad_norm));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return bad("train.warmup_ratio", format!("{} is outside [0, 1]", t.warmup_ratio));
        }
        crate::eval::suite::parse_tasks(&e.tasks.join(","))
            .map_err(|err| Error::config(&self.file, "eval.tasks", err.to_string()))?;
        if !["val", "test"].contains(&e.mmlu_split.as_str()) {
            return bad("eval.mmlu_split", format!("`{}` is not val or test", e.mmlu_split));
        }
        match (&d.path, &d.builtin) {
            (None, None) => return bad("data", "set `path` (a data file) or `builtin` (a built-in task)".into()),
            (Some(_), Some(_)) => return bad("data", "set only one of `path` and `builtin`".into()),
            (None, Some(task)) if !crate::data::builtin::TASKS.contains(&task.as_str()) => {
                return bad(
                    "data.builtin",
                    format!("unknown task `{task}` (known: {})", crate::data::builtin::TASKS.join(", ")),
                )
            }
            _ => {}
        }
        if let Err(e) = self.device.name.parse::<crate::backend::Device>() {
            return bad("device.name", e.to_string());
        }
        Ok(())
    }
}
