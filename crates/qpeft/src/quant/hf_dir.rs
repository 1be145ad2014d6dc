//! Quantized linear weights in Hugging Face model directories.
//!
//! bitsandbytes 4-bit (what transformers writes when it saves a bnb model, see docs/formats/bnb4-hf-dir.md):
//! `<m>.weight` packed u8 [(n+1)/2, 1], `<m>.weight.absmax` (u8 codes when double-quantized, else f32),
//! `<m>.weight.quant_map` f32[16], and when double-quantized `<m>.weight.nested_absmax` f32 and
//! `<m>.weight.nested_quant_map` f32[256]; `<m>.weight.quant_state.bitsandbytes__<nf4|fp4>` is a u8 tensor holding
//! a JSON object (quant_type, blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset).
//! qpeft's ICQ adds `<m>.weight.icq_tau_codes` (u8) and `<m>.weight.icq_tau_scales` (f32): transformers does
//! not know them, so an ICQ directory is for qpeft only.
//!
//! GPTQ (AutoGPTQ layout): `<m>.qweight` i32 [in/8, out], `<m>.qzeros` i32 [groups, out/8], `<m>.scales` f16
//! [groups, out], `<m>.g_idx` i32 [in], optional `<m>.bias` f16.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::base::BaseWeight;
use super::blockwise8::Blockwise8;
use super::icq::IcqNf4;
use super::int4::GptqInt4;
use super::maps::signed_dynamic;
use super::nf4::{Absmax, Bnb4, FourBit, NESTED_BLOCK};
use crate::error::{Error, Result};
use crate::formats::safetensors::{OwnedTensor, SafetensorsStore};

/// The `quantization_config` of a quantized directory's config.json.
#[cfg(test)]
mod tests {
    #[test]
    fn python_float_repr() {
        use super::python_float_repr as r;
        // Expected strings are what Python 3 prints for repr(float(x)).
        assert_eq!(r(0.49454465508461), "0.49454465508461");
        assert_eq!(r(3.5092763900756836), "3.5092763900756836");
        assert_eq!(r(1e-05), "1e-05");
        assert_eq!(r(0.0001), "0.0001");
        assert_eq!(r(-2.5e-7), "-2.5e-07");
        assert_eq!(r(123.0), "123.0");
        assert_eq!(r(1e16), "1e+16");
        assert_eq!(r(0.0), "0.0");
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum QuantizationConfig {
    Bnb4 { kind: FourBit, double: bool, compute_dtype: String, icq: bool },
    Gptq { group: usize, sym: bool, desc_act: bool },
}

impl QuantizationConfig {
    /// Reads `quantization_config` from a parsed config.json; None when the model is not quantized.
    pub fn from_config(config: &Value, file: &Path) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else { return Ok(None) };
        let field = |k: &str| format!("quantization_config.{k}");
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        match method {
            "bitsandbytes" => {
                if q.get("load_in_4bit").and_then(Value::as_bool) != Some(true) {
                    return Err(Error::unsupported(file, "bitsandbytes quantization other than load_in_4bit"));
                }
                let kind = match q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
                    Some("nf4") => FourBit::Nf4,
                    Some("fp4") | None => FourBit::Fp4,
                    Some(other) => {
                        return Err(Error::config(
                            file,
                            field("bnb_4bit_quant_type"),
                            format!("unknown value `{other}`"),
                        ))
                    }
                };
                let double = q.get("bnb_4bit_use_double_quant").and_then(Value::as_bool).unwrap_or(false);
                let compute_dtype =
                    q.get("bnb_4bit_compute_dtype").and_then(Value::as_str).unwrap_or("float32").to_string();
                let icq = q.get("qpeft_icq").and_then(Value::as_bool).unwrap_or(false);
                Ok(Some(QuantizationConfig::Bnb4 { kind, double, compute_dtype, icq }))
            }
            "gptq" => {
                let bits = q.get("bits").and_then(Value::as_u64).unwrap_or(0);
                if bits != 4 {
                    return Err(Error::config(
                        file,
                        field("bits"),
                        format!("only 4-bit GPTQ is supported, got {bits}"),
                    ));
                }
                let group = q.get("group_size").and_then(Value::as_i64).unwrap_or(-1);
                if group <= 0 {
                    return Err(Error::config(file, field("group_size"), format!("must be positive, got {group}")));
                }
                let sym = q.get("sym").and_then(Value::as_bool).unwrap_or(true);
                let desc_act = q.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
                Ok(Some(QuantizationConfig::Gptq { group: group as usize, sym, desc_act }))
            }
            other => Err(Error::unsupported(
                file,
                format!("quantization method `{other}` (supported: bitsandbytes 4-bit, gptq)"),
            )),
        }
    }

