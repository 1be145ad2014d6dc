//! Adapter directories in PEFT's format (methods.md §1.5): `adapter_config.json` + `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_A.weight` etc. What each method writes:
//!
//! - LoRA: a plain PEFT LoRA adapter. Per-module ranks and alphas go to `rank_pattern` / `alpha_pattern`, and a
//!   module set that differs between layers is listed module by module in `target_modules`.
//! - Hierarchical: one plain PEFT LoRA adapter per level in `level_0/`, `level_1/`, … (PEFT sums the outputs of
//!   active adapters, which is exactly the hierarchical adapter).
//! - IR-QLoRA, QA-LoRA, Q-BaRA, QA-HiRA: their own tensors (IR-QLoRA: LoRA plus the β scalars
//!   `lora_default_A_scale` / `lora_default_B_scale`; QA-LoRA: lora_A over pooled inputs; Q-BaRA: lora_A/B over
//!   pooled/repeated features; QA-HiRA: one `lora_A.weight` [out/λ2, in/λ1]) under the same key scheme. PEFT
//!   cannot run these; qpeft can, and `qpeft merge` turns them into plain weights.
//!
//! Every `adapter_config.json` also carries a `qpeft` object with each module's resolved configuration and the
//! base the adapter was trained on (`BaseRecord`: the model, a fingerprint of its weights, the quantization
//! recipe), which is what qpeft reads back (PEFT ignores unknown keys). Plain PEFT LoRA directories without it load
//! too.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::lora::LoraMethod;
use super::set::AdapterSet;
use super::{AdapterConfig, Method};
use crate::arch::{ModelSpec, Proj};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::formats::safetensors::{write_file, OwnedTensor, SafetensorsStore};

/// The resolved adapter of every module: [layer][index in `Proj::ALL`].
pub type Modules = Vec<Vec<Option<AdapterConfig>>>;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// One module's configuration as JSON (the `qpeft.modules` entries): the shared keys and the method's own.
pub fn config_to_json(c: &AdapterConfig) -> Value {
    let mut o = Map::from_iter([
        ("method".to_string(), json!(c.method.name())),
        ("rank".to_string(), json!(c.rank)),
        ("alpha".to_string(), json!(c.alpha)),
        ("dropout".to_string(), json!(c.dropout)),
    ]);
    o.extend(c.method.to_keys());
    Value::Object(o)
}

pub fn config_from_json(v: &Value) -> std::result::Result<AdapterConfig, String> {
    let o = v.as_object().ok_or_else(|| format!("{v} is not an object"))?;
    let num = |k: &str| o.get(k).and_then(Value::as_f64).ok_or_else(|| format!("missing number `{k}`"));
    let alpha = num("alpha")? as f32;
    let method = Method::from_keys(o.get("method").and_then(Value::as_str).unwrap_or_default(), o, alpha)?;
    Ok(AdapterConfig { method, rank: num("rank")? as usize, alpha, dropout: num("dropout").unwrap_or(0.0) as f32 })
}

/// The base an adapter was trained on: `qpeft eval --adapter` and the other commands rebuild it from this.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BaseRecord {
    /// The model as the run config named it (an HF directory, a .gguf file).
    pub model: String,
    /// `Checkpoint::fingerprint` of its weights.
    pub fingerprint: String,
    /// The run's `[quant]` section: how its linears became the frozen base.
    pub quant: Value,
}

/// The most frequent value (ties: the smallest), for PEFT's defaults with per-module patterns for the rest.
fn most_common<T: Clone + PartialOrd>(values: &[T]) -> Option<T> {
    let mut best: Option<(usize, T)> = None;
    for v in values {
        let n = values.iter().filter(|w| *w == v).count();
        if best.as_ref().is_none_or(|(bn, bv)| n > *bn || (n == *bn && v < bv)) {
            best = Some((n, v.clone()));
        }
    }
    best.map(|(_, v)| v)
}

