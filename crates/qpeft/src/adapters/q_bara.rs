//! Q-BaRA (methods.md §5): Δ(x) = s·RepeatInterleave_λ(B·A·dropout(AvgPool_λ(x))) with A [λr, in/λ]
//! (kaiming-uniform), B [out/λ, λr] = 0 — the same parameter count as LoRA at rank r.

use rand_chacha::ChaCha8Rng;

use super::{expand_delta, kaiming, Adapter, AdapterConfig, InputView, LowRank, Param, Pass};
use crate::backend::{Backend, Groups};
use crate::error::Result;

pub struct QBara<B: Backend> {
    view: InputView,
    lr: LowRank<B>,
    lambda: usize,
    out_dim: usize,
}

impl<B: Backend> QBara<B> {
    pub fn new(
        be: &B,
        cfg: &AdapterConfig,
        lambda: usize,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (n_in, n_out, rank) = (in_dim / lambda, out_dim / lambda, lambda * cfg.rank);
        let a = kaiming(rng, rank, n_in);
        Ok(QBara {
            view: InputView { in_dim, pool: Some(Groups { width: in_dim, groups: n_in }), dropout: cfg.dropout },
            lr: LowRank::new(be, "", rank, n_in, n_out, cfg.scaling(), &a, 1.0)?,
            lambda,
            out_dim,
        })
    }

    fn repeat(&self) -> Groups {
        Groups { width: self.out_dim, groups: self.lr.n_out }
    }
}

impl<B: Backend> Adapter<B> for QBara<B> {
    fn forward(&self, be: &B, x: &B::Buf, rows: usize, pass: Pass, y: &mut B::Buf) -> Result<()> {
        let u = self.view.forward(be, x, rows, pass)?;
        let h = self.lr.hidden(be, &u, rows)?;
        let mut z = be.zeros(rows * self.lr.n_out)?;
        self.lr.project(be, &h, rows, &mut z, false)?;
        be.group_expand(&z, rows, self.repeat(), false, 1.0, y, true)
    }

    fn backward(&mut self, be: &B, x: &B::Buf, dy: &B::Buf, rows: usize, pass: Pass, dx: &mut B::Buf) -> Result<()> {
        let u = self.view.forward(be, x, rows, pass)?;
        let h = self.lr.hidden(be, &u, rows)?;
        // The repeat's adjoint sums each run of λ output gradients.
        let mut dz = be.zeros(rows * self.lr.n_out)?;
        be.group_reduce(dy, rows, self.repeat(), false, 1.0, &mut dz, false)?;
        self.lr.backward(be, &u, &h, &dz, rows, &self.view, pass, dx)
    }

    fn params(&self) -> Vec<&Param<B>> {
        self.lr.params()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.lr.params_mut()
    }

    /// ΔW[j, i] = (s/λ)·(BA)[⌊j/λ⌋, ⌊i/λ⌋].
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>> {
        Ok(expand_delta(&self.lr.product(be)?, self.lr.n_out, self.lr.n_in, self.lambda, self.lambda))
    }
}
