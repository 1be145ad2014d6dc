//! One decoder block, forward and backward side by side:
//!   x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1))),   n1 = norm1(x_in)
//!   x_out = x_mid + down(act(gate(n2)) ⊙ up(n2)),               n2 = norm2(x_mid)
//! Every linear may carry an adapter (y = base(x) + Δ(x)). The base weights, norms and biases are frozen, so
//! backward produces only the residual-stream gradient and the adapters' parameter gradients.

use super::linear::QuantLinear;
use crate::adapters::set::{module_seed, AdapterSet};
use crate::adapters::Pass;
use crate::arch::{InputSite, ModelSpec, Proj};
use crate::backend::{AttentionShape, Backend, GluKind, RowWrite};
use crate::error::Result;

/// Receives (layer, site, input [rows, in_dim]) for every linear input of a forward pass.
pub type LinearInputObserver<'a, B> = dyn FnMut(usize, InputSite, &<B as Backend>::Buf) -> Result<()> + 'a;

pub struct Block<B: Backend> {
    pub attn_norm: B::Buf,
    pub q: QuantLinear<B>,
    pub k: QuantLinear<B>,
    pub v: QuantLinear<B>,
    pub o: QuantLinear<B>,
    pub mlp_norm: B::Buf,
    pub gate: QuantLinear<B>,
    pub up: QuantLinear<B>,
    pub down: QuantLinear<B>,
}

/// One block of a decoder with what running it needs: the backend, the model's shape, the RoPE frequencies,
/// and the block's index (adapters and dropout seeds are keyed by it).
pub(crate) struct Layer<'a, B: Backend> {
    pub be: &'a B,
    pub spec: &'a ModelSpec,
    pub inv_freq: &'a B::Buf,
    pub block: &'a Block<B>,
    pub index: usize,
}

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

impl<'a, B: Backend> Ctx<'a, B> {
    fn pass(&self, layer: usize, proj: Proj) -> Pass {
        Pass { seed: module_seed(self.pass.seed, layer, proj), ..self.pass }
    }

    /// The context of rows `first..first + rows` run on their own (row-wise parts of a block only).
    fn rows_from(&self, first: usize, rows: usize) -> Ctx<'a, B> {
        Ctx { rows, pass: Pass { first_row: self.pass.first_row + first, ..self.pass }, ..*self }
    }
}

/// The adapters' hidden states h = x·Aᵀ of a forward pass (`Adapter::forward_term`), kept per linear where `keep` is
/// set (the forward that a backward follows: the recompute, or training without checkpointing), so that the backward
/// takes them instead of computing them again.
pub(crate) struct Hidden<B: Backend> {
    pub keep: bool,
    h: [Option<B::Buf>; 7],
}

impl<B: Backend> Hidden<B> {
    fn new() -> Self {
        Hidden { keep: false, h: Default::default() }
    }
    fn store(&mut self, p: Proj, h: B::Buf) {
        if self.keep {
            self.h[p as usize] = Some(h);
        }
    }
    fn take(&mut self, p: Proj) -> Option<B::Buf> {
        self.h[p as usize].take()
    }
}

/// The attention half's activations ([rows, width] each).
pub(crate) struct AttnActs<B: Backend> {
    pub n1: B::Buf,
    /// q and k after RoPE.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub att: B::Buf,
    pub hidden: Hidden<B>,
    /// What the attention left for its backward (`Backend::attention_keeping`), where `hidden.keep` asks for it.
    kept: Option<B::AttnKept>,
}

impl<B: Backend> AttnActs<B> {
    pub fn new(be: &B, rows: usize, d: &Dims) -> Result<Self> {
        Self::around(be, rows, d, be.uninit(rows * d.q)?)
    }

    /// The activations of an attention whose output is known already.
    fn around(be: &B, rows: usize, d: &Dims, att: B::Buf) -> Result<Self> {
        Ok(AttnActs {
            n1: be.uninit(rows * d.h)?,
            q: be.uninit(rows * d.q)?,
            k: be.uninit(rows * d.kv)?,
            v: be.uninit(rows * d.kv)?,
            att,
            hidden: Hidden::new(),
            kept: None,
        })
    }
}