/// PEFT LoRA config fields for modules with (rank, alpha) each: defaults plus patterns and the target list.
fn peft_lora_config(
    spec: &ModelSpec,
    modules: &[(usize, Proj, usize, f32)],
    dropout: f32,
    base_model: &str,
) -> Map<String, Value> {
    let r = most_common(&modules.iter().map(|m| m.2).collect::<Vec<_>>()).unwrap_or(0);
    let alpha = most_common(&modules.iter().map(|m| m.3).collect::<Vec<_>>()).unwrap_or(0.0);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for &(l, p, mr, ma) in modules {
        if mr != r {
            rank_pattern.insert(p.path(l), json!(mr));
        }
        if ma != alpha {
            alpha_pattern.insert(p.path(l), json!(ma));
        }
    }
    // Short names when a projection is adapted in every layer or none, else every module by full name.
    let uniform = Proj::ALL.iter().all(|&p| {
        let n = modules.iter().filter(|m| m.1 == p).count();
        n == 0 || n == spec.num_layers
    });
    let targets: Vec<String> = if uniform {
        Proj::ALL.iter().filter(|&&p| modules.iter().any(|m| m.1 == p)).map(|&p| p.short_name().to_string()).collect()
    } else {
        modules.iter().map(|&(l, p, ..)| p.path(l)).collect()
    };
    let v = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "modules_to_save": null, "layers_to_transform": null, "layers_pattern": null, "revision": null,
        "use_rslora": false, "use_dora": false,
    });
    v.as_object().expect("object").clone()
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    crate::formats::write_atomic(path, &serde_json::to_vec_pretty(v).expect("JSON serializes"))
}

