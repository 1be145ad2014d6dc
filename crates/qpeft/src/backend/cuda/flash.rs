//! Launchers of the fused attention kernels (flash.cu): the 16-bit modes' attention for `flash_head` heads on GPUs
//! with bf16/fp16 tensor cores (compute capability 8.0 and up). Scores stay on chip, so attention needs no score
//! scratch. The inputs are converted to 16-bit operands once per call (`Cuda::to_operand`; in the f16 mode scaled per
//! tensor, their maxima passed on so that the kernels undo the scales), which halves what the tiles re-read and lets
//! them stream in asynchronously.

use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{device_err, Attn, Cuda};
use crate::backend::{check, check_attention, flash_head, AttentionShape, Precision};
use crate::error::Result;

/// Rows a block owns (queries forward and for dQ, keys for dK and dV), rows per tile of the side it walks, and
/// threads per block (backward: 8 warps of 16 rows; forward: 4 warps of 32), as in flash.cu.
const ROWS: usize = 128;
const TILE: usize = 64;
const THREADS: u32 = 256;
const FWD_THREADS: u32 = 128;

/// The kernels' head size: head_dim rounded up to an instantiated one.
fn padded(head_dim: usize) -> usize {
    [16, 32, 64, 128].into_iter().find(|&d| d >= head_dim).expect("a flash_head")
}

/// Bytes of dynamic shared memory: `owned` 16-bit tiles of [ROWS, d + 8] and `walked` ones of [TILE, d + 8] (rows padded
/// by 16 bytes against bank conflicts), and `vectors` f32/u32 vectors of TILE.
fn smem(d: usize, owned: usize, walked: usize, vectors: usize) -> usize {
    2 * (owned * ROWS + walked * TILE) * (d + 8) + 4 * TILE * vectors
}

impl Cuda {
    /// Whether attention of shape `s` runs through the fused kernels.
    pub(super) fn flash(&self, s: &AttentionShape) -> bool {
        self.precision != Precision::F32 && self.bf16_tensor_cores && flash_head(s.head_dim)
    }

