//! How much memory a training pass's activations take under each `Checkpointing` policy, and `"auto"`: the fastest
//! policy whose estimate fits the memory left.
//!
//! The estimate follows the buffers `model::train` and `model::block` allocate (f32 work buffers; kept copies in
//! `Backend::saved_bytes` per value): what the policy keeps for every block, plus the larger of the forward's and one
//! block's backward working set, plus the LM head's loss chunk and the dequantized weights (the MLP's held ones).
//! It leaves out the weights, adapters and optimizer state, which exist before the pass (the caller counts what is
//! not allocated yet: the gradients, and the moments before the first step), and the adapters' hidden states that a
//! pass keeps for its backward (`block::Hidden`: [rows, r] per adapted linear; under `None` for every block, 0.7% of
//! that policy's estimate at LLaMA-7B with r 64 on all seven, inside the tenth `choose` keeps to spare).

use super::block::Dims;
use super::train::Checkpointing;
use crate::arch::ModelSpec;

/// What a pass of `rows` rows allocates besides the model, under `policy`: bytes. `chunk`: the MLP rows per chunk in
/// the backward (`block::mlp_chunk`), `saved`: bytes per kept value, `loss_chunk`: rows per LM-head chunk.
pub fn activation_bytes(
    spec: &ModelSpec,
    rows: usize,
    chunk: usize,
    saved: usize,
    loss_chunk: usize,
    policy: Checkpointing,
) -> usize {
    const F32: usize = 4;
    let Dims { h, q, kv, ff } = Dims::of(spec);
    let layers = spec.num_layers;
    // Widths of the attention half's activations (n1, q, k, v, att) and the MLP's (n2, gate, up, act).
    let attn = h + 2 * q + 2 * kv;
    let mlp = h + 3 * ff;
    // The forward's MLP runs whole while no gradient is held (the first micro-batch of a step).
    let forward = rows * F32 * (h + attn + mlp);
    // What the attention's forward keeps for its backward (`Backend::attention_keeping`: the fused kernels' 16-bit
    // q, k and v and two f32 statistics per query and head; counted for every backend, which over-counts where
    // nothing is kept).
    let attn_kept = rows * (2 * (q + 2 * kv) + 8 * spec.num_heads);
    // One block's backward: x_in, x_mid, dx and the attention half's activations (and what its attention kept)
    // throughout; the MLP chunk with its gradients at their widest (d_act, d_gate, d_up and dn beside the chunk's
    // activations, and the 16-bit copy of d_up besides d_gate's in `scratch`); then the attention's gradients (d_att,
    // dq, dk, dv, dn).
    let around = rows * F32 * (3 * h + attn) + attn_kept;
    let mlp_backward = chunk * F32 * (mlp + 3 * ff + h) + chunk * 2 * ff;
    let attn_backward = rows * F32 * (2 * q + 2 * kv + h);
    let block_backward = around + mlp_backward.max(attn_backward);
    // The LM head: a chunk's logits and their gradient, and the hidden states and their gradient.
    let head = loss_chunk.min(rows) * F32 * 2 * spec.vocab_size + rows * F32 * 2 * h;
    // The dequantized weights: with checkpointing, the MLP's three held in 16 bits through its row chunks
    // (`Backend::hold_weights`; more than the widest one in f32, the f32 mode's) beside an attention weight's scratch,
    // else the widest one in f32; and a 16-bit copy of the widest input.
    let weights = if policy == Checkpointing::None { ff * h * F32 } else { 3 * ff * h * 2 + h * h.max(q) * 2 };
    let scratch = weights + rows * ff * 2;
    let working = forward.max(block_backward).max(head) + scratch;
    let kept = match policy {
        // Every block's activations as the forward leaves them, then one block's backward gradients on top (with
        // d_up's 16-bit copy besides d_gate's in `scratch`).
        Checkpointing::None => {
            let gradients = rows * F32 * (3 * ff + h) + rows * 2 * ff;
            return layers * (rows * F32 * (2 * h + attn + mlp) + attn_kept) + gradients + head + scratch;
        }
        Checkpointing::Selective => layers * rows * saved * (h + q),
        Checkpointing::Full => layers * rows * saved * h,
        // One input on its way back and one restored.
        Checkpointing::Offload => 2 * rows * saved * h,
    };
    kept + working
}

