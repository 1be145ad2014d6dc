//! A model on disk — an HF directory or a GGUF file — seen through transformers' tensor names.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::arch::{Arch, ModelSpec};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::SafetensorsStore;
use crate::formats::{SharedBytes, StoredDtype};
use crate::quant::base::{BaseWeight, GgmlRows};
use crate::quant::hf_dir::{read_linear, QuantizationConfig};
use crate::tensor::HostTensor;
use crate::tokenizer::Tokenizer;

pub enum Source {
    Gguf(GgufFile),
    Hf {
        dir: PathBuf,
        store: SafetensorsStore,
    },
    /// `random:ARCH[:SEED]`: a built-in shape (`ModelSpec::builtin`) with seeded random weights, for benchmarks
    /// and device tests at real sizes without the weights.
    Random {
        seed: u64,
    },
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub spec: ModelSpec,
    pub source: Source,
    /// Set for directories whose linears are stored quantized (bitsandbytes 4-bit or GPTQ).
    pub quant: Option<QuantizationConfig>,
}

/// One stored tensor, for `qpeft info`.
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StoredDtype,
}

/// The GGUF (llama.cpp) name of an HF tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{param}"))
}

/// llama.cpp stores q/k rows of llama models interleaved for its rotary convention: within each
/// head, row 2i+t of the file is row t·(d/2)+i of transformers' rotate-half layout. Undo it.
fn unpermute_rows<E: Copy>(data: &mut [E], rows: usize, heads: usize) {
    let cols = data.len() / rows;
    let d = rows / heads;
    let half = d / 2;
    let src = data.to_vec();
    for h in 0..heads {
        for i in 0..half {
            for two in 0..2 {
                let from = h * d + 2 * i + two;
                let to = h * d + two * half + i;
                data[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
}

/// Files copied from an HF source directory when present.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

impl Checkpoint {
    /// Writes this checkpoint's tokenizer into the model directory `out`: the files of an HF source as they are, or for a
    /// GGUF source the tokenizer.json / tokenizer_config.json documents rebuilt from its metadata.
    pub fn write_tokenizer(&self, out: &Path) -> Result<()> {
        match &self.source {
            Source::Hf { dir, .. } => {
                for f in TOKENIZER_FILES {
                    let src = dir.join(f);
                    if src.exists() {
                        let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
                        crate::formats::write_atomic(&out.join(f), &bytes)?;
                    }
                }
            }
            Source::Gguf(_) | Source::Random { .. } => {
                let (json, config) = self.tokenizer()?.hf_files()?;
                crate::formats::write_atomic(&out.join("tokenizer.json"), json.as_bytes())?;
                crate::formats::write_atomic(
                    &out.join("tokenizer_config.json"),
                    &serde_json::to_vec_pretty(&config).expect("JSON serializes"),
                )?;
            }
        }
        Ok(())
    }

    /// Opens a `.gguf` file or an HF directory (config.json + safetensors).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if let Some(rest) = path.to_str().and_then(|p| p.strip_prefix("random:")) {
            let (arch, seed) = rest.split_once(':').unwrap_or((rest, "0"));
            let spec = ModelSpec::builtin(arch).ok_or_else(|| {
                Error::unsupported(
                    path,
                    format!("architecture `{arch}` (built-in: {})", crate::arch::BUILTIN.join(", ")),
                )
            })?;
            let seed = seed.parse().map_err(|_| Error::format(path, format!("seed `{seed}` is not an integer")))?;
            return Ok(Checkpoint { path: path.to_path_buf(), spec, source: Source::Random { seed }, quant: None });
        }
        if path.is_dir() {
            let config = path.join("config.json");
            if !config.exists() {
                return Err(Error::format(path, "not a model directory: config.json is missing"));
            }
            let spec = ModelSpec::from_hf_config(&config)?;
            let text = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&config, format!("invalid JSON: {e}")))?;
            let quant = QuantizationConfig::from_config(&json, &config)?;
            let store = SafetensorsStore::open_dir(path)?;
            Ok(Checkpoint {
                path: path.to_path_buf(),
                spec,
                source: Source::Hf { dir: path.to_path_buf(), store },
                quant,
            })
        } else if path.exists() {
            let g = GgufFile::open(path)?;
            let spec = ModelSpec::from_gguf(&g)?;
            Ok(Checkpoint { path: path.to_path_buf(), spec, source: Source::Gguf(g), quant: None })
        } else {
            Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
        }
    }

    /// A fingerprint of the weights' content, which an adapter records to find its base again: SHA-256 over every
    /// weight file's size and bytes, and in a directory its name (`sha256:…`). Above `FULL_HASH_BYTES` in all, the bytes are 256 evenly
    /// spaced 64 KiB samples of each file (`sha256-sampled:…`), so a 7B model is not read whole: any different
    /// download, re-quantization or truncation changes it, an edit between samples would not.
    pub fn fingerprint(&self) -> Result<String> {
        const FULL_HASH_BYTES: u64 = 2 << 30;
        const SAMPLES: u64 = 256;
        const SAMPLE: u64 = 64 << 10;
        let files: Vec<PathBuf> = match &self.source {
            Source::Random { seed } => return Ok(format!("{}:{seed}", self.path.display())),
            Source::Gguf(_) => vec![self.path.clone()],
            Source::Hf { dir, .. } => {
                let mut files = vec![dir.join("config.json")];
                let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| Error::io(dir, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                weights.sort();
                files.extend(weights);
                files
            }
        };
        let sizes: Vec<u64> = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).map_err(|e| Error::io(f, e)))
            .collect::<Result<_>>()?;
        let sampled = sizes.iter().sum::<u64>() > FULL_HASH_BYTES;
        let mut h = Sha256::new();
        for (f, &size) in files.iter().zip(&sizes) {
            // A directory's files are told apart by name; a single file may be renamed or moved freely.
            if matches!(self.source, Source::Hf { .. }) {
                h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            }
            h.update(size.to_le_bytes());
            let mut file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            if !sampled || size <= SAMPLES * SAMPLE {
                std::io::copy(&mut file, &mut h).map_err(|e| Error::io(f, e))?;
                continue;
            }
            let mut buf = vec![0u8; SAMPLE as usize];
            for k in 0..SAMPLES {
                let at = k * (size - SAMPLE) / (SAMPLES - 1);
                file.seek(SeekFrom::Start(at)).and_then(|_| file.read_exact(&mut buf)).map_err(|e| Error::io(f, e))?;
                h.update(&buf);
            }
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{}:{hex}", if sampled { "sha256-sampled" } else { "sha256" }))
    }

    pub fn format_name(&self) -> &'static str {
        match self.source {
            Source::Gguf(_) => "gguf",
            Source::Hf { .. } => "hf-safetensors",
            Source::Random { .. } => "random",
        }
    }

    /// Reads a tensor by its transformers name, in transformers' layout; None if absent.
    pub fn read(&self, hf_name: &str) -> Result<Option<HostTensor>> {
        match &self.source {
            Source::Hf { store, .. } => store.read_f32(hf_name),
            Source::Gguf(g) => {
                let Some(info) = gguf_name(hf_name).and_then(|n| g.tensor_info(&n)) else { return Ok(None) };
                let mut t = g.read_f32(info)?;
                if let Some(heads) = self.permuted_heads(hf_name) {
                    unpermute_rows(&mut t.data, t.shape[0], heads);
                }
                // llama.cpp's converter stores Gemma's norm offsets w as 1 + w.
                if self.spec.norm_plus_one && hf_name.ends_with("norm.weight") {
                    t.data.iter_mut().for_each(|x| *x -= 1.0);
                }
                Ok(Some(t))
            }
            Source::Random { seed } => Ok(random_tensor(&self.spec, hf_name, *seed)),
        }
    }

    /// Reads a tensor that must exist with exactly `shape`.
    pub fn require(&self, hf_name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t =
            self.read(hf_name)?.ok_or_else(|| Error::format(&self.path, format!("tensor `{hf_name}` is missing")))?;
        if t.shape != shape {
            return Err(Error::format(
                &self.path,
                format!("tensor `{hf_name}` has shape {:?}, but the config implies {shape:?}", t.shape),
            ));
        }
        Ok(t)
    }

    /// The head count of a tensor whose rows llama.cpp permuted (llama q/k in a GGUF file), None for any other.
    fn permuted_heads(&self, hf_name: &str) -> Option<usize> {
        let llama_gguf = self.spec.arch == Arch::Llama && matches!(self.source, Source::Gguf(_));
        if !llama_gguf {
            None
        } else if hf_name.contains("q_proj") {
            Some(self.spec.num_heads)
        } else if hf_name.contains("k_proj") {
            Some(self.spec.num_kv_heads)
        } else {
            None
        }
    }

    /// The stored form of linear `m` ([out_dim, in_dim]; also `model.embed_tokens` as [vocab, hidden]) and, where it
    /// is stored dense, its f32 values. A quantized form (a bitsandbytes or GPTQ directory, or a GGUF block format
    /// kept as stored) comes without them: `BaseWeight::dequantize` gives them when needed. The LM head of a
    /// directory is never quantized.
    pub fn linear_base(&self, m: &str, out_dim: usize, in_dim: usize) -> Result<(BaseWeight, Option<HostTensor>)> {
        match (&self.quant, &self.source) {
            (Some(qc), Source::Hf { store, .. }) if m != "lm_head" && m != "model.embed_tokens" => {
                return Ok((read_linear(store, qc, m, out_dim, in_dim)?, None));
            }
            (_, Source::Gguf(g)) => {
                let name = format!("{m}.weight");
                if let Some(info) = gguf_name(&name).and_then(|n| g.tensor_info(&n)) {
                    if info.shape == [out_dim, in_dim] {
                        let bytes = match self.permuted_heads(&name) {
                            // Whole rows move, so the permutation works on the stored blocks.
                            Some(heads) => {
                                let stored = g.tensor_bytes(info);
                                let mut rows: Vec<&[u8]> = stored.chunks(stored.len() / out_dim.max(1)).collect();
                                unpermute_rows(&mut rows, out_dim, heads);
                                SharedBytes::Owned(rows.concat().into())
                            }
                            None => g.tensor_shared(info),
                        };
                        if let Some(rows) = GgmlRows::new(info.dtype, out_dim, in_dim, bytes) {
                            return Ok((BaseWeight::Ggml(rows), None));
                        }
                    }
                }
            }
            _ => {}
        }
        Ok((BaseWeight::Dense, Some(self.require(&format!("{m}.weight"), &[out_dim, in_dim])?)))
    }

    /// The weight of linear `m` ([out_dim, in_dim]) dequantized to f32, and its stored form.
    pub fn linear(&self, m: &str, out_dim: usize, in_dim: usize) -> Result<(HostTensor, BaseWeight)> {
        let (base, dense) = self.linear_base(m, out_dim, in_dim)?;
        let w = match dense {
            Some(w) => w,
            None => HostTensor::new(vec![out_dim, in_dim], base.dequantize().expect("a stored form dequantizes")),
        };
        Ok((w, base))
    }

    pub fn listing(&self) -> Vec<TensorEntry> {
        match &self.source {
            Source::Hf { store, .. } => {
                store.list().into_iter().map(|(name, shape, dtype)| TensorEntry { name, shape, dtype }).collect()
            }
            Source::Gguf(g) => g
                .tensors
                .iter()
                .map(|t| TensorEntry {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: StoredDtype::Ggml(t.dtype),
                })
                .collect(),
            Source::Random { .. } => Vec::new(),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.source {
            Source::Hf { dir, .. } => Tokenizer::from_hf_dir(dir),
            Source::Gguf(g) => Tokenizer::from_gguf(g),
            Source::Random { .. } => Err(Error::unsupported(&self.path, "tokenizer: a random-init model has none")),
        }
    }
}

