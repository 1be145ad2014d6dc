//! QA-LoRA (methods.md §4): Δ(x) = s·B·A·dropout(AvgPool_L(x)) with L the int4 base's group size,
//! A [r, in/L] xavier-uniform, B = 0. ΔW[j, i] = (s/L)·(BA)[j, ⌊i/L⌋] is constant inside each quantization
//! group, so it folds exactly into the GPTQ zero points (`GptqInt4::merge_into_zeros`).

use rand_chacha::ChaCha8Rng;

use super::lora::Lora;
use super::{uniform, AdapterConfig, InputView};
use crate::backend::{Backend, Groups};
use crate::error::Result;

pub fn new<B: Backend>(
    be: &B,
    cfg: &AdapterConfig,
    group: usize,
    in_dim: usize,
    out_dim: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Lora<B>> {
    let pooled = in_dim / group;
    // xavier_uniform on A [r, in/L]: U(±√(6 / (fan_in + fan_out))).
    let a = uniform(rng, cfg.rank * pooled, (6.0 / (pooled + cfg.rank) as f64).sqrt());
    let view = InputView { in_dim, pool: Some(Groups { width: in_dim, groups: pooled }), dropout: cfg.dropout };
    Lora::on_view(be, cfg, view, out_dim, &a)
}
