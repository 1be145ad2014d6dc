//! Causal grouped-query attention as strided-batched GEMMs around a masked-softmax kernel (the f32 mode, and heads
//! the fused kernels of flash.rs do not take), the structure of the CPU version (backend/cpu/attention.rs): scores S = scale·Q·Kᵀ, P = softmax(S) over the visible keys, O = P·V.
//! Backward recomputes P, then dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K,
//! dK += scale·dSᵀ·Q. Work goes in chunks: one sequence, a run of KV heads (with their query heads) and a block of
//! `QUERY_BLOCK` queries, whose scores cover only the keys the block's last query can see (causality) and fit in a
//! scratch buffer of at most `SCORE_BYTES`. Inside a chunk, the query heads at position r of their KV head's group
//! form one strided batch.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::gemm::{Gemm, Operand};
use super::{Attn, Cuda, THREADS};
use crate::backend::AttentionShape;
use crate::error::Result;

/// Bytes of one score buffer (backward uses two).
const SCORE_BYTES: usize = 64 << 20;
/// Queries per chunk: the causal triangle is covered by blocks of this height.
const QUERY_BLOCK: usize = 512;

/// One sequence `b`, KV heads g0..g0 + gn, queries q0..q0 + qn, which see keys 0..keys.
struct Chunk {
    b: usize,
    g0: usize,
    gn: usize,
    q0: usize,
    qn: usize,
    keys: usize,
}

impl Chunk {
    /// Scores of one query head: qn × keys, rows `keys` apart.
    fn plane(&self) -> usize {
        self.qn * self.keys
    }
}

struct Layout {
    s: AttentionShape,
    rep: usize,
}

impl Layout {
    fn new(s: AttentionShape) -> Self {
        Layout { s, rep: s.heads / s.kv_heads }
    }
    /// KV heads per chunk, so that a full-height block's scores fit in `SCORE_BYTES`.
    fn heads_per_chunk(&self) -> usize {
        (SCORE_BYTES / (4 * self.rep * QUERY_BLOCK.min(self.s.q_len) * self.s.kv_len).max(1)).clamp(1, self.s.kv_heads)
    }
    fn scratch_len(&self) -> usize {
        self.heads_per_chunk() * self.rep * QUERY_BLOCK.min(self.s.q_len) * self.s.kv_len
    }
    fn chunks(&self) -> Vec<Chunk> {
        let (s, gc) = (self.s, self.heads_per_chunk());
        let mut out = Vec::new();
        for b in 0..s.batch {
            for g0 in (0..s.kv_heads).step_by(gc) {
                for q0 in (0..s.q_len).step_by(QUERY_BLOCK) {
                    let qn = QUERY_BLOCK.min(s.q_len - q0);
                    out.push(Chunk { b, g0, gn: gc.min(s.kv_heads - g0), q0, qn, keys: s.kv_len - s.q_len + q0 + qn });
                }
            }
        }
        out
    }
    /// Element offset of the chunk's first query of head (g0·rep + r) in a [batch, q_len, heads, head_dim] buffer.
    fn q_at(&self, c: &Chunk, r: usize) -> usize {
        ((c.b * self.s.q_len + c.q0) * self.s.heads + c.g0 * self.rep + r) * self.s.head_dim
    }
    /// Element offset of KV head g0 of sequence b in the cache.
    fn kv_at(&self, c: &Chunk) -> usize {
        (c.b * self.s.kv_capacity * self.s.kv_heads + c.g0) * self.s.head_dim
    }
    /// A product batched over the chunk's KV heads: `m × n × k`, with row strides `ld` (a, b, out) and batch strides.
    fn gemm(
        &self,
        c: &Chunk,
        (m, n, k): (usize, usize, usize),
        (a_t, b_t): (bool, bool),
        ld: (usize, usize, usize),
        strides: (usize, usize, usize),
    ) -> Gemm {
        let mut g = Gemm::new(m, n, k, a_t, b_t);
        (g.lda, g.ldb, g.ldc) = ld;
        (g.stride_a, g.stride_b, g.stride_c) = strides;
        g.batch = c.gn;
        g
    }
    /// Row strides of the query side, the cache side and a score plane, and batch strides of the query side and
    /// the scores (the cache side's is head_dim).
    fn strides(&self, c: &Chunk) -> (usize, usize, usize, usize, usize) {
        let s = self.s;
        (s.heads * s.head_dim, s.kv_heads * s.head_dim, c.keys, self.rep * s.head_dim, self.rep * c.plane())
    }
}

