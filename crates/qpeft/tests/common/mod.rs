//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use qpeft::formats::safetensors::SafetensorsStore;
use qpeft::tensor::HostTensor;

/// The repository's `tests/fixtures` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The real default model, fetched by scripts/fetch-smollm2.sh.
pub fn smollm2_gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn read_expected(path: &std::path::Path) -> std::collections::HashMap<String, HostTensor> {
    let store = SafetensorsStore::open_files(&[path.to_path_buf()]).expect("fixture opens");
    store
        .list()
        .into_iter()
        .map(|(n, shape, dtype)| {
            let t = if dtype == qpeft::tensor::StoredDtype::I32 {
                let ints = store.read_raw(&n).unwrap().to_i32(&n).unwrap();
                HostTensor::new(shape, ints.into_iter().map(|v| v as f32).collect())
            } else {
                store.read_f32(&n).unwrap().unwrap()
            };
            (n, t)
        })
        .collect()
}

/// max |a − b| / max |b| over the entries selected by `keep`.
pub fn rel_err(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut diff = 0f32;
    let mut scale = 0f32;
    for i in (0..a.len()).filter(|&i| keep(i)) {
        diff = diff.max((a[i] - b[i]).abs());
        scale = scale.max(b[i].abs());
    }
    diff / scale
}
