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

/// Storage dtype of a tensor in a file, reported by `qpeft info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Ggml(crate::formats::gguf::GgmlType),
}

impl std::fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredDtype::Ggml(t) => write!(f, "{t:?}"),
            other => write!(f, "{}", format!("{other:?}").to_lowercase()),
        }
    }
}
