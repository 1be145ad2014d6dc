//! IR-QLoRA's information elastic connection (methods.md §3.3) on a LoRA, used on an ICQ-calibrated NF4 base:
//!   h = A·dropout(x) + β_A·GroupMean_r(x),   z = B·h + β_B·Repeat_{out}(h),   Δ(x) = s·z,
//! with β_A, β_B trainable scalars initialised to 0 (so training starts as plain LoRA). Feature i of the input
//! belongs to group ⌊i·r/in⌋ and output j repeats h[⌊j·r/out⌋] — IR-QLoRA's contiguous groups when r divides
//! the dimension. When it does not, the same rule gives runs whose lengths differ by at most one and which are
//! never empty (r ≤ min(in, out)), and the group mean is over each run's actual members. (methods.md's
//! proposed "groups of ⌈in/r⌉, the last shorter" leaves trailing groups empty for e.g. in 10, r 6.) This is
//! exactly the merged form ΔW = s·(B + β_B·Q)(A + β_A·P) of methods.md with P, Q defined by the same rule.

use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use super::{Viewed, kaiming, Adapter, AdapterConfig, InputView, LowRank, MethodKind, Param, Pass};
use crate::backend::{Backend, Groups};
use crate::error::Result;

/// IR-QLoRA has no keys of its own (its ICQ base is a `[quant]` choice).
#[derive(Clone, Debug, PartialEq)]
pub struct IrQloraMethod;

impl MethodKind for IrQloraMethod {
    const NAME: &'static str = "ir-qlora";

    fn from_keys(_: &Map<String, Value>, _: f32) -> std::result::Result<Self, String> {
        Ok(IrQloraMethod)
    }
    /// LoRA's A and B, and the two β scalars.
    fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
        rank * (in_dim + out_dim) + 2
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        Ok(Box::new(IrQlora::new(be, cfg, in_dim, out_dim, rng)?))
    }
}

pub struct IrQlora<B: Backend> {
    view: InputView,
    lr: LowRank<B>,
    beta_a: Param<B>,
    beta_b: Param<B>,
    out_dim: usize,
}

impl<B: Backend> IrQlora<B> {
    pub fn new(be: &B, cfg: &AdapterConfig, in_dim: usize, out_dim: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        let a = kaiming(rng, cfg.rank, in_dim);
        Ok(IrQlora {
            view: InputView { in_dim, pool: None, dropout: cfg.dropout },
            lr: LowRank::new(be, "", cfg.rank, in_dim, out_dim, cfg.scaling(), &a, 1.0)?,
            beta_a: Param::new(be, "lora_default_A_scale", vec![1], &[0.0], 1.0)?,
            beta_b: Param::new(be, "lora_default_B_scale", vec![1], &[0.0], 1.0)?,
            out_dim,
        })
    }

    fn in_groups(&self) -> Groups {
        Groups { width: self.view.in_dim, groups: self.lr.rank }
    }
    fn out_groups(&self) -> Groups {
        Groups { width: self.out_dim, groups: self.lr.rank }
    }

    /// (GroupMean_r(x), h): the elastic input term and the hidden state including it.
    fn hidden(&self, be: &B, x: &B::Buf, u: &Viewed<B>, rows: usize) -> Result<(B::Buf, B::Buf)> {
        let mut h = self.lr.hidden(be, u, rows)?;
        let mut gm = be.zeros(rows * self.lr.rank)?;
        // The group mean reads x itself, not the dropped-out view (as IR-QLoRA does).
        be.group_reduce(x, rows, self.in_groups(), true, 1.0, &mut gm, false)?;
        be.add_scaled_by(&mut h, &gm, &self.beta_a.value, 1.0)?;
        Ok((gm, h))
    }
}

impl<B: Backend> Adapter<B> for IrQlora<B> {
    fn forward(
        &self,
        be: &B,
        x: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        y: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let u = self.view.of_operand(be, x, rows, pass)?;
        let (_, h) = self.hidden(be, be.operand_values(x), &u, rows)?;
        self.lr.project(be, &h, rows, y, accumulate)?;
        let mut rep = be.zeros(rows * self.out_dim)?;
        be.group_expand(&h, rows, self.out_groups(), false, 1.0, &mut rep, false)?;
        be.add_scaled_by(y, &rep, &self.beta_b.value, self.lr.scaling)
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
        let s = self.lr.scaling;
        let u = self.view.of_values(be, x, rows, pass)?;
        let (gm, h) = self.hidden(be, x, &u, rows)?;
        // y += s·β_B·Repeat(h): dβ_B += s·⟨dy, Repeat(h)⟩ = s·⟨Sum(dy), h⟩, dh += s·β_B·Sum(dy).
        let mut dy_sum = be.zeros(rows * self.lr.rank)?;
        be.group_reduce(be.operand_values(dy), rows, self.out_groups(), false, 1.0, &mut dy_sum, false)?;
        be.dot(&dy_sum, &h, s, self.beta_b.grad_mut(be)?, true)?;
        let mut dh = self.lr.backward_b(be, &h, dy, rows)?;
        be.add_scaled_by(&mut dh, &dy_sum, &self.beta_b.value, s)?;
        // h += β_A·GroupMean(x): dβ_A += ⟨dh, GroupMean(x)⟩, dx += β_A·GroupMeanᵀ(dh) (after the low-rank part, which
        // writes dx first when not accumulating).
        be.dot(&dh, &gm, 1.0, self.beta_a.grad_mut(be)?, true)?;
        self.lr.backward_a(be, u.values(be), &dh, rows, &self.view, pass, dx, accumulate)?;
        let mut spread = be.zeros(rows * self.view.in_dim)?;
        be.group_expand(&dh, rows, self.in_groups(), true, 1.0, &mut spread, false)?;
        be.add_scaled_by(dx, &spread, &self.beta_a.value, 1.0)
    }

    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.lr.a, &self.lr.b, &self.beta_a, &self.beta_b]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.lr.a, &mut self.lr.b, &mut self.beta_a, &mut self.beta_b]
    }

    /// ΔW = s·(B + β_B·Q)(A + β_A·P), P[k, i] = [i ∈ group k]/|group k|, Q[j, k] = [j ∈ out-group k].
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>> {
        let (r, n_in, n_out) = (self.lr.rank, self.view.in_dim, self.out_dim);
        let (beta_a, beta_b) = (be.download(&self.beta_a.value)?[0] as f64, be.download(&self.beta_b.value)?[0] as f64);
        let mut a: Vec<f64> = be.download(&self.lr.a.value)?.into_iter().map(f64::from).collect();
        let mut b: Vec<f64> = be.download(&self.lr.b.value)?.into_iter().map(f64::from).collect();
        let (gi, go) = (self.in_groups(), self.out_groups());
        for k in 0..r {
            let (lo, hi) = gi.range(k);
            for i in lo..hi {
                a[k * n_in + i] += beta_a / (hi - lo) as f64;
            }
        }
        for j in 0..n_out {
            b[j * r + go.of(j)] += beta_b;
        }
        let s = self.lr.scaling as f64;
        Ok((0..n_out * n_in)
            .map(|ji| (s * (0..r).map(|k| b[(ji / n_in) * r + k] * a[k * n_in + ji % n_in]).sum::<f64>()) as f32)
            .collect())
    }
}
