//! One optimizer step, the same for `qpeft train` and `qpeft bench train` (methods.md §7): the gradients are
//! freed, `grad_accum` micro-batches run forward and backward (each one's mean loss divided by `grad_accum`, as HF
//! Trainer of the papers' era does), the gradients are clipped to a global L2 norm, and AdamW (32- or 8-bit)
//! updates the adapters with the scheduled learning rate.
//!
//! Dropout masks are keyed by (seed, step, micro-batch), so a resumed run or a recomputation draws the same ones.
//!
//! Data-parallel (a `Collective` of `world` ranks): a step is `world × grad_accum` micro-batches; rank r runs the
//! global micro-batches r·grad_accum … (r + 1)·grad_accum − 1, each scaled by 1/(world · grad_accum) and with the
//! dropout masks that micro-batch index gives, so that the summed gradients (`all_reduce`) are those of one rank
//! accumulating all of them. Every rank then clips and steps the same summed gradients: the replicas stay equal.

use std::time::Instant;

use super::config::{CheckpointSetting, RunConfig};
use super::optimizer::{clip_coefficient, grad_norm, AdamW, OptimizerState, StateBits};
use super::schedule::Schedule;
use crate::adapters::set::{module_seed, AdapterSet};
use crate::arch::Proj;
use crate::backend::collective::Collective;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::block::mlp_chunk;
use crate::model::memory;
use crate::model::train::{Batch, Checkpointing, StepOptions};
use crate::model::Decoder;

/// Everything about a step that the run config fixes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecipe {
    pub adamw: AdamW,
    /// Peak learning rate, its schedule, warm-up steps and the run's length (which the schedule needs).
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup: u64,
    pub steps: u64,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    /// Seed of the dropout masks.
    pub seed: u64,
    pub checkpointing: CheckpointSetting,
    /// The memory "auto" checkpointing may fill, bytes (None: what is free).
    pub memory_budget: Option<usize>,
    pub loss_chunk: usize,
    pub mlp_chunk: Option<usize>,
}

/// Host memory a CPU pass may still fill: the budget less this process's resident memory, or what the system has
/// available (0 where neither is known: "auto" then offloads, which on the CPU is full checkpointing).
fn host_headroom(budget: Option<usize>) -> usize {
    match budget {
        Some(b) => b.saturating_sub(proc_kib("/proc/self/status", "VmRSS:").unwrap_or(0) << 10),
        None => proc_kib("/proc/meminfo", "MemAvailable:").unwrap_or(0) << 10,
    }
}

/// A `key: N kB` line of a Linux /proc file, in KiB.
pub(crate) fn proc_kib(file: &str, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean of the micro-batches' losses.
    pub loss: f64,
    /// Loss targets, and real (non-padding) input tokens, over the micro-batches.
    pub tokens: usize,
    pub input_tokens: usize,
    /// Global gradient norm before clipping, and the learning rate used.
    pub grad_norm: f64,
    pub lr: f32,
    /// Wall time of the forward and backward passes, and of clipping and the optimizer (the backend synchronized
    /// in between).
    pub forward_backward_s: f64,
    pub optimizer_s: f64,
    /// The checkpointing policy and MLP chunk rows (None: the default) of the last micro-batch (what "auto" chose).
    pub checkpointing: Checkpointing,
    pub mlp_chunk: Option<usize>,
}

impl StepRecipe {
    /// The step of a run config's `[train]` section.
    pub fn from_config(cfg: &RunConfig) -> StepRecipe {
        let t = &cfg.train;
        StepRecipe {
            adamw: AdamW {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
                bits: t.optimizer.state_bits(),
                min_8bit_size: t.min_8bit_size,
            },
            lr: t.lr,
            schedule: t.schedule,
            warmup: cfg.warmup(),
            steps: t.steps,
            max_grad_norm: t.max_grad_norm,
            grad_accum: t.grad_accum,
            seed: t.seed,
            checkpointing: t.checkpointing,
            memory_budget: t.memory_budget.map(|b| b.0),
            loss_chunk: t.loss_chunk,
            mlp_chunk: t.mlp_chunk,
        }
    }

