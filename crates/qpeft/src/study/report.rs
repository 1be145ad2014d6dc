//! The study report: for every variant (with its axis values) and metric, the mean over seeds with a 95% t-interval,
//! and against the baseline the paired difference with a 95% interval and a p-value — a seeded paired bootstrap over
//! seeds and evaluation items for the benchmark accuracies (every item's prediction is in the cells' `evals/`), a
//! paired t-test over seeds for the rest. Written to `DIR/report/`: report.md, results.csv, cells.csv, results.json and
//! SVG charts (one bar chart per headline metric with interval whiskers, the baseline marked; the loss curves).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use super::run::{cell_dir, cell_state, CellState};
use super::spec::{Cell, Study};
use super::stats::{paired_bootstrap, paired_t, t_interval, Estimate, PairedItems};
use crate::error::{Error, Result};
use crate::formats::write_atomic;
use crate::svg;
use crate::train::metrics::Record;
use crate::train::run_dir::{RunDir, EVALS, SUMMARY};

/// Bootstrap resamples and their seed (fixed: the same cells give the same report).
const RESAMPLES: usize = 2000;
const BOOTSTRAP_SEED: u64 = 0x5EED_2026;

/// What one finished cell measured: scalar metrics, and per benchmark metric the per-item scores.
#[derive(Clone, Debug, Default)]
struct Measured {
    scalars: BTreeMap<String, f64>,
    items: BTreeMap<String, Vec<f64>>,
    /// (step, training loss).
    curve: Vec<(f64, f64)>,
}

/// Metrics where lower is better.
fn lower_is_better(metric: &str) -> bool {
    metric.contains("loss") || metric.ends_with("_s") || metric.contains("memory") || metric == "trainable"
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

/// Reads what a finished cell measured.
fn measure(dir: &Path, cell: &Cell) -> Result<Measured> {
    let d = cell_dir(dir, cell);
    let run = RunDir::open(&d)?;
    let summary = read_json(&d.join(SUMMARY))?;
    let mut m = Measured::default();
    let num = |k: &str| summary.get(k).and_then(Value::as_f64);
    for (key, name) in [("trainable", "trainable"), ("seconds", "train_time_s"), ("tokens_per_s", "tokens_per_s")] {
        if let Some(v) = num(key) {
            m.scalars.insert(name.into(), v);
        }
    }
    if let Some(v) = num("peak_rss_mib") {
        m.scalars.insert("peak_memory_mib".into(), v);
    }
    let records = run.metrics()?;
    let losses: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| if let Record::Step(s) = r { Some((s.step as f64, s.loss)) } else { None })
        .collect();
    // The final training loss: the mean over the last tenth of the steps (at least one), less noisy than one step.
    let tail = (losses.len() / 10).max(1).min(losses.len());
    if tail > 0 {
        let last = &losses[losses.len() - tail..];
        m.scalars.insert("train_loss".into(), last.iter().map(|p| p.1).sum::<f64>() / tail as f64);
    }
    m.curve = losses;
    let last_eval = records.iter().rev().find_map(|r| if let Record::Eval(e) = r { Some(e.clone()) } else { None });
    let Some(ev) = last_eval else { return Ok(m) };
    m.scalars.insert("heldout_loss".into(), ev.eval_loss);
    let reports_path = d.join(EVALS).join(format!("step-{:06}.json", ev.step));
    if !reports_path.exists() {
        return Ok(m);
    }
    let reports = read_json(&reports_path)?;
    let Some(reports) = reports.as_object() else { return Ok(m) };
    let mut zs_acc = Vec::new();
    for (task, r) in reports {
        let items = r.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
        let score = |pred: &str| -> Vec<f64> {
            items
                .iter()
                .map(|it| (it.get(pred).and_then(Value::as_u64) == it.get("gold").and_then(Value::as_u64)) as u8 as f64)
                .collect()
        };
        if task == "mmlu" {
            let acc = score("pred");
            m.scalars.insert("mmlu_acc".into(), acc.iter().sum::<f64>() / acc.len().max(1) as f64);
            m.items.insert("mmlu_acc".into(), acc);
            if let Some(v) = r.get("macro_avg").and_then(Value::as_f64) {
                m.scalars.insert("mmlu_acc_macro".into(), v);
            }
            for (cat, a) in r.get("categories").and_then(Value::as_object).into_iter().flatten() {
                let (c, t) = (a["correct"].as_f64().unwrap_or(0.0), a["total"].as_f64().unwrap_or(0.0));
                // "Other (business, health, misc.)" → mmlu_other.
                let name = cat.split(" (").next().unwrap_or(cat).to_lowercase().replace(' ', "_");
                m.scalars.insert(format!("mmlu_{name}"), c / t.max(1.0));
            }
        } else {
            let acc = score("pred");
            m.scalars.insert(format!("{task}_acc"), acc.iter().sum::<f64>() / acc.len().max(1) as f64);
            m.items.insert(format!("{task}_acc"), acc);
            if items.first().is_some_and(|it| it.get("pred_norm").is_some()) {
                let norm = score("pred_norm");
                m.scalars.insert(format!("{task}_acc_norm"), norm.iter().sum::<f64>() / norm.len().max(1) as f64);
                m.items.insert(format!("{task}_acc_norm"), norm);
            }
            // The task's headline metric (HEADLINE) enters the average.
            if let Some(h) = HEADLINE.iter().find(|h| h.starts_with(&format!("{task}_acc"))) {
                zs_acc.push(m.scalars[*h]);
            }
        }
    }
    if !zs_acc.is_empty() {
        m.scalars.insert("zero_shot_avg".into(), zs_acc.iter().sum::<f64>() / zs_acc.len() as f64);
    }
    Ok(m)
}

