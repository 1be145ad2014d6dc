//! Training-step throughput (what `qpeft bench train` and the peer scripts measure): the trainer's optimizer steps
//! (`StepRecipe::step`: forward with the causal-LM loss, backward, global-norm clipping, AdamW) on a fixed batch of
//! seeded random tokens (labels = ids, no padding), with the time of each phase and the memory it took.

use serde::Serialize;

use super::optimizer::OptimizerState;
use super::step::StepRecipe;
use crate::adapters::set::AdapterSet;
use crate::backend::collective::Solo;
use crate::backend::{Backend, KernelTime};
use crate::error::Result;
use crate::model::train::Batch;
use crate::model::{Decoder, Input};

pub struct BenchOptions {
    pub batch: usize,
    pub seq: usize,
    /// Timed steps after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// The run config's step; each step is one micro-batch of `batch` × `seq` tokens.
    pub recipe: StepRecipe,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub batch: usize,
    pub seq: usize,
    pub trainable: usize,
    /// Median over the timed steps.
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub forward_backward_s: f64,
    pub optimizer_s: f64,
    pub loss: f64,
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
    let batch = Batch {
        input: Input { batch: opts.batch, seq: opts.seq, tokens: tokens.clone(), mask: vec![1; n] },
        labels: tokens,
    };
    let recipe = StepRecipe { grad_accum: 1, ..opts.recipe };
    let mut state = OptimizerState::new();
    let (mut steps, mut fb, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss = f64::NAN;
    for i in 0..opts.warmup + opts.steps {
        if i == opts.warmup {
            be.synchronize()?;
            be.kernel_times()?;
        }
        be.synchronize()?;
        let s = recipe.step(model, set, &mut state, i as u64, &Solo, &mut || Ok(batch.clone()))?;
        loss = s.loss;
        if i >= opts.warmup {
            steps.push(s.forward_backward_s + s.optimizer_s);
            fb.push(s.forward_backward_s);
            opt.push(s.optimizer_s);
        }
    }
    let step_s = median(steps);
    let kernels = be.kernel_times()?;
    let memory = be.device_memory()?;
    Ok(BenchReport {
        device: be.name(),
        batch: opts.batch,
        seq: opts.seq,
        trainable: set.trainable(),
        tokens_per_s: n as f64 / step_s,
        step_s,
        forward_backward_s: median(fb),
        optimizer_s: median(opt),
        loss,
        peak_allocated_mib: memory.map(|m| mib(m.peak_allocated)),
        peak_reserved_mib: memory.map(|m| mib(m.peak_reserved)),
        loaded_allocated_mib: loaded,
        peak_rss_mib: super::trainer::peak_rss_mib(),
        kernels,
    })
}
