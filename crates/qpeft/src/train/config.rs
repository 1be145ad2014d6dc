//! The run config: one TOML file per run with `[model]`, `[quant]`, `[adapter]` (per-layer rules, see `plan`),
//! `[data]`, `[train]`, `[eval]` and `[device]`. Unknown keys and invalid values are refused with the file, the
//! field and the value. `--set section.key=value` edits the parsed document before it is read, and the run
//! directory keeps the result as `config.toml`.
//!
//! Relative paths (model, data, out_dir) are taken from the working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optimizer::StateBits;
use super::schedule::Schedule;
use crate::config_doc::{self, parse_section, Edits};
use crate::data::DataFormat;
use crate::error::{Error, Result};
use crate::model::train::Checkpointing;
use crate::plan::Plan;
use crate::quant::recipe::Format;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An HF directory or a .gguf file.
    pub path: PathBuf,
}

/// How `[quant]` turns the checkpoint's block linears into the frozen base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// Train on the checkpoint's own weights: 16/32-bit, an already quantized directory, or a GGUF file's
    /// dequantized values.
    None,
    /// bitsandbytes NF4 (QLoRA's base).
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
    /// Round-to-nearest int4 in the GPTQ layout (QA-LoRA's base).
    Int4,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::None => "none",
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Fp4 => "fp4",
            QuantFormat::Int4 => "int4",
        }
    }

    /// The quantization format, None for `none`.
    pub fn format(self) -> Option<Format> {
        match self {
            QuantFormat::None => None,
            QuantFormat::Nf4 => Some(Format::Nf4),
            QuantFormat::Fp4 => Some(Format::Fp4),
            QuantFormat::Int4 => Some(Format::Int4),
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `[train] optimizer`: bitsandbytes' AdamW with 32-bit or 8-bit states. Paging (`paged_adamw_*`, accepted as
/// aliases) moves the states between host and device memory under pressure and changes no arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum OptimizerKind {
    #[serde(rename = "adamw-32bit", alias = "adamw_32bit", alias = "paged_adamw_32bit")]
    AdamW32,
    #[serde(rename = "adamw-8bit", alias = "adamw_8bit", alias = "paged_adamw_8bit")]
    AdamW8,
}

impl OptimizerKind {
    pub fn state_bits(self) -> StateBits {
        match self {
            OptimizerKind::AdamW32 => StateBits::B32,
            OptimizerKind::AdamW8 => StateBits::B8,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSection {
    pub format: QuantFormat,
    pub double_quant: bool,
    pub block: usize,
    pub group: usize,
    pub sym: bool,
    /// IR-QLoRA's information-calibrated quantization (ICQ) of the base.
    pub icq: bool,
}

impl Default for QuantSection {
    fn default() -> Self {
        QuantSection { format: QuantFormat::Nf4, double_quant: true, block: 64, group: 128, sym: false, icq: false }
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
    /// Padding-free batches: each micro-batch's examples packed into one row, as transformers'
    /// DataCollatorWithFlattening does (positions restart per example, no attention across examples; `Collator`).
    pub packing: bool,
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
            packing: false,
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
    pub optimizer: OptimizerKind,
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
    /// What each block keeps for the backward: "none", "selective", "full" (the default; `true` means it, `false`
    /// means "none"), "offload", or "auto" (the fastest that fits `memory_budget`): `model::train::Checkpointing`.
    pub checkpointing: CheckpointSetting,
    /// The memory "auto" checkpointing may fill, device memory on a GPU and host memory on the CPU: MiB, or a string
    /// with a unit ("60GiB", "24000MiB"). Unset: what is free (on the CPU: available).
    pub memory_budget: Option<MemoryBudget>,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep the newest N checkpoints (0: all).
    pub keep_checkpoints: usize,
    /// Rows per LM-head chunk of the loss.
    pub loss_chunk: usize,
    /// Most rows per MLP chunk with checkpointing (unset: chunks whose f32 intermediate activations take 1/20 of
    /// the checkpointed block inputs, at least 24 MiB: `model::block::mlp_chunk`). Larger chunks use more memory
    /// and run larger GEMMs (the chunks share the MLP weights' dequantization where the backend holds them).
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
            optimizer: OptimizerKind::AdamW32,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            min_8bit_size: super::optimizer::MIN_8BIT_SIZE,
            max_grad_norm: 0.3,
            seed: 0,
            checkpointing: CheckpointSetting::Fixed(Checkpointing::Full),
            memory_budget: None,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            loss_chunk: 256,
            mlp_chunk: None,
        }
    }
}

/// `train.checkpointing`: a policy, or "auto" (chosen per micro-batch shape from the memory left: `model::memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BoolOrName")]
pub enum CheckpointSetting {
    Fixed(Checkpointing),
    Auto,
}

impl CheckpointSetting {
    pub fn name(self) -> &'static str {
        match self {
            CheckpointSetting::Fixed(c) => c.name(),
            CheckpointSetting::Auto => "auto",
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrName {
    Bool(bool),
    Name(String),
}

impl TryFrom<BoolOrName> for CheckpointSetting {
    type Error = String;
    fn try_from(v: BoolOrName) -> std::result::Result<Self, String> {
        match v {
            BoolOrName::Bool(true) => Ok(CheckpointSetting::Fixed(Checkpointing::Full)),
            BoolOrName::Bool(false) => Ok(CheckpointSetting::Fixed(Checkpointing::None)),
            BoolOrName::Name(n) if n == "auto" => Ok(CheckpointSetting::Auto),
            BoolOrName::Name(n) => Checkpointing::parse(&n).map(CheckpointSetting::Fixed).ok_or_else(|| {
                format!("`{n}` is not a checkpointing policy (none, selective, full, offload, auto, true or false)")
            }),
        }
    }
}

/// `train.memory_budget` in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "MibOrText")]
pub struct MemoryBudget(pub usize);

#[derive(Deserialize)]
#[serde(untagged)]
enum MibOrText {
    Mib(u64),
    Text(String),
}

impl TryFrom<MibOrText> for MemoryBudget {
    type Error = String;
    fn try_from(v: MibOrText) -> std::result::Result<Self, String> {
        const MIB: f64 = (1u64 << 20) as f64;
        let (n, unit) = match v {
            MibOrText::Mib(m) => (m as f64, MIB),
            MibOrText::Text(t) => {
                let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
                let unit = match t[split..].trim() {
                    "MiB" | "" => MIB,
                    "GiB" => MIB * 1024.0,
                    "MB" => 1e6,
                    "GB" => 1e9,
                    other => return Err(format!("`{t}`: unknown unit `{other}` (MiB, GiB, MB or GB)")),
                };
                let n: f64 =
                    t[..split].trim().parse().map_err(|_| format!("`{t}` is not a memory size such as 60GiB"))?;
                (n, unit)
            }
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("{n} is not a positive memory size"));
        }
        Ok(MemoryBudget((n * unit) as usize))
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
    /// First N questions of each MMLU subject (unset: `task_limit`).
    pub mmlu_limit: Option<usize>,
    /// MMLU split during training: val (as QLoRA's callback) or test.
    pub mmlu_split: String,
    /// Run `tasks` before training too (a study's cells share one base and skip it).
    pub tasks_before_training: bool,
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
            mmlu_limit: None,
            mmlu_split: "val".into(),
            tasks_before_training: true,
            data_dir: PathBuf::from("../shared/datasets"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSection {
    /// `cpu`, `cpu:bf16` or `cuda[:N][:f16|:bf16|:f32]`, or a comma-separated list of one kind for data-parallel
    /// ranks (`cuda:0,cuda:1`, `cuda:all`; see `Device::parse_list`). `qpeft train --device` overrides it.
    pub name: String,
}

impl Default for DeviceSection {
    fn default() -> Self {
        DeviceSection { name: "cpu".into() }
    }
}

/// The sections a run config may have.
const SECTIONS: [&str; 7] = ["model", "quant", "adapter", "data", "train", "eval", "device"];

/// Section `name` of `doc` as `T` (its defaults when absent); errors name the section and the key.
fn section<T: for<'de> Deserialize<'de> + Default>(file: &Path, doc: &toml::Table, name: &str) -> Result<T> {
    match doc.get(name) {
        None => Ok(T::default()),
        Some(v) => parse_section(file, name, v),
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

impl RunConfig {
    /// Reads `file` and applies `sets`.
    pub fn read(file: &Path, sets: &[String]) -> Result<RunConfig> {
        RunConfig::compose(&[file.to_path_buf()], &Edits::sets(sets))
    }

    /// A run config composed of a base file and fragments merged over it in order (`config_doc::compose`; a study's
    /// variants are fragments such as configs/study/rank-mlp-div2.toml), then the command line's edits. Errors
    /// name the base file, or the option of a value the command line set.
    pub fn compose(files: &[PathBuf], edits: &Edits) -> Result<RunConfig> {
        let (base, doc) = config_doc::compose(files)?;
        RunConfig::from_doc(&base, doc, edits)
    }

    pub fn parse(file: &Path, text: &str, sets: &[String]) -> Result<RunConfig> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| Error::format(file, e.to_string().trim_end()))?;
        RunConfig::from_doc(file, doc, &Edits::sets(sets))
    }

    pub fn from_doc(file: &Path, mut doc: toml::Table, edits: &Edits) -> Result<RunConfig> {
        edits.apply(&mut doc)?;
        RunConfig::checked(file, doc).map_err(|e| edits.attribute(e))
    }

    fn checked(file: &Path, doc: toml::Table) -> Result<RunConfig> {
        let text = toml::to_string(&doc).map_err(|e| Error::format(file, e.to_string()))?;
        if let Some(k) = doc.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
            return Err(Error::config(file, k.clone(), format!("unknown section (known: {})", SECTIONS.join(", "))));
        }
        for required in ["model", "adapter", "data"] {
            if !doc.contains_key(required) {
                return Err(Error::config(file, required, "missing section"));
            }
        }
        let model: ModelSection = parse_section(file, "model", &doc["model"])?;
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

    pub fn warmup(&self) -> u64 {
        self.train
            .warmup_steps
            .unwrap_or_else(|| super::schedule::warmup_from_ratio(self.train.steps, self.train.warmup_ratio))
    }

    /// Values that are wrong whatever the model.
    fn check(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(&self.file, field, msg));
        let (t, d, e) = (&self.train, &self.data, &self.eval);
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
        crate::eval::suite::parse_tasks(&e.tasks.join(","), &[])
            .map_err(|err| Error::config(&self.file, "eval.tasks", err.to_string()))?;
        if !["val", "test"].contains(&e.mmlu_split.as_str()) {
            return bad("eval.mmlu_split", format!("`{}` is not val or test", e.mmlu_split));
        }
        match (&d.path, &d.builtin) {
            (None, None) => return bad("data", "set `path` (a data file) or `builtin` (a built-in task)".into()),
            (Some(_), Some(_)) => return bad(
                "data",
                "set only one of `path` and `builtin` (drop the other with --unset data.path or --unset data.builtin)"
                    .into(),
            ),
            (None, Some(task)) if !crate::data::builtin::TASKS.contains(&task.as_str()) => {
                return bad(
                    "data.builtin",
                    format!("unknown task `{task}` (known: {})", crate::data::builtin::TASKS.join(", ")),
                )
            }
            _ => {}
        }
        if let Err(e) = crate::backend::Device::parse_list(&self.device.name) {
            return bad("device.name", e.to_string());
        }
        Ok(())
    }
}
