//! The study file: a base run config and edits for every cell, named variants (config fragments, inline edits or
//! both), optional axes whose product multiplies the variants, seeds, a baseline, the evaluation every cell ends
//! with, and the findings the report checks. Every cell is composed and validated here, before anything runs.
//!
//! ```toml
//! [study]
//! name = "Experiment 1: rank by layer type"
//! base = "../configs/qlora.toml"          # paths are relative to the study file
//! seeds = [0, 1, 2]                       # each sets `seed_keys` (default ["train.seed"])
//! baseline = "baseline"
//! set = { "train.steps" = 200 }           # edits of every cell (dotted keys, TOML values)
//!
//! [eval]                                  # the evaluation at the end of every cell
//! tasks = ["mmlu", "arc_easy"]
//! limit = 50                              # items per task / questions per MMLU subject
//! mmlu_split = "test"
//!
//! [[variant]]
//! name = "baseline"
//! [[variant]]
//! name = "mlp r/2"
//! fragments = ["../configs/study/rank-mlp-div2.toml"]
//! set = { "adapter.dropout" = 0.0 }
//!
//! [[axis]]                                # optional: every variant at every value
//! keys = ["adapter.rank", "adapter.alpha"] # one key, or several set together (paired lists)
//! values = [[16, 32], [64, 16]]
//!
//! [[finding]]                             # a stated result the report checks
//! text = "Cutting MLP ranks costs less MMLU accuracy than the same cut on attention"
//! better = "mlp r/2"
//! worse = "attn r/2"
//! metric = "mmlu_acc"
//! ```
//!
//! A cell's config is the base, the variant's fragments merged over it (`config_doc::merge_into`), `[study] set`,
//! the axis values, the variant's `set`, the command line's `--set`, the seed, and the study's evaluation, in that
//! order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::arch::ModelSpec;
use crate::config_doc::Edits;
use crate::error::{Error, Result};
use crate::model::Checkpoint;
use crate::plan::{count, Counts};
use crate::train::config::RunConfig;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    study: Header,
    #[serde(default)]
    eval: EvalSpec,
    #[serde(default, rename = "variant")]
    variants: Vec<VariantSpec>,
    #[serde(default, rename = "axis")]
    axes: Vec<AxisSpec>,
    #[serde(default, rename = "finding")]
    findings: Vec<Finding>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: String,
    base: PathBuf,
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    #[serde(default = "default_seed_keys")]
    seed_keys: Vec<String>,
    baseline: String,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
    #[serde(default)]
    unset: Vec<String>,
}

fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}

fn default_seed_keys() -> Vec<String> {
    vec!["train.seed".into()]
}

/// The evaluation every cell ends with (its `[eval]` tasks at the last step).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Items per zero-shot task, questions per MMLU subject (unset: all).
    pub limit: Option<usize>,
    /// Questions per MMLU subject (unset: `limit`).
    pub mmlu_limit: Option<usize>,
    pub mmlu_split: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantSpec {
    name: String,
    #[serde(default)]
    fragments: Vec<PathBuf>,
    #[serde(default)]
    set: BTreeMap<String, toml::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AxisSpec {
    key: Option<String>,
    keys: Option<Vec<String>>,
    values: Vec<toml::Value>,
}

/// A stated result: `metric` of `better` is at least that of `worse` (for a loss, at most); with `same`, the two do
/// not differ significantly.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    pub text: String,
    pub better: String,
    pub worse: String,
    pub metric: String,
    #[serde(default)]
    pub same: bool,
}

/// One training run of the study.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The run directory's name under `cells/`: variant, axis values and seed, e.g. `mlp-r-2__rank-16__seed-0`.
    pub id: String,
    pub variant: String,
    /// (key, value) of each axis.
    pub axis: Vec<(String, String)>,
    pub seed: u64,
    pub config: RunConfig,
}

impl Cell {
    /// The variant and axis values without the seed: the cells of one group differ only by seed.
    pub fn group(&self) -> String {
        let mut g = self.variant.clone();
        for (k, v) in &self.axis {
            g += &format!(" {k}={v}");
        }
        g
    }
}

/// A parsed, fully resolved study.
#[derive(Clone, Debug)]
pub struct Study {
    pub file: PathBuf,
    pub name: String,
    pub baseline: String,
    pub variants: Vec<String>,
    pub seeds: Vec<u64>,
    pub eval: EvalSpec,
    pub findings: Vec<Finding>,
    /// Every cell: variants × axis values × seeds, in that order.
    pub cells: Vec<Cell>,
}

