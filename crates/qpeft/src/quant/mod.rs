//! 4-bit quantization of frozen base weights: bitsandbytes NF4/FP4 (with double quantization), GPTQ-style
//! group-wise int4, and IR-QLoRA's information calibration (ICQ).

pub mod base;
pub mod blockwise8;
pub mod gptq;
pub mod hf_dir;
pub mod icq;
pub mod int4;
pub mod maps;
pub mod nf4;
pub mod recipe;
pub mod torch_sum;
