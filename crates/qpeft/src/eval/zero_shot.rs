//! Zero-shot multiple choice as lm-evaluation-harness scores it (methods.md §9.2): every choice's
//! log-likelihood LL = Σ log p(continuation | context); acc = [argmax LL = gold], acc_norm = [argmax LL / chars
//! of the choice = gold]; argmax takes the first maximum.

use serde::{Deserialize, Serialize};

use super::loglik::{self, Request};
use super::tasks::{Item, Task};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::Result;
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

/// One scored item.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scored {
    pub index: usize,
    pub gold: usize,
    pub pred: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pred_norm: Option<usize>,
    /// Per choice: Σ log p of the continuation.
    pub ll: Vec<f64>,
    /// Per choice: continuation tokens.
    pub ntok: Vec<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub task: String,
    pub n: usize,
    pub acc: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Tokens of every (context ++ continuation) scored: the work a one-pass-per-choice evaluator does.
    pub scored_tokens: usize,
    pub items: Vec<Scored>,
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 || i == 0 {
            best = (i, x);
        }
    }
    best.0
}

/// The harness's requests of `items`, one per choice, in item order.
pub fn requests(tok: &Tokenizer, items: &[Item]) -> Result<Vec<Request>> {
    items.iter().flat_map(|it| it.pairs.iter()).map(|(c, x)| loglik::encode(tok, c, x)).collect()
}

/// Scores `items` of `task`, `batch` sequences per forward pass; `progress(n)` follows the scored choices.
pub fn evaluate<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    task: Task,
    items: &[Item],
    batch: usize,
    progress: impl FnMut(usize) -> Result<()>,
) -> Result<Report> {
    let reqs = requests(tok, items)?;
    // Inputs are left-truncated to the model's context, as the harness does.
    let scores = loglik::score(model, adapters, &reqs, batch, model.spec.max_position_embeddings, progress)?;
    let mut out = Vec::with_capacity(items.len());
    let mut at = 0;
    for (index, it) in items.iter().enumerate() {
        let n = it.pairs.len();
        let ll: Vec<f64> = scores[at..at + n].to_vec();
        let ntok = reqs[at..at + n].iter().map(|r| r.continuation.len()).collect();
        at += n;
        let pred = argmax(ll.iter().copied());
        let pred_norm = it.lens.as_ref().map(|lens| argmax(ll.iter().zip(lens).map(|(l, &c)| l / c as f64)));
        out.push(Scored { index, gold: it.gold, pred, pred_norm, ll, ntok });
    }
    let n = out.len();
    let frac = |hits: usize| hits as f64 / n.max(1) as f64;
    let acc = frac(out.iter().filter(|s| s.pred == s.gold).count());
    let acc_norm = task.has_norm().then(|| frac(out.iter().filter(|s| s.pred_norm == Some(s.gold)).count()));
    let scored_tokens = reqs.iter().map(|r| r.context.len() + r.continuation.len()).sum();
    Ok(Report { task: task.name().into(), n, acc, acc_norm, scored_tokens, items: out })
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(argmax([-5.0, -7.0].into_iter()), 0);
    }
}
