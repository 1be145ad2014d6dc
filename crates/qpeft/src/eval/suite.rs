//! The benchmark tasks by name, so that `qpeft eval` and evaluation during training run them the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::tasks::{Task, ALL};
use super::{mmlu, zero_shot};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

/// Every task name, in the papers' order.
pub const NAMES: [&str; 8] =
    ["mmlu", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"];

/// Splits a comma-separated task list ("all" = every benchmark task), refusing unknown names. `extra` are the
/// caller's own task names (e.g. `heldout`), accepted and listed in the error.
pub fn parse_tasks(list: &str, extra: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            out.extend(NAMES.iter().map(|s| s.to_string()));
        } else if NAMES.contains(&name) || extra.contains(&name) {
            out.push(name.to_string());
        } else {
            let known: Vec<&str> = NAMES.iter().chain(extra).copied().collect();
            return Err(Error::Invalid(format!("unknown task `{name}` (tasks: {}, or all)", known.join(", "))));
        }
    }
    out.dedup();
    Ok(out)
}

/// Every benchmark task with its number of items in `data_dir` (MMLU: the questions of `mmlu_split`) and what an
/// item is.
pub fn sizes(data_dir: &Path, mmlu_split: &str) -> Result<Vec<(&'static str, usize, String)>> {
    let mut out = Vec::new();
    let mmlu = mmlu::load_split(&data_dir.join("mmlu"), mmlu_split)?;
    let questions = mmlu.values().map(Vec::len).sum();
    out.push(("mmlu", questions, format!("{mmlu_split} questions in {} subjects, 5-shot", mmlu.len())));
    for task in ALL {
        let items = task.load(data_dir)?;
        let choices: usize = items.iter().map(|i| i.pairs.len()).sum();
        out.push((task.name(), items.len(), format!("items, {choices} scored continuations")));
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct Options {
    /// The datasets folder: mmlu/, hellaswag/, … inside it.
    pub data_dir: PathBuf,
    /// First N items of each zero-shot task, first N questions of each MMLU subject (None: all).
    pub limit: Option<usize>,
    /// First N questions of each MMLU subject (None: `limit`).
    pub mmlu_limit: Option<usize>,
    /// MMLU split: test or val.
    pub mmlu_split: String,
    /// Longest MMLU prompt in tokens (shots are dropped to fit).
    pub mmlu_max_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// Runs task `name`; `progress(done, total)` counts MMLU questions or zero-shot choices, and an error from it
/// (`Error::Interrupted`) stops the task.
pub fn run<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    name: &str,
    opts: &Options,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<TaskReport> {
    if name == "mmlu" {
        let o = mmlu::Options {
            split: opts.mmlu_split.clone(),
            limit: opts.mmlu_limit.or(opts.limit),
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
        progress(done, total)
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
        assert_eq!(super::parse_tasks("mmlu, piqa", &[]).unwrap(), ["mmlu", "piqa"]);
        assert_eq!(super::parse_tasks("all", &[]).unwrap().len(), 8);
        assert!(super::parse_tasks("mmlu,squad", &[]).unwrap_err().to_string().contains("squad"));
        assert_eq!(super::parse_tasks("heldout,piqa", &["heldout"]).unwrap(), ["heldout", "piqa"]);
        let e = super::parse_tasks("held", &["heldout"]).unwrap_err().to_string();
        assert!(e.contains("`held`") && e.contains("openbookqa, heldout"), "{e}");
    }
}
