//! One decoder block, forward and backward side by side:
//!   x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))),   n1 = norm1(x_in)
//!   x_out = x_mid + down(act(gate(n2)) ⊙ up(n2)),               n2 = norm2(x_mid)
//! Every linear may carry an adapter (y = base(x) + Δ(x)). The base weights, norms and biases are frozen, so
//! backward produces only the residual-stream gradient and the adapters' parameter gradients.

use super::decoder::{Block, Decoder, InputSite, LinearInputObserver, Proj};
use super::linear::QuantLinear;
use crate::adapters::set::{module_seed, AdapterSet};
use crate::adapters::Pass;
use crate::backend::{AttentionShape, Backend, GluKind, RowWrite};
use crate::error::Result;

/// What a block's forward needs besides its input.
pub(crate) struct Ctx<'a, B: Backend> {
    pub rows: usize,
    pub positions: &'a B::Ints,
    pub key_mask: &'a B::Ints,
    pub shape: AttentionShape,
    pub glu: GluKind,
    /// Dropout on, and the step's seed (each module derives its own).
    pub pass: Pass,
}

impl<B: Backend> Ctx<'_, B> {
    fn pass(&self, layer: usize, proj: Proj) -> Pass {
        Pass { seed: module_seed(self.pass.seed, layer, proj), ..self.pass }
    }
}

/// A block's intermediate activations ([rows, width] each). Inference reuses one set for every layer;
/// training keeps one per layer (or recomputes it, with activation checkpointing).
pub(crate) struct Acts<B: Backend> {
    /// The block's input and the residual after attention: kept only for backward.
    pub x_in: Option<B::Buf>,
    pub x_mid: Option<B::Buf>,
    pub n1: B::Buf,
    /// q and k after RoPE.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub att: B::Buf,
    pub n2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub act: B::Buf,
}

impl<B: Backend> Acts<B> {
    pub fn new(be: &B, rows: usize, d: &Dims) -> Result<Self> {
        Ok(Acts {
            x_in: None,
            x_mid: None,
            n1: be.zeros(rows * d.h)?,
            q: be.zeros(rows * d.q)?,
            k: be.zeros(rows * d.kv)?,
            v: be.zeros(rows * d.kv)?,
            att: be.zeros(rows * d.q)?,
            n2: be.zeros(rows * d.h)?,
            gate: be.zeros(rows * d.ff)?,
            up: be.zeros(rows * d.ff)?,
            act: be.zeros(rows * d.ff)?,
        })
    }
}

/// Widths of the activations.
pub(crate) struct Dims {
    pub h: usize,
    pub q: usize,
    pub kv: usize,
    pub ff: usize,
}

impl<B: Backend> Block<B> {
    pub fn proj(&self, p: Proj) -> &QuantLinear<B> {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }

    pub fn proj_mut(&mut self, p: Proj) -> &mut QuantLinear<B> {
        match p {
            Proj::Q => &mut self.q,
            Proj::K => &mut self.k,
            Proj::V => &mut self.v,
            Proj::O => &mut self.o,
            Proj::Gate => &mut self.gate,
            Proj::Up => &mut self.up,
            Proj::Down => &mut self.down,
        }
    }
}

/// Where a block's keys and values go during forward.
pub(crate) enum KvTarget<'a, B: Backend> {
    /// Appended to a cache (inference); attention reads the cache.
    Cache { k: &'a mut B::Buf, v: &'a mut B::Buf, at: RowWrite },
    /// The block's own k, v are the whole sequence (training).
    Own,
}

impl<B: Backend> Decoder<B> {
    pub(crate) fn dims(&self) -> Dims {
        let s = &self.spec;
        Dims { h: s.hidden_size, q: s.q_dim(), kv: s.kv_dim(), ff: s.intermediate_size }
    }

    /// out (+)= base(x) + Δ(x) for linear `p` of layer `l`.
    #[allow(clippy::too_many_arguments)]
    fn linear(&self, l: usize, p: Proj, x: &B::Buf, out: &mut B::Buf, accumulate: bool, ctx: &Ctx<B>, adapters: Option<&AdapterSet<B>>) -> Result<()> {
        let be = &self.backend;
        self.blocks[l].proj(p).forward(be, x, ctx.rows, out, accumulate)?;
        match adapters.and_then(|a| a.get(l, p)) {
            Some(a) => a.forward(be, x, ctx.rows, ctx.pass(l, p), out),
            None => Ok(()),
        }
    }

