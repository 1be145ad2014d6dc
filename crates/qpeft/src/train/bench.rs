//! Training-step throughput (what `qpeft bench train` and the peer scripts measure): the trainer's optimizer steps
//! (`StepRecipe::step`: forward with the causal-LM loss, backward, global-norm clipping, AdamW) on a fixed batch of
//! seeded random tokens (labels = ids, no padding), or on given batches of real data in turn, with the time of each
//! phase and the memory it took.

use serde::Serialize;

use super::optimizer::OptimizerState;
use super::step::StepRecipe;
use crate::adapters::set::AdapterSet;
use crate::backend::collective::Solo;
use crate::backend::{Backend, KernelTime};
use crate::error::Result;
use crate::model::block::mlp_chunk;
use crate::model::memory::activation_bytes;
use crate::model::train::{Batch, Checkpointing};
use crate::model::{Decoder, Input};

pub struct BenchOptions {
    pub batch: usize,
    pub seq: usize,
    /// Timed steps after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// The run config's step; each step is one micro-batch of `batch` × `seq` tokens …
    pub recipe: StepRecipe,
    /// … or, if any, the next of these batches (real data, padded or packed), in turn.
    pub batches: Vec<Batch>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    pub trainable: usize,
    /// Real (non-padding) input tokens per second: the median step's on random tokens; with real batches, all timed
    /// steps' tokens over their time.
    pub tokens_per_s: f64,
    /// Loss targets per second, likewise.
    pub target_tokens_per_s: f64,
    pub step_s: f64,
    pub forward_backward_s: f64,
    pub optimizer_s: f64,
    pub loss: f64,
    /// The checkpointing policy and MLP chunk rows of the last step (what "auto" chose), and its activations as
    /// `model::memory` estimates them for this shape (to hold against the measured peak less the model, adapters,
    /// gradients and moments).
    pub checkpointing: &'static str,
    pub mlp_chunk: usize,
    pub estimated_activations_mib: f64,
    /// Peak device memory of the run's buffers (allocated, and reserved by the allocator), where the backend has
    /// device memory.
    pub peak_allocated_mib: Option<f64>,
    pub peak_reserved_mib: Option<f64>,
    /// Device memory allocated before the first step: the model and the adapters (gradients are allocated by backward).
    pub loaded_allocated_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// GPU time per kernel over the timed steps (QPEFT_CUDA_PROFILE set; profiling slows the steps).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<KernelTime>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `opts.warmup + opts.steps` optimizer steps of `set` on `model`.
pub fn train_steps<B: Backend + 'static>(
    model: &Decoder<B>,
    set: &mut AdapterSet<B>,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    let be = &model.backend;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let loaded = be.device_memory()?.map(|m| mib(m.peak_allocated));
    let n = opts.batch * opts.seq;
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let tokens: Vec<u32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % model.spec.vocab_size as u64) as u32
        })
        .collect();
    let random = [Batch {
        input: Input { batch: opts.batch, seq: opts.seq, tokens: tokens.clone(), mask: vec![1; n] },
        labels: tokens,
    }];
    let batches = if opts.batches.is_empty() { &random[..] } else { &opts.batches[..] };
    let recipe = StepRecipe { grad_accum: 1, ..opts.recipe };
    let mut state = OptimizerState::new();
    let (mut steps, mut fb, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut inputs, mut targets) = (0usize, 0usize);
    let mut loss = f64::NAN;
    let (mut checkpointing, mut mlp_chunk_rows) = (Checkpointing::Full, None);
    for i in 0..opts.warmup + opts.steps {
        if i == opts.warmup {
            be.synchronize()?;
            be.kernel_times()?;
        }
        be.synchronize()?;
        let batch = &batches[i % batches.len()];
        let s = recipe.step(model, set, &mut state, i as u64, &Solo, &mut || Ok(batch.clone()))?;
        (loss, checkpointing, mlp_chunk_rows) = (s.loss, s.checkpointing, s.mlp_chunk);
        if i >= opts.warmup {
            steps.push(s.forward_backward_s + s.optimizer_s);
            fb.push(s.forward_backward_s);
            opt.push(s.optimizer_s);
            inputs += s.input_tokens;
            targets += s.tokens;
        }
    }
    let total_s: f64 = steps.iter().sum();
    let step_s = median(steps);
    let (tokens_per_s, target_tokens_per_s) = if opts.batches.is_empty() {
        (n as f64 / step_s, (targets as f64 / opts.steps.max(1) as f64) / step_s)
    } else {
        (inputs as f64 / total_s, targets as f64 / total_s)
    };
    let kernels = be.kernel_times()?;
    let memory = be.device_memory()?;
    let spec = &model.spec;
    let rows = batches.iter().map(|b| b.input.batch * b.input.seq).max().unwrap_or(0);
    let chunk = mlp_chunk(rows, spec.intermediate_size, spec.hidden_size, spec.num_layers, mlp_chunk_rows);
    let estimate = activation_bytes(spec, rows, chunk, be.saved_bytes(), recipe.loss_chunk, checkpointing);
    Ok(BenchReport {
        device: be.name(),
        batch: opts.batch,
        seq: opts.seq,
        trainable: set.trainable(),
        tokens_per_s,
        target_tokens_per_s,
        step_s,
        forward_backward_s: median(fb),
        optimizer_s: median(opt),
        loss,
        checkpointing: checkpointing.name(),
        mlp_chunk: chunk,
        estimated_activations_mib: mib(estimate),
        peak_allocated_mib: memory.map(|m| mib(m.peak_allocated)),
        peak_reserved_mib: memory.map(|m| mib(m.peak_reserved)),
        loaded_allocated_mib: loaded,
        peak_rss_mib: super::trainer::peak_rss_mib(),
        kernels,
    })
}
