//! GGUF v2/v3 reader: header, metadata, tensor infos, alignment, memory-mapped tensor data.
//!
//! Every length and offset read from the file is checked against the bytes that remain before it
//! is used, so a truncated or corrupted file gives an error naming the file and the offset — never
//! a panic or an absurd allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::ggml_quants::{self, GgmlType};
use super::SharedBytes;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// A metadata value. Arrays keep their element values (token lists are a few 100k strings at most).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short rendering for `qpeft info` (long arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::Str(s) if s.len() > 80 => format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(80)], s.len()),
            MetaValue::Str(s) => format!("{s:?}"),
            MetaValue::Array(a) if a.len() > 8 => format!("[{} values]", a.len()),
            MetaValue::Array(a) => format!("[{}]", a.iter().map(|v| v.summary()).collect::<Vec<_>>().join(", ")),
            MetaValue::Bool(b) => b.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            other => other.as_u64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in PyTorch order (slowest dimension first); GGUF stores it reversed.
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    mmap: Arc<Mmap>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::format(self.path, format!("truncated or corrupt GGUF at byte {} while reading {what}", self.pos))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count that will drive a loop or an allocation: each item takes at least `min_item_bytes`,
    /// so a count larger than the remaining bytes allow is corruption.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > remaining {
            return Err(Error::format(
                self.path,
                format!("truncated or corrupt GGUF: {what} = {n} at byte {} exceeds what the remaining {remaining} bytes can hold", self.pos - 8),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let start = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(self.path, format!("{what} at byte {start} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(Error::format(self.path, format!("metadata `{key}`: invalid bool byte {b}"))),
            },
            8 => MetaValue::Str(self.string(key)?),
            9 if depth == 0 => {
                let item_ty = self.u32(key)?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        return Err(Error::format(self.path, format!("metadata `{key}`: unknown array item type {t}")))
                    }
                };
                let n = self.count(min, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(Error::format(self.path, format!("metadata `{key}`: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; qpeft never writes to model files while they are open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = Self::parse(&mmap, path)?;
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, mmap: Arc::new(mmap) })
    }

    #[allow(clippy::type_complexity)]
    fn parse(buf: &[u8], path: &Path) -> Result<(u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>)> {
        let mut c = Cursor { buf, pos: 0, path };
        if c.take(4, "magic").ok() != Some(MAGIC.as_slice()) {
            return Err(Error::format(path, "not a GGUF file (magic bytes are not `GGUF`)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(path, format!("GGUF version {version} (qpeft reads versions 2 and 3)")));
        }
        // A tensor info takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.count(8 + 4, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let remaining = (buf.len() - c.pos) as u64;
        if n_tensors.saturating_mul(24) > remaining {
            return Err(Error::format(
                path,
                format!("truncated or corrupt GGUF: tensor count {n_tensors} exceeds what the file can hold"),
            ));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::format(
                        path,
                        format!("general.alignment = {} is not a power of two", v.summary()),
                    ))
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {n_dims} dimensions (expected 1 to {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let dtype = GgmlType::from_u32(c.u32(&name)?);
            let offset = c.u64(&name)?;
            raw.push((name, dims, dtype, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, dtype, offset) in raw {
            let (block, block_bytes) = dtype
                .layout()
                .ok_or_else(|| Error::unsupported(path, format!("tensor type {dtype:?} of tensor `{name}`")))?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let row = dims[0];
            let len = numel
                .filter(|_| row % block as u64 == 0)
                .and_then(|n| (n / block as u64).checked_mul(block_bytes as u64));
            let Some(len) = len else {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: dimensions {dims:?} invalid for type {dtype:?}"),
                ));
            };
            if offset % alignment != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: data offset {offset} is not aligned to {alignment}"),
                ));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= buf.len() as u64 => tensors.push(TensorInfo {
                    name,
                    shape: dims.iter().rev().map(|&d| d as usize).collect(),
                    dtype,
                    start: s as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(Error::format(
                        path,
                        format!("tensor `{name}`: data at offset {offset} ({len} bytes) runs past the end of the file ({} bytes); the file is truncated", buf.len()),
                    ))
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// A tensor's bytes as stored, shared with the file's map (no copy; it outlives this `GgufFile`).
    pub fn tensor_shared(&self, info: &TensorInfo) -> SharedBytes {
        SharedBytes::Mapped(self.mmap.clone(), info.start..info.start + info.len)
    }

    /// Reads and dequantizes a tensor to f32, in PyTorch shape order.
    pub fn read_f32(&self, info: &TensorInfo) -> Result<HostTensor> {
        let data = ggml_quants::dequantize(info.dtype, self.tensor_bytes(info), info.numel()).ok_or_else(|| {
            Error::unsupported(&self.path, format!("tensor type {:?} of `{}`", info.dtype, info.name))
        })?;
        Ok(HostTensor::new(info.shape.clone(), data))
    }
}
