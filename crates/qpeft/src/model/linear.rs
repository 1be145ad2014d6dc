//! `QuantLinear`: the frozen base of an (adapted) linear layer, y = x·Ŵᵀ (+ b).
//!
//! Ŵ lives on the backend in the backend's form (`Backend::Weight`: f32 on the CPU, the packed 4-bit base on a
//! GPU); the quantized form also stays on the host for saving and reports. Only the input gradient exists: the
//! base is frozen.

use crate::backend::{Backend, Tail};
use crate::error::Result;
use crate::quant::base::BaseWeight;

pub struct QuantLinear<B: Backend> {
    /// Ŵ [out_dim, in_dim], PyTorch layout.
    pub weight: B::Weight,
    pub bias: Option<B::Buf>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub base: BaseWeight,
}

impl<B: Backend> QuantLinear<B> {
    /// out ([rows, out_dim]) = x·Ŵᵀ + b (+ an adapter's `tail`), or out += … when `accumulate`, for the operand of x
    /// (`Backend::operand`, which the linear's adapters read too).
    pub fn forward(
        &self,
        be: &B,
        x: &B::Operand<'_>,
        tail: Option<Tail<'_, B>>,
        rows: usize,
        out: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        be.linear_from(x, &self.weight, tail, rows, out, accumulate)?;
        if let Some(b) = &self.bias {
            be.add_bias(out, b)?;
        }
        Ok(())
    }

    /// dx ([rows, in_dim]) = dy·Ŵ (+ an adapter's `tail`), or dx += … when `accumulate`, for the operand of dy.
    pub fn backward_input(
        &self,
        be: &B,
        dy: &B::Operand<'_>,
        tail: Option<Tail<'_, B>>,
        rows: usize,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        be.linear_backward_from(dy, &self.weight, tail, rows, dx, accumulate)
    }
}