/// The tensor `hf_name` of a random-init `spec`: norms 1 (0 where the norm adds 1), everything else uniform in
/// ±1/√fan-in (embeddings ±0.02), from a SplitMix64 counter hash of (seed, name, index) — any tensor can be made
/// alone, in parallel, and the same seed gives the same model.
fn random_tensor(spec: &ModelSpec, hf_name: &str, seed: u64) -> Option<HostTensor> {
    use crate::arch::Proj;
    use rayon::prelude::*;
    let h = spec.hidden_size;
    let (shape, bound) =
        if hf_name == "model.embed_tokens.weight" || (hf_name == "lm_head.weight" && !spec.tie_word_embeddings) {
            (vec![spec.vocab_size, h], 0.02)
        } else if hf_name.ends_with("norm.weight") {
            let one = if spec.norm_plus_one { 0.0 } else { 1.0 };
            return Some(HostTensor::new(vec![h], vec![one; h]));
        } else {
            let rest = hf_name.strip_prefix("model.layers.")?.split_once('.')?.1;
            let (module, bias) = match rest.strip_suffix(".weight") {
                Some(m) => (m, false),
                None => (rest.strip_suffix(".bias")?, true),
            };
            let p = Proj::ALL.into_iter().find(|p| p.module() == module)?;
            let (out_dim, in_dim) = p.dims(spec);
            // Biases (Qwen2's q/k/v) in the range nn.Linear initializes them in.
            let shape = if bias { vec![out_dim] } else { vec![out_dim, in_dim] };
            (shape, 1.0 / (in_dim as f64).sqrt())
        };
    let key = hf_name.bytes().fold(seed ^ 0xCBF2_9CE4_8422_2325, |k, b| (k ^ b as u64).wrapping_mul(0x100_0000_01B3));
    let n: usize = shape.iter().product();
    let data = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut z = key ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound) as f32
        })
        .collect();
    Some(HostTensor::new(shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_shapes_have_their_biases() {
        let spec = ModelSpec::builtin("qwen2.5-1.5b").unwrap();
        let b = random_tensor(&spec, "model.layers.3.self_attn.k_proj.bias", 7).unwrap();
        assert_eq!(b.shape, vec![spec.kv_dim()]);
        let bound = 1.0 / (spec.hidden_size as f32).sqrt();
        assert!(b.data.iter().all(|x| x.abs() <= bound) && b.data.iter().any(|&x| x != 0.0));
        assert!(random_tensor(&spec, "model.layers.3.self_attn.k_proj.scales", 7).is_none());
    }

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.layers.3.self_attn.o_proj.weight").as_deref(), Some("blk.3.attn_output.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.bias").as_deref(), Some("blk.0.attn_q.bias"));
        assert_eq!(
            gguf_name("model.layers.12.post_attention_layernorm.weight").as_deref(),
            Some("blk.12.ffn_norm.weight")
        );
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.1.mlp.experts.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() {
        // Two heads of d = 4, one column: transformers rows [h0: a0 a1 b0 b1, h1: ...] where a are
        // first-half and b second-half; llama.cpp interleaves them as a0 b0 a1 b1.
        let mut t = HostTensor::new(vec![8, 1], vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let rows = t.shape[0];
        unpermute_rows(&mut t.data, rows, 2);
        assert_eq!(t.data, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    }
}