    /// dx (+)= ∂/∂x of linear `p` of layer `l` (input x, output gradient dy); its adapter's grads accumulate.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: usize,
        p: Proj,
        x: &B::Buf,
        dy: &B::Buf,
        dx: &mut B::Buf,
        accumulate: bool,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
    ) -> Result<()> {
        let be = &self.backend;
        self.blocks[l].proj(p).backward_input(be, dy, ctx.rows, dx, accumulate)?;
        match adapters.get_mut(l, p) {
            Some(a) => a.backward(be, x, dy, ctx.rows, ctx.pass(l, p), dx),
            None => Ok(()),
        }
    }

    /// Runs block `l` on the residual stream `x` in place, leaving its activations in `a`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward(
        &self,
        l: usize,
        x: &mut B::Buf,
        a: &mut Acts<B>,
        kv: KvTarget<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let (be, s, blk) = (&self.backend, &self.spec, &self.blocks[l]);
        let h = s.hidden_size;
        let lin = |p: Proj, x: &B::Buf, out: &mut B::Buf, acc: bool| self.linear(l, p, x, out, acc, ctx, adapters);
        be.rmsnorm(x, &blk.attn_norm, h, s.rms_norm_eps, s.norm_plus_one, &mut a.n1)?;
        observe(l, InputSite::Attention, &a.n1)?;
        lin(Proj::Q, &a.n1, &mut a.q, false)?;
        lin(Proj::K, &a.n1, &mut a.k, false)?;
        lin(Proj::V, &a.n1, &mut a.v, false)?;
        be.rope(&mut a.q, ctx.positions, &self.inv_freq, s.num_heads, s.head_dim)?;
        be.rope(&mut a.k, ctx.positions, &self.inv_freq, s.num_kv_heads, s.head_dim)?;
        match kv {
            KvTarget::Cache { k, v, at } => {
                be.write_rows(&a.k, k, at)?;
                be.write_rows(&a.v, v, at)?;
                be.attention(&a.q, k, v, ctx.key_mask, ctx.shape, &mut a.att)?;
            }
            KvTarget::Own => be.attention(&a.q, &a.k, &a.v, ctx.key_mask, ctx.shape, &mut a.att)?,
        }
        observe(l, InputSite::AttentionOutput, &a.att)?;
        lin(Proj::O, &a.att, x, true)?;
        if let Some(m) = &mut a.x_mid {
            be.copy(x, 0, m, 0, be.len(x))?;
        }

        be.rmsnorm(x, &blk.mlp_norm, h, s.rms_norm_eps, s.norm_plus_one, &mut a.n2)?;
        observe(l, InputSite::Mlp, &a.n2)?;
        lin(Proj::Gate, &a.n2, &mut a.gate, false)?;
        lin(Proj::Up, &a.n2, &mut a.up, false)?;
        be.glu(&a.gate, &a.up, ctx.glu, &mut a.act)?;
        observe(l, InputSite::MlpOutput, &a.act)?;
        lin(Proj::Down, &a.act, x, true)
    }

    /// Given dx = ∂L/∂x_out of block `l` and its forward activations (with x_in and x_mid saved), replaces dx
    /// by ∂L/∂x_in and accumulates the block's adapter gradients.
    pub(crate) fn block_backward(&self, l: usize, dx: &mut B::Buf, a: &Acts<B>, ctx: &Ctx<B>, adapters: &mut AdapterSet<B>) -> Result<()> {
        let (be, s, blk) = (&self.backend, &self.spec, &self.blocks[l]);
        let (h, rows) = (s.hidden_size, ctx.rows);
        let d = self.dims();
        let missing = || crate::Error::Invalid("block_backward needs the activations of a training forward".into());
        let (x_in, x_mid) = (a.x_in.as_ref().ok_or_else(missing)?, a.x_mid.as_ref().ok_or_else(missing)?);

        // MLP half: x_out = x_mid + down(act), act = glu(gate(n2), up(n2)).
        let mut d_act = be.zeros(rows * d.ff)?;
        self.linear_backward(l, Proj::Down, &a.act, dx, &mut d_act, false, ctx, adapters)?;
        let (mut d_gate, mut d_up) = (be.zeros(rows * d.ff)?, be.zeros(rows * d.ff)?);
        be.glu_backward(&a.gate, &a.up, &d_act, ctx.glu, &mut d_gate, &mut d_up)?;
        let mut dn = be.zeros(rows * h)?;
        self.linear_backward(l, Proj::Gate, &a.n2, &d_gate, &mut dn, false, ctx, adapters)?;
        self.linear_backward(l, Proj::Up, &a.n2, &d_up, &mut dn, true, ctx, adapters)?;
        be.rmsnorm_backward(x_mid, &blk.mlp_norm, &dn, h, s.rms_norm_eps, s.norm_plus_one, dx, true)?;

        // Attention half: x_mid = x_in + o(att).
        let mut d_att = be.zeros(rows * d.q)?;
        self.linear_backward(l, Proj::O, &a.att, dx, &mut d_att, false, ctx, adapters)?;
        let (mut dq, mut dk, mut dv) = (be.zeros(rows * d.q)?, be.zeros(rows * d.kv)?, be.zeros(rows * d.kv)?);
        be.attention_backward(&a.q, &a.k, &a.v, ctx.key_mask, ctx.shape, &d_att, &mut dq, &mut dk, &mut dv)?;
        be.rope_backward(&mut dq, ctx.positions, &self.inv_freq, s.num_heads, s.head_dim)?;
        be.rope_backward(&mut dk, ctx.positions, &self.inv_freq, s.num_kv_heads, s.head_dim)?;
        self.linear_backward(l, Proj::Q, &a.n1, &dq, &mut dn, false, ctx, adapters)?;
        self.linear_backward(l, Proj::K, &a.n1, &dk, &mut dn, true, ctx, adapters)?;
        self.linear_backward(l, Proj::V, &a.n1, &dv, &mut dn, true, ctx, adapters)?;
        be.rmsnorm_backward(x_in, &blk.attn_norm, &dn, h, s.rms_norm_eps, s.norm_plus_one, dx, true)
    }
}