/// Per (axis values, seed): a variant's value of a metric and its per-item scores, where it has them.
type SeedValues = BTreeMap<(String, u64), (f64, Option<Vec<f64>>)>;
/// Per-seed item scores of two variants.
type ItemPairs = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// One variant group's result for one metric.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub group: String,
    pub variant: String,
    pub metric: String,
    /// Over seeds.
    pub value: Estimate,
    /// Paired difference against the baseline (None for the baseline itself).
    pub vs_baseline: Option<Estimate>,
    /// Relative to the baseline's mean, in percent.
    pub change_percent: Option<f64>,
}

/// A finding checked on this study.
#[derive(Clone, Debug, Serialize)]
pub struct FindingResult {
    pub text: String,
    pub metric: String,
    pub difference: Estimate,
    pub verdict: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub study: String,
    pub cells_done: usize,
    pub cells: usize,
    pub rows: Vec<Row>,
    pub findings: Vec<FindingResult>,
}

/// The report of the finished cells of `study` in `dir`.
pub fn build(study: &Study, dir: &Path) -> Result<Report> {
    let mut measured: BTreeMap<String, Measured> = BTreeMap::new();
    for c in &study.cells {
        if cell_state(dir, c) == CellState::Done {
            measured.insert(c.id.clone(), measure(dir, c)?);
        }
    }
    let mut groups: Vec<(String, String, Vec<&Cell>)> = Vec::new();
    for c in &study.cells {
        match groups.iter_mut().find(|g| g.0 == c.group()) {
            Some(g) => g.2.push(c),
            None => groups.push((c.group(), c.variant.clone(), vec![c])),
        }
    }
    let metrics: Vec<String> = {
        let mut all: Vec<String> = measured.values().flat_map(|m| m.scalars.keys().cloned()).collect();
        all.sort();
        all.dedup();
        all
    };
    let mut rows = Vec::new();
    for (group, variant, cells) in &groups {
        for metric in &metrics {
            // (this cell's value, its baseline's value, this cell's items, the baseline's items) per seed.
            let mut own = Vec::new();
            let mut pairs = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for c in cells {
                let Some(v) = measured.get(&c.id).and_then(|m| m.scalars.get(metric)) else { continue };
                own.push(*v);
                let Some(b) = study.baseline_of(c) else { continue };
                let Some(bm) = measured.get(&b.id) else { continue };
                let Some(bv) = bm.scalars.get(metric) else { continue };
                pairs.0.push(*v);
                pairs.1.push(*bv);
                if let (Some(i), Some(bi)) = (measured[&c.id].items.get(metric), bm.items.get(metric)) {
                    if i.len() == bi.len() {
                        pairs.2.push(i.clone());
                        pairs.3.push(bi.clone());
                    }
                }
            }
            if own.is_empty() {
                continue;
            }
            let value = t_interval(&own);
            let is_baseline = *variant == study.baseline;
            let vs_baseline = (!is_baseline && !pairs.0.is_empty()).then(|| {
                if !pairs.2.is_empty() && pairs.2.len() == pairs.0.len() {
                    paired_bootstrap(&PairedItems { variant: &pairs.2, baseline: &pairs.3 }, RESAMPLES, BOOTSTRAP_SEED)
                } else {
                    paired_t(&pairs.0, &pairs.1)
                }
            });
            let base_mean = (!pairs.1.is_empty()).then(|| pairs.1.iter().sum::<f64>() / pairs.1.len() as f64);
            let change_percent = match (&vs_baseline, base_mean) {
                (Some(d), Some(b)) if b != 0.0 => Some(100.0 * d.mean / b.abs()),
                _ => None,
            };
            rows.push(Row {
                group: group.clone(),
                variant: variant.clone(),
                metric: metric.clone(),
                value,
                vs_baseline,
                change_percent,
            });
        }
    }
    let findings = study
        .findings
        .iter()
        .map(|f| {
            let per_seed = |variant: &str| -> SeedValues {
                study
                    .cells
                    .iter()
                    .filter(|c| c.variant == variant)
                    .filter_map(|c| {
                        let m = measured.get(&c.id)?;
                        let v = *m.scalars.get(&f.metric)?;
                        Some(((format!("{:?}", c.axis), c.seed), (v, m.items.get(&f.metric).cloned())))
                    })
                    .collect()
            };
            let (better, worse) = (per_seed(&f.better), per_seed(&f.worse));
            let keys: Vec<_> = better.keys().filter(|k| worse.contains_key(*k)).cloned().collect();
            let sign = if lower_is_better(&f.metric) { -1.0 } else { 1.0 };
            let items: Option<ItemPairs> = keys
                .iter()
                .map(|k| Some((better[k].1.clone()?, worse[k].1.clone()?)))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().unzip());
            let mut d = match items {
                Some((b, w)) if !b.is_empty() && b.iter().zip(&w).all(|(x, y)| x.len() == y.len()) => {
                    paired_bootstrap(&PairedItems { variant: &b, baseline: &w }, RESAMPLES, BOOTSTRAP_SEED)
                }
                _ => paired_t(
                    &keys.iter().map(|k| better[k].0).collect::<Vec<_>>(),
                    &keys.iter().map(|k| worse[k].0).collect::<Vec<_>>(),
                ),
            };
            if sign < 0.0 {
                (d.mean, d.lo, d.hi) = (-d.mean, d.hi.map(|h| -h), d.lo.map(|l| -l));
            }
            let verdict = if keys.is_empty() {
                "not measured yet".to_string()
            } else if f.same {
                if d.significant() {
                    "does not hold: the difference is significant at 95%".to_string()
                } else {
                    "holds (no significant difference at 95%)".to_string()
                }
            } else if d.mean > 0.0 && d.significant() {
                "holds (significant at 95%)".to_string()
            } else if d.mean > 0.0 {
                "points the stated way, but the interval includes no difference".to_string()
            } else if d.significant() {
                "does not hold: the opposite is significant at 95%".to_string()
            } else {
                "does not hold (no significant difference)".to_string()
            };
            FindingResult { text: f.text.clone(), metric: f.metric.clone(), difference: d, verdict }
        })
        .collect();
    Ok(Report { study: study.name.clone(), cells_done: measured.len(), cells: study.cells.len(), rows, findings })
}

