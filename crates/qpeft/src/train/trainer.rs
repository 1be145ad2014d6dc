//! The training loop (methods.md §7): micro-batches of `batch_size` examples, `grad_accum` of them per
//! optimizer step (each micro-batch's mean loss divided by `grad_accum`), global-norm clipping, AdamW, the
//! learning-rate schedule; held-out loss (and optionally exact match) before training, every `eval.every`
//! steps and at the end; atomic checkpoints every `checkpoint_every` steps; the final adapter in PEFT format
//! and the loss plot.
//!
//! Determinism: the example order is a function of (data seed, epoch), dropout masks of (seed, step,
//! micro-batch), and checkpoints hold the exact f32 adapter and optimizer state plus the data position — so a
//! run resumed from a checkpoint ends bit-identical to one that was never interrupted.
//!
//! Data-parallel: each rank runs its own `Trainer` (`Trainer::for_rank`) with the same config and a replica of the
//! adapters. A global step takes `world × grad_accum` micro-batches in the order one rank would take them, rank r
//! the r-th run of `grad_accum` (see `train::step`); every rank advances the same data position, so checkpoints
//! are those of one rank and resume with any world size. Rank 0 alone evaluates and writes metrics, checkpoints and
//! the adapter; the others read the newest checkpoint on resume (the run directory is shared, as torchrun-launched
//! trainers share theirs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::base::base_record;
use super::config::{CheckpointSetting, RunConfig};
use super::metrics::{Evaluation, Record, StepRecord};
use super::optimizer::{OptimizerState, Tensor};
use super::plot::loss_svg;
use super::run_dir::{RunDir, FINAL_ADAPTER};
use super::step::StepRecipe;
use crate::adapters::peft::{self, BaseRecord, Modules};
use crate::adapters::set::AdapterSet;
use crate::adapters::BaseKind;
use crate::backend::collective::{Collective, Solo};
use crate::backend::Backend;
use crate::data::collate::{Collator, Tokenized};
use crate::data::{builtin, sampler, DataFormat, Example};
use crate::error::{DeviceFailure, Error, Result};
use crate::eval::suite;
use crate::formats::safetensors::{write_file, SafetensorsStore};
use crate::generate::{generate, GenerateOptions};
use crate::model::train::{Checkpointing, StepOptions};
use crate::model::{Checkpoint, Decoder};
use crate::quant::base::BaseWeight;
use crate::quant::nf4::FourBit;
use crate::tokenizer::Tokenizer;

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// Where training stands; saved in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Current epoch and the next example's position in its order.
    pub epoch: u64,
    pub cursor: usize,
    /// Loss targets trained on so far.
    pub tokens: u64,
}

/// What the progress display is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// An evaluation at optimizer step `step` is under way: `done` of `total` units of `what` (held-out batches,
    /// exact-match answers, a benchmark task's items).
    Evaluating { step: u64, what: String, done: usize, total: usize },
    /// Optimizer step `step` of `steps` is done.
    Step { step: u64, steps: u64, loss: f64, tokens_per_s: f64 },
}

/// The outcome of `train`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Stopped by `Trainer::run`'s `stop` before `train.steps` (a checkpoint of the last step is saved).
    pub interrupted: bool,
    pub run_dir: PathBuf,
    pub steps: u64,
    pub trainable: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub first: Option<Evaluation>,
    pub last: Option<Evaluation>,
    /// Mean input tokens/s of the steps of this invocation after the first (the steady state).
    pub tokens_per_s: f64,
    pub peak_rss_mib: Option<f64>,
    pub seconds: f64,
}

/// The peak resident memory of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    Some(super::step::proc_kib("/proc/self/status", "VmHWM:")? as f64 / 1024.0)
}