/// Writes the adapters of `set` (configured by `modules`, trained on `base`) into `dir` (created if needed).
pub fn write_adapter<B: Backend>(
    dir: &Path,
    be: &B,
    spec: &ModelSpec,
    set: &AdapterSet<B>,
    modules: &Modules,
    base: &BaseRecord,
) -> Result<()> {
    let base_model = base.model.as_str();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let adapted: Vec<(usize, Proj, &AdapterConfig)> = modules
        .iter()
        .enumerate()
        .flat_map(|(l, row)| Proj::ALL.iter().zip(row).filter_map(move |(&p, c)| c.as_ref().map(|c| (l, p, c))))
        .collect();
    let mut qpeft_modules = Map::new();
    for &(l, p, c) in &adapted {
        qpeft_modules.insert(p.path(l), config_to_json(c));
    }
    let qpeft = json!({"format": 1, "modules": qpeft_modules, "base": base});
    let mut tensors = BTreeMap::new();
    for (name, p) in set.named_params() {
        tensors.insert(format!("{PREFIX}{name}"), OwnedTensor::f32(p.shape.clone(), &be.download(&p.value)?));
    }
    let dropout = adapted.first().map_or(0.0, |a| a.2.dropout);
    // A method saved as plain PEFT adapters per level (hierarchical) writes one directory per level.
    let levels: Option<Vec<Vec<(usize, f32)>>> = adapted.iter().map(|a| a.2.method.peft_levels()).collect();
    if let Some(levels) = levels.filter(|l| !l.is_empty()) {
        let count = levels.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..count {
            let members: Vec<(usize, Proj, usize, f32)> = adapted
                .iter()
                .zip(&levels)
                .filter_map(|(&(l, p, _), lv)| lv.get(i).map(|&(rank, alpha)| (l, p, rank, alpha)))
                .collect();
            let level = format!("level_{i}.");
            let level_tensors: BTreeMap<String, OwnedTensor> = tensors
                .iter()
                .filter(|(k, _)| k.contains(&format!(".{level}")))
                .map(|(k, t)| {
                    (
                        k.replace(&format!(".{level}"), "."),
                        OwnedTensor { dtype: t.dtype, shape: t.shape.clone(), bytes: t.bytes.clone() },
                    )
                })
                .collect();
            let sub = dir.join(format!("level_{i}"));
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
            write_file(&sub.join(WEIGHTS), &level_tensors)?;
            write_json(&sub.join(CONFIG), &Value::Object(peft_lora_config(spec, &members, dropout, base_model)))?;
        }
        let mut top = Map::new();
        top.insert("peft_type".into(), json!("LORA"));
        top.insert("base_model_name_or_path".into(), json!(base_model));
        top.insert("qpeft".into(), json!({"format": 1, "modules": qpeft_modules, "levels": count, "base": base}));
        return write_json(&dir.join(CONFIG), &Value::Object(top));
    }
    // PEFT's r/lora_alpha describe LoRA-shaped adapters; for the other methods they are informational.
    let members: Vec<(usize, Proj, usize, f32)> = adapted.iter().map(|&(l, p, c)| (l, p, c.rank, c.alpha)).collect();
    let mut config = peft_lora_config(spec, &members, dropout, base_model);
    config.insert("qpeft".into(), qpeft);
    write_file(&dir.join(WEIGHTS), &tensors)?;
    write_json(&dir.join(CONFIG), &Value::Object(config))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// The module configurations a plain PEFT LoRA config describes.
fn modules_from_peft(path: &Path, c: &Value, spec: &ModelSpec) -> Result<Modules> {
    let field = |k: &str| c.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return Err(Error::unsupported(path, format!("peft_type {other:?} (only LORA adapters load)"))),
    }
    for flag in ["use_dora", "use_rslora", "fan_in_fan_out", "use_qalora"] {
        if field(flag).and_then(Value::as_bool) == Some(true) {
            return Err(Error::unsupported(path, format!("`{flag}: true`")));
        }
    }
    let r = field("r").and_then(Value::as_u64).ok_or_else(|| Error::config(path, "r", "missing or not an integer"))?
        as usize;
    let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0) as f32;
    let targets: Vec<String> = match field("target_modules") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(Value::String(s)) => {
            return Err(Error::unsupported(
                path,
                format!("a regular-expression `target_modules` (`{s}`); list the modules"),
            ))
        }
        _ => return Err(Error::config(path, "target_modules", "missing")),
    };
    let layers: Option<Vec<usize>> = match field("layers_to_transform") {
        Some(Value::Array(a)) => Some(a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect()),
        Some(v) => v.as_u64().map(|x| vec![x as usize]),
        None => None,
    };
    let pattern = |k: &str, name: &str| -> Option<f64> {
        let map = field(k)?.as_object()?;
        // PEFT matches a pattern key against the module name's suffix; the longest matching key wins here.
        map.iter()
            .filter(|(key, _)| name == key.as_str() || name.ends_with(&format!(".{key}")))
            .max_by_key(|(key, _)| key.len())
            .and_then(|(_, v)| v.as_f64())
    };
    Ok((0..spec.num_layers)
        .map(|l| {
            Proj::ALL
                .iter()
                .map(|&p| {
                    let name = p.path(l);
                    let targeted = targets.iter().any(|t| name == *t || name.ends_with(&format!(".{t}")));
                    let in_layers = layers.as_ref().is_none_or(|ls| ls.contains(&l));
                    (targeted && in_layers).then(|| AdapterConfig {
                        method: LoraMethod.into(),
                        rank: pattern("rank_pattern", &name).map_or(r, |x| x as usize),
                        alpha: pattern("alpha_pattern", &name).map_or(alpha, |x| x as f32),
                        dropout: 0.0,
                    })
                })
                .collect()
        })
        .collect())
}

fn modules_from_qpeft(path: &Path, q: &Value, spec: &ModelSpec) -> Result<Modules> {
    let map =
        q.get("modules").and_then(Value::as_object).ok_or_else(|| Error::config(path, "qpeft.modules", "missing"))?;
    let mut modules: Modules = vec![vec![None; Proj::ALL.len()]; spec.num_layers];
    for (name, v) in map {
        let slot = (0..spec.num_layers)
            .flat_map(|l| Proj::ALL.iter().map(move |&p| (l, p)))
            .find(|&(l, p)| p.path(l) == *name)
            .ok_or_else(|| {
                Error::config(
                    path,
                    format!("qpeft.modules.{name}"),
                    format!("no such module in a {}-layer model", spec.num_layers),
                )
            })?;
        let cfg = config_from_json(v).map_err(|e| Error::config(path, format!("qpeft.modules.{name}"), e))?;
        modules[slot.0][slot.1 as usize] = Some(cfg);
    }
    Ok(modules)
}

