//! qpeft: fine-tune 4-bit-quantized LLMs with LoRA-family adapters, and evaluate them.

pub mod adapters;
pub mod arch;
pub mod backend;
pub mod config_doc;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod linalg;
pub mod lockfile;
pub mod model;
pub mod plan;
pub mod quant;
pub mod quantize;
pub mod simd;
pub mod study;
pub mod svg;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
