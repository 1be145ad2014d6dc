//! The benchmark tasks by name, so that `qpeft eval` and evaluation during training run them the same way.

use std::path::PathBuf;

use serde::Serialize;

use super::tasks::Task;
use super::{mmlu, zero_shot};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

/// Every task name, in the papers' order.
pub const NAMES: [&str; 8] =
    ["mmlu", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"];

/// Splits a comma-separated task list ("all" = every task), refusing unknown names.
pub fn parse_tasks(list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(NAMES.iter().map(|s| s.to_string()));
        } else if NAMES.contains(&name) {
            out.push(name.to_string());
        } else {
            return Err(Error::Invalid(format!("unknown task `{name}` (tasks: {}, or all)", NAMES.join(", "))));
        }
    }
    out.dedup();
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct Options {
    /// The datasets folder: mmlu/, hellaswag/, … inside it.
    pub data_dir: PathBuf,
    /// First N items of each zero-shot task, first N questions of each MMLU subject (None: all).
    pub limit: Option<usize>,
    /// MMLU split: test or val.
    pub mmlu_split: String,
    /// Longest MMLU prompt in tokens (shots are dropped to fit).
    pub mmlu_max_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum TaskReport {
    Mmlu(mmlu::Report),
    ZeroShot(zero_shot::Report),
}

impl TaskReport {
    /// The headline numbers: (metric, value), e.g. ("acc", 0.41), ("acc_norm", 0.45).
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        match self {
            TaskReport::Mmlu(r) => vec![("acc", r.micro), ("acc_macro", r.macro_avg)],
            TaskReport::ZeroShot(r) => {
                std::iter::once(("acc", r.acc)).chain(r.acc_norm.map(|a| ("acc_norm", a))).collect()
            }
        }
    }

    pub fn items(&self) -> usize {
        match self {
            TaskReport::Mmlu(r) => r.items.len(),
            TaskReport::ZeroShot(r) => r.n,
        }
    }
}

/// Runs task `name`; `progress(done, total)` counts MMLU questions or zero-shot choices.
pub fn run<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    name: &str,
    opts: &Options,
    mut progress: impl FnMut(usize, usize),
) -> Result<TaskReport> {
    if name == "mmlu" {
        let o = mmlu::Options {
            split: opts.mmlu_split.clone(),
            limit: opts.limit,
            subjects: Vec::new(),
            shots: 5,
            max_len: opts.mmlu_max_len,
            batch: opts.batch,
        };
        return Ok(TaskReport::Mmlu(mmlu::evaluate(model, adapters, tok, &opts.data_dir.join("mmlu"), &o, progress)?));
    }
    let task = Task::parse(name)
        .ok_or_else(|| Error::Invalid(format!("unknown task `{name}` (tasks: {})", NAMES.join(", "))))?;
    let mut items = task.load(&opts.data_dir)?;
    items.truncate(opts.limit.unwrap_or(usize::MAX));
    let total = items.iter().map(|it| it.pairs.len()).sum();
    let mut done = 0;
    let r = zero_shot::evaluate(model, adapters, tok, task, &items, opts.batch, |n| {
        done += n;
        progress(done, total);
    })?;
    Ok(TaskReport::ZeroShot(r))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_cover_every_zero_shot_task() {
        for t in crate::eval::tasks::ALL {
            assert!(super::NAMES.contains(&t.name()));
        }
        assert_eq!(super::parse_tasks("mmlu, piqa").unwrap(), ["mmlu", "piqa"]);
        assert_eq!(super::parse_tasks("all").unwrap().len(), 8);
        assert!(super::parse_tasks("mmlu,squad").unwrap_err().to_string().contains("squad"));
    }
}
