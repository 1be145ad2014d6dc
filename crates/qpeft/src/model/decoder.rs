//! The decoder: embeddings, pre-norm blocks of attention and gated MLP, final norm, LM head —
//! one config-driven implementation for every supported family (see `ModelSpec`).

use super::block::{Acts, Block, Ctx, Dims, KvTarget, Layer, LinearInputObserver};
use super::checkpoint::Checkpoint;
use super::kv_cache::KvCache;
use super::linear::QuantLinear;
use super::rope;
use crate::adapters::set::AdapterSet;
use crate::adapters::Pass;
use crate::arch::{Activation, ModelSpec, Proj};
use crate::backend::{AttentionShape, Backend, GluKind, RowWrite};
use crate::error::{Error, Result};
use crate::quant::base::BaseWeight;
use crate::quant::recipe::{quantize_weight, QuantizeOptions};

pub struct Decoder<B: Backend> {
    pub spec: ModelSpec,
    pub backend: B,
    /// [vocab, hidden]; also the LM head when embeddings are tied.
    pub embed: B::Weight,
    pub blocks: Vec<Block<B>>,
    pub norm: B::Buf,
    /// None when tied to `embed`.
    pub lm_head: Option<QuantLinear<B>>,
    pub(crate) inv_freq: B::Buf,
}

/// A batch of equally long token rows; `mask` marks real tokens (1) and padding (0).
#[derive(Clone, Debug)]
pub struct Input {
    pub batch: usize,
    pub seq: usize,
    pub tokens: Vec<u32>,
    pub mask: Vec<u32>,
}

impl Input {
    pub fn single(tokens: &[u32]) -> Input {
        Input { batch: 1, seq: tokens.len(), tokens: tokens.to_vec(), mask: vec![1; tokens.len()] }
    }

    /// Right-pads rows to a common length: every row keeps positions 0..len (as for scoring).
    pub fn right_padded(rows: &[&[u32]], pad: u32) -> Input {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            let n = seq - r.len();
            tokens.extend(r.iter().copied().chain(std::iter::repeat_n(pad, n)));
            mask.extend(std::iter::repeat_n(1, r.len()).chain(std::iter::repeat_n(0, n)));
        }
        Input { batch: rows.len(), seq, tokens, mask }
    }
}

impl<B: Backend> Decoder<B> {
    pub fn load(ckpt: &Checkpoint, backend: B) -> Result<Self> {
        Self::load_quantized(ckpt, backend, None, &mut |_, _| {})
    }

    /// `load`, with the block linears that are stored unquantized quantized (round to nearest) as `quantize` says, on
    /// the host before they reach the backend: a GPU never holds the dense model. `progress(done, total)` counts the
    /// blocks loaded.
    pub fn load_quantized(
        ckpt: &Checkpoint,
        backend: B,
        quantize: Option<&QuantizeOptions>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let s = ckpt.spec.clone();
        let be = &backend;
        let h = s.hidden_size;
        let vec = |name: &str, len: usize| -> Result<B::Buf> { be.upload(&ckpt.require(name, &[len])?.data) };
        let linear =
            |name: &str, in_dim: usize, out_dim: usize, bias: bool, quantizable: bool| -> Result<QuantLinear<B>> {
                let (mut base, mut dense) = ckpt.linear_base(name, out_dim, in_dim)?;
                // Weights stored unquantized or in a GGUF block format are (re-)quantized as asked.
                if let (Some(opts), true, BaseWeight::Dense | BaseWeight::Ggml(_)) = (quantize, quantizable, &base) {
                    let values = match dense.take() {
                        Some(w) => w.data,
                        None => base.dequantize().expect("a stored form dequantizes"),
                    };
                    base = quantize_weight(&values, out_dim, in_dim, opts)
                        .map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
                }
                let weight = be.upload_weight(&base, dense.as_ref().map(|w| &w.data[..]), out_dim, in_dim)?;
                let bias = if bias { Some(vec(&format!("{name}.bias"), out_dim)?) } else { None };
                Ok(QuantLinear { weight, bias, in_dim, out_dim, base })
            };
        // No with_capacity: num_layers is untrusted until every block's tensors are found.
        let mut blocks = Vec::new();
        for i in 0..s.num_layers {
            let p = format!("model.layers.{i}");
            let proj = |pr: Proj| {
                let (out_dim, in_dim) = pr.dims(&s);
                linear(&format!("{p}.{}", pr.module()), in_dim, out_dim, pr.has_bias(&s), true)
            };
            blocks.push(Block {
                attn_norm: vec(&format!("{p}.input_layernorm.weight"), h)?,
                q: proj(Proj::Q)?,
                k: proj(Proj::K)?,
                v: proj(Proj::V)?,
                o: proj(Proj::O)?,
                mlp_norm: vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: proj(Proj::Gate)?,
                up: proj(Proj::Up)?,
                down: proj(Proj::Down)?,
            });
            progress(i + 1, s.num_layers);
        }
        let (embed_base, embed_values) = ckpt.linear_base("model.embed_tokens", s.vocab_size, h)?;
        let embed = be.upload_weight(&embed_base, embed_values.as_ref().map(|w| &w.data[..]), s.vocab_size, h)?;
        let lm_head =
            if s.tie_word_embeddings { None } else { Some(linear("lm_head", h, s.vocab_size, false, false)?) };
        let norm = vec("model.norm.weight", h)?;
        let inv_freq = be.upload(&rope::inv_freq(&s))?;
        Ok(Decoder { spec: s, embed, blocks, norm, lm_head, inv_freq, backend })
    }