/// The base the adapter in `dir` was trained on, if qpeft wrote it (PEFT's adapters and older ones record none).
pub fn read_base(dir: &Path) -> Result<Option<BaseRecord>> {
    let path = dir.join(CONFIG);
    match read_json(&path)?.get("qpeft").and_then(|q| q.get("base")) {
        None => Ok(None),
        Some(b) => {
            serde_json::from_value(b.clone()).map(Some).map_err(|e| Error::config(&path, "qpeft.base", e.to_string()))
        }
    }
}

/// The module configurations of the adapter in `dir`.
pub fn read_modules(dir: &Path, spec: &ModelSpec) -> Result<Modules> {
    let path = dir.join(CONFIG);
    let config = read_json(&path)?;
    match config.get("qpeft") {
        Some(q) => modules_from_qpeft(&path, q, spec),
        None => modules_from_peft(&path, &config, spec),
    }
}

/// Reads an adapter directory written by qpeft (any method) or by PEFT (LoRA) for a model of shape `spec`.
pub fn read_adapter<B: Backend + 'static>(dir: &Path, be: &B, spec: &ModelSpec) -> Result<(AdapterSet<B>, Modules)> {
    let modules = read_modules(dir, spec)?;
    let mut set = AdapterSet::build(be, spec, 0, |l, p| modules[l][p as usize].clone())
        .map_err(|e| Error::format(&dir.join(CONFIG), format!("the adapter does not fit this model: {e}")))?;
    load_values(dir, be, &mut set)?;
    Ok((set, modules))
}

/// Sets every parameter of `set` from the adapter files in `dir`; a missing, misshapen or unexpected tensor is
/// an error naming the file and the tensor.
pub fn load_values<B: Backend>(dir: &Path, be: &B, set: &mut AdapterSet<B>) -> Result<()> {
    let config = read_json(&dir.join(CONFIG))?;
    let files: Vec<(PathBuf, String)> = match config.get("qpeft").and_then(|q| q.get("levels")).and_then(Value::as_u64)
    {
        Some(n) => (0..n).map(|i| (dir.join(format!("level_{i}")).join(WEIGHTS), format!("level_{i}."))).collect(),
        None => vec![(dir.join(WEIGHTS), String::new())],
    };
    // name in the set → (file index, name in the file)
    let mut stored: HashMap<String, (usize, String)> = HashMap::new();
    let mut stores = Vec::new();
    for (i, (file, level)) in files.iter().enumerate() {
        if !file.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (adapter_model.bin is a torch pickle: re-save it with safe_serialization=True)"
            } else {
                ""
            };
            return Err(Error::format(file, format!("missing{hint}")));
        }
        let store = SafetensorsStore::open_files(std::slice::from_ref(file))?;
        for (name, _, _) in store.list() {
            let key = name.strip_prefix(PREFIX).unwrap_or(&name);
            // Level files hold `….q_proj.lora_A.weight`; the set names it `….q_proj.level_i.lora_A.weight`.
            let set_name = match key.rsplit_once(".lora_") {
                Some((module, rest)) if !level.is_empty() => format!("{module}.{level}lora_{rest}"),
                _ => key.to_string(),
            };
            stored.insert(set_name, (i, name.clone()));
        }
        stores.push(store);
    }
    for (name, p) in set.named_params_mut() {
        let (i, key) =
            stored.remove(&name).ok_or_else(|| Error::format(&files[0].0, format!("missing tensor for `{name}`")))?;
        let t = stores[i].read_f32(&key)?.ok_or_else(|| Error::format(&files[i].0, format!("cannot read `{key}`")))?;
        if t.shape != p.shape {
            return Err(Error::format(
                &files[i].0,
                format!("`{key}` has shape {:?}, the configuration gives {:?}", t.shape, p.shape),
            ));
        }
        p.value = be.upload(&t.data)?;
    }
    if let Some((_, (i, key))) = stored.iter().min_by_key(|(k, _)| k.as_str()) {
        return Err(Error::format(
            &files[*i].0,
            format!("unexpected tensor `{key}` (does this adapter belong to this model?)"),
        ));
    }
    Ok(())
}