    /// The `quantization_config` object to write.
    pub fn to_json(&self) -> Value {
        match self {
            QuantizationConfig::Bnb4 { kind, double, compute_dtype, icq } => {
                let mut v = json!({
                    "quant_method": "bitsandbytes",
                    "_load_in_4bit": true,
                    "_load_in_8bit": false,
                    "load_in_4bit": true,
                    "load_in_8bit": false,
                    "bnb_4bit_quant_type": kind.name(),
                    "bnb_4bit_use_double_quant": double,
                    "bnb_4bit_compute_dtype": compute_dtype,
                    "bnb_4bit_quant_storage": "uint8",
                    "llm_int8_skip_modules": null,
                    "llm_int8_threshold": 6.0,
                    "llm_int8_has_fp16_weight": false,
                    "llm_int8_enable_fp32_cpu_offload": false,
                });
                if *icq {
                    v["qpeft_icq"] = json!(true);
                }
                v
            }
            QuantizationConfig::Gptq { group, sym, desc_act } => json!({
                "quant_method": "gptq",
                "bits": 4,
                "group_size": group,
                "sym": sym,
                "desc_act": desc_act,
                "damp_percent": 0.01,
                "static_groups": false,
                "true_sequential": true,
                "checkpoint_format": "gptq",
            }),
        }
    }
}

fn state_key(m: &str, kind: FourBit) -> String {
    format!("{m}.weight.quant_state.bitsandbytes__{}", kind.name())
}

/// Adds the tensors of linear `m` (e.g. `model.layers.0.self_attn.q_proj`) to `out`. `dtype` is the torch dtype
/// name recorded in the bitsandbytes quant state (the dtype the weight was quantized from).
pub fn write_linear(out: &mut BTreeMap<String, OwnedTensor>, m: &str, base: &BaseWeight, dtype: &str) {
    match base {
        // Not a bitsandbytes or GPTQ form: the caller writes the values.
        BaseWeight::Dense | BaseWeight::Ggml(_) => {}
        BaseWeight::Bnb4(q) => write_bnb4(out, m, q, dtype),
        BaseWeight::IcqNf4(q) => {
            write_bnb4(out, m, &q.nf4, dtype);
            out.insert(
                format!("{m}.weight.icq_tau_codes"),
                OwnedTensor::u8(vec![q.tau_codes.len()], q.tau_codes.clone()),
            );
            out.insert(format!("{m}.weight.icq_tau_scales"), OwnedTensor::f32(vec![q.tau_scales.len()], &q.tau_scales));
        }
        BaseWeight::Int4(q) => {
            let groups = q.groups();
            out.insert(format!("{m}.qweight"), OwnedTensor::i32(vec![q.in_dim / 8, q.out_dim], &q.qweight));
            match &q.float_zeros {
                Some(z) => out.insert(format!("{m}.zeros"), OwnedTensor::f16(vec![groups, q.out_dim], z)),
                None => out.insert(format!("{m}.qzeros"), OwnedTensor::i32(vec![groups, q.out_dim / 8], &q.qzeros)),
            };
            out.insert(format!("{m}.scales"), OwnedTensor::f16(vec![groups, q.out_dim], &q.scales));
            out.insert(format!("{m}.g_idx"), OwnedTensor::i32(vec![q.in_dim], &q.g_idx));
        }
    }
}

