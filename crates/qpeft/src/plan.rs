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

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::adapters::{AdapterConfig, Method};
use crate::arch::{Kind, ModelSpec, Proj};
use crate::error::{Error, Result};

/// The keys every rule may set (the `[adapter]` section sets the defaults).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Keys {
    pub method: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub dropout: Option<f32>,
    /// Q-BaRA's balance factor λ.
    pub lambda: Option<usize>,
    /// QA-HiRA's input pooling λ1 and output repeat λ2.
    pub l1: Option<usize>,
    pub l2: Option<usize>,
    /// QA-HiRA's init: "kaiming" (published) or "zero".
    pub hira_init: Option<String>,
    /// QA-LoRA's pooling group; must equal the int4 base's group size.
    pub group_size: Option<usize>,
    /// Hierarchical ranks, per-level α (default: `alpha` for every level, so s_i = α/r_i) and learning-rate scales.
    pub ranks: Option<Vec<usize>>,
    pub level_alpha: Option<Vec<f32>>,
    pub level_lr_scale: Option<Vec<f32>>,
    /// Adapt the selected modules (true) or leave them frozen (false).
    pub target: Option<bool>,
}

/// The names of `Keys`' fields: serde cannot refuse unknown keys through `flatten`, so `Plan` checks them.
const KEY_NAMES: [&str; 13] = [
    "method",
    "rank",
    "alpha",
    "dropout",
    "lambda",
    "l1",
    "l2",
    "hira_init",
    "group_size",
    "ranks",
    "level_alpha",
    "level_lr_scale",
    "target",
];

impl Keys {
    /// `over`'s keys on top of these.
    fn apply(&mut self, over: &Keys) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(
            method,
            rank,
            alpha,
            dropout,
            lambda,
            l1,
            l2,
            hira_init,
            group_size,
            ranks,
            level_alpha,
            level_lr_scale,
            target
        );
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
#[serde(deny_unknown_fields)]
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

/// The parts of a run config `plan` reads: `[adapter]` (other sections belong to the trainer).
#[derive(Debug, Deserialize)]
struct RunFile {
    adapter: AdapterSection,
}

/// A parsed adapter plan and the file it came from (for error messages).
#[derive(Clone, Debug)]
pub struct Plan {
    pub file: PathBuf,
    pub adapter: AdapterSection,
}

/// What the base weight of a module is, for rules that depend on it (QA-LoRA's group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseKind {
    /// Not known (parameter accounting from shapes alone).
    Any,
    Dense,
    Nf4,
    Int4 {
        group: usize,
    },
}

impl Plan {
    pub fn from_toml(file: &Path, text: &str) -> Result<Plan> {
        let run: RunFile =
            toml::from_str(text).map_err(|e| Error::config(file, "adapter", e.to_string().trim_end()))?;
        check_unknown_keys(file, text)?;
        let plan = Plan { file: file.to_path_buf(), adapter: run.adapter };
        plan.check_rules()?;
        Ok(plan)
    }

    pub fn read(file: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        Plan::from_toml(file, &text)
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
        if let Method::QaLora { group } = cfg.method {
            match base {
                BaseKind::Any => {}
                BaseKind::Int4 { group: g } if g == group => {}
                BaseKind::Int4 { group: g } => {
                    return Err(fail(format!("group_size = {group} but the int4 base uses groups of {g}")))
                }
                other => {
                    return Err(fail(format!("qa-lora needs an int4 (GPTQ) base, this module's base is {other:?}")))
                }
            }
        }
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

/// Refuses keys of `[adapter]` and its overrides that no rule knows (a typo would otherwise be ignored).
fn check_unknown_keys(file: &Path, text: &str) -> Result<()> {
    let doc: toml::Table =
        toml::from_str(text).map_err(|e| Error::config(file, "adapter", e.to_string().trim_end()))?;
    let Some(toml::Value::Table(adapter)) = doc.get("adapter") else { return Ok(()) };
    let unknown = |t: &toml::Table, extra: &[&str], field: &str| -> Result<()> {
        match t.keys().find(|k| !KEY_NAMES.contains(&k.as_str()) && !extra.contains(&k.as_str())) {
            Some(k) => Err(Error::config(
                file,
                format!("{field}.{k}"),
                format!("unknown key (known: {}, {})", extra.join(", "), KEY_NAMES.join(", ")),
            )),
            None => Ok(()),
        }
    };
    unknown(adapter, &["targets", "override"], "adapter")?;
    if let Some(toml::Value::Array(rules)) = adapter.get("override") {
        for (i, r) in rules.iter().enumerate() {
            if let toml::Value::Table(t) = r {
                unknown(t, &["where"], &format!("adapter.override[{i}]"))?;
            }
        }
    }
    Ok(())
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
    let need = |v: Option<usize>, key: &str, method: &str| v.ok_or_else(|| format!("{method} needs `{key}`"));
    let name = k.method.as_deref().unwrap_or("lora");
    let alpha = k.alpha.unwrap_or(16.0);
    let method = match name {
        "lora" | "qlora" => Method::Lora,
        "ir-qlora" => Method::IrQlora,
        "qa-lora" => Method::QaLora { group: need(k.group_size, "group_size", name)? },
        "q-bara" => Method::QBara { lambda: need(k.lambda, "lambda", name)? },
        "qa-hira" => Method::QaHira {
            l1: need(k.l1, "l1", name)?,
            l2: need(k.l2, "l2", name)?,
            zero_init: match k.hira_init.as_deref().unwrap_or("kaiming") {
                "kaiming" => false,
                "zero" => true,
                other => return Err(format!("hira_init = `{other}` is not `kaiming` or `zero`")),
            },
        },
        "hierarchical" => {
            let ranks = k.ranks.clone().ok_or_else(|| "hierarchical needs `ranks`".to_string())?;
            let alphas = k.level_alpha.clone().unwrap_or_else(|| vec![alpha; ranks.len()]);
            let lr_scales = k.level_lr_scale.clone().unwrap_or_else(|| vec![1.0; ranks.len()]);
            Method::Hierarchical { ranks, alphas, lr_scales }
        }
        other => {
            return Err(format!(
                "method = `{other}` is not one of lora, ir-qlora, qa-lora, q-bara, qa-hira, hierarchical"
            ))
        }
    };
    // A hierarchical adapter's rank is the sum of its levels' (only used for reporting).
    let rank = match &method {
        Method::Hierarchical { ranks, .. } => ranks.iter().sum(),
        _ => k.rank.unwrap_or(64),
    };
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
