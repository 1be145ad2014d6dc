//! The op set a decoder needs, implemented once per device.
//!
//! Buffers are device-resident (`Backend::Buf`); ops take buffers and explicit sizes and never
//! return data to the host except through `download`, so a GPU backend can queue them without
//! synchronising. Layouts are row-major; "rows" are tokens.

pub mod cpu;

use crate::error::Result;

/// y = a · op(b), with op(b) = bᵀ when `b_transposed` (the usual `x · Wᵀ` of a linear layer).
#[derive(Clone, Copy, Debug)]
pub struct MatMul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// b is stored as [n, k] (a weight matrix) rather than [k, n].
    pub b_transposed: bool,
    /// Add into the output instead of overwriting it.
    pub accumulate: bool,
}

/// Shape of one causal attention call over a KV cache laid out [batch, capacity, kv_heads, head_dim].
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    /// New query tokens per sequence; queries are [batch, q_len, heads, head_dim].
    pub q_len: usize,
    /// Keys/values valid in the cache (the queries are its last `q_len` positions).
    pub kv_len: usize,
    pub kv_capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Mistral's sliding window: query at cache index i sees keys i − window < j ≤ i.
    pub window: Option<usize>,
}

/// Where `write_rows` puts a [batch, rows, width] block inside a [batch, capacity, width] buffer.
#[derive(Clone, Copy, Debug)]
pub struct RowWrite {
    pub batch: usize,
    pub rows: usize,
    pub capacity: usize,
    pub start: usize,
    pub width: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluKind {
    Silu,
    GeluTanh,
}

pub trait Backend: Send + Sync {
    /// An f32 device buffer.
    type Buf: Send + Sync;
    /// A u32 device buffer (token ids, positions, masks).
    type Ints: Send + Sync;

    fn name(&self) -> String;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn upload_ints(&self, data: &[u32]) -> Result<Self::Ints>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;

    /// out[r, :] = table[ids[r], :] · scale.
    fn embedding(&self, table: &Self::Buf, ids: &Self::Ints, dim: usize, scale: f32, out: &mut Self::Buf) -> Result<()>;
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf, shape: MatMul) -> Result<()>;
    /// x[r, :] += bias for every row.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf) -> Result<()>;
    /// x += y.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()>;
    /// out = w ⊙ x / rms(x) (or (1 + w) ⊙ … when `plus_one`), per row of `dim`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f32, plus_one: bool, out: &mut Self::Buf) -> Result<()>;
    /// Rotates x ([rows, heads, head_dim]) in place by angle positions[r] · inv_freq[j].
    fn rope(&self, x: &mut Self::Buf, positions: &Self::Ints, inv_freq: &Self::Buf, heads: usize, head_dim: usize) -> Result<()>;
    /// out = act(gate) ⊙ up.
    fn glu(&self, gate: &Self::Buf, up: &Self::Buf, kind: GluKind, out: &mut Self::Buf) -> Result<()>;
    /// Writes `src` ([batch, rows, width]) into `dst` ([batch, capacity, width]) at row `start`.
    fn write_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, at: RowWrite) -> Result<()>;
    /// Causal grouped-query attention; `key_mask` ([batch, kv_capacity], 1 = real token) hides padding.
    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        key_mask: &Self::Ints,
        shape: AttentionShape,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Per-row −log softmax(logits)[target]; rows whose target is `ignore` give 0.
    fn cross_entropy(&self, logits: &Self::Buf, targets: &Self::Ints, vocab: usize, ignore: u32, out: &mut Self::Buf) -> Result<()>;
}