fn base_kind(b: &BaseWeight) -> BaseKind {
    match b {
        // A GGUF block format kept as stored is no 4-bit base a method can build on (QA-LoRA needs GPTQ int4).
        BaseWeight::Dense => BaseKind::Other("a 16/32-bit weight"),
        BaseWeight::Ggml(_) => BaseKind::Other("a GGUF block format as stored"),
        BaseWeight::Bnb4(q) => BaseKind::Other(match q.kind {
            FourBit::Nf4 => "bitsandbytes NF4",
            FourBit::Fp4 => "bitsandbytes FP4",
        }),
        BaseWeight::IcqNf4(_) => BaseKind::Other("NF4 with ICQ"),
        BaseWeight::Int4(q) => BaseKind::Int4 { group: q.group },
    }
}

/// The resolved adapter of every module of `model` under the run's `[adapter]` rules.
pub fn resolve_modules<B: Backend>(cfg: &RunConfig, model: &Decoder<B>) -> Result<Modules> {
    cfg.plan.resolve_all(&model.spec, |l, p| base_kind(&model.blocks[l].proj(p).base))
}

/// Detects a data file's layout from its name and first record.
fn detect_format(path: &Path) -> Result<DataFormat> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".json") || name.ends_with(".json.gz") {
        return Ok(DataFormat::Alpaca);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
    let v: Value =
        serde_json::from_str(first).map_err(|e| Error::format(path, format!("line 1: {e} (set data.format)")))?;
    Ok(if v.get("text").is_some() {
        DataFormat::Oasst
    } else if v.get("instruction").is_some() {
        DataFormat::Alpaca
    } else {
        DataFormat::Jsonl
    })
}

/// The run's examples split into (train, held-out).
pub fn load_data(cfg: &RunConfig, tok: &Tokenizer) -> Result<(Vec<Example>, Vec<Example>)> {
    let d = &cfg.data;
    let examples = match (&d.path, &d.builtin) {
        (Some(path), _) => {
            let format = match d.format {
                Some(f) => f,
                None => detect_format(path)?,
            };
            crate::data::load(path, format, tok)?
        }
        (None, Some(task)) => builtin::generate(task, d.builtin_size, d.seed)?,
        (None, None) => unreachable!("checked by RunConfig"),
    };
    let (train_idx, eval_idx) = sampler::split(examples.len(), d.eval_size, d.seed);
    let mut train: Vec<Example> = train_idx.iter().map(|&i| examples[i].clone()).collect();
    if let Some(n) = d.max_train_examples {
        train.truncate(n);
    }
    let eval = eval_idx.iter().map(|&i| examples[i].clone()).collect();
    Ok((train, eval))
}

/// The collator of the run's `[data]` settings.
fn collator<'a>(cfg: &RunConfig, tok: &'a Tokenizer) -> Result<Collator<'a>> {
    let d = &cfg.data;
    let mut c = Collator::new(tok, d.source_max_len, d.target_max_len, d.train_on_source)?;
    c.packing = d.packing;
    Ok(c)
}

/// The target-token-weighted mean loss over `examples` (batches of `batch`) and the number of target tokens.
/// `progress(done, total)` counts batches; an error from it stops the loop.
fn loss_over<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    collator: &Collator<'_>,
    examples: &[Example],
    batch: usize,
    loss_chunk: usize,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<(f64, usize)> {
    let opts = StepOptions {
        checkpointing: Checkpointing::None,
        dropout: false,
        seed: 0,
        grad_scale: 1.0,
        loss_chunk,
        mlp_chunk: None,
    };
    let items: Vec<Tokenized> = examples.iter().map(|x| collator.tokenize(x)).collect::<Result<_>>()?;
    let (mut sum, mut tokens) = (0f64, 0usize);
    let total = items.len().div_ceil(batch.max(1));
    for (i, chunk) in items.chunks(batch.max(1)).enumerate() {
        progress(i, total)?;
        let refs: Vec<&Tokenized> = chunk.iter().collect();
        let r = model.loss(&collator.batch(&refs), adapters, &opts)?;
        sum += r.loss * r.tokens as f64;
        tokens += r.tokens;
    }
    progress(total, total)?;
    Ok((if tokens == 0 { 0.0 } else { sum / tokens as f64 }, tokens))
}

