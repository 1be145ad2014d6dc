//! qpeft: fine-tune 4-bit-quantized LLMs with LoRA-family adapters, and evaluate them.

pub mod adapters;
pub mod backend;
pub mod data;
pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
pub mod model;
pub mod plan;
pub mod quant;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