/// The MLP half's activations: its input's norm, and the products before and after the gated activation.
pub(crate) struct MlpActs<B: Backend> {
    pub n2: B::Buf,
    pub gate: B::Buf,
    pub up: B::Buf,
    pub act: B::Buf,
    pub hidden: Hidden<B>,
}

impl<B: Backend> MlpActs<B> {
    pub fn new(be: &B, rows: usize, d: &Dims) -> Result<Self> {
        Ok(MlpActs {
            n2: be.uninit(rows * d.h)?,
            gate: be.uninit(rows * d.ff)?,
            up: be.uninit(rows * d.ff)?,
            act: be.uninit(rows * d.ff)?,
            hidden: Hidden::new(),
        })
    }
}

/// A whole block's activations. Inference reuses one set for every layer; training without checkpointing
/// keeps one per layer, with the block's input and the residual after attention.
pub(crate) struct Acts<B: Backend> {
    pub x_in: Option<B::Buf>,
    pub x_mid: Option<B::Buf>,
    pub attn: AttnActs<B>,
    pub mlp: MlpActs<B>,
}

impl<B: Backend> Acts<B> {
    pub fn new(be: &B, rows: usize, d: &Dims) -> Result<Self> {
        Ok(Acts { x_in: None, x_mid: None, attn: AttnActs::new(be, rows, d)?, mlp: MlpActs::new(be, rows, d)? })
    }

    /// These activations with the adapters' hidden states kept (`Hidden`).
    pub fn keeping_hidden(mut self) -> Self {
        (self.attn.hidden.keep, self.mlp.hidden.keep) = (true, true);
        self
    }
}

/// Rows per MLP chunk in a checkpointed training pass. The MLP works row by row, and its intermediate
/// activations and their gradients are a block's largest buffers (86 MiB each at LLaMA-7B's 11008 for 2048 rows),
/// so running it in chunks bounds the working set of the recompute and backward; the chunks multiply with the MLP's
/// weights held (`Backend::hold_weights`: dequantized once for all of them, which costs the three weights' 16-bit
/// size) but run smaller GEMMs. `limit` sets the most rows; by default a chunk's f32 [rows, intermediate] takes 1/20
/// of the checkpointed block inputs (`layers` × [rows, hidden] in 16 bits), at least 24 MiB: a fixed share of what
/// checkpointing keeps anyway, so the chunks grow with the batch. The rows are split evenly and rounded up to a
/// multiple of 128 (GEMM tiles). On an H200 (LLaMA-7B, 2048 × 4, NF4, r 64), before weights were held, 3 chunks
/// (1/16) instead of the 11 of a fixed 32 MiB made 6,183 → 6,981 tok/s at the same peak memory (9,753 MiB). With
/// the weights held each chunk costs less, and 1/20 gives 4 chunks at 2048 × 4 and at 2048 × 1, whose smaller
/// working set (78 MiB less at 2048 × 1 than 3 chunks') pays for most of the held weights.
pub fn mlp_chunk(rows: usize, ff: usize, hidden: usize, layers: usize, limit: Option<usize>) -> usize {
    const MIN_CHUNK_BYTES: usize = 24 << 20;
    const TILE: usize = 128;
    if let Some(most) = limit {
        return most.clamp(1, rows.max(1));
    }
    let bytes = (rows * hidden * 2 * layers / 20).max(MIN_CHUNK_BYTES);
    let most = (bytes / (4 * ff)).max(1);
    let even = rows.div_ceil(rows.div_ceil(most).max(1));
    even.div_ceil(TILE).saturating_mul(TILE).clamp(1, rows.max(1))
}

/// Widths of the activations.
pub(crate) struct Dims {
    pub h: usize,
    pub q: usize,
    pub kv: usize,
    pub ff: usize,
}

