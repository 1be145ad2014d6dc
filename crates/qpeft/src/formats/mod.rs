pub mod ggml_quants;
pub mod gguf;
pub mod safetensors;
