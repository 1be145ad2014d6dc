//! A quantization recipe (`QuantizeOptions`: format, block or group, double quantization, ICQ, GPTQ calibration,
//! the dtype weights are rounded to first) and the round-to-nearest quantization of one weight under it. The
//! whole-model pipeline (calibration through a decoder, reports, output directories) is `crate::quantize`.

use half::bf16;

use super::base::BaseWeight;
use super::hf_dir::QuantizationConfig;
use super::icq::{self, find_int4_params, range_multipliers, TauSearch};
use super::int4::{check_group, quantize_rtn_with, GptqInt4, GroupParams};
use super::nf4::{check_block, check_finite, Bnb4, FourBit};
use crate::arch::{ModelSpec, Proj};
use crate::error::{Error, Result};
use crate::formats::safetensors::OwnedTensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nf4,
    Fp4,
    Int4,
}

/// The dtype weights are rounded to before quantizing (transformers quantizes from the dtype it loaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
        }
    }
    pub(crate) fn round(self, w: &mut [f32]) {
        if self == WeightDtype::Bf16 {
            w.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
    }
    pub(crate) fn tensor(self, shape: Vec<usize>, data: &[f32]) -> OwnedTensor {
        match self {
            WeightDtype::F32 => OwnedTensor::f32(shape, data),
            WeightDtype::Bf16 => OwnedTensor::bf16(shape, data),
        }
    }
}

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub format: Format,
    pub double_quant: bool,
    pub block: usize,
    pub group: usize,
    pub sym: bool,
    pub icq: bool,
    /// Token sequences for GPTQ; None means round-to-nearest for int4.
    pub calibration: Option<Vec<Vec<u32>>>,
    pub dtype: WeightDtype,
}

impl QuantizeOptions {
    /// Checks the options against a model of shape `s` before any work is done.
    pub fn check(&self, s: &ModelSpec) -> Result<()> {
        match self.format {
            Format::Nf4 | Format::Fp4 => check_block(self.block)?,
            Format::Int4 => {
                for p in Proj::ALL {
                    let (_, in_dim) = p.dims(s);
                    check_group(self.group, in_dim).map_err(|e| Error::Invalid(format!("{}: {e}", p.module())))?;
                    let (out_dim, _) = p.dims(s);
                    if out_dim % 8 != 0 {
                        return Err(Error::Invalid(format!(
                            "{}: int4 packing needs out_features divisible by 8, got {out_dim}",
                            p.module()
                        )));
                    }
                }
            }
        }
        if self.icq && self.format == Format::Fp4 {
            return Err(Error::Invalid("ICQ is defined for NF4 and int4, not FP4".into()));
        }
        if self.icq && self.format == Format::Nf4 && self.block != icq::ICQ_BLOCK {
            return Err(Error::Invalid(format!("ICQ for NF4 uses 64-element blocks, got --block {}", self.block)));
        }
        if self.calibration.is_some() && self.format != Format::Int4 {
            return Err(Error::Invalid("calibration data (GPTQ) applies to --format int4 only".into()));
        }
        Ok(())
    }

    pub(crate) fn quantization_config(&self) -> QuantizationConfig {
        match self.format {
            Format::Nf4 | Format::Fp4 => QuantizationConfig::Bnb4 {
                kind: if self.format == Format::Nf4 { FourBit::Nf4 } else { FourBit::Fp4 },
                double: self.double_quant,
                compute_dtype: self.dtype.torch_name().into(),
                icq: self.icq,
            },
            Format::Int4 => QuantizationConfig::Gptq { group: self.group, sym: self.sym, desc_act: false },
        }
    }
}

/// The round-to-nearest base of one linear `w` [out, in] in `opts.format` (no calibration): what the trainer
/// puts under the adapters of an unquantized checkpoint.
pub fn quantize_weight(w: &[f32], out_dim: usize, in_dim: usize, opts: &QuantizeOptions) -> Result<BaseWeight> {
    check_finite(w, &[out_dim, in_dim])?;
    Ok(match opts.format {
        Format::Nf4 if opts.icq => {
            BaseWeight::IcqNf4(icq::quantize_nf4(w, &[out_dim, in_dim], opts.double_quant, TauSearch::default())?.0)
        }
        Format::Nf4 | Format::Fp4 => {
            let kind = if opts.format == Format::Nf4 { FourBit::Nf4 } else { FourBit::Fp4 };
            BaseWeight::Bnb4(Bnb4::quantize(w, &[out_dim, in_dim], kind, opts.block, opts.double_quant)?)
        }
        Format::Int4 => {
            check_group(opts.group, in_dim)?;
            let multipliers = range_multipliers(0.1, 50);
            let find = |row: &[f32]| {
                if opts.icq {
                    find_int4_params(row, opts.sym, &multipliers)
                } else {
                    GroupParams::find(row, opts.sym, 1.0)
                }
            };
            let (codes, params) = quantize_rtn_with(w, in_dim, opts.group, &find);
            BaseWeight::Int4(GptqInt4::pack(&codes, &params, out_dim, in_dim, opts.group, opts.sym)?)
        }
    })
}
