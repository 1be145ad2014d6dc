//! File formats: GGUF and safetensors in, safetensors and JSON out.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

pub mod ggml_quants;
pub mod gguf;
pub mod peft;
pub mod safetensors;

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