/// `name` as a path component: lowercase letters, digits and dashes.
fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').to_string()
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The study file `file` as a TOML table, its `extends` chain merged under it: `[study] extends = "FILE"` names
/// another study file in the same folder whose every key this one inherits (a companion at another scale sets only
/// `name`, `set` and `[eval]`); tables are merged key by key, so `set` adds to the parent's edits.
fn read_doc(file: &Path, depth: usize) -> Result<toml::Table> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let doc: toml::Table = toml::from_str(&text).map_err(|e| Error::format(file, e.to_string().trim_end()))?;
    let Some(parent) = doc.get("study").and_then(|s| s.get("extends")).and_then(toml::Value::as_str) else {
        return Ok(doc);
    };
    let parent = PathBuf::from(parent);
    if parent.components().count() != 1 || depth > 8 {
        return Err(Error::config(
            file,
            "study.extends",
            format!("`{}` must name a study file in the same folder (and not loop)", parent.display()),
        ));
    }
    let mut base = read_doc(&file.with_file_name(&parent), depth + 1)?;
    for key in ["variant", "axis", "finding"] {
        if doc.contains_key(key) {
            return Err(Error::config(file, key, format!("a study that extends another inherits its [[{key}]]")));
        }
    }
    crate::config_doc::merge_into(&mut base, doc);
    if let Some(toml::Value::Table(s)) = base.get_mut("study") {
        s.remove("extends");
    }
    Ok(base)
}