    /// Block `l` with what running it needs.
    pub(crate) fn layer(&self, l: usize) -> Layer<'_, B> {
        Layer { be: &self.backend, spec: &self.spec, inv_freq: &self.inv_freq, block: &self.blocks[l], index: l }
    }

    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache<B>> {
        KvCache::new(&self.backend, self.spec.num_layers, batch, capacity, self.spec.kv_dim())
    }

    /// Runs the new tokens of `input` through the decoder, appending them to `cache`, and returns
    /// the final-normed hidden states [batch·seq, hidden].
    pub fn forward(&self, input: &Input, cache: &mut KvCache<B>) -> Result<B::Buf> {
        self.forward_with(input, cache, None, &mut |_, _, _| Ok(()))
    }

    /// `forward` with adapters on the linears (inference: no dropout), and every linear layer's input shown to
    /// `observe(layer, site, x)` (x is [rows, in_dim]); calibration (GPTQ) collects its statistics this way.
    pub fn forward_with(
        &self,
        input: &Input,
        cache: &mut KvCache<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<B::Buf> {
        let be = &self.backend;
        if input.batch != cache.batch
            || input.tokens.len() != input.batch * input.seq
            || input.mask.len() != input.tokens.len()
        {
            return Err(Error::Invalid(format!(
                "input of {} tokens ({} × {}) does not fit a cache for batch {}",
                input.tokens.len(),
                input.batch,
                input.seq,
                cache.batch
            )));
        }
        let rows = input.tokens.len();
        let start = cache.len;
        let positions = be.upload_ints(&cache.append_mask(&input.mask, input.seq)?)?;
        let key_mask = be.upload_ints(&cache.key_mask)?;
        let mut x = self.embed(input)?;
        let ctx = Ctx {
            rows,
            positions: &positions,
            key_mask: &key_mask,
            shape: self.attention_shape(input.batch, input.seq, start + input.seq, cache.capacity),
            glu: self.glu(),
            pass: Pass { training: false, seed: 0, first_row: 0 },
        };
        let mut acts = Acts::new(be, rows, &Dims::of(&self.spec))?;
        let at = RowWrite {
            batch: input.batch,
            rows: input.seq,
            capacity: cache.capacity,
            start,
            width: self.spec.kv_dim(),
        };
        for l in 0..self.blocks.len() {
            let kv = KvTarget::Cache { k: &mut cache.k[l], v: &mut cache.v[l], at };
            self.layer(l).forward(&mut x, &mut acts, kv, &ctx, adapters, observe)?;
        }
        cache.len += input.seq;
        self.final_norm(&x, rows)
    }

    /// The scaled token embeddings [rows, hidden] of `input`.
    pub(crate) fn embed(&self, input: &Input) -> Result<B::Buf> {
        let (be, h) = (&self.backend, self.spec.hidden_size);
        // Checked here, on the host: a GPU kernel would read out of bounds instead of failing.
        if let Some(&bad) = input.tokens.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.spec.vocab_size
            )));
        }
        let ids = be.upload_ints(&input.tokens)?;
        // Gemma scales embeddings by √hidden rounded to the activation dtype (f32 here).
        let scale = if self.spec.scale_embeddings { (h as f32).sqrt() } else { 1.0 };
        let mut x = be.zeros(input.tokens.len() * h)?;
        be.embedding(&self.embed, &ids, h, scale, &mut x)?;
        Ok(x)
    }

    pub(crate) fn final_norm(&self, x: &B::Buf, rows: usize) -> Result<B::Buf> {
        let (be, s) = (&self.backend, &self.spec);
        let mut n = be.zeros(rows * s.hidden_size)?;
        be.rmsnorm(x, &self.norm, s.hidden_size, s.rms_norm_eps, s.norm_plus_one, &mut n)?;
        Ok(n)
    }

    pub(crate) fn attention_shape(
        &self,
        batch: usize,
        q_len: usize,
        kv_len: usize,
        kv_capacity: usize,
    ) -> AttentionShape {
        let s = &self.spec;
        AttentionShape {
            batch,
            q_len,
            kv_len,
            kv_capacity,
            heads: s.num_heads,
            kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            window: s.sliding_window,
        }
    }

    pub(crate) fn glu(&self) -> GluKind {
        match self.spec.activation {
            Activation::Silu => GluKind::Silu,
            Activation::GeluTanh => GluKind::GeluTanh,
        }
    }

    /// Logits [rows, vocab] of final hidden states [rows, hidden].
    pub fn logits(&self, hidden: &B::Buf, rows: usize) -> Result<B::Buf> {
        let be = &self.backend;
        let mut out = be.uninit(rows * self.spec.vocab_size)?;
        match &self.lm_head {
            Some(head) => head.forward(be, &be.operand(hidden)?, None, rows, &mut out, false)?,
            None => be.linear(hidden, &self.embed, rows, &mut out, false)?,
        }
        Ok(out)
    }
}
