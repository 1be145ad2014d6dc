pub mod block;
pub mod checkpoint;
pub mod decoder;
pub mod kv_cache;
pub mod linear;
pub mod memory;
pub mod merge;
pub mod rope;
pub mod train;

pub use checkpoint::Checkpoint;
pub use decoder::{Decoder, Input};
pub use kv_cache::KvCache;