/// `KEY=VALUE` edits from a table of dotted keys.
fn sets(table: &BTreeMap<String, toml::Value>) -> Vec<String> {
    table.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

impl Study {
    /// Reads and resolves `file`; `sets` (`KEY=VALUE`, from the command line) edit every cell after the variant's own
    /// edits.
    pub fn read(file: &Path, sets: &[String]) -> Result<Study> {
        let doc = read_doc(file, 0)?;
        let spec: StudyFile = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let path = e.path().to_string();
            Error::config(file, if path == "." { "study file".into() } else { path }, e.into_inner().to_string())
        })?;
        Study::resolve(file, spec, sets)
    }

    fn resolve(file: &Path, spec: StudyFile, cli_sets: &[String]) -> Result<Study> {
        let dir = file.parent().unwrap_or(Path::new("."));
        let bad = |field: String, msg: String| Error::config(file, field, msg);
        if spec.variants.is_empty() {
            return Err(bad("variant".into(), "a study needs at least one [[variant]]".into()));
        }
        if spec.study.seeds.is_empty() {
            return Err(bad("study.seeds".into(), "no seeds".into()));
        }
        let mut names = std::collections::BTreeSet::new();
        for v in &spec.variants {
            if !names.insert(v.name.as_str()) {
                return Err(bad(format!("variant `{}`", v.name), "two variants have this name".into()));
            }
            if slug(&v.name).is_empty() {
                return Err(bad(format!("variant `{}`", v.name), "the name needs a letter or digit".into()));
            }
        }
        if !names.contains(spec.study.baseline.as_str()) {
            return Err(bad(
                "study.baseline".into(),
                format!(
                    "`{}` is not a variant (variants: {})",
                    spec.study.baseline,
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for f in &spec.findings {
            for side in [&f.better, &f.worse] {
                if !spec.variants.iter().any(|v| &v.name == side) {
                    return Err(bad(format!("finding `{}`", f.text), format!("`{side}` is not a variant")));
                }
            }
        }
        // The axes' (key, value) lists; their product multiplies the variants.
        let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = Vec::new();
        for (i, a) in spec.axes.iter().enumerate() {
            let keys = match (&a.key, &a.keys) {
                (Some(k), None) => vec![k.clone()],
                (None, Some(ks)) if !ks.is_empty() => ks.clone(),
                _ => return Err(bad(format!("axis[{i}]"), "give `key` or `keys`".into())),
            };
            let mut points = Vec::new();
            for v in &a.values {
                let vals = if keys.len() == 1 {
                    vec![v.clone()]
                } else {
                    match v {
                        toml::Value::Array(vs) if vs.len() == keys.len() => vs.clone(),
                        other => {
                            return Err(bad(
                                format!("axis[{i}].values"),
                                format!("{other} is not a list of {} values (keys {})", keys.len(), keys.join(", ")),
                            ))
                        }
                    }
                };
                points.push(keys.iter().cloned().zip(vals).collect());
            }
            if points.is_empty() {
                return Err(bad(format!("axis[{i}].values"), "no values".into()));
            }
            axes.push(points);
        }
        let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        for points in &axes {
            combos = combos
                .iter()
                .flat_map(|c| points.iter().map(move |p| c.iter().cloned().chain(p.iter().cloned()).collect()))
                .collect();
        }

        let base = dir.join(&spec.study.base);
        let mut cells = Vec::new();
        for v in &spec.variants {
            let mut files = vec![base.clone()];
            files.extend(v.fragments.iter().map(|f| dir.join(f)));
            for f in &files {
                if !f.exists() {
                    return Err(bad(format!("variant `{}`", v.name), format!("{}: no such file", f.display())));
                }
            }
            for combo in &combos {
                for &seed in &spec.study.seeds {
                    let mut set = sets(&spec.study.set);
                    set.extend(combo.iter().map(|(k, val)| format!("{k}={val}")));
                    set.extend(sets(&v.set));
                    set.extend(cli_sets.iter().cloned());
                    set.extend(spec.study.seed_keys.iter().map(|k| format!("{k}={seed}")));
                    set.extend(eval_edits(&spec.eval));
                    let edits = Edits { unset: spec.study.unset.clone(), set };
                    let config = RunConfig::compose(&files, &edits)
                        .map_err(|e| bad(format!("variant `{}`", v.name), e.to_string()))?;
                    let axis: Vec<(String, String)> =
                        combo.iter().map(|(k, val)| (k.clone(), value_text(val))).collect();
                    let mut id = slug(&v.name);
                    for (k, val) in &axis {
                        id += &format!("__{}-{}", slug(k.rsplit('.').next().unwrap_or(k)), slug(val));
                    }
                    id += &format!("__seed-{seed}");
                    cells.push(Cell { id, variant: v.name.clone(), axis, seed, config });
                }
            }
        }
        Ok(Study {
            file: file.to_path_buf(),
            name: spec.study.name,
            baseline: spec.study.baseline,
            variants: spec.variants.iter().map(|v| v.name.clone()).collect(),
            seeds: spec.study.seeds,
            eval: spec.eval,
            findings: spec.findings,
            cells,
        })
    }

    /// The baseline cell of `cell`'s axis values and seed.
    pub fn baseline_of(&self, cell: &Cell) -> Option<&Cell> {
        self.cells.iter().find(|c| c.variant == self.baseline && c.axis == cell.axis && c.seed == cell.seed)
    }

    /// Checks every cell against a model of shape `spec` (ranks, λ and groups must fit its linears) and counts its
    /// trainable parameters.
    pub fn plan(&self, spec: &ModelSpec) -> Result<Vec<Counts>> {
        self.cells
            .iter()
            .map(|c| {
                count(&c.config.plan, spec)
                    .map_err(|e| Error::config(&self.file, format!("variant `{}`", c.variant), e.to_string()))
            })
            .collect()
    }

    /// The model shape of the cells: a built-in `arch`, or the (first) cell's model read without its weights.
    pub fn model_spec(&self, arch: Option<&str>) -> Result<ModelSpec> {
        match arch {
            Some(a) => ModelSpec::builtin(a).ok_or_else(|| {
                Error::Invalid(format!("--arch `{a}` is not built in (known: {})", crate::arch::BUILTIN.join(", ")))
            }),
            None => Ok(Checkpoint::open(&self.cells[0].config.model.path)?.spec),
        }
    }
}

/// The study's `[eval]` as edits of a cell's `[eval]`: its tasks run once, at the end of training.
fn eval_edits(e: &EvalSpec) -> Vec<String> {
    let tasks: Vec<String> = e.tasks.iter().map(|t| format!("{t:?}")).collect();
    let mut out = vec![format!("eval.tasks=[{}]", tasks.join(", ")), "eval.tasks_before_training=false".into()];
    if let Some(n) = e.limit {
        out.push(format!("eval.task_limit={n}"));
    }
    if let Some(n) = e.mmlu_limit {
        out.push(format!("eval.mmlu_limit={n}"));
    }
    if let Some(s) = &e.mmlu_split {
        out.push(format!("eval.mmlu_split={s:?}"));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs_are_path_components() {
        assert_eq!(super::slug("MLP r/2"), "mlp-r-2");
        assert_eq!(super::slug("  (8, 8) on attn "), "8-8-on-attn");
        assert_eq!(super::slug("32,16,16"), "32-16-16");
    }
}