/// What "auto" decides for a pass: the checkpointing policy and the MLP rows per chunk of its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub policy: Checkpointing,
    pub mlp_chunk: usize,
}

/// The fastest choice whose activations fit `headroom` bytes with a tenth to spare: the policies in order, each first
/// with its MLP whole (one chunk: larger GEMMs; +4% at LLaMA-7B 2048 × 4 on an H200 when each chunk still
/// dequantized the MLP weights again) and then in `chunk` rows, unless `fixed_chunk` (train.mlp_chunk set) keeps
/// `chunk`. `Offload` in chunks when nothing fits: it keeps the least on the device.
#[allow(clippy::too_many_arguments)]
pub fn choose(
    spec: &ModelSpec,
    rows: usize,
    chunk: usize,
    fixed_chunk: bool,
    saved: usize,
    loss_chunk: usize,
    headroom: usize,
) -> Choice {
    let whole = if fixed_chunk { chunk } else { rows.max(chunk) };
    Checkpointing::ALL
        .into_iter()
        .flat_map(|policy| [whole, chunk].map(|mlp_chunk| Choice { policy, mlp_chunk }))
        .find(|c| {
            activation_bytes(spec, rows, c.mlp_chunk, saved, loss_chunk, c.policy).saturating_mul(11) / 10 <= headroom
        })
        .unwrap_or(Choice { policy: Checkpointing::Offload, mlp_chunk: chunk })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::block::mlp_chunk;

    /// Each policy in `Checkpointing::ALL` needs less than the one before it, at the shapes of the benchmarks, so
    /// `choose` trades speed for memory in order; and the choice follows the headroom.
    #[test]
    fn policies_need_less_memory_in_order_and_auto_picks_the_fastest_that_fits() {
        for (arch, seq, batch) in [("llama-7b", 2048, 1), ("llama-7b", 2048, 4), ("smollm2-135m", 256, 4)] {
            let spec = ModelSpec::builtin(arch).unwrap();
            let rows = seq * batch;
            let chunk = mlp_chunk(rows, spec.intermediate_size, spec.hidden_size, spec.num_layers, None);
            let need: Vec<usize> =
                Checkpointing::ALL.iter().map(|&p| activation_bytes(&spec, rows, chunk, 2, 256, p)).collect();
            assert!(need.windows(2).all(|w| w[0] > w[1]), "{arch} {seq}×{batch}: {need:?}");
            for (i, &p) in Checkpointing::ALL.iter().enumerate() {
                let c = choose(&spec, rows, chunk, true, 2, 256, need[i] * 11 / 10);
                assert_eq!(c, Choice { policy: p, mlp_chunk: chunk }, "{arch}");
            }
            assert_eq!(
                choose(&spec, rows, chunk, false, 2, 256, 0),
                Choice { policy: Checkpointing::Offload, mlp_chunk: chunk }
            );
            // With the chunking free, room for a policy's whole MLP keeps it whole; room for its chunks alone chunks it.
            for p in [Checkpointing::Selective, Checkpointing::Full] {
                let whole = activation_bytes(&spec, rows, rows, 2, 256, p) * 11 / 10;
                let chunked = activation_bytes(&spec, rows, chunk, 2, 256, p) * 11 / 10;
                assert!(whole > chunked || chunk == rows, "{arch}");
                let faster = Checkpointing::ALL.iter().take_while(|&&q| q != p).count();
                if activation_bytes(&spec, rows, chunk, 2, 256, Checkpointing::ALL[faster.saturating_sub(1)]) * 11 / 10
                    > whole
                {
                    assert_eq!(choose(&spec, rows, chunk, false, 2, 256, whole), Choice { policy: p, mlp_chunk: rows });
                }
                assert_eq!(choose(&spec, rows, chunk, false, 2, 256, chunked).policy, p, "{arch}");
            }
        }
        // LLaMA-7B at 2048 × 4, bf16 checkpoints: the kept inputs are 32 × 8192 × 4096 × 2 bytes = 2 GiB.
        let spec = ModelSpec::builtin("llama-7b").unwrap();
        let chunk = mlp_chunk(8192, 11008, 4096, 32, None);
        let full = activation_bytes(&spec, 8192, chunk, 2, 256, Checkpointing::Full);
        let offload = activation_bytes(&spec, 8192, chunk, 2, 256, Checkpointing::Offload);
        assert_eq!(full - offload, (32 - 2) * 8192 * 4096 * 2);
    }
}
