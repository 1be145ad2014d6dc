//! The records of a run's `metrics.jsonl`: one JSON object per optimizer step (`StepRecord`) and per evaluation
//! (`Evaluation`), in the order they happened. Plots, summaries and study reports read them back through these
//! types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// Mean training loss of the step's micro-batches.
    pub loss: f64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Loss targets, and real (non-padding) input tokens, of the step.
    pub tokens: usize,
    pub input_tokens: usize,
    /// Input tokens per second, as peers report throughput.
    pub tokens_per_s: f64,
    pub epoch: u64,
    pub seconds: f64,
    /// The checkpointing policy the step ran (`train.checkpointing`; with "auto", what it chose), and with "auto"
    /// the MLP rows per chunk it chose. Absent from runs written before the policies existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checkpointing: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_chunk: Option<usize>,
}

/// Held-out results at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub step: u64,
    /// Mean cross-entropy per target token over the evaluated examples.
    pub eval_loss: f64,
    pub eval_tokens: usize,
    /// With exact match on: the fraction of greedy answers equal to the target, and how many were judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match_n: Option<usize>,
    /// Benchmark scores of `[eval] tasks`, e.g. `mmlu_acc`, `arc_easy_acc_norm`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tasks: BTreeMap<String, f64>,
}

impl Evaluation {
    /// (correct, judged) answers of the exact-match check.
    pub fn exact_match_counts(&self) -> Option<(usize, usize)> {
        let n = self.exact_match_n?;
        Some(((self.exact_match? * n as f64).round() as usize, n))
    }
}

/// A line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Eval(Evaluation),
    Step(StepRecord),
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Eval(e) => e.step,
            Record::Step(s) => s.step,
        }
    }
}
