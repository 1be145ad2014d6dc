//! Host-side tensors: what loaders produce and what backends upload from.

/// A dense row-major f32 tensor in host memory. Loaders convert every stored dtype to this
/// (bf16/f16 widen exactly; GGUF block formats dequantize) so that models compute in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} does not match data length");
        HostTensor { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
