//! The training pass of the decoder: causal-LM loss over a batch and the adapters' gradients, with a choice of
//! what each block keeps for its backward (`Checkpointing`): everything, or only its input (recomputing the block in
//! backward), its input and its attention output (the recompute skips attention), or its input in host memory.
//!
//! Labels follow transformers: `labels[t]` is the token at t and position t is scored on `labels[t + 1]`;
//! `IGNORE` (−100 in PyTorch) excludes a target, e.g. padding or the prompt of a response-only loss. The loss is
//! the mean over the kept targets. The LM head and the loss run over chunks of rows so that the [rows, vocab]
//! logits never exist at once.

use super::block::{copy_of, mlp_chunk, Acts, AttnActs, Ctx, Dims, KvTarget};
use super::decoder::{Decoder, Input};
use crate::adapters::set::AdapterSet;
use crate::adapters::Pass;
use crate::backend::Backend;
use crate::error::{Error, Result};

/// What `Decoder::loss_and_backward_with` calls after each block's backward: the block's index and the adapters.
pub type LayerDone<'a, B> = dyn FnMut(usize, &mut AdapterSet<B>) -> Result<()> + 'a;

/// A target that does not count (PyTorch's ignore_index −100).
pub const IGNORE: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct Batch {
    pub input: Input,
    /// [batch, seq], unshifted; IGNORE where no loss is taken.
    pub labels: Vec<u32>,
}

/// What a training pass keeps of each block for its backward (`train.checkpointing`). Fastest first; each keeps less
/// device memory than the one before. In f32 numerics every policy gives the same gradients bit for bit; in the 16-bit
/// modes a kept activation is stored in bf16 (`Backend::Saved`), so the policies differ by that rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every activation of every block: no recompute.
    None,
    /// Each block's input and its attention output: the backward recomputes the norms, projections and RoPE but not
    /// the attention itself (the costliest op per byte kept).
    Selective,
    /// Each block's input: the backward recomputes the block.
    Full,
    /// As `Full`, with the inputs in host memory (`Backend::offload`), copied back one block ahead of the backward.
    Offload,
}

