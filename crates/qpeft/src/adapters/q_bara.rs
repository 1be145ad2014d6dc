//! Q-BaRA (methods.md §5): Δ(x) = s·RepeatInterleave_λ(B·A·dropout(AvgPool_λ(x))) with A [λr, in/λ]
//! (kaiming-uniform), B [out/λ, λr] = 0 — the same parameter count as LoRA at rank r.

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::{
    check_divides, expand_delta, kaiming, required, Adapter, AdapterConfig, InputView, LowRank, MethodKind, Param,
    Pass,
};
use crate::backend::{Backend, Groups};
use crate::error::Result;

/// Q-BaRA's balance factor λ.
#[derive(Clone, Debug, PartialEq)]
pub struct QBaraMethod {
    pub lambda: usize,
}

impl MethodKind for QBaraMethod {
    const NAME: &'static str = "q-bara";
    const KEYS: &'static [&'static str] = &["lambda"];

    fn from_keys(keys: &Map<String, Value>, _: f32) -> std::result::Result<Self, String> {
        Ok(QBaraMethod { lambda: required(keys, "lambda", Self::NAME)? })
    }
    fn to_keys(&self) -> Map<String, Value> {
        Map::from_iter([("lambda".to_string(), json!(self.lambda))])
    }
    fn check(&self, rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        let lambda = self.lambda;
        check_divides("lambda", lambda, in_dim, "input")?;
        check_divides("lambda", lambda, out_dim, "output")?;
        let (n_in, n_out) = (in_dim / lambda, out_dim / lambda);
        if rank == 0 {
            return Err("rank = 0 must be at least 1".into());
        }
        if lambda * rank > n_in.min(n_out) {
            return Err(format!("lambda·rank = {} exceeds min(in/lambda {n_in}, out/lambda {n_out})", lambda * rank));
        }
        Ok(())
    }
    /// A [λr, in/λ] and B [out/λ, λr]: LoRA's count at rank r.
    fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
        self.lambda * rank * (in_dim / self.lambda + out_dim / self.lambda)
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        Ok(Box::new(QBara::new(be, cfg, self.lambda, in_dim, out_dim, rng)?))
    }
}

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
        let h = self.lr.hidden(be, &u, rows)?;
        let mut z = be.zeros(rows * self.lr.n_out)?;
        self.lr.project(be, &h, rows, &mut z, false)?;
        be.group_expand(&z, rows, self.repeat(), false, 1.0, y, accumulate)
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
        let u = self.view.of_values(be, x, rows, pass)?;
        let h = self.lr.hidden(be, &u, rows)?;
        // The repeat's adjoint sums each run of λ output gradients.
        let mut dz = be.zeros(rows * self.lr.n_out)?;
        be.group_reduce(be.operand_values(dy), rows, self.repeat(), false, 1.0, &mut dz, false)?;
        let dz = be.operand(&dz)?;
        self.lr.backward(be, u.values(be), &h, &dz, rows, &self.view, pass, dx, accumulate)
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