    /// `Backend::attention`, through the fused kernels where they take the shape (keeping, with `keep`, what their
    /// backward may reuse), else through GEMMs (attention.rs), which keep nothing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_with(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        key_mask: &CudaSlice<u32>,
        s: AttentionShape,
        out: &mut CudaSlice<f32>,
        keep: bool,
    ) -> Result<Option<FlashKept>> {
        check_attention(q.len(), k.len(), v.len(), key_mask.len(), s, &[out.len()])?;
        if self.flash(&s) {
            return self.flash_forward(q, k, v, key_mask, s, out, keep);
        }
        self.attention_gemm(q, k, v, key_mask, s, out)?;
        Ok(None)
    }

    /// x as a 16-bit operand (`to_operand`), its largest magnitude going to slot `i` of `amax`.
    fn operand_copy(&self, x: &CudaSlice<f32>, amax: &CudaSlice<u32>, i: usize) -> Result<CudaSlice<u16>> {
        // Every value is written by the conversion.
        let y = self.alloc_uninit::<u16>(x.len())?;
        self.to_operand(x, self.addr(&y), self.addr(amax) + 4 * i as u64, 0)?;
        Ok(y)
    }

    /// The maxima the kernels read (q, k, v, dO), or a null pointer where nothing is scaled (bf16).
    fn scales_arg(&self, amax: &CudaSlice<u32>) -> u64 {
        if self.precision == Precision::F16 {
            self.addr(amax)
        } else {
            0
        }
    }

    /// The launch of kernel `name` over `grid` in blocks of `threads`, with `bytes` of dynamic shared memory allowed.
    fn flash_config(
        &self,
        name: &str,
        grid: (usize, usize, usize),
        threads: u32,
        bytes: usize,
    ) -> Result<LaunchConfig> {
        self.func(name)?
            .set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(|e| device_err(&format!("allowing `{name}` {bytes} bytes of shared memory"), e))?;
        Ok(LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: bytes as u32,
        })
    }

    /// The fused forward; with `keep`, also what `flash_backward` may reuse (`FlashKept`).
    #[allow(clippy::too_many_arguments)]
    fn flash_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        key_mask: &CudaSlice<u32>,
        s: AttentionShape,
        out: &mut CudaSlice<f32>,
        keep: bool,
    ) -> Result<Option<FlashKept>> {
        let d = padded(s.head_dim);
        let name = format!("flash_forward_{d}");
        let cfg =
            self.flash_config(&name, (s.q_len.div_ceil(ROWS), s.heads, s.batch), FWD_THREADS, smem(d, 1, 4, 2))?;
        let amax = self.alloc::<u32>(4)?;
        let (a, q, k, v) = (
            Attn::of(s),
            self.operand_copy(q, &amax, 0)?,
            self.operand_copy(k, &amax, 1)?,
            self.operand_copy(v, &amax, 2)?,
        );
        let scales = self.scales_arg(&amax);
        // Given somewhere to write them, the kernel leaves each row's log-sum-exp at stats[2·row].
        let stats = if keep { Some(self.alloc_uninit::<f32>(stats_len(s))?) } else { None };
        let at = stats.as_ref().map_or(0, |x| self.addr(x));
        launch!(self, &name, cfg, &q, &k, &v, key_mask, &a, out, &scales, &at)?;
        Ok(stats.map(|stats| FlashKept { shape: s, q, k, v, amax, stats }))
    }

    /// The fused backward; `kept` (from `flash_forward` on these q, k, v) spares it their conversions and the dQ
    /// kernel's walk over the keys for the log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        key_mask: &CudaSlice<u32>,
        s: AttentionShape,
        out: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        kept: Option<FlashKept>,
    ) -> Result<()> {
        let d = padded(s.head_dim);
        let a = Attn::of(s);
        // Per query row: its log-sum-exp and rowsum(dO ⊙ O).
        let (q, k, v, amax, mut stats, have_lse) = match kept {
            Some(kept) => {
                check(kept.shape == s, "attention_backward", || {
                    format!("kept from a forward of shape {:?}, not {s:?}", kept.shape)
                })?;
                (kept.q, kept.k, kept.v, kept.amax, kept.stats, 1i32)
            }
            None => {
                let amax = self.alloc::<u32>(4)?;
                let (q, k, v) =
                    (self.operand_copy(q, &amax, 0)?, self.operand_copy(k, &amax, 1)?, self.operand_copy(v, &amax, 2)?);
                (q, k, v, amax, self.alloc::<f32>(stats_len(s))?, 0i32)
            }
        };
        let dout16 = self.operand_copy(dout, &amax, 3)?;
        let scales = self.scales_arg(&amax);
        let name = format!("flash_dq_{d}");
        let cfg = self.flash_config(&name, (s.q_len.div_ceil(ROWS), s.heads, s.batch), THREADS, smem(d, 2, 4, 2))?;
        launch!(self, &name, cfg, &q, &k, &v, key_mask, &a, out, dout, &dout16, dq, &mut stats, &scales, &have_lse)?;
        if s.kv_capacity > s.kv_len {
            // The kernel writes the kv_len rows of each sequence; the rest of the cache layout is zero.
            self.stream.memset_zeros(dk).map_err(|e| device_err("clearing dk", e))?;
            self.stream.memset_zeros(dv).map_err(|e| device_err("clearing dv", e))?;
        }
        let name = format!("flash_dkv_{d}");
        let split = dkv_split(s);
        let cfg = self.flash_config(
            &name,
            (s.kv_len.div_ceil(ROWS), s.kv_heads * split, s.batch),
            THREADS,
            smem(d, 2, 4, 6),
        )?;
        if split == 1 {
            return launch!(self, &name, cfg, &q, &k, &v, key_mask, &a, &dout16, &stats, dk, dv, &scales, &1i32, &0i64);
        }
        // Each part of the query heads writes its own dK, dV (rows past kv_len stay zero), summed in order after.
        let n = dk.len();
        let (mut dk_parts, mut dv_parts) = (self.alloc::<f32>(split * n)?, self.alloc::<f32>(split * n)?);
        let (split_i, stride) = (split as i32, n as i64);
        launch!(
            self,
            &name,
            cfg,
            &q,
            &k,
            &v,
            key_mask,
            &a,
            &dout16,
            &stats,
            &mut dk_parts,
            &mut dv_parts,
            &scales,
            &split_i,
            &stride
        )?;
        let sum = LaunchConfig {
            grid_dim: (n.div_ceil(1024).min(4096) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "flash_sum_parts", sum, &dk_parts, &split_i, &stride, dk)?;
        launch!(self, "flash_sum_parts", sum, &dv_parts, &split_i, &stride, dv)
    }
}

/// What the fused forward leaves for the backward of the same q, k and v (`Backend::attention_keeping`): their 16-bit
/// copies, their maxima (amax[0..3]; slot 3 is dO's, which the backward fills) and each query's log-sum-exp in log2
/// units at stats[2·row] (the backward writes rowsum(dO ⊙ O) at stats[2·row + 1]).
pub struct FlashKept {
    shape: AttentionShape,
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    amax: CudaSlice<u32>,
    stats: CudaSlice<f32>,
}

/// Two f32 statistics per query row (`FlashKept::stats`).
fn stats_len(s: AttentionShape) -> usize {
    2 * s.batch * s.heads * s.q_len
}

/// Parts into which `flash_dkv` splits each KV head's query heads: one unless the key blocks × KV heads × batch leave
/// the GPU idle (grouped-query attention on one sequence: Qwen2.5-1.5B's 2 KV heads give 32 blocks for 2,048 keys),
/// then the largest divisor of the group size that keeps the blocks within about two waves of an H100's 132 SMs.
fn dkv_split(s: AttentionShape) -> usize {
    let blocks = s.kv_len.div_ceil(ROWS) * s.kv_heads * s.batch;
    let rep = s.heads / s.kv_heads;
    (1..=rep).rev().find(|&p| rep.is_multiple_of(p) && blocks * p <= 264).unwrap_or(1)
}