fn write_bnb4(out: &mut BTreeMap<String, OwnedTensor>, m: &str, q: &Bnb4, dtype: &str) {
    out.insert(format!("{m}.weight"), OwnedTensor::u8(vec![q.packed.len(), 1], q.packed.clone()));
    out.insert(format!("{m}.weight.quant_map"), OwnedTensor::f32(vec![16], &q.kind.table()));
    // The quant state is written exactly as bitsandbytes' Python `json.dumps` writes it: this key order,
    // ", " and ": " separators, and the offset as Python's repr of the f32 value widened to a double.
    let shape = q.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
    let mut state = format!(
        r#"{{"quant_type": "{}", "blocksize": {}, "dtype": "{dtype}", "shape": [{shape}]"#,
        q.kind.name(),
        q.block
    );
    match &q.absmax {
        Absmax::Plain(a) => {
            out.insert(format!("{m}.weight.absmax"), OwnedTensor::f32(vec![a.len()], a));
        }
        Absmax::Double { nested, offset } => {
            out.insert(format!("{m}.weight.absmax"), OwnedTensor::u8(vec![nested.codes.len()], nested.codes.clone()));
            out.insert(
                format!("{m}.weight.nested_absmax"),
                OwnedTensor::f32(vec![nested.absmax.len()], &nested.absmax),
            );
            out.insert(format!("{m}.weight.nested_quant_map"), OwnedTensor::f32(vec![256], &signed_dynamic()));
            state += &format!(
                r#", "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {}"#,
                nested.block,
                python_float_repr(*offset as f64)
            );
        }
    }
    state.push('}');
    let bytes = state.into_bytes();
    out.insert(state_key(m, q.kind), OwnedTensor::u8(vec![bytes.len()], bytes));
}

/// Python's `repr` of a float: the shortest round-trip digits, fixed notation for exponents in -4..16,
/// otherwise `d.ddde-05` style.
pub fn python_float_repr(v: f64) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Reads the quantized base of linear `m` ([out_dim, in_dim]) written by `write_linear` or by
/// transformers/AutoGPTQ.
pub fn read_linear(
    store: &SafetensorsStore,
    qc: &QuantizationConfig,
    m: &str,
    out_dim: usize,
    in_dim: usize,
) -> Result<BaseWeight> {
    let file = |k: &str| store.path_of(k).map(Path::to_path_buf).unwrap_or_default();
    let raw = |k: &str| {
        store
            .read_raw(k)
            .ok_or_else(|| Error::format(&file(&format!("{m}.weight")), format!("quantized tensor `{k}` is missing")))
    };
    match qc {
        QuantizationConfig::Bnb4 { kind, icq, .. } => {
            let q = read_bnb4(store, m, *kind, out_dim, in_dim)?;
            if !icq {
                return Ok(BaseWeight::Bnb4(q));
            }
            let codes_key = format!("{m}.weight.icq_tau_codes");
            let tau_codes = raw(&codes_key)?.to_u8(&codes_key)?;
            let scales_key = format!("{m}.weight.icq_tau_scales");
            let tau_scales = store.read_f32(&scales_key)?.map(|t| t.data).unwrap_or_default();
            let blocks = q.numel() / super::icq::ICQ_BLOCK;
            if tau_codes.len() != blocks || tau_scales.len() != blocks.div_ceil(super::icq::SUPER_BLOCK) {
                return Err(Error::format(
                    &file(&codes_key),
                    format!("ICQ τ tensors of `{m}` do not fit {blocks} blocks"),
                ));
            }
            Ok(BaseWeight::IcqNf4(IcqNf4 { nf4: q, tau_codes, tau_scales }))
        }
        QuantizationConfig::Gptq { group, sym, .. } => {
            let k = |s: &str| format!("{m}.{s}");
            // qpeft's merged QA-LoRA layers carry fp16 `zeros` instead of packed `qzeros`.
            let float_zeros = match store.read_raw(&k("zeros")) {
                Some(z) => Some(z.to_f16(&k("zeros"))?),
                None => None,
            };
            let qzeros = if float_zeros.is_some() { Vec::new() } else { raw(&k("qzeros"))?.to_i32(&k("qzeros"))? };
            let q = GptqInt4 {
                in_dim,
                out_dim,
                group: *group,
                sym: *sym,
                qweight: raw(&k("qweight"))?.to_i32(&k("qweight"))?,
                qzeros,
                scales: raw(&k("scales"))?.to_f16(&k("scales"))?,
                g_idx: raw(&k("g_idx"))?.to_i32(&k("g_idx"))?,
                float_zeros,
            };
            q.validate().map_err(|e| Error::format(&file(&k("qweight")), format!("`{m}`: {e}")))?;
            Ok(BaseWeight::Int4(q))
        }
    }
}