    /// The policy and MLP chunk rows (None: the default) of a micro-batch of `rows` rows: the fixed ones, or with
    /// "auto" the fastest whose activations (`model::memory`) fit what the budget leaves after the model, the adapters,
    /// their gradients (allocated during the backward) and, before the first update, the optimizer's moments. The same
    /// at every step of a shape, as it is decided before the pass allocates anything.
    pub fn checkpointing_for<B: Backend>(
        &self,
        model: &Decoder<B>,
        set: &AdapterSet<B>,
        state: &OptimizerState<B>,
        rows: usize,
    ) -> Result<(Checkpointing, Option<usize>)> {
        if let CheckpointSetting::Fixed(policy) = self.checkpointing {
            return Ok((policy, self.mlp_chunk));
        }
        let be = &model.backend;
        let trainable = set.trainable();
        let moments = match (state.step, self.adamw.bits) {
            (0, StateBits::B32) => 8 * trainable,
            (0, StateBits::B8) => 2 * trainable + trainable / 64,
            _ => 0,
        };
        let pending = 4 * trainable + moments;
        let headroom = match (be.device_memory()?, self.memory_budget) {
            (Some(m), Some(budget)) => budget.saturating_sub(m.allocated + pending),
            // Free on the device, and what the pool holds unused.
            (Some(m), None) => {
                (m.total.saturating_sub(m.in_use) + m.reserved.saturating_sub(m.allocated)).saturating_sub(pending)
            }
            (None, budget) => host_headroom(budget).saturating_sub(pending),
        };
        let s = &model.spec;
        let chunk = mlp_chunk(rows, s.intermediate_size, s.hidden_size, s.num_layers, self.mlp_chunk);
        let fixed = self.mlp_chunk.is_some();
        let c = memory::choose(s, rows, chunk, fixed, be.saved_bytes(), self.loss_chunk, headroom);
        Ok((c.policy, Some(c.mlp_chunk)))
    }

    /// Takes optimizer step `step` (0-based) of `set` on this rank's micro-batches, which `next_batch` gives in
    /// order (`grad_accum` of them); `comm` is the data-parallel group (`Solo` for one rank).
    pub fn step<B: Backend + 'static>(
        &self,
        model: &Decoder<B>,
        set: &mut AdapterSet<B>,
        state: &mut OptimizerState<B>,
        step: u64,
        comm: &dyn Collective<B>,
        next_batch: &mut dyn FnMut() -> Result<Batch>,
    ) -> Result<StepStats> {
        let be = &model.backend;
        let start = Instant::now();
        set.zero_grads(be)?;
        let micros = comm.world() * self.grad_accum;
        // [loss, loss targets, real input tokens] of this rank's micro-batches, then of all.
        let mut totals = [0f64; 3];
        let (mut checkpointing, mut mlp_chunk) = (Checkpointing::Full, None);
        for local in 0..self.grad_accum {
            let micro = comm.rank() * self.grad_accum + local;
            let batch = next_batch()?;
            (checkpointing, mlp_chunk) =
                self.checkpointing_for(model, set, state, batch.input.batch * batch.input.seq)?;
            let opts = StepOptions {
                checkpointing,
                dropout: true,
                seed: micro_seed(self.seed, step, micro),
                grad_scale: 1.0 / micros as f32,
                loss_chunk: self.loss_chunk,
                mlp_chunk,
            };
            // A group that sums while the backward goes on gets each layer's gradients of the last micro-batch as
            // soon as they are final.
            let r = if local + 1 == self.grad_accum && comm.overlaps_buckets() {
                model.loss_and_backward_with(&batch, set, &opts, &mut |l, set| {
                    let mut grads =
                        set.layer_params_mut(l).into_iter().map(|p| p.grad_mut(be)).collect::<Result<Vec<_>>>()?;
                    comm.all_reduce_bucket(be, &mut grads)
                })?
            } else {
                model.loss_and_backward(&batch, set, &opts)?
            };
            if !r.loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss is {} at step {} (micro-batch {micro})",
                    r.loss,
                    step + 1
                )));
            }
            totals[0] += r.loss / micros as f64;
            totals[1] += r.tokens as f64;
            totals[2] += batch.input.mask.iter().filter(|&&m| m != 0).count() as f64;
        }
        // (A group of one still goes through its collective: NCCL with one rank must leave the sums as they are.)
        if comm.overlaps_buckets() {
            comm.finish_buckets(be)?;
        } else {
            let mut grads = set.params_mut().into_iter().map(|p| p.grad_mut(be)).collect::<Result<Vec<_>>>()?;
            comm.all_reduce(be, &mut grads)?;
        }
        comm.all_reduce_host(&mut totals)?;
        let [loss, tokens, input_tokens] = totals;
        let (tokens, input_tokens) = (tokens as usize, input_tokens as usize);
        be.synchronize()?;
        let middle = Instant::now();
        let norm = grad_norm(be, set.named_params().into_iter().map(|(_, p)| p))?;
        if !norm.is_finite() {
            return Err(Error::Invalid(format!("the gradient norm is {norm} at step {}", step + 1)));
        }
        let lr = (self.lr * self.schedule.multiplier(step, self.warmup, self.steps)) as f32;
        self.adamw.step(be, state, set.named_params_mut(), lr, clip_coefficient(norm, self.max_grad_norm))?;
        be.synchronize()?;
        Ok(StepStats {
            loss,
            tokens,
            input_tokens,
            grad_norm: norm,
            lr,
            forward_backward_s: (middle - start).as_secs_f64(),
            optimizer_s: middle.elapsed().as_secs_f64(),
            checkpointing,
            mlp_chunk,
        })
    }
}

/// Seed of the dropout masks of one micro-batch.
fn micro_seed(seed: u64, step: u64, micro: usize) -> u64 {
    module_seed(seed ^ step.wrapping_mul(0xD6E8_FEB8_6659_FD93), micro, Proj::Q)
}
