//! QA-HiRA (methods.md §5): one matrix C [out/l2, in/l1],
//!   Δ(x) = s·RepeatInterleave_{l2}(C·dropout(AvgPool_{l1}(x))).
//! The published code gives C the kaiming-uniform init of a LoRA A (U(±1/√(in/l1)), so Δ ≠ 0 at step 0);
//! `zero_init` starts from C = 0 instead, like LoRA's ΔW = 0. The unused zero `lora_B` of the published code is
//! not created. C is saved as `lora_A.weight`, as there.

use rand_chacha::ChaCha8Rng;

use super::{expand_delta, kaiming, Adapter, AdapterConfig, InputView, Param, Pass};
use crate::backend::{Backend, Groups, MatMul};
use crate::error::Result;

pub struct QaHira<B: Backend> {
    view: InputView,
    c: Param<B>,
    n_out: usize,
    out_dim: usize,
    l1: usize,
    scaling: f32,
}

impl<B: Backend> QaHira<B> {
    pub fn new(
        be: &B,
        cfg: &AdapterConfig,
        (l1, l2): (usize, usize),
        zero_init: bool,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (n_in, n_out) = (in_dim / l1, out_dim / l2);
        let init = if zero_init { vec![0.0; n_out * n_in] } else { kaiming(rng, n_out, n_in) };
        Ok(QaHira {
            view: InputView { in_dim, pool: Some(Groups { width: in_dim, groups: n_in }), dropout: cfg.dropout },
            c: Param::new(be, "lora_A.weight", vec![n_out, n_in], &init, 1.0)?,
            n_out,
            out_dim,
            l1,
            scaling: cfg.scaling(),
        })
    }

    fn repeat(&self) -> Groups {
        Groups { width: self.out_dim, groups: self.n_out }
    }
}

impl<B: Backend> Adapter<B> for QaHira<B> {
    fn forward(&self, be: &B, x: &B::Buf, rows: usize, pass: Pass, y: &mut B::Buf) -> Result<()> {
        let u = self.view.forward(be, x, rows, pass)?;
        let mut z = be.zeros(rows * self.n_out)?;
        be.matmul(&u, &self.c.value, &mut z, MatMul::new(rows, self.n_out, self.view.width()).bt())?;
        be.group_expand(&z, rows, self.repeat(), false, self.scaling, y, true)
    }

    fn backward(&mut self, be: &B, x: &B::Buf, dy: &B::Buf, rows: usize, pass: Pass, dx: &mut B::Buf) -> Result<()> {
        let u = self.view.forward(be, x, rows, pass)?;
        // dz = s·(sum over each run of l2 output gradients); dC += dzᵀ·u; du = dz·C.
        let mut dz = be.zeros(rows * self.n_out)?;
        be.group_reduce(dy, rows, self.repeat(), false, self.scaling, &mut dz, false)?;
        let n_in = self.view.width();
        be.matmul(&dz, &u, self.c.grad_mut(be)?, MatMul::new(self.n_out, n_in, rows).at().acc(true))?;
        self.view.backward_product(be, &dz, &self.c.value, self.n_out, rows, pass, dx)
    }

    fn params(&self) -> Vec<&Param<B>> {
        vec![&self.c]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.c]
    }

    /// ΔW[j, i] = (s/l1)·C[⌊j/l2⌋, ⌊i/l1⌋].
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>> {
        let s = self.scaling as f64;
        let c: Vec<f64> = be.download(&self.c.value)?.into_iter().map(|v| s * v as f64).collect();
        Ok(expand_delta(&c, self.n_out, self.view.width(), self.out_dim / self.n_out, self.l1))
    }
}
