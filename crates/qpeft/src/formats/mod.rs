//! File formats: GGUF and safetensors in, safetensors and JSON out.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use ggml_quants::GgmlType;

pub mod ggml_dot;
pub mod ggml_quants;
pub mod gguf;
pub mod safetensors;

/// Bytes shared without copying: a range of a memory-mapped file (a GGUF tensor kept as stored, which then costs
/// only page cache) or an owned buffer.
#[derive(Clone)]
pub enum SharedBytes {
    Mapped(std::sync::Arc<memmap2::Mmap>, std::ops::Range<usize>),
    Owned(std::sync::Arc<[u8]>),
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            SharedBytes::Mapped(map, range) => &map[range.clone()],
            SharedBytes::Owned(bytes) => bytes,
        }
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len())
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
    Ggml(GgmlType),
}

impl std::fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredDtype::Ggml(t) => write!(f, "{t:?}"),
            other => write!(f, "{}", format!("{other:?}").to_lowercase()),
        }
    }
}

/// Writes `bytes` to `path` so that a reader never sees a partial file and an existing file is only replaced
/// by a complete one: write a temporary file next to it, flush it to disk, then rename it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
