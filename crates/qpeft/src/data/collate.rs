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

    /// Right-pads `items` to their longest and masks the padding.
    pub fn batch(&self, items: &[&Tokenized]) -> Batch {
        let seq = items.iter().map(|t| t.ids.len()).max().unwrap_or(0).max(1);
        let n = items.len() * seq;
        let (mut tokens, mut mask, mut labels) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for t in items {
            let pad = seq - t.ids.len();
            tokens.extend(t.ids.iter().copied().chain(std::iter::repeat_n(self.pad, pad)));
            mask.extend(std::iter::repeat_n(1, t.ids.len()).chain(std::iter::repeat_n(0, pad)));
            labels.extend(t.labels.iter().copied().chain(std::iter::repeat_n(IGNORE, pad)));
        }
        Batch { input: Input { batch: items.len(), seq, tokens, mask }, labels }
    }
}
