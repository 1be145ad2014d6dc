//! What a model is before any weight is read: its shape and arithmetic (`ModelSpec`, from an HF config or GGUF
//! metadata) and the names of its parts (`Proj`, `InputSite`, module kinds and depth halves). Everything that
//! talks about "layer 3's q_proj" — adapters, per-layer rules, adapter files, checkpoints, calibration — imports
//! it from here, so none of them depends on the model's implementation.

pub mod proj;
pub mod spec;

pub use proj::{Depth, InputSite, Kind, Proj};
pub use spec::{Activation, Arch, ModelSpec, RopeScaling, BUILTIN};
