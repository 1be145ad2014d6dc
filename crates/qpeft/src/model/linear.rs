//! `QuantLinear`: the frozen base of an (adapted) linear layer, y = x·Ŵᵀ (+ b).
//!
//! Ŵ is kept dequantized to f32 on the backend (the quantized form stays on the host for saving and reports),
//! so the forward and the input gradient are plain matrix products. Only the input gradient exists: the base
//! is frozen.

use crate::backend::{Backend, MatMul};
use crate::error::Result;
use crate::quant::base::BaseWeight;

pub struct QuantLinear<B: Backend> {
    /// Ŵ [out_dim, in_dim], PyTorch layout.
    pub weight: B::Buf,
    pub bias: Option<B::Buf>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub base: BaseWeight,
}

impl<B: Backend> QuantLinear<B> {
    /// out ([rows, out_dim]) = x·Ŵᵀ + b, or out += x·Ŵᵀ + b when `accumulate`.
    pub fn forward(&self, be: &B, x: &B::Buf, rows: usize, out: &mut B::Buf, accumulate: bool) -> Result<()> {
        let shape = MatMul::new(rows, self.out_dim, self.in_dim).bt().acc(accumulate);
        be.matmul(x, &self.weight, out, shape)?;
        if let Some(b) = &self.bias {
            be.add_bias(out, b)?;
        }
        Ok(())
    }

    /// dx ([rows, in_dim]) = dy·Ŵ, or dx += dy·Ŵ when `accumulate`.
    pub fn backward_input(&self, be: &B, dy: &B::Buf, rows: usize, dx: &mut B::Buf, accumulate: bool) -> Result<()> {
        let shape = MatMul::new(rows, self.in_dim, self.out_dim).acc(accumulate);
        be.matmul(dy, &self.weight, dx, shape)
    }
}
