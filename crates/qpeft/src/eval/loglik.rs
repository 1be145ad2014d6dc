//! Log-likelihood scoring as lm-evaluation-harness does it: a request is (context, continuation) text; the
//! continuation's tokens are those of tok(context + continuation) beyond tok(context) (trailing whitespace of
//! the context moves to the continuation first), the model reads (context ++ continuation)[:-1] left-truncated
//! to `max_len`, and the score is Σ log p(continuation token | prefix). (The harness also reports whether every
//! token was the argmax; none of qpeft's tasks uses that.) Requests sharing a context run it once; the rest runs in
//! padded batches of similar lengths. The log-softmax runs on the backend, so only one number per token comes
//! back: a 151,936-entry vocabulary made the host's log-softmax most of a zero-shot task's time on a GPU.

use std::collections::HashMap;

use super::prefix::{self, Group};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::train::IGNORE;
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

/// One request in tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
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

/// Σ log p(continuation) of each of `requests`, at most `batch` sequences per forward pass, each input left-truncated to `max_len` tokens.
/// Requests with the same context run it once (see `prefix`); `progress(n)` follows the scored requests, and an
/// error from it (`Error::Interrupted`) stops the scoring.
pub fn score<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    requests: &[Request],
    batch: usize,
    max_len: usize,
    mut progress: impl FnMut(usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let (h, v) = (model.spec.hidden_size, model.spec.vocab_size);
    // The model input (ctx ++ cont)[:-1], left-truncated, splits into a prefix and the suffix whose k positions
    // predict the last k continuation tokens (all of them unless truncation cut into the continuation).
    let mut groups: Vec<Group> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut by_prefix: HashMap<Vec<u32>, usize> = HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        if r.context.is_empty() || r.continuation.is_empty() {
            return Err(Error::Invalid(format!("request {i} has an empty context or continuation")));
        }
        let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let input = &all[..all.len() - 1];
        let input = &input[input.len().saturating_sub(max_len.max(1))..];
        let (prefix, suffix) = input.split_at(input.len() - r.continuation.len().min(input.len()));
        let g = *by_prefix.entry(prefix.to_vec()).or_insert_with(|| {
            groups.push(Group { prefix: prefix.to_vec(), suffixes: Vec::new() });
            members.push(Vec::new());
            groups.len() - 1
        });
        groups[g].suffixes.push(suffix.to_vec());
        members[g].push(i);
    }
    let mut out = vec![0.0; requests.len()];
    // Scored positions of many requests go through the LM head together: the head is the largest weight (Qwen:
    // 151,936 × 1,536), and a pass per request would stream it once per request.
    let head_rows = (HEAD_VALUES / v.max(1)).clamp(1, MAX_HEAD_ROWS);
    let mut pending = Pending::default();
    prefix::run(model, adapters, &groups, batch, |g, s, hidden| {
        let i = members[g][s];
        let cont = &requests[i].continuation;
        let k = hidden.len() / h;
        pending.hidden.extend_from_slice(hidden);
        pending.targets.extend_from_slice(&cont[cont.len() - k..]);
        pending.owners.push((i, k));
        if pending.targets.len() >= head_rows {
            let n = pending.score(model, &mut out)?;
            progress(n)?;
        }
        Ok(())
    })?;
    let n = pending.score(model, &mut out)?;
    progress(n)?;
    Ok(out)
}

/// At most this many logits (f32) at once: 256 MiB.
const HEAD_VALUES: usize = 1 << 26;
const MAX_HEAD_ROWS: usize = 1024;

/// Final hidden states of scored positions waiting for the LM head, with their targets and owners.
#[derive(Default)]
struct Pending {
    hidden: Vec<f32>,
    targets: Vec<u32>,
    /// (request, its number of scored positions), in the order of `targets`.
    owners: Vec<(usize, usize)>,
}

impl Pending {
    /// Σ log p of each owner's targets into `out`; empties the queue and returns how many requests it scored.
    fn score<B: Backend>(&mut self, model: &Decoder<B>, out: &mut [f64]) -> Result<usize> {
        let (be, rows) = (&model.backend, self.targets.len());
        if rows > 0 {
            let logits = model.logits(&be.upload(&self.hidden)?, rows)?;
            let mut nll = be.zeros(rows)?;
            be.cross_entropy(&logits, &be.upload_ints(&self.targets)?, model.spec.vocab_size, IGNORE, &mut nll)?;
            let nll = be.download(&nll)?;
            let mut at = 0;
            for &(i, k) in &self.owners {
                out[i] = -nll[at..at + k].iter().map(|&x| x as f64).sum::<f64>();
                at += k;
            }
        }
        let n = self.owners.len();
        self.hidden.clear();
        self.targets.clear();
        self.owners.clear();
        Ok(n)
    }
}
