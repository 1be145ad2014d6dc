//! The frozen base weight of a linear layer in any supported storage: plain f32 (from 16/32-bit or GGUF
//! checkpoints), bitsandbytes NF4/FP4, NF4 with ICQ shifts, or GPTQ int4.

use super::icq::IcqNf4;
use super::int4::GptqInt4;
use super::nf4::Bnb4;

#[derive(Clone, Debug, PartialEq)]
pub enum BaseWeight {
    /// Not quantized; the dequantized buffer is the weight itself.
    Dense,
    Bnb4(Bnb4),
    IcqNf4(IcqNf4),
    Int4(GptqInt4),
}

impl BaseWeight {
    /// Ŵ [out, in] in f32; None for `Dense` (the caller already holds the weight).
    pub fn dequantize(&self) -> Option<Vec<f32>> {
        match self {
            BaseWeight::Dense => None,
            BaseWeight::Bnb4(q) => Some(q.dequantize()),
            BaseWeight::IcqNf4(q) => Some(q.dequantize()),
            BaseWeight::Int4(q) => Some(q.dequantize()),
        }
    }

    pub fn name(&self) -> String {
        match self {
            BaseWeight::Dense => "dense".into(),
            BaseWeight::Bnb4(q) => {
                format!(
                    "{}{}",
                    q.kind.name(),
                    if matches!(q.absmax, super::nf4::Absmax::Double { .. }) { "+dq" } else { "" }
                )
            }
            BaseWeight::IcqNf4(_) => "nf4+icq".into(),
            BaseWeight::Int4(q) => format!("int4-g{}{}", q.group, if q.sym { "-sym" } else { "" }),
        }
    }

    /// Storage bits per parameter; 32 for dense f32.
    pub fn bits_per_param(&self) -> f64 {
        match self {
            BaseWeight::Dense => 32.0,
            BaseWeight::Bnb4(q) => q.bits_per_param(),
            BaseWeight::IcqNf4(q) => q.bits_per_param(),
            BaseWeight::Int4(q) => q.bits_per_param(),
        }
    }
}