impl Dims {
    pub fn of(s: &ModelSpec) -> Dims {
        Dims { h: s.hidden_size, q: s.q_dim(), kv: s.kv_dim(), ff: s.intermediate_size }
    }
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

impl<B: Backend> Layer<'_, B> {
    /// out (+)= base(x) + Δ(x) for linear `p` of this block.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        p: Proj,
        x: &B::Buf,
        out: &mut B::Buf,
        accumulate: bool,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        hidden: &mut Hidden<B>,
    ) -> Result<()> {
        let x = self.be.operand_with_room(x, ctx.rows, self.room(&[p], adapters))?;
        self.adapted(p, &x, out, accumulate, ctx, adapters, hidden)
    }

    /// Holds the MLP's weights dequantized (`Backend::hold_weights`, with the rooms their operands get) until the guard
    /// drops: for the products of row chunks, which would otherwise dequantize each weight once per chunk and use.
    /// Down only with `down` (where it multiplies more than once).
    fn hold_mlp(&self, adapters: &AdapterSet<B>, down: bool) -> Result<HeldWeights<'_, B>> {
        let held = HeldWeights(self.be);
        let groups: &[&[Proj]] =
            if down { &[&[Proj::Gate, Proj::Up], &[Proj::Down]] } else { &[&[Proj::Gate, Proj::Up]] };
        for &ps in groups {
            let ws: Vec<_> = ps.iter().map(|&p| &self.block.proj(p).weight).collect();
            self.be.hold_weights(&ws, self.room(ps, Some(adapters)))?;
        }
        Ok(held)
    }

    /// The room a shared operand of the linears `ps` needs for their adapters' terms (`Adapter::term_rank`).
    fn room(&self, ps: &[Proj], adapters: Option<&AdapterSet<B>>) -> usize {
        let Some(set) = adapters else { return 0 };
        ps.iter().filter_map(|&p| set.get(self.index, p)).map(|a| a.term_rank()).max().unwrap_or(0)
    }

    /// outs[i] = base(x) + Δ(x) for the linears `ps` of this block, which read the same operand of x (made with the
    /// room of `room(ps)`).
    fn linears<const N: usize>(
        &self,
        ps: [Proj; N],
        x: &B::Operand<'_>,
        outs: [&mut B::Buf; N],
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        hidden: &mut Hidden<B>,
    ) -> Result<()> {
        for (p, out) in ps.into_iter().zip(outs) {
            self.adapted(p, x, out, false, ctx, adapters, hidden)?;
        }
        Ok(())
    }

    /// out (+)= base(x) + Δ(x) for the operand of x: Δ(x) handed to the base product as its tail where the adapter
    /// gives it as a term (a GPU folds it into the base GEMM), otherwise in the order the backend accumulates for free
    /// (`Backend::adapter_term_first`): on a GPU the adapter's term first and the base GEMM adding onto it, so that the
    /// adapter does not read and write the output once more.
    #[allow(clippy::too_many_arguments)]
    fn adapted(
        &self,
        p: Proj,
        x: &B::Operand<'_>,
        out: &mut B::Buf,
        accumulate: bool,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        hidden: &mut Hidden<B>,
    ) -> Result<()> {
        let (be, rows, base) = (self.be, ctx.rows, self.block.proj(p));
        let Some(a) = adapters.and_then(|a| a.get(self.index, p)) else {
            return base.forward(be, x, None, rows, out, accumulate);
        };
        let pass = ctx.pass(self.index, p);
        if let Some(term) = a.forward_term(be, x, rows, pass)? {
            base.forward(be, x, Some(term.tail()), rows, out, accumulate)?;
            hidden.store(p, term.h);
            return Ok(());
        }
        if be.adapter_term_first() {
            a.forward(be, x, rows, pass, out, accumulate)?;
            base.forward(be, x, None, rows, out, true)
        } else {
            base.forward(be, x, None, rows, out, accumulate)?;
            a.forward(be, x, rows, pass, out, true)
        }
    }

    /// The operand of the output gradient dy of linear `p`, with the room its adapter's term needs.
    fn grad_operand<'b>(
        &self,
        p: Proj,
        dy: &'b B::Buf,
        ctx: &Ctx<B>,
        adapters: &AdapterSet<B>,
    ) -> Result<B::Operand<'b>> {
        self.be.operand_with_room(dy, ctx.rows, self.room(&[p], Some(adapters)))
    }

    /// dx (+)= ∂/∂x of linear `p` of this block (input x, the operand of the output gradient dy made with the room of
    /// `room([p])`); its adapter's grads accumulate. The adapter's part of dx goes to the base product as a tail where
    /// the adapter gives it as a term, otherwise the two parts come in the order of `adapted`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        p: Proj,
        x: &B::Buf,
        dy: &B::Operand<'_>,
        dx: &mut B::Buf,
        accumulate: bool,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
        hidden: Option<B::Buf>,
    ) -> Result<()> {
        let (be, rows, base) = (self.be, ctx.rows, self.block.proj(p));
        let pass = ctx.pass(self.index, p);
        let Some(a) = adapters.get_mut(self.index, p) else {
            return base.backward_input(be, dy, None, rows, dx, accumulate);
        };
        if let Some(term) = a.backward_term(be, x, dy, rows, pass, hidden)? {
            return base.backward_input(be, dy, Some(term.tail()), rows, dx, accumulate);
        }
        if be.adapter_term_first() {
            a.backward(be, x, dy, rows, pass, dx, accumulate)?;
            base.backward_input(be, dy, None, rows, dx, true)
        } else {
            base.backward_input(be, dy, None, rows, dx, accumulate)?;
            a.backward(be, x, dy, rows, pass, dx, true)
        }
    }

    /// Runs this block on the residual stream `x` in place, leaving its activations in `a`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &mut B::Buf,
        a: &mut Acts<B>,
        kv: KvTarget<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let be = self.be;
        self.attention_forward(x, &mut a.attn, kv, ctx, adapters, observe)?;
        if let Some(m) = &mut a.x_mid {
            be.copy(x, 0, m, 0, be.len(x))?;
        }
        self.mlp_hidden(x, &mut a.mlp, ctx, adapters, observe)?;
        self.mlp_down(x, &mut a.mlp, ctx, adapters, observe)
    }

    /// x += o(attn(…)) of this block, leaving the attention half's activations in `a`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        x: &mut B::Buf,
        a: &mut AttnActs<B>,
        kv: KvTarget<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let be = self.be;
        self.attention_inputs(x, a, ctx, adapters, observe)?;
        match kv {
            KvTarget::Cache { k, v, at } => {
                be.write_rows(&a.k, k, at)?;
                be.write_rows(&a.v, v, at)?;
                be.attention(&a.q, k, v, ctx.key_mask, ctx.shape, &mut a.att)?;
            }
            KvTarget::Own if a.hidden.keep => {
                a.kept = be.attention_keeping(&a.q, &a.k, &a.v, ctx.key_mask, ctx.shape, &mut a.att)?;
            }
            KvTarget::Own => be.attention(&a.q, &a.k, &a.v, ctx.key_mask, ctx.shape, &mut a.att)?,
        }
        observe(self.index, InputSite::AttentionOutput, &a.att)?;
        self.linear(Proj::O, &a.att, x, true, ctx, adapters, &mut a.hidden)
    }

    /// The attention's inputs: n1 = norm1(x), and q, k, v of n1 with RoPE on q and k.
    fn attention_inputs(
        &self,
        x: &B::Buf,
        a: &mut AttnActs<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let (be, s, blk) = (self.be, self.spec, self.block);
        let ps = [Proj::Q, Proj::K, Proj::V];
        let (h, eps, room) = (s.hidden_size, s.rms_norm_eps, self.room(&ps, adapters));
        let n1 = be.rmsnorm_operand(x, &blk.attn_norm, h, eps, s.norm_plus_one, &mut a.n1, room)?;
        observe(self.index, InputSite::Attention, be.operand_values(&n1))?;
        self.linears(ps, &n1, [&mut a.q, &mut a.k, &mut a.v], ctx, adapters, &mut a.hidden)?;
        drop(n1);
        be.rope(&mut a.q, ctx.positions, self.inv_freq, s.num_heads, s.head_dim)?;
        be.rope(&mut a.k, ctx.positions, self.inv_freq, s.num_kv_heads, s.head_dim)
    }

    /// The MLP of this block up to the gated activation's inputs: n2 = norm2(x), gate(n2) and up(n2).
    fn mlp_hidden(
        &self,
        x: &B::Buf,
        m: &mut MlpActs<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let (be, s, blk) = (self.be, self.spec, self.block);
        let ps = [Proj::Gate, Proj::Up];
        let (h, eps, room) = (s.hidden_size, s.rms_norm_eps, self.room(&ps, adapters));
        let n2 = be.rmsnorm_operand(x, &blk.mlp_norm, h, eps, s.norm_plus_one, &mut m.n2, room)?;
        observe(self.index, InputSite::Mlp, be.operand_values(&n2))?;
        self.linears(ps, &n2, [&mut m.gate, &mut m.up], ctx, adapters, &mut m.hidden)
    }

    /// x += down(act) with act = glu(gate, up) of `mlp_hidden`, made with the down projection's operand.
    fn mlp_down(
        &self,
        x: &mut B::Buf,
        m: &mut MlpActs<B>,
        ctx: &Ctx<B>,
        adapters: Option<&AdapterSet<B>>,
        observe: &mut LinearInputObserver<'_, B>,
    ) -> Result<()> {
        let (be, room) = (self.be, self.room(&[Proj::Down], adapters));
        let act = be.glu_operand(&m.gate, &m.up, ctx.glu, &mut m.act, ctx.rows, room)?;
        observe(self.index, InputSite::MlpOutput, be.operand_values(&act))?;
        self.adapted(Proj::Down, &act, x, true, ctx, adapters, &mut m.hidden)
    }

    /// Given dx = ∂L/∂x_out of this block and its forward activations (with x_in and x_mid saved), replaces dx
    /// by ∂L/∂x_in and accumulates the block's adapter gradients.
    pub(crate) fn backward(
        &self,
        dx: &mut B::Buf,
        a: &mut Acts<B>,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
    ) -> Result<()> {
        let missing = || crate::Error::Invalid("Layer::backward needs the activations of a training forward".into());
        let (x_in, x_mid) = (a.x_in.as_ref().ok_or_else(missing)?, a.x_mid.as_ref().ok_or_else(missing)?);
        self.mlp_backward(dx, x_mid, &mut a.mlp, ctx, adapters)?;
        self.attention_backward(dx, x_in, &mut a.attn, ctx, adapters)
    }

    /// The training forward of this block with checkpointing: the attention half whole (its activations in the
    /// reused `a`), the MLP `chunk` rows at a time.
    pub(crate) fn forward_chunked(
        &self,
        x: &mut B::Buf,
        a: &mut AttnActs<B>,
        ctx: &Ctx<B>,
        adapters: &AdapterSet<B>,
        chunk: usize,
    ) -> Result<()> {
        let (be, h) = (self.be, self.spec.hidden_size);
        self.attention_forward(x, a, KvTarget::Own, ctx, Some(adapters), &mut |_, _, _| Ok(()))?;
        let _held = if chunk < ctx.rows { Some(self.hold_mlp(adapters, true)?) } else { None };
        // The MLP reads and updates the residual stream in place.
        for_row_chunks(be, None, x, h, ctx, chunk, |_, xc, cctx| {
            let mut m = MlpActs::new(be, cctx.rows, &Dims::of(self.spec))?;
            let no_observer = &mut |_, _, _: &B::Buf| Ok(());
            self.mlp_hidden(xc, &mut m, cctx, Some(adapters), no_observer)?;
            self.mlp_down(xc, &mut m, cctx, Some(adapters), no_observer)
        })
    }

    /// Backward of this block from its checkpointed input: recomputes the attention half (keeping its
    /// activations; with its kept output `att`, all but the attention itself), then recomputes and differentiates the
    /// MLP `chunk` rows at a time (its output, x_out, is never needed), then differentiates the attention half.
    /// Replaces dx = ∂L/∂x_out by ∂L/∂x_in.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn recompute_backward(
        &self,
        x_in: &B::Buf,
        att: Option<B::Buf>,
        dx: &mut B::Buf,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
        chunk: usize,
    ) -> Result<()> {
        let (be, h) = (self.be, self.spec.hidden_size);
        let mut x_mid = copy_of(be, x_in)?;
        let no_observer = &mut |_, _, _: &B::Buf| Ok(());
        let d = Dims::of(self.spec);
        let mut a = match att {
            Some(att) => {
                let mut a = AttnActs::around(be, ctx.rows, &d, att)?;
                a.hidden.keep = true;
                self.attention_inputs(x_in, &mut a, ctx, Some(adapters), no_observer)?;
                self.linear(Proj::O, &a.att, &mut x_mid, true, ctx, Some(adapters), &mut a.hidden)?;
                a
            }
            None => {
                let mut a = AttnActs::new(be, ctx.rows, &d)?;
                a.hidden.keep = true;
                self.attention_forward(&mut x_mid, &mut a, KvTarget::Own, ctx, Some(adapters), no_observer)?;
                a
            }
        };
        // Gate and up multiply in each chunk's forward and backward, down in its backward (once, in one chunk).
        let held = self.hold_mlp(adapters, chunk < ctx.rows)?;
        for_row_chunks(be, Some(&x_mid), dx, h, ctx, chunk, |xc, dxc, cctx| {
            let xc = xc.expect("x_mid is given");
            let mut m = MlpActs::new(be, cctx.rows, &Dims::of(self.spec))?;
            m.hidden.keep = true;
            self.mlp_hidden(xc, &mut m, cctx, Some(adapters), &mut |_, _, _| Ok(()))?;
            // Only down's backward reads act: no operand of it.
            be.glu(&m.gate, &m.up, cctx.glu, &mut m.act)?;
            self.mlp_backward(dxc, xc, &mut m, cctx, adapters)
        })?;
        drop((x_mid, held));
        self.attention_backward(dx, x_in, &mut a, ctx, adapters)
    }

    /// dx (= ∂L/∂x_out) += ∂/∂x_mid of the MLP half, x_out = x_mid + down(act); adapter gradients accumulate.
    fn mlp_backward(
        &self,
        dx: &mut B::Buf,
        x_mid: &B::Buf,
        m: &mut MlpActs<B>,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
    ) -> Result<()> {
        let (be, s, blk) = (self.be, self.spec, self.block);
        let (h, rows, ff) = (s.hidden_size, ctx.rows, s.intermediate_size);
        let mut d_act = be.uninit(rows * ff)?;
        let (down_h, dy) = (m.hidden.take(Proj::Down), self.grad_operand(Proj::Down, dx, ctx, adapters)?);
        self.linear_backward(Proj::Down, &m.act, &dy, &mut d_act, false, ctx, adapters, down_h)?;
        drop(dy);
        let (mut d_gate, mut d_up) = (be.uninit(rows * ff)?, be.uninit(rows * ff)?);
        let rooms = [self.room(&[Proj::Gate], Some(adapters)), self.room(&[Proj::Up], Some(adapters))];
        let (dg, du) =
            be.glu_backward_operands(&m.gate, &m.up, &d_act, ctx.glu, &mut d_gate, &mut d_up, rows, rooms)?;
        drop(d_act);
        let mut dn = be.uninit(rows * h)?;
        self.linear_backward(Proj::Gate, &m.n2, &dg, &mut dn, false, ctx, adapters, m.hidden.take(Proj::Gate))?;
        drop(dg);
        self.linear_backward(Proj::Up, &m.n2, &du, &mut dn, true, ctx, adapters, m.hidden.take(Proj::Up))?;
        drop(du);
        be.rmsnorm_backward(x_mid, &blk.mlp_norm, &dn, h, s.rms_norm_eps, s.norm_plus_one, dx, true)
    }

    /// dx (= ∂L/∂x_mid) += ∂/∂x_in of the attention half, x_mid = x_in + o(att); adapter gradients accumulate.
    fn attention_backward(
        &self,
        dx: &mut B::Buf,
        x_in: &B::Buf,
        a: &mut AttnActs<B>,
        ctx: &Ctx<B>,
        adapters: &mut AdapterSet<B>,
    ) -> Result<()> {
        let (be, s, blk) = (self.be, self.spec, self.block);
        let (h, rows) = (s.hidden_size, ctx.rows);
        let d = Dims::of(self.spec);
        let mut d_att = be.uninit(rows * d.q)?;
        let (o_h, dy) = (a.hidden.take(Proj::O), self.grad_operand(Proj::O, dx, ctx, adapters)?);
        self.linear_backward(Proj::O, &a.att, &dy, &mut d_att, false, ctx, adapters, o_h)?;
        drop(dy);
        // attention_backward writes every value of all three.
        let (mut dq, mut dk, mut dv) = (be.uninit(rows * d.q)?, be.uninit(rows * d.kv)?, be.uninit(rows * d.kv)?);
        let kept = a.kept.take();
        be.attention_backward(
            &a.q,
            &a.k,
            &a.v,
            ctx.key_mask,
            ctx.shape,
            &a.att,
            &d_att,
            &mut dq,
            &mut dk,
            &mut dv,
            kept,
        )?;
        drop(d_att);
        be.rope_backward(&mut dq, ctx.positions, self.inv_freq, s.num_heads, s.head_dim)?;
        be.rope_backward(&mut dk, ctx.positions, self.inv_freq, s.num_kv_heads, s.head_dim)?;
        let mut dn = be.uninit(rows * h)?;
        // Each gradient is dropped as soon as its product has read it.
        for (p, dy, accumulate) in [(Proj::Q, dq, false), (Proj::K, dk, true), (Proj::V, dv, true)] {
            let dy = self.grad_operand(p, &dy, ctx, adapters)?;
            self.linear_backward(p, &a.n1, &dy, &mut dn, accumulate, ctx, adapters, a.hidden.take(p))?;
        }
        be.rmsnorm_backward(x_in, &blk.attn_norm, &dn, h, s.rms_norm_eps, s.norm_plus_one, dx, true)
    }
}