impl Cuda {
    pub(super) fn attention_gemm(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        key_mask: &CudaSlice<u32>,
        s: AttentionShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let l = Layout::new(s);
        let scores = self.scores_a.get(self, l.scratch_len())?;
        let p = Operand::f32(self.addr(scores.as_ref().expect("allocated")));
        let (q, k, v, o) = (
            Operand::f32(self.addr(q)),
            Operand::f32(self.addr(k)),
            Operand::f32(self.addr(v)),
            Operand::f32(self.addr(out)),
        );
        let hd = s.head_dim;
        for c in l.chunks() {
            self.probabilities(&l, &c, q, k, key_mask, p)?;
            let (qrow, kvrow, prow, qbatch, pbatch) = l.strides(&c);
            for r in 0..l.rep {
                // O = P·V.
                let g = l.gemm(&c, (c.qn, hd, c.keys), (false, false), (prow, kvrow, qrow), (pbatch, hd, qbatch));
                // SAFETY: offsets and strides stay inside the buffers checked by the caller and the scratch sized above.
                unsafe { self.gemm(g, p.at(r * c.plane()), v.at(l.kv_at(&c)), o.at(l.q_at(&c, r)).ptr)? };
            }
        }
        Ok(())
    }

    /// P of chunk `c` into `p` ([gn, rep, qn, keys]).
    fn probabilities(
        &self,
        l: &Layout,
        c: &Chunk,
        q: Operand,
        k: Operand,
        key_mask: &CudaSlice<u32>,
        p: Operand,
    ) -> Result<()> {
        let s = l.s;
        let (qrow, kvrow, prow, qbatch, pbatch) = l.strides(c);
        for r in 0..l.rep {
            let mut g =
                l.gemm(c, (c.qn, c.keys, s.head_dim), (false, true), (qrow, kvrow, prow), (qbatch, s.head_dim, pbatch));
            g.alpha = s.scale;
            // SAFETY: as in `attention_gemm`.
            unsafe { self.gemm(g, q.at(l.q_at(c, r)), k.at(l.kv_at(c)), p.at(r * c.plane()).ptr)? };
        }
        let (a, b, q0, qn, cols) = (Attn::of(s), c.b as i32, c.q0 as i32, c.qn as i32, c.keys as i32);
        let cfg = LaunchConfig {
            grid_dim: ((c.gn * l.rep * c.qn) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "attention_softmax", cfg, &p.ptr, key_mask, &a, &b, &q0, &qn, &cols)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_gemm_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        key_mask: &CudaSlice<u32>,
        s: AttentionShape,
        dout: &CudaSlice<f32>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let l = Layout::new(s);
        let (scores, grads) = (self.scores_a.get(self, l.scratch_len())?, self.scores_b.get(self, l.scratch_len())?);
        let (p, dp) = (
            Operand::f32(self.addr(scores.as_ref().expect("allocated"))),
            Operand::f32(self.addr(grads.as_ref().expect("allocated"))),
        );
        let (q, k, v, dout) = (
            Operand::f32(self.addr(q)),
            Operand::f32(self.addr(k)),
            Operand::f32(self.addr(v)),
            Operand::f32(self.addr(dout)),
        );
        let (dq, dk, dv) = (Operand::f32(self.addr(dq)), Operand::f32(self.addr(dk)), Operand::f32(self.addr(dv)));
        let hd = s.head_dim;
        for c in l.chunks() {
            self.probabilities(&l, &c, q, k, key_mask, p)?;
            let (qrow, kvrow, prow, qbatch, pbatch) = l.strides(&c);
            let plane = c.plane();
            for r in 0..l.rep {
                let (qa, kva) = (l.q_at(&c, r), l.kv_at(&c));
                // dV += Pᵀ·dO (the query heads sharing a KV head and the query blocks all add into it).
                let mut g = l.gemm(&c, (c.keys, hd, c.qn), (true, false), (prow, qrow, kvrow), (pbatch, qbatch, hd));
                g.beta = 1.0;
                // SAFETY: as in `attention_gemm`.
                unsafe { self.gemm(g, p.at(r * plane), dout.at(qa), dv.at(kva).ptr)? };
                // dP = dO·Vᵀ.
                let g = l.gemm(&c, (c.qn, c.keys, hd), (false, true), (qrow, kvrow, prow), (qbatch, hd, pbatch));
                // SAFETY: as above.
                unsafe { self.gemm(g, dout.at(qa), v.at(kva), dp.at(r * plane).ptr)? };
            }
            let (rows, cols) = ((c.gn * l.rep * c.qn) as u32, c.keys as i32);
            let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "attention_softmax_backward", cfg, &p.ptr, &dp.ptr, &cols)?;
            for r in 0..l.rep {
                let (qa, kva) = (l.q_at(&c, r), l.kv_at(&c));
                // dQ = scale·dS·K.
                let mut g = l.gemm(&c, (c.qn, hd, c.keys), (false, false), (prow, kvrow, qrow), (pbatch, hd, qbatch));
                g.alpha = s.scale;
                // SAFETY: as above.
                unsafe { self.gemm(g, dp.at(r * plane), k.at(kva), dq.at(qa).ptr)? };
                // dK += scale·dSᵀ·Q.
                let mut g = l.gemm(&c, (c.keys, hd, c.qn), (true, false), (prow, qrow, kvrow), (pbatch, qbatch, hd));
                (g.alpha, g.beta) = (s.scale, 1.0);
                // SAFETY: as above.
                unsafe { self.gemm(g, dp.at(r * plane), q.at(qa), dk.at(kva).ptr)? };
            }
        }
        Ok(())
    }
}
