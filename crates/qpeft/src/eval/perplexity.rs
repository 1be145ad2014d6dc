//! Perplexity: mean negative log-likelihood per predicted token over windows of a token stream.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Decoder, Input};

/// Rows of logits computed at once: bounds the [rows, vocab] buffer.
const LOGIT_ROWS: usize = 256;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub tokens: usize,
    pub predicted: usize,
    pub windows: usize,
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Per-token NLL of `tokens[1..]` given the prefix, within one window (one forward pass).
pub fn window_nll<B: Backend>(model: &Decoder<B>, tokens: &[u32]) -> Result<Vec<f32>> {
    let be = &model.backend;
    let (h, v) = (model.spec.hidden_size, model.spec.vocab_size);
    let mut cache = model.new_cache(1, tokens.len())?;
    let hidden = be.download(&model.forward(&Input::single(tokens), &mut cache)?)?;
    let mut nll = Vec::with_capacity(tokens.len().saturating_sub(1));
    let predicted = tokens.len() - 1;
    for start in (0..predicted).step_by(LOGIT_ROWS) {
        let rows = LOGIT_ROWS.min(predicted - start);
        let x = be.upload(&hidden[start * h..(start + rows) * h])?;
        let logits = model.logits(&x, rows)?;
        let targets = be.upload_ints(&tokens[start + 1..start + 1 + rows])?;
        let mut out = be.zeros(rows)?;
        be.cross_entropy(&logits, &targets, v, u32::MAX, &mut out)?;
        nll.extend(be.download(&out)?);
    }
    Ok(nll)
}

/// Splits `tokens` into consecutive non-overlapping windows of at most `window` tokens; each window
/// is scored independently (its first token is context only).
pub fn perplexity<B: Backend>(
    model: &Decoder<B>,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(usize),
) -> Result<Perplexity> {
    if window < 2 {
        return Err(Error::Invalid(format!("window must be at least 2 tokens, got {window}")));
    }
    if tokens.len() < 2 {
        return Err(Error::Invalid(format!("need at least 2 tokens to measure perplexity, got {}", tokens.len())));
    }
    let mut sum = 0f64;
    let mut predicted = 0;
    let mut windows = 0;
    for chunk in tokens.chunks(window).filter(|c| c.len() >= 2) {
        let nll = window_nll(model, chunk)?;
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        predicted += nll.len();
        windows += 1;
        progress(chunk.len());
    }
    let mean_nll = sum / predicted as f64;
    Ok(Perplexity { tokens: tokens.len(), predicted, windows, mean_nll, perplexity: mean_nll.exp() })
}
