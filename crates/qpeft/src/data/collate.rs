//! QLoRA's collator (`DataCollatorForCausalLM`, methods.md §2): source string = BOS + source, target string =
//! target + EOS, each tokenized separately without special tokens and right-truncated to its own maximum; the
//! loss covers the target tokens only unless `train_on_source`. Batches are right-padded; padding is masked
//! from attention and loss.

use super::Example;
use crate::error::{Error, Result};
use crate::model::train::{Batch, IGNORE};
use crate::model::Input;
use crate::tokenizer::Tokenizer;

/// One tokenized example: ids and unshifted labels (IGNORE where no loss is taken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub labels: Vec<u32>,
}

pub struct Collator<'a> {
    tok: &'a Tokenizer,
    pub source_max_len: usize,
    pub target_max_len: usize,
    pub train_on_source: bool,
    /// `batch` packs instead of padding (`data.packing`).
    pub packing: bool,
    bos: String,
    eos: String,
    pad: u32,
}

impl<'a> Collator<'a> {
    pub fn new(
        tok: &'a Tokenizer,
        source_max_len: usize,
        target_max_len: usize,
        train_on_source: bool,
    ) -> Result<Self> {
        let eos = tok.eos_token.clone().ok_or_else(|| {
            Error::Invalid("the tokenizer has no EOS token; training needs one to end targets".into())
        })?;
        let pad =
            tok.token_id(&eos).ok_or_else(|| Error::Invalid(format!("EOS token `{eos}` is not in the vocabulary")))?;
        Ok(Collator {
            tok,
            source_max_len,
            target_max_len,
            train_on_source,
            packing: false,
            bos: tok.bos_token.clone().unwrap_or_default(),
            eos,
            pad,
        })
    }

    /// The source tokens: BOS + source, truncated to `source_max_len` (also the prompt for generation).
    pub fn prompt(&self, ex: &Example) -> Result<Vec<u32>> {
        // A chat-template source may already begin with BOS.
        let source =
            if ex.source.starts_with(&self.bos) { ex.source.clone() } else { format!("{}{}", self.bos, ex.source) };
        let mut src = self.tok.encode(&source, false)?;
        src.truncate(self.source_max_len);
        Ok(src)
    }

    pub fn tokenize(&self, ex: &Example) -> Result<Tokenized> {
        let mut src = self.prompt(ex)?;
        let mut tgt = self.tok.encode(&format!("{}{}", ex.target, self.eos), false)?;
        tgt.truncate(self.target_max_len);
        let labels =
            src.iter().map(|&t| if self.train_on_source { t } else { IGNORE }).chain(tgt.iter().copied()).collect();
        src.extend(tgt);
        Ok(Tokenized { ids: src, labels })
    }

    /// The model's batch of `items`: packed into one row with `packing` (`pack`), else right-padded (`pad`).
    pub fn batch(&self, items: &[&Tokenized]) -> Batch {
        if self.packing {
            pack(items)
        } else {
            self.pad(items)
        }
    }

    /// Right-pads `items` to their longest with EOS and masks the padding (`pad`).
    pub fn pad(&self, items: &[&Tokenized]) -> Batch {
        pad(items, self.pad)
    }
}

/// `items` right-padded to their longest with `pad_id`, the padding masked and ignored by the loss.
pub fn pad(items: &[&Tokenized], pad_id: u32) -> Batch {
    let seq = items.iter().map(|t| t.ids.len()).max().unwrap_or(0).max(1);
    let n = items.len() * seq;
    let (mut tokens, mut mask, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for t in items {
        let pad = seq - t.ids.len();
        tokens.extend(t.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
        mask.extend(std::iter::repeat_n(1, t.ids.len()).chain(std::iter::repeat_n(0, pad)));
        labels.extend(t.labels.iter().copied().chain(std::iter::repeat_n(IGNORE, pad)));
    }
    Batch { input: Input { batch: items.len(), seq, tokens, mask }, labels }
}

/// `items` concatenated into one row without padding, as transformers' DataCollatorWithFlattening does: the key mask
/// holds each token's example (1, 2, …), so positions restart per example (`Batch::positions`) and attention stays
/// inside each example (`Backend::attention`), and each example's first label is `IGNORE`, so that no position
/// predicts the next example's first token. The loss is then the padded batch's (the same target tokens, whose first is
/// a prompt token unless `train_on_source`).
pub fn pack(items: &[&Tokenized]) -> Batch {
    let (mut tokens, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (i, t) in items.iter().enumerate() {
        tokens.extend_from_slice(&t.ids);
        mask.extend(std::iter::repeat_n(i as u32 + 1, t.ids.len()));
        labels.extend(t.labels.iter().enumerate().map(|(j, &l)| if j == 0 { IGNORE } else { l }));
    }
    if tokens.is_empty() {
        // An empty batch keeps one padding token, as `pad` does.
        (tokens, mask, labels) = (vec![0], vec![0], vec![IGNORE]);
    }
    Batch { input: Input { batch: 1, seq: tokens.len(), tokens, mask }, labels }
}
