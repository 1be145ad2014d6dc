//! The frozen base weight of a linear layer in any supported storage: plain f32 (from 16/32-bit checkpoints), a
//! GGUF file's block format as stored, bitsandbytes NF4/FP4, NF4 with ICQ shifts, or GPTQ int4.

use std::ops::Range;

use super::icq::IcqNf4;
use super::int4::GptqInt4;
use super::nf4::Bnb4;
use crate::formats::ggml_quants::{self, GgmlType};
use crate::formats::SharedBytes;

/// A weight [out_dim, in_dim] kept in one of ggml's block formats, as a GGUF file stores it: every row is whole
/// blocks, so any range of rows dequantizes on its own (a backend dequantizes tiles per use instead of holding f32).
/// The bytes are shared: the model and the backend hold one copy.
#[derive(Clone, Debug, PartialEq)]
pub struct GgmlRows {
    pub dtype: GgmlType,
    pub out_dim: usize,
    pub in_dim: usize,
    pub data: SharedBytes,
}

impl GgmlRows {
    /// Rows of `in_dim` elements in `dtype`; None where a row is not whole blocks of a readable type or `data` is
    /// not exactly `out_dim` rows.
    pub fn new(dtype: GgmlType, out_dim: usize, in_dim: usize, data: SharedBytes) -> Option<GgmlRows> {
        let (block, block_bytes) = dtype.layout()?;
        let ok = block > 1 && in_dim.is_multiple_of(block) && data.len() == out_dim * (in_dim / block) * block_bytes;
        ok.then_some(GgmlRows { dtype, out_dim, in_dim, data })
    }

    pub fn row_bytes(&self) -> usize {
        let (block, block_bytes) = self.dtype.layout().expect("checked by new");
        self.in_dim / block * block_bytes
    }

    /// Rows `rows` of Ŵ into `out` ([rows.len(), in_dim]), on the calling thread.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let rb = self.row_bytes();
        ggml_quants::dequantize_into(self.dtype, &self.data[rows.start * rb..rows.end * rb], out)
            .expect("checked by new");
    }
}
#[derive(Clone, Debug, PartialEq)]
pub enum BaseWeight {
    /// Not quantized; the dequantized buffer is the weight itself.
    Dense,
    Ggml(GgmlRows),
    Bnb4(Bnb4),
    IcqNf4(IcqNf4),
    Int4(GptqInt4),
}

impl BaseWeight {
    /// Ŵ [out, in] in f32; None for `Dense` (the caller already holds the weight).
    pub fn dequantize(&self) -> Option<Vec<f32>> {
        match self {
            BaseWeight::Dense => None,
            BaseWeight::Ggml(g) => {
                Some(ggml_quants::dequantize(g.dtype, &g.data, g.out_dim * g.in_dim).expect("checked by new"))
            }
            BaseWeight::Bnb4(q) => Some(q.dequantize()),
            BaseWeight::IcqNf4(q) => Some(q.dequantize()),
            BaseWeight::Int4(q) => Some(q.dequantize()),
        }
    }

    pub fn name(&self) -> String {
        match self {
            BaseWeight::Dense => "dense".into(),
            BaseWeight::Ggml(g) => format!("gguf {:?}", g.dtype),
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
            BaseWeight::Ggml(g) => 8.0 * g.row_bytes() as f64 / g.in_dim as f64,
            BaseWeight::Bnb4(q) => q.bits_per_param(),
            BaseWeight::IcqNf4(q) => q.bits_per_param(),
            BaseWeight::Int4(q) => q.bits_per_param(),
        }
    }
}
