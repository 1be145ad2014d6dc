//! A frozen linear layer y = x·Wᵀ (+ b), weights resident on the backend.

use crate::backend::{Backend, MatMul};
use crate::error::Result;

pub struct Linear<B: Backend> {
    /// [out_dim, in_dim], PyTorch layout.
    pub weight: B::Buf,
    pub bias: Option<B::Buf>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl<B: Backend> Linear<B> {
    /// out ([rows, out_dim]) = x·Wᵀ + b, or out += x·Wᵀ + b when `accumulate`.
    pub fn forward(&self, be: &B, x: &B::Buf, rows: usize, out: &mut B::Buf, accumulate: bool) -> Result<()> {
        let shape = MatMul { m: rows, n: self.out_dim, k: self.in_dim, b_transposed: true, accumulate };
        be.matmul(x, &self.weight, out, shape)?;
        if let Some(b) = &self.bias {
            be.add_bias(out, b)?;
        }
        Ok(())
    }
}
