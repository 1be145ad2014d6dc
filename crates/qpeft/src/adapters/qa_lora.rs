//! QA-LoRA (methods.md §4): Δ(x) = s·B·A·dropout(AvgPool_L(x)) with L the int4 base's group size,
//! A [r, in/L] xavier-uniform, B = 0. ΔW[j, i] = (s/L)·(BA)[j, ⌊i/L⌋] is constant inside each quantization
//! group, so it folds exactly into the GPTQ zero points (`GptqInt4::merge_into_zeros`).

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::lora::Lora;
use super::{check_divides, check_rank, required, uniform, Adapter, AdapterConfig, BaseKind, InputView, MethodKind};
use crate::backend::{Backend, Groups};
use crate::error::Result;

/// QA-LoRA's pooling group, which must equal the int4 base's quantization group.
#[derive(Clone, Debug, PartialEq)]
pub struct QaLoraMethod {
    pub group: usize,
}

impl MethodKind for QaLoraMethod {
    const NAME: &'static str = "qa-lora";
    const KEYS: &'static [&'static str] = &["group_size"];

    fn from_keys(keys: &Map<String, Value>, _: f32) -> std::result::Result<Self, String> {
        Ok(QaLoraMethod { group: required(keys, "group_size", Self::NAME)? })
    }
    fn to_keys(&self) -> Map<String, Value> {
        Map::from_iter([("group_size".to_string(), json!(self.group))])
    }
    fn check(&self, rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        check_rank(rank, in_dim, out_dim)?;
        check_divides("group_size", self.group, in_dim, "input")?;
        if rank > in_dim / self.group {
            return Err(format!(
                "rank = {rank} exceeds the {} pooled inputs (in {in_dim} / group_size {})",
                in_dim / self.group,
                self.group
            ));
        }
        Ok(())
    }
    fn check_base(&self, base: BaseKind) -> std::result::Result<(), String> {
        match base {
            BaseKind::Any => Ok(()),
            BaseKind::Int4 { group } if group == self.group => Ok(()),
            BaseKind::Int4 { group } => {
                Err(format!("group_size = {} but the int4 base uses groups of {group}", self.group))
            }
            BaseKind::Other(name) => Err(format!(
                "qa-lora needs an int4 (GPTQ) base (quant.format = \"int4\"); this module's base is {name}"
            )),
        }
    }
    fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
        rank * (in_dim / self.group + out_dim)
    }
    fn merges_into_int4_zeros(&self) -> bool {
        true
    }
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>> {
        Ok(Box::new(new(be, cfg, self.group, in_dim, out_dim, rng)?))
    }
}

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
