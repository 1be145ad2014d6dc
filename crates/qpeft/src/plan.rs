//! Per-layer adapter rules: the run config's `[adapter]` section, with `[[adapter.override]]` rules selected
//! by module name, kind (`attn` = q,k,v,o; `mlp` = gate,up,down) and depth (`first-half`, `second-half`,
//! layer indices and ranges), resolved into one `AdapterConfig` per module; and parameter accounting.
//!
//! Rules apply in order and later ones win, key by key. Depth halves: with L layers, `first-half` is layers
//! 0..⌊L/2⌋ (nearest the input) and `second-half` the rest — the papers' depth groups 1 and 2.
//!
//! ```toml
//! [adapter]
//! method = "q-bara"
//! rank = 64
//! alpha = 16
//! lambda = 2
//! [[adapter.override]]
//! where = { kind = "mlp", depth = "second-half" }
//! rank = 32
//! [[adapter.override]]
//! where = { name = ["k_proj", "v_proj"], layers = "0-3" }
//! target = false
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::adapters::{AdapterConfig, BaseKind, Method};
use crate::arch::{Kind, ModelSpec, Proj};
use crate::config_doc::{self, parse_section, Edits};
use crate::error::{Error, Result};

/// The keys every rule may set (the `[adapter]` section sets the defaults): the shared ones, and the methods' own
/// (`lambda`, `group_size`, …: each method's `MethodKind::KEYS`), which only the registry knows.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Keys {
    pub method: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub dropout: Option<f32>,
    /// Adapt the selected modules (true) or leave them frozen (false).
    pub target: Option<bool>,
    /// The methods' keys, as set.
    #[serde(flatten)]
    pub method_keys: BTreeMap<String, toml::Value>,
}

/// The shared keys (the methods' own are `Method::all_keys`).
const SHARED_KEYS: [&str; 5] = ["method", "rank", "alpha", "dropout", "target"];

