//! Memory-mapped safetensors checkpoints: one file or a sharded `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::StoredDtype;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    infos: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// All tensors of a checkpoint, by name, across shards.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    /// Tensor name → shard index, sorted for stable listings.
    names: BTreeMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a model file that qpeft does not modify while it is open.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file (truncated or corrupt): {e}")))?;
    let infos = metadata.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
    Ok(Shard { path: path.to_path_buf(), mmap, data_start: 8 + header_len, infos })
}

impl SafetensorsStore {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            }
            vec![single]
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut names = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let shard = open_shard(f)?;
            for name in shard.infos.keys() {
                if names.insert(name.clone(), i).is_some() {
                    return Err(Error::format(f, format!("tensor `{name}` appears in more than one shard")));
                }
            }
            shards.push(shard);
        }
        Ok(SafetensorsStore { shards, names })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// (name, shape, dtype) of every tensor, sorted by name.
    pub fn list(&self) -> Vec<(String, Vec<usize>, StoredDtype)> {
        self.names
            .iter()
            .map(|(n, &s)| {
                let info = &self.shards[s].infos[n];
                (n.clone(), info.shape.clone(), stored_dtype(info.dtype))
            })
            .collect()
    }

    /// The stored bytes of a tensor, with its dtype and shape.
    pub fn read_raw(&self, name: &str) -> Option<RawTensor<'_>> {
        let &s = self.names.get(name)?;
        let shard = &self.shards[s];
        let info = &shard.infos[name];
        let (a, b) = info.data_offsets;
        Some(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &shard.mmap[shard.data_start + a..shard.data_start + b],
            path: &shard.path,
        })
    }

    /// Reads a floating-point tensor as f32 (bf16 and f16 widen exactly).
    pub fn read_f32(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&s) = self.names.get(name) else { return Ok(None) };
        let shard = &self.shards[s];
        let info = &shard.infos[name];
        let (a, b) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + a..shard.data_start + b];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::unsupported(
                    &shard.path,
                    format!("dtype {other:?} of tensor `{name}` (expected f32, bf16 or f16)"),
                ))
            }
        };
        Ok(Some(HostTensor::new(info.shape.clone(), data)))
    }

    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.names.get(name).map(|&s| self.shards[s].path.as_path())
    }
}

/// A tensor's stored bytes, borrowed from the mapped file.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    pub path: &'a Path,
}

impl RawTensor<'_> {
    fn expect(&self, name: &str, dtype: Dtype) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::format(
                self.path,
                format!("tensor `{name}` has dtype {:?}, expected {dtype:?}", self.dtype),
            ));
        }
        Ok(())
    }

    pub fn to_i32(&self, name: &str) -> Result<Vec<i32>> {
        self.expect(name, Dtype::I32)?;
        Ok(self.bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn to_u8(&self, name: &str) -> Result<Vec<u8>> {
        self.expect(name, Dtype::U8)?;
        Ok(self.bytes.to_vec())
    }

    pub fn to_f16(&self, name: &str) -> Result<Vec<f16>> {
        self.expect(name, Dtype::F16)?;
        Ok(self.bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect())
    }
}

/// A tensor to write: dtype, shape and little-endian bytes.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        OwnedTensor { dtype: Dtype::F32, shape, bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn bf16(shape: Vec<usize>, data: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::BF16,
            shape,
            bytes: data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }
    pub fn f16(shape: Vec<usize>, data: &[f16]) -> Self {
        OwnedTensor { dtype: Dtype::F16, shape, bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn i32(shape: Vec<usize>, data: &[i32]) -> Self {
        OwnedTensor { dtype: Dtype::I32, shape, bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        OwnedTensor { dtype: Dtype::U8, shape, bytes: data }
    }
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors to `path` atomically (a temporary file in the same directory, then a rename), with the
/// `{"format": "pt"}` metadata PyTorch loaders expect.
pub fn write_file(path: &Path, tensors: &BTreeMap<String, OwnedTensor>) -> Result<()> {
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| Error::Invalid(format!("cannot serialize {}: {e}", path.display())))?;
    crate::formats::write_atomic(path, &bytes)
}

fn stored_dtype(d: Dtype) -> StoredDtype {
    match d {
        Dtype::F32 => StoredDtype::F32,
        Dtype::F16 => StoredDtype::F16,
        Dtype::BF16 => StoredDtype::BF16,
        Dtype::F64 => StoredDtype::F64,
        Dtype::I8 => StoredDtype::I8,
        Dtype::I16 => StoredDtype::I16,
        Dtype::I32 => StoredDtype::I32,
        Dtype::I64 => StoredDtype::I64,
        _ => StoredDtype::U8,
    }
}
