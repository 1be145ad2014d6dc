//! Autoregressive generation over the KV cache: greedy by default, or temperature / top-p
//! sampling from a seeded ChaCha RNG.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Decoder, Input};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after any of these tokens (it is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 128, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens: vec![] }
    }
}

/// Index of the largest logit (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / temperature) restricted to the smallest set of most likely
/// tokens whose probability reaches `top_p`.
fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &x)| (i as u32, (((x - max) / temperature) as f64).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p as f64 {
            break;
        }
    }
    let probs = &probs[..kept];
    let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
    // 53 random bits → a uniform double in [0, 1).
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept_mass;
    let mut acc = 0.0;
    for p in probs {
        acc += p.1;
        if u < acc {
            return p.0;
        }
    }
    probs[kept - 1].0
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` for each new token.
pub fn generate<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty (no tokens to condition on)".into()));
    }
    let valid = opts.temperature >= 0.0 && opts.top_p > 0.0 && opts.top_p <= 1.0;
    if !valid {
        return Err(Error::Invalid(format!(
            "temperature must be ≥ 0 and top-p in (0, 1]; got {} and {}",
            opts.temperature, opts.top_p
        )));
    }
    let be = &model.backend;
    let mut cache = model.new_cache(1, prompt.len() + opts.max_new_tokens)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut out = Vec::new();
    let mut input = Input::single(prompt);
    while out.len() < opts.max_new_tokens {
        let hidden = model.forward_with(&input, &mut cache, adapters, &mut |_, _, _| Ok(()))?;
        let last = be.download(&hidden)?;
        let h = model.spec.hidden_size;
        let last = be.upload(&last[last.len() - h..])?;
        let logits = be.download(&model.logits(&last, 1)?)?;
        let next = if opts.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample(&logits, opts.temperature, opts.top_p, &mut rng)
        };
        out.push(next);
        on_token(next)?;
        if opts.stop_tokens.contains(&next) {
            break;
        }
        input = Input::single(&[next]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_head() {
        // p ≈ [0.86, 0.12, 0.02]: with top_p 0.5 only token 0 can be drawn.
        let logits = [2.0, 0.0, -1.7];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut rng), 0);
        }
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[sample(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        assert!(counts[0] > 1600 && counts[1] > 150 && counts[2] > 10, "{counts:?}");
    }
}