impl Keys {
    /// `over`'s keys on top of these.
    fn apply(&mut self, over: &Keys) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(method, rank, alpha, dropout, target);
        self.method_keys.extend(over.method_keys.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// A key no rule knows (a typo would otherwise be ignored), with the known ones.
    fn check_names(&self, file: &Path, field: &str, extra: &[&str]) -> Result<()> {
        match self.method_keys.keys().find(|k| !Method::knows_key(k)) {
            Some(k) => {
                let mut known: Vec<&str> = extra.to_vec();
                known.extend(SHARED_KEYS);
                known.extend(Method::all_keys());
                Err(Error::config(file, format!("{field}.{k}"), format!("unknown key (known: {})", known.join(", "))))
            }
            None => Ok(()),
        }
    }
}

/// Which modules a rule applies to; every given selector must match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Where {
    /// Module names (`q_proj`, …): one or a list.
    pub name: Option<OneOrMany<String>>,
    /// `attn` or `mlp`.
    pub kind: Option<String>,
    /// `first-half`, `second-half` or `all`.
    pub depth: Option<String>,
    /// Layer indices: a number, "3", "0-7", "0-3,8,10-11", or a list of numbers.
    pub layers: Option<Layers>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    Index(usize),
    List(Vec<usize>),
    Spec(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Override {
    #[serde(rename = "where")]
    pub selector: Where,
    #[serde(flatten)]
    pub keys: Keys,
}

/// The `[adapter]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AdapterSection {
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    #[serde(flatten)]
    pub keys: Keys,
    #[serde(default, rename = "override")]
    pub overrides: Vec<Override>,
}

fn default_targets() -> Vec<String> {
    Proj::ALL.iter().map(|p| p.short_name().to_string()).collect()
}

impl AdapterSection {
    fn check_key_names(&self, file: &Path) -> Result<()> {
        self.keys.check_names(file, "adapter", &["targets", "override"])?;
        // `targets` decides which modules [adapter] adapts; a `target` beside it would be silently overruled.
        if let Some(t) = self.keys.target {
            return Err(Error::config(
                file,
                "adapter.target",
                format!(
                    "`target = {t}` belongs in an [[adapter.override]] (where = …); at this level list the adapted \
                     modules in `targets = [\"q_proj\", …]`"
                ),
            ));
        }
        for (i, o) in self.overrides.iter().enumerate() {
            o.keys.check_names(file, &format!("adapter.override[{i}]"), &["where"])?;
        }
        Ok(())
    }
}

/// A parsed adapter plan and the file it came from (for error messages).
#[derive(Clone, Debug)]
pub struct Plan {
    pub file: PathBuf,
    pub adapter: AdapterSection,
}

impl Plan {
    pub fn from_toml(file: &Path, text: &str) -> Result<Plan> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| Error::format(file, e.to_string().trim_end()))?;
        let section = doc.get("adapter").ok_or_else(|| Error::config(file, "adapter", "missing section"))?;
        let adapter: AdapterSection = parse_section(file, "adapter", section)?;
        adapter.check_key_names(file)?;
        let plan = Plan { file: file.to_path_buf(), adapter };
        plan.check_rules()?;
        Ok(plan)
    }

    pub fn read(file: &Path) -> Result<Plan> {
        Plan::compose(&[file.to_path_buf()], &Edits::default())
    }

    /// The `[adapter]` section of a base config with fragments merged over it and the command line's edits
    /// (`config_doc`).
    pub fn compose(files: &[PathBuf], edits: &Edits) -> Result<Plan> {
        let (base, mut doc) = config_doc::compose(files)?;
        edits.apply(&mut doc)?;
        let text = toml::to_string(&doc).map_err(|e| Error::format(&base, e.to_string()))?;
        Plan::from_toml(&base, &text).map_err(|e| edits.attribute(e))
    }

    /// This plan without its overrides (the baseline of a key-variable study).
    pub fn baseline(&self) -> Plan {
        Plan { file: self.file.clone(), adapter: AdapterSection { overrides: Vec::new(), ..self.adapter.clone() } }
    }

    /// Selector values that are wrong regardless of the model.
    fn check_rules(&self) -> Result<()> {
        for name in &self.adapter.targets {
            if !Proj::ALL.iter().any(|&p| p.short_name() == name) {
                return Err(Error::config(
                    &self.file,
                    "adapter.targets",
                    format!("unknown module `{name}` (known: {})", default_targets().join(", ")),
                ));
            }
        }
        for (i, o) in self.adapter.overrides.iter().enumerate() {
            let field = format!("adapter.override[{i}].where");
            let w = &o.selector;
            if let Some(k) = &w.kind {
                if k != "attn" && k != "mlp" {
                    return Err(Error::config(
                        &self.file,
                        format!("{field}.kind"),
                        format!("`{k}` is not `attn` or `mlp`"),
                    ));
                }
            }
            if let Some(d) = &w.depth {
                if !["first-half", "second-half", "all"].contains(&d.as_str()) {
                    return Err(Error::config(
                        &self.file,
                        format!("{field}.depth"),
                        format!("`{d}` is not `first-half`, `second-half` or `all`"),
                    ));
                }
            }
            for n in names(&w.name) {
                if !Proj::ALL.iter().any(|&p| p.short_name() == n) {
                    return Err(Error::config(&self.file, format!("{field}.name"), format!("unknown module `{n}`")));
                }
            }
            if let Some(Layers::Spec(s)) = &w.layers {
                parse_layers(s).map_err(|e| Error::config(&self.file, format!("{field}.layers"), e))?;
            }
        }
        Ok(())
    }

    /// The adapter of layer `l`'s linear `p` (None: frozen), after every matching rule, checked against the
    /// module's shape and base. Errors name the file, the module and the rules that produced the value.
    pub fn resolve(&self, spec: &ModelSpec, l: usize, p: Proj, base: BaseKind) -> Result<Option<AdapterConfig>> {
        let mut keys = self.adapter.keys.clone();
        keys.target = Some(self.adapter.targets.iter().any(|t| t == p.short_name()));
        let mut rules = vec!["adapter".to_string()];
        for (i, o) in self.adapter.overrides.iter().enumerate() {
            if matches(&o.selector, spec.num_layers, l, p) {
                keys.apply(&o.keys);
                rules.push(format!("adapter.override[{i}]"));
            }
        }
        if keys.target != Some(true) {
            return Ok(None);
        }
        let module = format!("model.layers.{l}.{}", p.module());
        let fail = |msg: String| Error::config(&self.file, rules.join(" + "), format!("{module}: {msg}"));
        let cfg = to_config(&keys).map_err(fail)?;
        let (out_dim, in_dim) = p.dims(spec);
        cfg.check(in_dim, out_dim).map_err(fail)?;
        cfg.method.check_base(base).map_err(fail)?;
        Ok(Some(cfg))
    }

    /// Every module's resolved adapter, layer by layer in `Proj::ALL` order.
    pub fn resolve_all(
        &self,
        spec: &ModelSpec,
        base: impl Fn(usize, Proj) -> BaseKind,
    ) -> Result<Vec<Vec<Option<AdapterConfig>>>> {
        (0..spec.num_layers)
            .map(|l| Proj::ALL.iter().map(|&p| self.resolve(spec, l, p, base(l, p))).collect())
            .collect()
    }
}

