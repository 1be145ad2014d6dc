//! LoRA / QLoRA with PEFT semantics (methods.md §1.5): Δ(x) = s·B·A·dropout(x), s = α/r, A kaiming-uniform
//! (U(±1/√in)), B = 0. QA-LoRA is this with an average-pooled input (see `qa_lora`).

use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use super::{expand_delta, kaiming, Adapter, AdapterConfig, InputView, LowRank, MethodKind, Param, Pass, Term};
use crate::backend::Backend;
use crate::error::Result;

/// LoRA has no keys of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraMethod;

impl MethodKind for LoraMethod {
    const NAME: &'static str = "lora";
    const ALIASES: &'static [&'static str] = &["qlora"];

    fn from_keys(_: &Map<String, Value>, _: f32) -> std::result::Result<Self, String> {
        Ok(LoraMethod)
    }
    fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
        rank * (in_dim + out_dim)
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        Ok(Box::new(Lora::new(be, cfg, in_dim, out_dim, rng)?))
    }
}

pub struct Lora<B: Backend> {
    view: InputView,
    lr: LowRank<B>,
}

impl<B: Backend> Lora<B> {
    pub fn new(be: &B, cfg: &AdapterConfig, in_dim: usize, out_dim: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        let a = kaiming(rng, cfg.rank, in_dim);
        Self::on_view(be, cfg, InputView { in_dim, pool: None, dropout: cfg.dropout }, out_dim, &a)
    }

    /// A LoRA reading `view` of the input, with A initialised to `a` and B zero.
    pub(crate) fn on_view(be: &B, cfg: &AdapterConfig, view: InputView, out_dim: usize, a: &[f32]) -> Result<Self> {
        Ok(Lora { view, lr: LowRank::new(be, "", cfg.rank, view.width(), out_dim, cfg.scaling(), a, 1.0)? })
    }
}

impl<B: Backend> Adapter<B> for Lora<B> {
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
        self.lr.project(be, &h, rows, y, accumulate)
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
        self.lr.backward(be, u.values(be), &h, dy, rows, &self.view, pass, dx, accumulate)
    }

    fn term_rank(&self) -> usize {
        self.lr.rank
    }

    fn forward_term(&self, be: &B, x: &B::Operand<'_>, rows: usize, pass: Pass) -> Result<Option<Term<'_, B>>> {
        let u = self.view.of_operand(be, x, rows, pass)?;
        Ok(Some(self.lr.forward_term(be, &u, rows)?))
    }

    fn backward_term(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        hidden: Option<B::Buf>,
    ) -> Result<Option<Term<'_, B>>> {
        if !self.view.is_identity(pass) {
            return Ok(None);
        }
        Ok(Some(self.lr.backward_term(be, x, hidden, dy, rows)?))
    }

    fn params(&self) -> Vec<&Param<B>> {
        self.lr.params()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.lr.params_mut()
    }

    /// s·B·A, spread over each pooled group (÷ its size) when the input is pooled.
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>> {
        Ok(expand_delta(&self.lr.product(be)?, self.lr.n_out, self.lr.n_in, 1, self.view.in_dim / self.view.width()))
    }
}