fn read_bnb4(store: &SafetensorsStore, m: &str, kind: FourBit, out_dim: usize, in_dim: usize) -> Result<Bnb4> {
    let wkey = format!("{m}.weight");
    let path = store.path_of(&wkey).map(Path::to_path_buf).unwrap_or_default();
    let bad = |msg: String| Error::format(&path, format!("`{m}`: {msg}"));
    let skey = state_key(m, kind);
    let state_bytes = store.read_raw(&skey).ok_or_else(|| bad(format!("`{skey}` is missing")))?.to_u8(&skey)?;
    let state: Value =
        serde_json::from_slice(&state_bytes).map_err(|e| bad(format!("quant state is not JSON: {e}")))?;
    let get_u = |k: &str| state.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let block = get_u("blocksize").ok_or_else(|| bad("quant state has no blocksize".into()))?;
    super::nf4::check_block(block).map_err(|e| bad(e.to_string()))?;
    let shape: Vec<usize> = state
        .get("shape")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect())
        .unwrap_or_default();
    if shape != [out_dim, in_dim] {
        return Err(bad(format!("quant state shape {shape:?}, but the config implies [{out_dim}, {in_dim}]")));
    }
    let n = out_dim * in_dim;
    let packed = store.read_raw(&wkey).ok_or_else(|| bad("packed weight missing".into()))?.to_u8(&wkey)?;
    if packed.len() != n.div_ceil(2) {
        return Err(bad(format!("{} packed bytes, expected {}", packed.len(), n.div_ceil(2))));
    }
    let table_key = format!("{m}.weight.quant_map");
    if let Some(t) = store.read_f32(&table_key)? {
        if t.data != kind.table() {
            return Err(bad(format!("`{table_key}` is not bitsandbytes' {} table", kind.name())));
        }
    }
    let blocks = n.div_ceil(block);
    let akey = format!("{m}.weight.absmax");
    let a = store.read_raw(&akey).ok_or_else(|| bad("absmax missing".into()))?;
    let absmax = if let Some(offset) = state.get("nested_offset").and_then(Value::as_f64) {
        let codes = a.to_u8(&akey)?;
        let nested_block = get_u("nested_blocksize").unwrap_or(NESTED_BLOCK);
        let nkey = format!("{m}.weight.nested_absmax");
        let nested_absmax = store.read_f32(&nkey)?.ok_or_else(|| bad("nested_absmax missing".into()))?.data;
        if let Some(map) = store.read_f32(&format!("{m}.weight.nested_quant_map"))? {
            if map.data != signed_dynamic() {
                return Err(bad("nested_quant_map is not bitsandbytes' signed dynamic map".into()));
            }
        }
        if codes.len() != blocks || nested_absmax.len() != blocks.div_ceil(nested_block) {
            return Err(bad(format!("double-quantized absmax does not fit {blocks} blocks")));
        }
        Absmax::Double {
            nested: Blockwise8 { codes, absmax: nested_absmax, block: nested_block },
            offset: offset as f32,
        }
    } else {
        let plain = store.read_f32(&akey)?.ok_or_else(|| bad("absmax missing".into()))?.data;
        if plain.len() != blocks {
            return Err(bad(format!("{} absmax values, expected {blocks}", plain.len())));
        }
        Absmax::Plain(plain)
    };
    Ok(Bnb4 { kind, shape, block, packed, absmax })
}
