//! `ModelSpec`: everything about a decoder's shape and arithmetic that differs between the
//! supported families (llama incl. Llama-3 rope scaling, mistral, qwen2, gemma v1), read from an HF
//! `config.json` or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gemma,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, gemma";

    pub fn parse(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "gemma" => Arch::Gemma,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma => "gemma",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: down(silu(gate) ⊙ up).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`), as in Gemma.
    GeluTanh,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama-3.1 style frequency-dependent scaling (`rope_type = "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
    /// Linear position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Per-frequency divisors stored in a GGUF `rope_freqs.weight` tensor (llama.cpp convention).
    FreqFactors(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (qwen2; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama with `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// Gemma's RMSNorm multiplies by (1 + w) instead of w.
    pub norm_plus_one: bool,
    /// Gemma multiplies embeddings by √hidden.
    pub scale_embeddings: bool,
    /// Mistral's sliding-window attention: a query sees at most this many most recent keys.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Shapes of well-known checkpoints, for parameter accounting without the weights (`qpeft params --arch`).
pub const BUILTIN: [&str; 8] =
    ["llama-7b", "llama-13b", "llama2-7b", "llama2-13b", "llama3-8b", "gemma-2b", "gemma-7b", "smollm2-135m"];

impl ModelSpec {
    /// The shape of a built-in architecture (see `BUILTIN`), from its published config.json.
    pub fn builtin(name: &str) -> Option<ModelSpec> {
        // (arch, vocab, hidden, intermediate, layers, heads, kv heads, head_dim, rope θ)
        let (
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
        ) = match name {
            "llama-7b" | "llama2-7b" => (Arch::Llama, 32000, 4096, 11008, 32, 32, 32, 128, 10000.0),
            "llama-13b" | "llama2-13b" => (Arch::Llama, 32000, 5120, 13824, 40, 40, 40, 128, 10000.0),
            "llama3-8b" => (Arch::Llama, 128256, 4096, 14336, 32, 32, 8, 128, 500000.0),
            "gemma-2b" => (Arch::Gemma, 256000, 2048, 16384, 18, 8, 1, 256, 10000.0),
            "gemma-7b" => (Arch::Gemma, 256000, 3072, 24576, 28, 16, 16, 256, 10000.0),
            "smollm2-135m" => (Arch::Llama, 49152, 576, 1536, 30, 9, 3, 64, 100000.0),
            "qwen2.5-1.5b" => (Arch::Qwen2, 151936, 1536, 8960, 28, 12, 2, 128, 1000000.0),
            _ => return None,
        };
        let (gemma, qwen) = (arch == Arch::Gemma, arch == Arch::Qwen2);
        Some(ModelSpec {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: if gemma || qwen { 1e-6 } else { 1e-5 },
            rope_theta,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            // Qwen2.5-1.5B as its GGUF file (scripts/fetch-model.sh) stores it: with its own output matrix.
            tie_word_embeddings: gemma || name == "smollm2-135m",
            qkv_bias: qwen,
            o_bias: false,
            mlp_bias: false,
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
            norm_plus_one: gemma,
            scale_embeddings: gemma,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        })
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// An HF `config.json` for this model (used when a GGUF model is written out as an HF directory).
    pub fn to_hf_config(&self, file: &Path) -> Result<Value> {
        let arch_class = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Gemma => "GemmaForCausalLM",
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position,
                })
            }
            RopeScaling::FreqFactors(_) => {
                return Err(Error::unsupported(
                    file,
                    "writing an HF config for per-frequency rope factors (rope_freqs)",
                ))
            }
        };
        let mut c = serde_json::json!({
            "architectures": [arch_class],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
        });
        match self.arch {
            Arch::Llama => {
                c["attention_bias"] = Value::Bool(self.qkv_bias);
                c["mlp_bias"] = Value::Bool(self.mlp_bias);
            }
            Arch::Mistral => c["sliding_window"] = serde_json::json!(self.sliding_window),
            Arch::Qwen2 | Arch::Gemma => {}
        }
        if self.activation == Activation::GeluTanh {
            c["hidden_activation"] = Value::from("gelu_pytorch_tanh");
        }
        Ok(c)
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(file, field, "must be positive, got 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                file,
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads = {}", self.num_kv_heads, self.num_heads),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(
                file,
                "head_dim",
                format!("{} is odd; rotary embeddings need an even head_dim", self.head_dim),
            ));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(Error::format(
                    file,
                    format!("rope_freqs has {} entries, expected head_dim/2 = {}", f.len(), self.head_dim / 2),
                ));
            }
        }
        Ok(())
    }

    /// Parses an HF `config.json` (plus the optional `generation_config.json` beside it for EOS ids).
    pub fn from_hf_config(path: &Path) -> Result<ModelSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let get = |k: &str| cfg.get(k).filter(|v| !v.is_null());
        let usize_of = |k: &str| -> Result<usize> {
            let v = get(k).ok_or_else(|| Error::config(path, k, "missing"))?;
            v.as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::config(path, k, format!("expected a non-negative integer, got {v}")))
        };
        let f32_or = |k: &str, default: f32| -> Result<f32> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| Error::config(path, k, format!("expected a number, got {v}"))),
            }
        };
        let model_type =
            get("model_type").and_then(Value::as_str).ok_or_else(|| Error::config(path, "model_type", "missing"))?;
        let arch = Arch::parse(model_type).ok_or_else(|| {
            Error::unsupported(path, format!("architecture `{model_type}` (supported: {})", Arch::SUPPORTED))
        })?;
        let hidden_size = usize_of("hidden_size")?;
        let num_heads = usize_of("num_attention_heads")?;
        let num_kv_heads =
            if get("num_key_value_heads").is_some() { usize_of("num_key_value_heads")? } else { num_heads };
        // A zero head count leaves head_dim 0, which validate() reports.
        let head_dim = if get("head_dim").is_some() {
            usize_of("head_dim")?
        } else {
            hidden_size.checked_div(num_heads).unwrap_or(0)
        };
        // transformers ≥ 5 folds rope_theta and rope_scaling into `rope_parameters`.
        let rope_params = get("rope_parameters");
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t as f32,
            None => f32_or("rope_theta", 10000.0)?,
        };
        let scaling = get("rope_scaling").or(rope_params);
        let rope_scaling = parse_rope_scaling(path, scaling)?;
        let activation_name =
            get("hidden_activation").or_else(|| get("hidden_act")).and_then(Value::as_str).unwrap_or("silu");
        let activation = match (arch, activation_name) {
            (_, "silu" | "swish") => Activation::Silu,
            (_, "gelu_pytorch_tanh" | "gelu_tanh") => Activation::GeluTanh,
            // transformers runs Gemma v1 with the tanh approximation even when the config says "gelu".
            (Arch::Gemma, "gelu") => Activation::GeluTanh,
            (_, other) => {
                return Err(Error::unsupported(
                    path,
                    format!("activation `{other}` (supported: silu, gelu_pytorch_tanh)"),
                ))
            }
        };
        let bool_or = |k: &str, default: bool| get(k).and_then(Value::as_bool).unwrap_or(default);
        let attention_bias = bool_or("attention_bias", false);
        let sliding_window = match arch {
            Arch::Mistral => get("sliding_window").and_then(Value::as_u64).map(|w| w as usize),
            _ => None,
        };
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
                Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                None => vec![],
            }
        };
        let mut eos_token_ids = ids(get("eos_token_id"));
        let generation = path.with_file_name("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&generation) {
            let g: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&generation, format!("invalid JSON: {e}")))?;
            let more = ids(g.get("eos_token_id"));
            if !more.is_empty() {
                eos_token_ids = more;
            }
        }
        let spec = ModelSpec {
            arch,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_layers: usize_of("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f32_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: bool_or("tie_word_embeddings", arch == Arch::Gemma),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias && arch != Arch::Qwen2,
            mlp_bias: bool_or("mlp_bias", false),
            activation,
            norm_plus_one: arch == Arch::Gemma,
            scale_embeddings: arch == Arch::Gemma,
            sliding_window,
            bos_token_id: get("bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids,
        };
        spec.validate(path)?;
        Ok(spec)
    }

    /// Reads the `{arch}.*` metadata keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelSpec> {
        let path = g.path.as_path();
        let arch_name = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(path, "general.architecture", "missing"))?;
        let arch = Arch::parse(arch_name).ok_or_else(|| {
            Error::unsupported(path, format!("architecture `{arch_name}` (supported: {})", Arch::SUPPORTED))
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let full = key(k);
            let v = g.get(&full).ok_or_else(|| Error::config(path, &full, "missing"))?;
            v.as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::config(path, &full, format!("expected an integer, got {}", v.summary())))
        };
        let f32_or =
            |k: &str, default: f32| g.get(&key(k)).and_then(|v| v.as_f64()).map(|v| v as f32).unwrap_or(default);
        let hidden_size = usize_of("embedding_length")?;
        let num_heads = usize_of("attention.head_count")?;
        let num_kv_heads = if g.get(&key("attention.head_count_kv")).is_some() {
            usize_of("attention.head_count_kv")?
        } else {
            num_heads
        };
        let head_dim = match g.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        let vocab_size = match g.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|a| a.len()).ok_or_else(|| {
                Error::config(path, key("vocab_size"), "missing (and no tokenizer.ggml.tokens to count)")
            })?,
        };
        let rope_scaling = if let Some(info) = g.tensor_info("rope_freqs.weight") {
            RopeScaling::FreqFactors(g.read_f32(info)?.data)
        } else {
            match g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                None | Some("none") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear { factor: f32_or("rope.scaling.factor", 1.0) },
                Some(other) => return Err(Error::unsupported(path, format!("rope scaling type `{other}`"))),
            }
        };
        let has_tensor = |n: &str| g.tensor_info(n).is_some();
        let eos = g.get("tokenizer.ggml.eos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32);
        let spec = ModelSpec {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_layers: usize_of("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f32_or("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: f32_or("rope.freq_base", 10000.0),
            rope_scaling,
            max_position_embeddings: g.get(&key("context_length")).and_then(|v| v.as_u64()).unwrap_or(4096) as usize,
            tie_word_embeddings: !has_tensor("output.weight"),
            qkv_bias: has_tensor("blk.0.attn_q.bias"),
            o_bias: has_tensor("blk.0.attn_output.bias"),
            mlp_bias: has_tensor("blk.0.ffn_up.bias"),
            activation: if arch == Arch::Gemma { Activation::GeluTanh } else { Activation::Silu },
            norm_plus_one: arch == Arch::Gemma,
            scale_embeddings: arch == Arch::Gemma,
            sliding_window: None,
            bos_token_id: g.get("tokenizer.ggml.bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32),
            eos_token_ids: eos.into_iter().collect(),
        };
        spec.validate(path)?;
        Ok(spec)
    }
}

fn parse_rope_scaling(path: &Path, v: Option<&Value>) -> Result<RopeScaling> {
    let Some(v) = v else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        v.get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| Error::config(path, format!("rope_scaling.{k}"), "missing or not a number"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::unsupported(
                path,
                format!("rope scaling type `{other}` (supported: default, linear, llama3)"),
            ))
        }
    })
}