fn names(n: &Option<OneOrMany<String>>) -> Vec<&str> {
    match n {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.as_str()],
        Some(OneOrMany::Many(v)) => v.iter().map(String::as_str).collect(),
    }
}

fn matches(w: &Where, layers: usize, l: usize, p: Proj) -> bool {
    let name_ok = w.name.is_none() || names(&w.name).contains(&p.short_name());
    let kind_ok = w.kind.as_deref().is_none_or(|k| (k == "attn") == (p.kind() == Kind::Attention));
    let depth_ok = match w.depth.as_deref() {
        Some("first-half") => l < layers / 2,
        Some("second-half") => l >= layers / 2,
        _ => true,
    };
    let layers_ok = match &w.layers {
        None => true,
        Some(Layers::Index(i)) => *i == l,
        Some(Layers::List(v)) => v.contains(&l),
        Some(Layers::Spec(s)) => parse_layers(s).is_ok_and(|r| r.iter().any(|&(a, b)| a <= l && l <= b)),
    };
    name_ok && kind_ok && depth_ok && layers_ok
}

/// "0-3,8,10-11" → inclusive ranges.
fn parse_layers(s: &str) -> std::result::Result<Vec<(usize, usize)>, String> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("`{s}`: `{t}` is not a layer index"));
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("`{s}`: range {a}-{b} is empty"));
                    }
                    Ok((a, b))
                }
                None => num(part).map(|i| (i, i)),
            }
        })
        .collect()
}

fn to_config(k: &Keys) -> std::result::Result<AdapterConfig, String> {
    let alpha = k.alpha.unwrap_or(16.0);
    let keys = serde_json::to_value(&k.method_keys).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(keys) = keys else { unreachable!("a map serializes to an object") };
    let method = Method::from_keys(k.method.as_deref().unwrap_or("lora"), &keys, alpha)?;
    let rank = method.reported_rank(k.rank.unwrap_or(64));
    Ok(AdapterConfig { method, rank, alpha, dropout: k.dropout.unwrap_or(0.0) })
}

/// Trainable parameters of a resolved plan, split by kind and depth half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub attn_first: usize,
    pub attn_second: usize,
    pub mlp_first: usize,
    pub mlp_second: usize,
}

impl Counts {
    pub fn attn(&self) -> usize {
        self.attn_first + self.attn_second
    }
    pub fn mlp(&self) -> usize {
        self.mlp_first + self.mlp_second
    }
    pub fn first(&self) -> usize {
        self.attn_first + self.mlp_first
    }
    pub fn second(&self) -> usize {
        self.attn_second + self.mlp_second
    }
    pub fn total(&self) -> usize {
        self.attn() + self.mlp()
    }
}

/// Counts the trainable parameters `plan` puts on a model of shape `spec`.
pub fn count(plan: &Plan, spec: &ModelSpec) -> Result<Counts> {
    let mut c = Counts::default();
    for (l, row) in plan.resolve_all(spec, |_, _| BaseKind::Any)?.into_iter().enumerate() {
        for (p, cfg) in Proj::ALL.iter().zip(row) {
            let Some(cfg) = cfg else { continue };
            let (out_dim, in_dim) = p.dims(spec);
            let n = cfg.trainable(in_dim, out_dim);
            let first = l < spec.num_layers / 2;
            match (p.kind() == Kind::Attention, first) {
                (true, true) => c.attn_first += n,
                (true, false) => c.attn_second += n,
                (false, true) => c.mlp_first += n,
                (false, false) => c.mlp_second += n,
            }
        }
    }
    Ok(c)
}
