//! H-QLoRA (methods.md §6): K LoRA levels on one linear, Δ(x) = Σ_i s_i·B_i·A_i·dropout_i(x), each level with
//! its own rank r_i, scaling s_i = α_i/r_i and learning-rate scale. With one shared scaling and plain init this
//! equals a single rank-Σr_i LoRA; the per-level α and learning rates are what make it hierarchical.
//! Level i's parameters are named `level_<i>.lora_A.weight` / `level_<i>.lora_B.weight` (saved as one PEFT
//! adapter per level).

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::{kaiming, key, required, Adapter, AdapterConfig, InputView, LowRank, MethodKind, Param, Pass};
use crate::backend::Backend;
use crate::error::Result;

/// The levels' ranks, α (default: the module's α for every level, so s_i = α/r_i) and learning-rate scales.
#[derive(Clone, Debug, PartialEq)]
pub struct HierarchicalMethod {
    pub ranks: Vec<usize>,
    pub alphas: Vec<f32>,
    pub lr_scales: Vec<f32>,
}

impl MethodKind for HierarchicalMethod {
    const NAME: &'static str = "hierarchical";
    const KEYS: &'static [&'static str] = &["ranks", "level_alpha", "level_lr_scale"];

    fn from_keys(keys: &Map<String, Value>, alpha: f32) -> std::result::Result<Self, String> {
        let ranks: Vec<usize> = required(keys, "ranks", Self::NAME)?;
        let alphas = key(keys, "level_alpha")?.unwrap_or_else(|| vec![alpha; ranks.len()]);
        let lr_scales = key(keys, "level_lr_scale")?.unwrap_or_else(|| vec![1.0; ranks.len()]);
        Ok(HierarchicalMethod { ranks, alphas, lr_scales })
    }
    fn to_keys(&self) -> Map<String, Value> {
        Map::from_iter([
            ("ranks".to_string(), json!(self.ranks)),
            ("level_alpha".to_string(), json!(self.alphas)),
            ("level_lr_scale".to_string(), json!(self.lr_scales)),
        ])
    }
    /// The levels' ranks replace `rank`.
    fn check(&self, _rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        let min = in_dim.min(out_dim);
        if self.ranks.is_empty() {
            return Err("ranks is empty".into());
        }
        if let Some(bad) = self.ranks.iter().find(|&&ri| ri == 0 || ri > min) {
            return Err(format!("ranks entry {bad} must be in 1..={min} (min(in {in_dim}, out {out_dim}))"));
        }
        if self.alphas.len() != self.ranks.len() || self.lr_scales.len() != self.ranks.len() {
            return Err(format!(
                "{} ranks but {} level alphas and {} lr scales",
                self.ranks.len(),
                self.alphas.len(),
                self.lr_scales.len()
            ));
        }
        Ok(())
    }
    fn trainable(&self, _rank: usize, in_dim: usize, out_dim: usize) -> usize {
        self.ranks.iter().sum::<usize>() * (in_dim + out_dim)
    }
    fn reported_rank(&self, _rank: usize) -> usize {
        self.ranks.iter().sum()
    }
    fn peft_levels(&self) -> Option<Vec<(usize, f32)>> {
        Some(self.ranks.iter().copied().zip(self.alphas.iter().copied()).collect())
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        let (ranks, alphas, lr_scales) = (&self.ranks, &self.alphas, &self.lr_scales);
        Ok(Box::new(Hierarchical::new(be, cfg.dropout, ranks, alphas, lr_scales, in_dim, out_dim, rng)?))
    }
}

pub struct Hierarchical<B: Backend> {
    view: InputView,
    levels: Vec<LowRank<B>>,
}

/// Each level draws its own dropout mask.
fn level_pass(pass: Pass, level: usize) -> Pass {
    Pass { seed: pass.seed ^ ((level as u64 + 1) << 56), ..pass }
}

impl<B: Backend> Hierarchical<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        dropout: f32,
        ranks: &[usize],
        alphas: &[f32],
        lr_scales: &[f32],
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let levels = ranks
            .iter()
            .zip(alphas.iter().zip(lr_scales))
            .enumerate()
            .map(|(i, (&r, (&alpha, &lr)))| {
                let a = kaiming(rng, r, in_dim);
                LowRank::new(be, &format!("level_{i}."), r, in_dim, out_dim, alpha / r as f32, &a, lr)
            })
            .collect::<Result<_>>()?;
        Ok(Hierarchical { view: InputView { in_dim, pool: None, dropout }, levels })
    }
}

impl<B: Backend> Adapter<B> for Hierarchical<B> {
    fn forward(
        &self,
        be: &B,
        x: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        y: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        for (i, lr) in self.levels.iter().enumerate() {
            let u = self.view.of_operand(be, x, rows, level_pass(pass, i))?;
            let h = lr.hidden(be, &u, rows)?;
            lr.project(be, &h, rows, y, accumulate || i > 0)?;
        }
        Ok(())
    }

    fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let view = self.view;
        for (i, lr) in self.levels.iter_mut().enumerate() {
            let p = level_pass(pass, i);
            let u = view.of_values(be, x, rows, p)?;
            let h = lr.hidden(be, &u, rows)?;
            lr.backward(be, u.values(be), &h, dy, rows, &view, p, dx, accumulate || i > 0)?;
        }
        Ok(())
    }

    fn params(&self) -> Vec<&Param<B>> {
        self.levels.iter().flat_map(LowRank::params).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.levels.iter_mut().flat_map(LowRank::params_mut).collect()
    }

    /// Σ_i s_i·B_i·A_i.
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>> {
        let mut sum = vec![0f64; self.levels[0].n_out * self.levels[0].n_in];
        for l in &self.levels {
            sum.iter_mut().zip(l.product(be)?).for_each(|(s, v)| *s += v);
        }
        Ok(sum.into_iter().map(|v| v as f32).collect())
    }
}