fn fmt_est(e: &Estimate, scale: f64, digits: usize) -> String {
    match (e.lo, e.hi) {
        (Some(lo), Some(hi)) => {
            format!("{:.d$} [{:.d$}, {:.d$}]", e.mean * scale, lo * scale, hi * scale, d = digits)
        }
        _ => format!("{:.d$}", e.mean * scale, d = digits),
    }
}

/// (scale, digits) for showing a metric: accuracies in percent.
fn display(metric: &str) -> (f64, usize) {
    if metric.contains("acc") || metric.starts_with("mmlu_") || metric == "zero_shot_avg" {
        (100.0, 2)
    } else if metric == "trainable" {
        (1.0, 0)
    } else {
        (1.0, 4)
    }
}

/// Each benchmark's headline metric, in the papers' order: MMLU's accuracy, and each zero-shot task's `acc_norm`
/// where lm-evaluation-harness reports it as the task's number (HellaSwag, ARC-Challenge, OpenBookQA), else `acc`.
/// `zero_shot_avg` is the mean of the zero-shot ones.
const HEADLINE: [&str; 8] = [
    "mmlu_acc",
    "hellaswag_acc_norm",
    "piqa_acc",
    "winogrande_acc",
    "arc_easy_acc",
    "arc_challenge_acc_norm",
    "boolq_acc",
    "openbookqa_acc_norm",
];

