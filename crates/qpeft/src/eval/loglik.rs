//! Log-likelihood scoring as lm-evaluation-harness does it: a request is (context, continuation) text; the
//! continuation's tokens are those of tok(context + continuation) beyond tok(context) (trailing whitespace of
//! the context moves to the continuation first), the model reads (context ++ continuation)[:-1] left-truncated
//! to `max_len`, and the score is Σ log p(continuation token | prefix) with whether each token was the argmax.
//! Requests run in padded batches sorted by length.

use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Decoder, Input};
use crate::tokenizer::Tokenizer;

/// One request in tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// Σ log p over the continuation tokens.
    pub loglik: f64,
    /// Every continuation token was the argmax of its position.
    pub greedy: bool,
}

/// The harness's encoding of (context, continuation) strings, with the tokenizer's default special tokens.
pub fn encode(tok: &Tokenizer, context: &str, continuation: &str) -> Result<Request> {
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    let whole = tok.encode(&format!("{context}{continuation}"), true)?;
    let ctx = tok.encode(context, true)?;
    // As the harness: the continuation is whatever the whole encoding has beyond the context's length.
    let continuation = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    if continuation.is_empty() {
        return Err(Error::Invalid(format!("the continuation {continuation:?} adds no tokens to the context")));
    }
    Ok(Request { context: ctx, continuation })
}

/// log-softmax of `row` at `target`, and whether `target` is the (first) argmax.
fn log_prob(row: &[f32], target: u32) -> (f64, bool) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let argmax = row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
    (row[target as usize] as f64 - max as f64 - sum.ln(), argmax == target as usize)
}

/// Scores `requests` in batches of `batch` (by total length), each input left-truncated to `max_len` tokens.
pub fn score<B: Backend>(model: &Decoder<B>, adapters: Option<&AdapterSet<B>>, requests: &[Request], batch: usize, max_len: usize, mut progress: impl FnMut(usize)) -> Result<Vec<Score>> {
    let be = &model.backend;
    let (h, v) = (model.spec.hidden_size, model.spec.vocab_size);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len() + requests[i].continuation.len()));
    let mut out = vec![Score { loglik: 0.0, greedy: false }; requests.len()];
    for chunk in order.chunks(batch.max(1)) {
        // Inputs (ctx ++ cont)[:-1], left-truncated; the continuation is predicted by the last |cont| positions.
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| {
                let r = &requests[i];
                if r.continuation.is_empty() {
                    return Err(Error::Invalid(format!("request {i} has an empty continuation")));
                }
                let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
                let input = &all[..all.len() - 1];
                Ok(input[input.len().saturating_sub(max_len)..].to_vec())
            })
            .collect::<Result<_>>()?;
        let seq = rows.iter().map(Vec::len).max().unwrap_or(1);
        // Right padding keeps each row's positions 0..n; padded keys are masked.
        let mut tokens = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in &rows {
            tokens.extend(r.iter().copied().chain(std::iter::repeat_n(0, seq - r.len())));
            mask.extend(std::iter::repeat_n(1, r.len()).chain(std::iter::repeat_n(0, seq - r.len())));
        }
        let input = Input { batch: rows.len(), seq, tokens, mask };
        let mut cache = model.new_cache(rows.len(), seq)?;
        let hidden = be.download(&model.forward_with(&input, &mut cache, adapters, &mut |_, _, _| Ok(()))?)?;
        for (b, &i) in chunk.iter().enumerate() {
            let cont = &requests[i].continuation;
            let n = rows[b].len();
            let k = cont.len().min(n);
            let first = b * seq + n - k;
            let logits = be.download(&model.logits(&be.upload(&hidden[first * h..(first + k) * h])?, k)?)?;
            let mut s = Score { loglik: 0.0, greedy: true };
            for (j, &t) in cont[cont.len() - k..].iter().enumerate() {
                let (lp, top) = log_prob(&logits[j * v..(j + 1) * v], t);
                s.loglik += lp;
                s.greedy &= top;
            }
            out[i] = s;
        }
        progress(chunk.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_a_log_softmax() {
        let (lp, top) = log_prob(&[1.0, 2.0, 3.0], 2);
        let want = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lp - want).abs() < 1e-6 && top);
        assert!(!log_prob(&[1.0, 2.0, 3.0], 0).1);
    }
}