/// The held-out loss of `examples` (from `load_data`) as the run `cfg` collates them, and the target tokens.
pub fn heldout_loss<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    cfg: &RunConfig,
    examples: &[Example],
    batch: usize,
) -> Result<(f64, usize)> {
    let collator = collator(cfg, tok)?;
    loss_over(model, adapters, &collator, examples, batch, cfg.train.loss_chunk, &mut |_, _| Ok(()))
}

/// A training session: model, adapters, data, optimizer and where it stands.
pub struct Trainer<'a, B: Backend> {
    pub cfg: &'a RunConfig,
    pub model: &'a Decoder<B>,
    pub tok: &'a Tokenizer,
    pub set: AdapterSet<B>,
    pub modules: Modules,
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub state: TrainerState,
    pub opt_state: OptimizerState<B>,
    pub run: RunDir,
    /// What the adapters record of their base.
    pub base: BaseRecord,
    collator: Collator<'a>,
    lengths: Vec<usize>,
    order: (u64, Vec<usize>),
    comm: &'a dyn Collective<B>,
}

impl<'a, B: Backend + 'static> Trainer<'a, B> {
    /// A fresh run in `run` (already created), or with `resume` the state of the run's newest checkpoint.
    pub fn new(
        cfg: &'a RunConfig,
        model: &'a Decoder<B>,
        tok: &'a Tokenizer,
        run: RunDir,
        resume: bool,
    ) -> Result<Self> {
        Self::for_rank(cfg, model, tok, run, resume, &Solo)
    }

    /// `new` for one rank of the data-parallel group `comm`; ranks other than 0 only read `run`
    /// (`RunDir::open`).
    pub fn for_rank(
        cfg: &'a RunConfig,
        model: &'a Decoder<B>,
        tok: &'a Tokenizer,
        run: RunDir,
        resume: bool,
        comm: &'a dyn Collective<B>,
    ) -> Result<Self> {
        let writer = comm.rank() == 0;
        let modules = resolve_modules(cfg, model)?;
        let mut set =
            AdapterSet::build(&model.backend, &model.spec, cfg.train.seed, |l, p| modules[l][p as usize].clone())?;
        if set.trainable() == 0 {
            return Err(Error::config(&cfg.file, "adapter", "the rules adapt no module: nothing to train"));
        }
        let (train, eval) = load_data(cfg, tok)?;
        let base = base_record(cfg, &Checkpoint::open(&cfg.model.path)?)?;
        let collator = collator(cfg, tok)?;
        let mut state = TrainerState::default();
        let mut opt_state = OptimizerState::new();
        if resume {
            if let Some((step, dir)) = run.checkpoints()?.pop() {
                peft::load_values(&dir, &model.backend, &mut set)?;
                let state_path = dir.join(STATE_FILE);
                let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
                state = serde_json::from_str(&text).map_err(|e| Error::format(&state_path, e.to_string()))?;
                if state.step != step {
                    return Err(Error::format(
                        &state_path,
                        format!("step {} inside checkpoint step-{step:07}", state.step),
                    ));
                }
                opt_state = read_optimizer(&model.backend, &dir.join(OPTIMIZER_FILE), step, &set)?;
                if writer {
                    run.truncate_metrics(step)?;
                }
            } else if writer {
                // No checkpoint yet: the run starts over, metrics included.
                run.clear_metrics()?;
            }
        }
        let lengths = train.iter().map(Example::chars).collect();
        Ok(Trainer {
            cfg,
            model,
            tok,
            set,
            modules,
            train,
            eval,
            state,
            opt_state,
            run,
            base,
            collator,
            lengths,
            order: (u64::MAX, Vec::new()),
            comm,
        })
    }

    /// Whether this trainer writes the run's files (rank 0).
    fn writer(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Held-out loss over the first `eval.max_samples` held-out examples, and exact match on the first
    /// `eval.exact_match` of them.
    /// When `stop` becomes true the evaluation ends at its next batch with `Error::Interrupted`.
    pub fn evaluate(&self, progress: &mut dyn FnMut(&Progress), stop: &AtomicBool) -> Result<Option<Evaluation>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let e = &self.cfg.eval;
        let step = self.state.step;
        let mut at = |what: &str, done: usize, total: usize| {
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            progress(&Progress::Evaluating { step, what: what.to_string(), done, total });
            Ok(())
        };
        let held = &self.eval[..e.max_samples.max(1).min(self.eval.len())];
        let chunk = self.cfg.train.loss_chunk;
        let mut held_progress = |done, total| at("held-out batches", done, total);
        let (eval_loss, eval_tokens) =
            loss_over(self.model, Some(&self.set), &self.collator, held, e.batch_size, chunk, &mut held_progress)?;
        let (exact_match, exact_match_n) = if e.exact_match > 0 {
            let judged = &self.eval[..e.exact_match.min(self.eval.len())];
            let mut answer_progress = |done, total| at("exact-match answers", done, total);
            let answers = exact_match(
                self.model,
                Some(&self.set),
                self.tok,
                &self.collator,
                judged,
                e.max_new_tokens,
                &mut answer_progress,
            )?;
            let correct = answers.iter().filter(|a| a.correct).count();
            (Some(correct as f64 / answers.len().max(1) as f64), Some(answers.len()))
        } else {
            (None, None)
        };
        let tasks = if step == 0 && !e.tasks_before_training { BTreeMap::new() } else { self.run_tasks(&mut at)? };
        Ok(Some(Evaluation { step: self.state.step, eval_loss, eval_tokens, exact_match, exact_match_n, tasks }))
    }

    /// The `[eval] tasks` with the current adapters; every item's prediction goes to `evals/step-N.json`.
    fn run_tasks(&self, at: &mut dyn FnMut(&str, usize, usize) -> Result<()>) -> Result<BTreeMap<String, f64>> {
        let e = &self.cfg.eval;
        if e.tasks.is_empty() {
            return Ok(BTreeMap::new());
        }
        let opts = suite::Options {
            data_dir: e.data_dir.clone(),
            limit: e.task_limit,
            mmlu_limit: e.mmlu_limit,
            mmlu_split: e.mmlu_split.clone(),
            mmlu_max_len: 2048,
            batch: e.batch_size,
        };
        let (mut scores, mut reports) = (BTreeMap::new(), serde_json::Map::new());
        for name in suite::parse_tasks(&e.tasks.join(","), &[])? {
            let r =
                suite::run(self.model, Some(&self.set), self.tok, &name, &opts, |done, total| at(&name, done, total))?;
            scores.extend(r.metrics().into_iter().map(|(m, v)| (format!("{name}_{m}"), v)));
            reports.insert(name, serde_json::to_value(&r).expect("reports serialize"));
        }
        self.run.write_eval_report(self.state.step, &Value::Object(reports))?;
        Ok(scores)
    }

    /// Evaluates and records the result in metrics.jsonl; false if `stop` interrupted it (nothing recorded).
    fn evaluate_and_record(&self, progress: &mut dyn FnMut(&Progress), stop: &AtomicBool) -> Result<bool> {
        match self.evaluate(progress, stop) {
            Ok(Some(ev)) => self.run.append_metrics(&Record::Eval(ev)).map(|_| true),
            Ok(None) => Ok(true),
            Err(Error::Interrupted) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether an evaluation is due at `step`: before training, every `eval.every` steps, and after the last.
    fn eval_due(&self, step: u64) -> bool {
        let every = self.cfg.eval.every;
        step == 0 || step == self.cfg.train.steps || (every > 0 && step.is_multiple_of(every))
    }

    /// An evaluation due at the step the run stands at that metrics.jsonl lacks: a fresh run's first, or one a
    /// signal interrupted (its checkpoint was written without it).
    fn eval_owed(&self) -> Result<bool> {
        let step = self.state.step;
        let recorded = self.run.metrics()?.iter().any(|r| matches!(r, Record::Eval(e) if e.step == step));
        Ok(self.eval_due(step) && !recorded)
    }

    fn save_checkpoint(&self) -> Result<()> {
        let spec = &self.model.spec;
        let be = &self.model.backend;
        self.run.save_checkpoint(self.state.step, |dir| {
            peft::write_adapter(dir, be, spec, &self.set, &self.modules, &self.base)?;
            write_file(&dir.join(OPTIMIZER_FILE), &self.opt_state.tensors(be)?)?;
            crate::formats::write_atomic(
                &dir.join(STATE_FILE),
                &serde_json::to_vec_pretty(&self.state).expect("state serializes"),
            )
        })?;
        self.run.prune(self.cfg.train.keep_checkpoints)
    }

    /// Trains to `train.steps`, telling `progress` about every step and evaluation. When `stop` becomes true (e.g.
    /// on Ctrl-C) the run ends after the step in flight with a checkpoint of it, `Summary::interrupted` set; an
    /// evaluation in flight is abandoned, and the resumed run performs it first.
    pub fn run(&mut self, progress: &mut dyn FnMut(&Progress), stop: &AtomicBool) -> Result<Summary> {
        let (cfg, t) = (self.cfg, &self.cfg.train);
        let start = Instant::now();
        let recipe = StepRecipe::from_config(cfg);
        let mut rates = Vec::new();
        let comm = self.comm;
        let writer = self.writer();
        let owed = writer && self.eval_owed()?;
        let mut interrupted = comm.any(owed && !self.evaluate_and_record(progress, stop)?)?;
        while !interrupted && self.state.step < t.steps {
            // Every rank must see the same decision, whenever the signal reached each.
            if comm.any(stop.load(Ordering::Relaxed))? {
                interrupted = true;
                break;
            }
            let step = self.state.step;
            // The step's micro-batches in one rank's order; this rank's share of them.
            let mut mine = std::collections::VecDeque::new();
            for micro in 0..comm.world() * t.grad_accum {
                let idx = next_indices(cfg, &self.lengths, comm.world(), &mut self.state, &mut self.order);
                if micro / t.grad_accum == comm.rank() {
                    mine.push_back(idx);
                }
            }
            let (model, set, opt_state) = (self.model, &mut self.set, &mut self.opt_state);
            let (train, collator) = (&self.train, &self.collator);
            let shape = std::cell::Cell::new((0, 0));
            let mut next_batch = || {
                let idx = mine.pop_front().expect("grad_accum micro-batches per rank");
                let items = idx.iter().map(|&i| collator.tokenize(&train[i])).collect::<Result<Vec<_>>>()?;
                let batch = collator.batch(&items.iter().collect::<Vec<_>>());
                shape.set((batch.input.batch, batch.input.seq));
                Ok(batch)
            };
            let s = recipe.step(model, set, opt_state, step, comm, &mut next_batch).map_err(|e| match e {
                Error::Invalid(msg) => Error::Invalid(format!(
                    "{msg}; stopping — the newest checkpoint in {} is intact",
                    self.run.path.display()
                )),
                Error::Device { kind: DeviceFailure::OutOfMemory, what, msg } => Error::Device {
                    kind: DeviceFailure::OutOfMemory,
                    what,
                    msg: out_of_memory(cfg, &self.run.path, step + 1, shape.get(), &msg),
                },
                other => other,
            })?;
            self.state.step += 1;
            self.state.tokens += s.tokens as u64;
            let seconds = s.forward_backward_s + s.optimizer_s;
            // Throughput counts every real (non-padding) input token, as peers report it.
            let rate = s.input_tokens as f64 / seconds;
            rates.push(rate);
            let record = Record::Step(StepRecord {
                step: self.state.step,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
                tokens: s.tokens,
                input_tokens: s.input_tokens,
                tokens_per_s: rate,
                epoch: self.state.epoch,
                seconds,
                checkpointing: s.checkpointing.name().into(),
                mlp_chunk: s.mlp_chunk.filter(|_| t.checkpointing == CheckpointSetting::Auto),
            });
            if writer {
                self.run.append_metrics(&record)?;
            }
            progress(&Progress::Step { step: step + 1, steps: t.steps, loss: s.loss, tokens_per_s: rate });
            let at_end = self.state.step == t.steps;
            if self.eval_due(self.state.step) {
                interrupted = comm.any(writer && !self.evaluate_and_record(progress, stop)?)?;
            }
            if writer && ((t.checkpoint_every > 0 && self.state.step.is_multiple_of(t.checkpoint_every)) || at_end) {
                self.save_checkpoint()?;
            }
        }
        if writer {
            let saved = self.run.checkpoints()?.iter().any(|(s, _)| *s == self.state.step);
            if interrupted && self.state.step > 0 && !saved {
                self.save_checkpoint()?;
            }
            if !interrupted {
                self.finish()?;
            }
        }
        // The evaluations are the writer's to report.
        let evals: Vec<Evaluation> = if !writer {
            Vec::new()
        } else {
            self.run
                .metrics()?
                .into_iter()
                .filter_map(|r| match r {
                    Record::Eval(e) => Some(e),
                    Record::Step(_) => None,
                })
                .collect()
        };
        let summary = Summary {
            interrupted,
            run_dir: self.run.path.clone(),
            steps: self.state.step,
            trainable: self.set.trainable(),
            train_examples: self.train.len(),
            eval_examples: self.eval.len(),
            first: evals.iter().find(|e| e.step == 0).cloned(),
            last: evals.last().cloned(),
            tokens_per_s: steady_mean(&rates),
            peak_rss_mib: peak_rss_mib(),
            seconds: start.elapsed().as_secs_f64(),
        };
        if writer && !interrupted {
            self.run.write_summary(&summary)?;
        }
        Ok(summary)
    }

    /// The final adapter and the loss plot.
    fn finish(&self) -> Result<()> {
        let dir = self.run.file(FINAL_ADAPTER);
        peft::write_adapter(&dir, &self.model.backend, &self.model.spec, &self.set, &self.modules, &self.base)?;
        let metrics = self.run.metrics()?;
        let loss: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|r| if let Record::Step(s) = r { Some((s.step as f64, s.loss)) } else { None })
            .collect();
        let eval_loss: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|r| if let Record::Eval(e) = r { Some((e.step as f64, e.eval_loss)) } else { None })
            .collect();
        let title = format!(
            "{} — {}",
            self.run.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            self.cfg.model.path.display()
        );
        self.run.write_plot(&loss_svg(&title, &loss, &eval_loss))
    }
}

