//! QA-HiRA (methods.md §5): one matrix C [out/l2, in/l1],
//!   Δ(x) = s·RepeatInterleave_{l2}(C·dropout(AvgPool_{l1}(x))).
//! The published code gives C the kaiming-uniform init of a LoRA A (U(±1/√(in/l1)), so Δ ≠ 0 at step 0);
//! `zero_init` starts from C = 0 instead, like LoRA's ΔW = 0. The unused zero `lora_B` of the published code is
//! not created. C is saved as `lora_A.weight`, as there.

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::{
    check_divides, expand_delta, kaiming, key, required, Adapter, AdapterConfig, InputView, MethodKind, Param, Pass,
};
use crate::backend::{Backend, Groups, MatMul};
use crate::error::Result;

/// QA-HiRA's input pooling λ1 and output repeat λ2, and its init (`hira_init`: "kaiming", as published, or "zero").
#[derive(Clone, Debug, PartialEq)]
pub struct QaHiraMethod {
    pub l1: usize,
    pub l2: usize,
    pub zero_init: bool,
}

impl MethodKind for QaHiraMethod {
    const NAME: &'static str = "qa-hira";
    const KEYS: &'static [&'static str] = &["l1", "l2", "hira_init"];

    fn from_keys(keys: &Map<String, Value>, _: f32) -> std::result::Result<Self, String> {
        let zero_init = match key::<String>(keys, "hira_init")?.as_deref().unwrap_or("kaiming") {
            "kaiming" => false,
            "zero" => true,
            other => return Err(format!("hira_init = `{other}` is not `kaiming` or `zero`")),
        };
        Ok(QaHiraMethod { l1: required(keys, "l1", Self::NAME)?, l2: required(keys, "l2", Self::NAME)?, zero_init })
    }
    fn to_keys(&self) -> Map<String, Value> {
        Map::from_iter([
            ("l1".to_string(), json!(self.l1)),
            ("l2".to_string(), json!(self.l2)),
            ("hira_init".to_string(), json!(if self.zero_init { "zero" } else { "kaiming" })),
        ])
    }
    /// The rank only enters the scaling α/r.
    fn check(&self, rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        if rank == 0 {
            return Err("rank = 0 must be at least 1 (QA-HiRA scales by alpha/rank)".into());
        }
        check_divides("l1", self.l1, in_dim, "input")?;
        check_divides("l2", self.l2, out_dim, "output")
    }
    fn trainable(&self, _rank: usize, in_dim: usize, out_dim: usize) -> usize {
        (in_dim / self.l1) * (out_dim / self.l2)
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        Ok(Box::new(QaHira::new(be, cfg, (self.l1, self.l2), self.zero_init, in_dim, out_dim, rng)?))
    }
}

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
        let mut z = be.zeros(rows * self.n_out)?;
        u.matmul(be, &self.c.value, &mut z, MatMul::new(rows, self.n_out, self.view.width()).bt())?;
        be.group_expand(&z, rows, self.repeat(), false, self.scaling, y, accumulate)
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
        // dz = s·(sum over each run of l2 output gradients); dC += dzᵀ·u; du = dz·C.
        let mut dz = be.zeros(rows * self.n_out)?;
        be.group_reduce(be.operand_values(dy), rows, self.repeat(), false, self.scaling, &mut dz, false)?;
        let n_in = self.view.width();
        be.matmul(&dz, u.values(be), self.c.grad_mut(be)?, MatMul::new(self.n_out, n_in, rows).at().acc(true))?;
        self.view.backward_product(be, &dz, &self.c.value, self.n_out, rows, pass, dx, accumulate)
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