/// Ends `Backend::hold_weights` when dropped.
struct HeldWeights<'a, B: Backend>(&'a B);

impl<B: Backend> Drop for HeldWeights<'_, B> {
    fn drop(&mut self) {
        self.0.release_weights();
    }
}

pub(crate) fn copy_of<B: Backend>(be: &B, x: &B::Buf) -> Result<B::Buf> {
    let mut y = be.uninit(be.len(x))?;
    be.copy(x, 0, &mut y, 0, be.len(x))?;
    Ok(y)
}

/// Rows r0..r0 + n of the [rows, width] x, as a buffer of their own.
fn rows_of<B: Backend>(be: &B, x: &B::Buf, r0: usize, n: usize, width: usize) -> Result<B::Buf> {
    let mut y = be.uninit(n * width)?;
    be.copy(x, r0 * width, &mut y, 0, n * width)?;
    Ok(y)
}

/// Runs `f` on `chunk` rows at a time of `input` (read, if given) and `out` (updated, then written back), both
/// [ctx.rows, width], with the chunk's context. One chunk covering every row works on the buffers themselves.
fn for_row_chunks<B: Backend>(
    be: &B,
    input: Option<&B::Buf>,
    out: &mut B::Buf,
    width: usize,
    ctx: &Ctx<B>,
    chunk: usize,
    mut f: impl FnMut(Option<&B::Buf>, &mut B::Buf, &Ctx<B>) -> Result<()>,
) -> Result<()> {
    if chunk >= ctx.rows {
        return f(input, out, ctx);
    }
    for r0 in (0..ctx.rows).step_by(chunk) {
        let n = chunk.min(ctx.rows - r0);
        let input_rows = input.map(|x| rows_of(be, x, r0, n, width)).transpose()?;
        let mut out_rows = rows_of(be, out, r0, n, width)?;
        f(input_rows.as_ref(), &mut out_rows, &ctx.rows_from(r0, n))?;
        be.copy(&out_rows, 0, out, r0 * width, n * width)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mlp_chunk;

    #[test]
    fn mlp_chunks_take_a_twentieth_of_the_checkpoints_and_at_least_24_mib() {
        // LLaMA-7B (hidden 4096, 11008, 32 layers), 2048 × 4 rows: 8192·4096·2·32/20 bytes = 102.4 MiB → at most
        // 2438 rows of 11008 f32 → 4 even chunks of 2048.
        assert_eq!(mlp_chunk(8192, 11008, 4096, 32, None), 2048);
        // 2048 rows: 25.6 MiB → 609 rows → 4 chunks of 512.
        assert_eq!(mlp_chunk(2048, 11008, 4096, 32, None), 512);
        // SmolLM2 4 × 256: far below the floor → 24 MiB / (4 · 1536) = 4096 rows ≥ 1024: one chunk.
        assert_eq!(mlp_chunk(1024, 1536, 576, 30, None), 1024);
        assert_eq!(mlp_chunk(1024, 1536, 576, 30, Some(100)), 100);
        assert_eq!(mlp_chunk(10, 1536, 576, 30, Some(100)), 10);
    }
}