fn read_optimizer<B: Backend>(be: &B, path: &Path, step: u64, set: &AdapterSet<B>) -> Result<OptimizerState<B>> {
    let store = SafetensorsStore::open_files(&[path.to_path_buf()])?;
    let names: Vec<(String, usize)> = set.named_params().into_iter().map(|(n, p)| (n, p.numel())).collect();
    let get = |name: &str| -> Option<Tensor> {
        let raw = store.read_raw(name)?;
        match raw.dtype {
            safetensors::Dtype::U8 => raw.to_u8(name).ok().map(Tensor::U8),
            _ => store.read_f32(name).ok().flatten().map(|t| Tensor::F32(t.data)),
        }
    };
    OptimizerState::from_tensors(be, step, &names, &get).map_err(|e| Error::format(path, e))
}

/// Greedy answers to `examples`' sources (prompted as the collator prompts them), judged by exact match of the
/// trimmed text with the target.
pub fn exact_match<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    collator: &Collator<'_>,
    examples: &[Example],
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Answer>> {
    let mut stop = model.spec.eos_token_ids.clone();
    stop.extend(tok.eos_token.as_deref().and_then(|t| tok.token_id(t)));
    let opts = GenerateOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens: stop.clone() };
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        progress(i, examples.len())?;
        let prompt = collator.prompt(ex)?;
        let ids = generate(model, adapters, &prompt, &opts, |_| Ok(()))?;
        let answer_ids: Vec<u32> = ids.into_iter().filter(|t| !stop.contains(t)).collect();
        let answer = tok.decode(&answer_ids, true)?.trim().to_string();
        let correct = answer == ex.target.trim();
        out.push(Answer { text: answer, correct });
    }
    progress(examples.len(), examples.len())?;
    Ok(out)
}