impl Checkpointing {
    pub const ALL: [Checkpointing; 4] =
        [Checkpointing::None, Checkpointing::Selective, Checkpointing::Full, Checkpointing::Offload];

    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Selective => "selective",
            Checkpointing::Full => "full",
            Checkpointing::Offload => "offload",
        }
    }

    pub fn parse(name: &str) -> Option<Checkpointing> {
        Checkpointing::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// What each block keeps for the backward.
    pub checkpointing: Checkpointing,
    /// Dropout on (training) or off.
    pub dropout: bool,
    /// Seed of this step's dropout masks.
    pub seed: u64,
    /// Multiplies the gradients (e.g. 1/accumulation steps); the reported loss is unscaled.
    pub grad_scale: f32,
    /// Rows per LM-head chunk.
    pub loss_chunk: usize,
    /// Most rows per MLP chunk with checkpointing; None: as many as keep a chunk's activations small
    /// (`block::mlp_chunk`). The recompute in backward always runs in chunks; the forward does only while the adapters
    /// hold gradients (after the first micro-batch of a step), as only then does its working set meet theirs.
    pub mlp_chunk: Option<usize>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            checkpointing: Checkpointing::None,
            dropout: false,
            seed: 0,
            grad_scale: 1.0,
            loss_chunk: 256,
            mlp_chunk: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepResult {
    /// Mean cross-entropy over the kept targets (0 when there are none).
    pub loss: f64,
    /// Kept targets.
    pub tokens: usize,
}

impl Batch {
    /// The shifted targets, one per row: position t of a sequence is scored on labels[t + 1]. Every kept label must
    /// be a token id of the vocabulary: checked here, on the host, as a GPU kernel would read out of bounds.
    fn targets(&self, vocab: usize) -> Result<Vec<u32>> {
        let Input { batch, seq, .. } = self.input;
        if self.labels.len() != batch * seq
            || self.input.tokens.len() != batch * seq
            || self.input.mask.len() != batch * seq
        {
            return Err(Error::Invalid(format!(
                "batch of {batch} × {seq}: {} tokens, {} mask values, {} labels",
                self.input.tokens.len(),
                self.input.mask.len(),
                self.labels.len()
            )));
        }
        if let Some(&bad) = self.labels.iter().find(|&&t| t != IGNORE && t as usize >= vocab) {
            return Err(Error::Invalid(format!("label id {bad} is outside the vocabulary (size {vocab})")));
        }
        Ok((0..batch * seq).map(|r| if r % seq + 1 < seq { self.labels[r + 1] } else { IGNORE }).collect())
    }

    /// Position ids: each real token continues its example's count; padding gets 0. The mask holds segments (a packed
    /// row's examples are 1, 2, …: `data::collate::pack`), and the count restarts where the segment changes.
    fn positions(&self) -> Vec<u32> {
        let Input { batch, seq, ref mask, .. } = self.input;
        let mut out = Vec::with_capacity(batch * seq);
        for b in 0..batch {
            let (mut next, mut segment) = (0, 0);
            for &m in &mask[b * seq..(b + 1) * seq] {
                if m == 0 {
                    out.push(0);
                    continue;
                }
                if m != segment {
                    (next, segment) = (0, m);
                }
                out.push(next);
                next += 1;
            }
        }
        out
    }
}

impl<B: Backend> Decoder<B> {
    /// The loss of `batch` without gradients (adapters in inference or training mode per `opts.dropout`).
    pub fn loss(&self, batch: &Batch, adapters: Option<&AdapterSet<B>>, opts: &StepOptions) -> Result<StepResult> {
        self.pass(batch, adapters.map(Adapters::Shared), opts, &mut |_, _| Ok(()))
    }

    /// The loss of `batch`, and its gradient (× `grad_scale`) added to every adapter parameter's `grad`.
    pub fn loss_and_backward(
        &self,
        batch: &Batch,
        adapters: &mut AdapterSet<B>,
        opts: &StepOptions,
    ) -> Result<StepResult> {
        self.loss_and_backward_with(batch, adapters, opts, &mut |_, _| Ok(()))
    }

    /// `loss_and_backward`, calling `layer_done(l, adapters)` as soon as the backward has finished block l (the last
    /// block first): its adapters' gradients of this pass are then complete (data-parallel steps start summing them).
    pub fn loss_and_backward_with(
        &self,
        batch: &Batch,
        adapters: &mut AdapterSet<B>,
        opts: &StepOptions,
        layer_done: &mut LayerDone<'_, B>,
    ) -> Result<StepResult> {
        self.pass(batch, Some(Adapters::Training(adapters)), opts, layer_done)
    }

    fn pass(
        &self,
        batch: &Batch,
        mut adapters: Option<Adapters<'_, B>>,
        opts: &StepOptions,
        layer_done: &mut LayerDone<'_, B>,
    ) -> Result<StepResult> {
        let be = &self.backend;
        let targets = batch.targets(self.spec.vocab_size)?;
        let Input { batch: nb, seq, .. } = batch.input;
        let rows = nb * seq;
        let positions = be.upload_ints(&batch.positions())?;
        let key_mask = be.upload_ints(&batch.input.mask)?;
        let ctx = Ctx {
            rows,
            positions: &positions,
            key_mask: &key_mask,
            shape: self.attention_shape(nb, seq, seq, seq),
            glu: self.glu(),
            pass: Pass { training: opts.dropout, seed: opts.seed, first_row: 0 },
        };
        let backward = matches!(adapters, Some(Adapters::Training(_)));
        let dims = Dims::of(&self.spec);
        let chunk = mlp_chunk(rows, dims.ff, dims.h, self.blocks.len(), opts.mlp_chunk);

        // Forward, keeping of each block what the backward will need.
        let mut x = self.embed(&batch.input)?;
        let mut keep = match (backward, opts.checkpointing) {
            (false, _) => Kept::Nothing { scratch: Acts::new(be, rows, &dims)? },
            (true, Checkpointing::None) => Kept::Activations(Vec::with_capacity(self.blocks.len())),
            (true, policy) => Kept::Inputs {
                scratch: AttnActs::new(be, rows, &dims)?,
                inputs: Vec::new(),
                outputs: (policy == Checkpointing::Selective).then(Vec::new),
                offload: policy == Checkpointing::Offload,
            },
        };
        let set = adapters.as_ref().map(Adapters::shared);
        for l in 0..self.blocks.len() {
            let layer = self.layer(l);
            match &mut keep {
                Kept::Nothing { scratch } => {
                    layer.forward(&mut x, scratch, KvTarget::Own, &ctx, set, &mut |_, _, _| Ok(()))?
                }
                Kept::Activations(saved) => {
                    let mut a = Acts::new(be, rows, &dims)?.keeping_hidden();
                    a.x_in = Some(copy_of(be, &x)?);
                    a.x_mid = Some(be.uninit(be.len(&x))?);
                    layer.forward(&mut x, &mut a, KvTarget::Own, &ctx, set, &mut |_, _, _| Ok(()))?;
                    saved.push(a);
                }
                Kept::Inputs { scratch, inputs, outputs, offload } => {
                    let set = set.expect("a training pass has adapters");
                    // The MLP runs whole until the adapters hold gradients (the first micro-batch of a step): only
                    // then does its working set meet theirs.
                    let forward_chunk = if set.holds_gradients(be) { chunk } else { rows };
                    inputs.push(if *offload { be.offload(&x)? } else { be.save(&x)? });
                    layer.forward_chunked(&mut x, scratch, &ctx, set, forward_chunk)?;
                    if let Some(outputs) = outputs {
                        outputs.push(be.save(&scratch.att)?);
                    }
                }
            }
        }
        // The forward's scratch is not needed any more (the backward allocates its own per block).
        match &mut keep {
            Kept::Nothing { scratch } => *scratch = Acts::new(be, 0, &dims)?,
            Kept::Inputs { scratch, .. } => *scratch = AttnActs::new(be, 0, &dims)?,
            Kept::Activations(_) => {}
        }
        let hidden = self.final_norm(&x, rows)?;
        let kept = targets.iter().filter(|&&t| t != IGNORE).count();
        let scale = if kept == 0 { 0.0 } else { opts.grad_scale / kept as f32 };
        let (loss_sum, d_hidden) =
            self.head_loss(&hidden, &targets, rows, backward.then_some(scale), opts.loss_chunk)?;
        drop(hidden);
        let result = StepResult { loss: if kept == 0 { 0.0 } else { loss_sum / kept as f64 }, tokens: kept };
        let (Some(Adapters::Training(set)), Some(d_hidden)) = (adapters.as_mut(), d_hidden) else {
            return Ok(result);
        };

        // Backward: final norm, then the blocks in reverse.
        let s = &self.spec;
        let mut dx = be.zeros(rows * s.hidden_size)?;
        be.rmsnorm_backward(&x, &self.norm, &d_hidden, s.hidden_size, s.rms_norm_eps, s.norm_plus_one, &mut dx, false)?;
        drop((x, d_hidden));
        for l in (0..self.blocks.len()).rev() {
            let layer = self.layer(l);
            match &mut keep {
                Kept::Inputs { inputs, outputs, .. } => {
                    // Recompute the block from its saved input with the same dropout masks.
                    // The saved (16-bit) copy is freed before the recompute: it is a block input's worth of memory.
                    let out_of_step = || Error::Invalid("checkpoint inputs out of step".into());
                    let saved = inputs.pop().ok_or_else(out_of_step)?;
                    let x_in = be.restore(&saved)?;
                    drop(saved);
                    // The next block's input starts on its way back while this block runs (offloaded inputs).
                    if let Some(next) = inputs.last() {
                        be.prefetch(next)?;
                    }
                    let att = match outputs {
                        Some(outputs) => Some(be.restore(&outputs.pop().ok_or_else(out_of_step)?)?),
                        None => None,
                    };
                    layer.recompute_backward(&x_in, att, &mut dx, &ctx, set, chunk)?;
                }
                Kept::Activations(saved) => {
                    let mut a = saved.pop().ok_or_else(|| Error::Invalid("block activations out of step".into()))?;
                    layer.backward(&mut dx, &mut a, &ctx, set)?;
                }
                Kept::Nothing { .. } => unreachable!("a pass with gradients keeps activations or inputs"),
            }
            layer_done(l, set)?;
        }
        Ok(result)
    }

    /// Σ cross-entropy of the LM head over the kept targets, and with `grad_scale` Some(c) also
    /// ∂(c · Σ loss)/∂hidden — computed `chunk` rows at a time.
    fn head_loss(
        &self,
        hidden: &B::Buf,
        targets: &[u32],
        rows: usize,
        grad_scale: Option<f32>,
        chunk: usize,
    ) -> Result<(f64, Option<B::Buf>)> {
        let (be, h, vocab) = (&self.backend, self.spec.hidden_size, self.spec.vocab_size);
        let chunk = chunk.max(1);
        let mut d_hidden = match grad_scale {
            Some(_) => Some(be.zeros(rows * h)?),
            None => None,
        };
        let mut total = 0f64;
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            if targets[r0..r0 + n].iter().all(|&t| t == IGNORE) {
                continue;
            }
            let mut hc = be.uninit(n * h)?;
            be.copy(hidden, r0 * h, &mut hc, 0, n * h)?;
            let logits = self.logits(&hc, n)?;
            let t = be.upload_ints(&targets[r0..r0 + n])?;
            let mut losses = be.zeros(n)?;
            be.cross_entropy(&logits, &t, vocab, IGNORE, &mut losses)?;
            total += be.sum(&losses)?;
            if let (Some(scale), Some(dh)) = (grad_scale, d_hidden.as_mut()) {
                let mut dlogits = be.uninit(n * vocab)?;
                be.cross_entropy_backward(&logits, &t, vocab, IGNORE, scale, &mut dlogits)?;
                let mut dhc = be.uninit(n * h)?;
                match &self.lm_head {
                    Some(head) => head.backward_input(be, &be.operand(&dlogits)?, None, n, &mut dhc, false)?,
                    None => be.linear_backward(&dlogits, &self.embed, n, &mut dhc, false)?,
                }
                be.copy(&dhc, 0, dh, r0 * h, n * h)?;
            }
        }
        Ok((total, d_hidden))
    }
}

/// What a pass keeps of each block for its backward.
enum Kept<B: Backend> {
    /// Loss only: one set of activations reused by every block.
    Nothing { scratch: Acts<B> },
    /// Every block's activations, its input and mid-residual included.
    Activations(Vec<Acts<B>>),
    /// Checkpointing: each block's input (as `Backend::Saved`, offloaded or not) and with `Selective` its attention
    /// output; the attention half's activations in one reused set.
    Inputs { scratch: AttnActs<B>, inputs: Vec<B::Saved>, outputs: Option<Vec<B::Saved>>, offload: bool },
}

/// The adapters of a pass: read-only (loss only) or with gradients.
enum Adapters<'a, B: Backend> {
    Shared(&'a AdapterSet<B>),
    Training(&'a mut AdapterSet<B>),
}

impl<B: Backend> Adapters<'_, B> {
    fn shared(&self) -> &AdapterSet<B> {
        match self {
            Adapters::Shared(s) => s,
            Adapters::Training(s) => s,
        }
    }
}