/// The headline metrics first, in the papers' order, then the training metrics, then the rest by name.
fn ordered(metrics: &[String]) -> Vec<String> {
    let rank = |m: &str| -> usize {
        const AFTER: [&str; 5] = ["zero_shot_avg", "heldout_loss", "train_loss", "trainable", "tokens_per_s"];
        HEADLINE.iter().chain(&AFTER).position(|f| *f == m).unwrap_or(HEADLINE.len() + AFTER.len())
    };
    let mut v = metrics.to_vec();
    v.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    v
}

/// Writes the report files into `dir/report/` and returns their paths.
pub fn write(study: &Study, dir: &Path, report: &Report) -> Result<Vec<PathBuf>> {
    let out = dir.join("report");
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let mut files = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = out.join(name);
        write_atomic(&p, bytes)?;
        files.push(p);
        Ok(())
    };
    put("results.json", &serde_json::to_vec_pretty(report).expect("reports serialize"))?;

    let mut csv = String::from("group,variant,metric,mean,lo95,hi95,n,diff,diff_lo95,diff_hi95,p,change_percent\n");
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
    for r in &report.rows {
        let d = r.vs_baseline;
        csv += &format!(
            "{:?},{:?},{},{},{},{},{},{},{},{},{},{}\n",
            r.group,
            r.variant,
            r.metric,
            r.value.mean,
            opt(r.value.lo),
            opt(r.value.hi),
            r.value.n,
            opt(d.map(|d| d.mean)),
            opt(d.and_then(|d| d.lo)),
            opt(d.and_then(|d| d.hi)),
            opt(d.and_then(|d| d.p)),
            opt(r.change_percent)
        );
    }
    put("results.csv", csv.as_bytes())?;

    let mut cells_csv = String::from("cell,variant,seed,metric,value\n");
    for c in &study.cells {
        if cell_state(dir, c) != CellState::Done {
            continue;
        }
        for (k, v) in measure(dir, c)?.scalars {
            cells_csv += &format!("{},{:?},{},{k},{v}\n", c.id, c.variant, c.seed);
        }
    }
    put("cells.csv", cells_csv.as_bytes())?;

    let metrics: Vec<String> = {
        let mut m: Vec<String> = report.rows.iter().map(|r| r.metric.clone()).collect();
        m.sort();
        m.dedup();
        ordered(&m)
    };
    let groups: Vec<String> = {
        let mut g: Vec<String> = Vec::new();
        for r in &report.rows {
            if !g.contains(&r.group) {
                g.push(r.group.clone());
            }
        }
        g
    };
    let row = |g: &str, m: &str| report.rows.iter().find(|r| r.group == g && r.metric == m);
    let mut md = format!(
        "# {}\n\n{} of {} cells finished. Means over seeds with 95% t-intervals; Δ is the paired difference from the \
         baseline (`{}`) with its 95% interval and p-value (benchmark accuracies: seeded paired bootstrap over seeds and \
         items, {RESAMPLES} resamples; other metrics: paired t-test over seeds). Accuracies in percent; ✱ marks a \
         difference whose interval excludes 0.\n\n",
        report.study, report.cells_done, report.cells, study.baseline
    );
    let table = |md: &mut String, cols: &[&String]| {
        *md += &format!(
            "| variant | {} |\n|---|{}\n",
            cols.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(" | "),
            "---|".repeat(cols.len())
        );
        for g in &groups {
            let mut line = format!("| {g} |");
            for m in cols {
                let (scale, digits) = display(m);
                line += &match row(g, m) {
                    Some(r) => {
                        let mut s = format!(" {}", fmt_est(&r.value, scale, digits));
                        if let Some(d) = &r.vs_baseline {
                            let star = if d.significant() { "✱" } else { "" };
                            s += &format!(
                                "<br>Δ {}{star} (p {:.3})",
                                fmt_est(d, scale, digits),
                                d.p.unwrap_or(f64::NAN)
                            );
                        }
                        s + " |"
                    }
                    None => " – |".to_string(),
                };
            }
            *md += &line;
            *md += "\n";
        }
        *md += "\n";
    };
    let is_accuracy = |m: &str| m.contains("acc") || m.starts_with("mmlu_") || m == "zero_shot_avg";
    md += "## Benchmarks\n\n";
    let bench: Vec<&String> =
        metrics.iter().filter(|m| HEADLINE.contains(&m.as_str()) || m.as_str() == "zero_shot_avg").collect();
    table(&mut md, &bench);
    md += "## More accuracies (the other zero-shot metric of each task, MMLU by category)\n\n";
    let more: Vec<&String> = metrics.iter().filter(|m| is_accuracy(m) && !bench.contains(m)).collect();
    table(&mut md, &more);
    md += "## Training\n\n";
    let training: Vec<&String> = metrics.iter().filter(|m| !is_accuracy(m)).collect();
    table(&mut md, &training);
    if !report.findings.is_empty() {
        md += "## The papers' findings on this model at this scale\n\n";
        for f in &report.findings {
            let (scale, digits) = display(&f.metric);
            if f.difference.n == 0 {
                md += &format!("- **{}** — {}.\n", f.text, f.verdict);
                continue;
            }
            md += &format!(
                "- **{}** — {}: difference in `{}` {} (p {:.3}).\n",
                f.text,
                f.verdict,
                f.metric,
                fmt_est(&f.difference, scale, digits),
                f.difference.p.unwrap_or(f64::NAN)
            );
        }
        md += "\n";
    }
    md += "## Charts\n\n";
    for m in
        metrics.iter().filter(|m| ["mmlu_acc", "zero_shot_avg", "heldout_loss", "train_loss"].contains(&m.as_str()))
    {
        let (scale, _) = display(m);
        let bars: Vec<svg::Bar> = groups
            .iter()
            .filter_map(|g| {
                let r = row(g, m)?;
                Some(svg::Bar {
                    label: g.clone(),
                    value: r.value.mean * scale,
                    lo: r.value.lo.map(|v| v * scale),
                    hi: r.value.hi.map(|v| v * scale),
                    baseline: r.variant == study.baseline,
                })
            })
            .collect();
        let name = format!("{m}.svg");
        let from_zero = !lower_is_better(m);
        put(&name, svg::bars(&format!("{} — {m}", report.study), m, &bars, from_zero).as_bytes())?;
        md += &format!("![{m}]({name})\n\n");
    }
    let curves: Vec<(String, Vec<(f64, f64)>)> = groups
        .iter()
        .filter_map(|g| {
            let cells: Vec<&Cell> = study.cells.iter().filter(|c| &c.group() == g).collect();
            let measured: Vec<Vec<(f64, f64)>> = cells
                .iter()
                .filter(|c| cell_state(dir, c) == CellState::Done)
                .filter_map(|c| measure(dir, c).ok().map(|m| m.curve))
                .collect();
            let n = measured.iter().map(Vec::len).min()?;
            (n > 0).then(|| {
                let mean = (0..n)
                    .map(|i| (measured[0][i].0, measured.iter().map(|c| c[i].1).sum::<f64>() / measured.len() as f64))
                    .collect();
                (g.clone(), mean)
            })
        })
        .collect();
    if !curves.is_empty() {
        let series: Vec<svg::Series> =
            curves.iter().map(|(g, points)| svg::Series { name: g, points, dots: false }).collect();
        let title = format!("{} — training loss (mean over seeds)", report.study);
        put("loss_curves.svg", svg::lines(&title, "optimizer step", "loss", &series).as_bytes())?;
        md += "![training loss](loss_curves.svg)\n";
    }
    put("report.md", md.as_bytes())?;
    Ok(files)
}