/// The message of a step that ran out of device memory: the step and its batch shape, the device's words (the size
/// asked for and what was free), the settings that need less memory, and how to go on from the intact checkpoint.
pub fn out_of_memory(cfg: &RunConfig, run: &Path, step: u64, (batch, seq): (usize, usize), device: &str) -> String {
    let t = &cfg.train;
    let mut fits = Vec::new();
    if t.batch_size > 1 {
        let half = t.batch_size / 2;
        fits.push(format!(
            "--set train.batch_size={half} --set train.grad_accum={} (the same {} examples per step)",
            t.grad_accum * 2,
            half * t.grad_accum * 2
        ));
    }
    match t.checkpointing {
        CheckpointSetting::Fixed(Checkpointing::None | Checkpointing::Selective) => {
            fits.push("--set train.checkpointing=full (recompute each block in backward: far fewer activations)".into())
        }
        CheckpointSetting::Fixed(Checkpointing::Full) => {
            fits.push("--set train.checkpointing=offload (the checkpointed block inputs in host memory)".into())
        }
        _ => {}
    }
    fits.push(format!(
        "shorter examples: --set data.source_max_len={} --set data.target_max_len={}",
        (cfg.data.source_max_len / 2).max(1),
        (cfg.data.target_max_len / 2).max(1)
    ));
    format!(
        "{device}; out of device memory in step {step} (batch {batch} × {seq} tokens). Settings that need less memory: {}. \
         The newest checkpoint in {} is intact: continue with qpeft train --resume {1} and those settings",
        fits.join("; "),
        run.display()
    )
}

/// A generated answer and whether it matches the target exactly.
pub struct Answer {
    pub text: String,
    pub correct: bool,
}

/// The first `n` micro-batches one rank of the run `cfg` trains on, tokenized, in the trainer's order (real-data
/// benchmarks: `qpeft bench batches`).
pub fn first_micro_batches(cfg: &RunConfig, tok: &Tokenizer, n: usize) -> Result<Vec<Vec<Tokenized>>> {
    let (train, _) = load_data(cfg, tok)?;
    if train.is_empty() {
        return Err(Error::config(&cfg.file, "data", "no training examples"));
    }
    let collator = collator(cfg, tok)?;
    let lengths: Vec<usize> = train.iter().map(Example::chars).collect();
    let (mut state, mut order) = (TrainerState::default(), (u64::MAX, Vec::new()));
    (0..n)
        .map(|_| {
            let idx = next_indices(cfg, &lengths, 1, &mut state, &mut order);
            idx.iter().map(|&i| collator.tokenize(&train[i])).collect()
        })
        .collect()
}

/// The mean throughput of the steps after the first (the steady state).
fn steady_mean(rates: &[f64]) -> f64 {
    let steady = if rates.len() > 1 { &rates[1..] } else { rates };
    if steady.is_empty() {
        0.0
    } else {
        steady.iter().sum::<f64>() / steady.len() as f64
    }
}

/// The indices of the next micro-batch's examples (of `lengths.len()` training examples): `batch_size` in the
/// epoch's order (length-grouped by global batch, `batch_size × grad_accum × world`, when `data.group_by_length`),
/// a new epoch and order when the current one is used up.
fn next_indices(
    cfg: &RunConfig,
    lengths: &[usize],
    world: usize,
    state: &mut TrainerState,
    order: &mut (u64, Vec<usize>),
) -> Vec<usize> {
    let n = lengths.len();
    if state.cursor >= n {
        state.epoch += 1;
        state.cursor = 0;
    }
    if order.0 != state.epoch {
        let group = cfg.data.group_by_length.then_some(cfg.train.batch_size * cfg.train.grad_accum * world);
        *order = (state.epoch, sampler::epoch_order(lengths, cfg.data.seed, state.epoch, group));
    }
    let end = (state.cursor + cfg.train.batch_size).min(n);
    let idx = order.1[state.cursor..end].to_vec();
    state.cursor = end;
    idx
}
