//! `qpeft eval` and `[eval] tasks` end to end on a tiny model: benchmark tasks run inside training (scores in
//! metrics.jsonl, every item in evals/), an adapter from the trainer changes the scores, the held-out split of a
//! run config is a task, and bad task lists or data folders give clear errors.

mod common;

use std::path::{Path, PathBuf};

use common::{ok, qpeft};
use serde_json::Value;

const MODEL: &str = "tests/fixtures/gguf/tiny-llama-spm.gguf";

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{MODEL}"
[quant]
format = "none"
[adapter]
method = "lora"
rank = 8
alpha = 16
[data]
builtin = "dates"
builtin_size = 40
eval_size = 8
[train]
out_dir = {:?}
steps = 6
batch_size = 4
lr = 1e-2
checkpoint_every = 0
[eval]
every = 3
max_samples = 8
tasks = ["arc_easy", "winogrande"]
task_limit = 5
"#,
        dir.join("run")
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Per-item log-likelihoods of a task in a report.
fn lls(report: &Value, task: &str) -> Vec<Vec<f64>> {
    report[task]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| it["ll"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect()
}

#[test]
fn tasks_run_during_training_and_the_trained_adapter_changes_the_scores() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let out = ok(&qpeft(&["--threads", "2", "train", "--config", cfg.to_str().unwrap()]));
    assert!(out.contains("arc_easy_acc"), "{out}");
    let run = d.path().join("run");
    let metrics: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<&Value> = metrics.iter().filter(|r| r.get("tasks").is_some()).collect();
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 3, 6]);
    for r in &evals {
        let t = &r["tasks"];
        for key in ["arc_easy_acc", "arc_easy_acc_norm", "winogrande_acc"] {
            let v = t[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {t}"));
            assert!((0.0..=1.0).contains(&v));
        }
        assert!(t.get("winogrande_acc_norm").is_none(), "WinoGrande has no acc_norm");
    }
    let at_start = read_json(&run.join("evals/step-000000.json"));
    let at_end = read_json(&run.join("evals/step-000006.json"));
    assert_eq!(at_start["arc_easy"]["items"].as_array().unwrap().len(), 5);

    // The base model alone scores exactly what the untrained adapter (B = 0) scored at step 0 …
    let base_json = d.path().join("base.json");
    let tuned_json = d.path().join("tuned.json");
    ok(&qpeft(&[
        "eval",
        MODEL,
        "--tasks",
        "arc_easy,winogrande",
        "--limit",
        "5",
        "--json",
        base_json.to_str().unwrap(),
    ]));
    let adapter = run.join("adapter");
    let table = ok(&qpeft(&[
        "eval",
        MODEL,
        "--adapter",
        adapter.to_str().unwrap(),
        "--tasks",
        "arc_easy,winogrande",
        "--limit",
        "5",
        "--json",
        tuned_json.to_str().unwrap(),
    ]));
    assert!(table.contains("arc_easy") && table.contains("acc_norm"), "{table}");
    let (base, tuned) = (read_json(&base_json), read_json(&tuned_json));
    let close = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(1.0))
    };
    for task in ["arc_easy", "winogrande"] {
        assert!(close(&lls(&base, task), &lls(&at_start, task)), "{task}: base ≠ step 0");
        // … and the trained adapter scores what training's final evaluation scored, which is not the base's.
        assert!(close(&lls(&tuned, task), &lls(&at_end, task)), "{task}: --adapter ≠ final evaluation");
        assert!(!close(&lls(&tuned, task), &lls(&base, task)), "{task}: the adapter did not change the scores");
    }

    // The run's held-out split as a task: the loss training logged at step 0 (the adapter starts as the identity).
    // (Another report file: base.json holds results with --limit 5, and a report keeps one set of settings.)
    let held_json = d.path().join("held.json");
    let held = ok(&qpeft(&[
        "eval",
        MODEL,
        "--tasks",
        "heldout",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        held_json.to_str().unwrap(),
    ]));
    assert!(held.contains("perplexity"), "{held}");
    let logged =
        metrics.iter().find(|r| r["step"] == 0 && r.get("eval_loss").is_some()).unwrap()["eval_loss"].as_f64().unwrap();
    let measured = read_json(&held_json)["heldout"]["loss"].as_f64().unwrap();
    assert!((logged - measured).abs() < 1e-4, "held-out loss {measured} vs logged {logged}");
}

/// Without an adapter, `--config RUN.toml` evaluates the base that config trains on: with an NF4 [quant], the
/// held-out loss is the trainer's loss before training on that base, not the stored Q4 weights' one.
#[test]
fn heldout_without_an_adapter_evaluates_the_configs_quantized_base() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let cfg_s = cfg.to_str().unwrap();
    let nf4 = ["--set", "quant.format=\"nf4\"", "--set", "eval.tasks=[]", "--set", "train.steps=1"];
    ok(&qpeft(&[&["train", "--config", cfg_s][..], &nf4[..]].concat()));
    let metrics: Vec<Value> = std::fs::read_to_string(d.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged =
        metrics.iter().find(|r| r["step"] == 0 && r.get("eval_loss").is_some()).unwrap()["eval_loss"].as_f64().unwrap();
    let measure = |extra: &[&str]| {
        let json = d.path().join(format!("held-{}.json", extra.len()));
        let args =
            [&["eval", MODEL, "--tasks", "heldout", "--config", cfg_s, "--json", json.to_str().unwrap()][..], extra]
                .concat();
        let out = qpeft(&args);
        ok(&out);
        (read_json(&json)["heldout"]["loss"].as_f64().unwrap(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (quantized, said) = measure(&nf4[..2]);
    assert!((quantized - logged).abs() < 1e-4, "NF4 base: {quantized} vs the trainer's {logged}");
    assert!(said.contains("re-quantized to nf4") && said.contains("[quant]"), "{said}");
    let (stored, _) = measure(&[]);
    assert!((stored - quantized).abs() > 1e-3, "the stored and the NF4 base give the same loss: {stored}");
}

#[test]
fn bad_task_lists_and_missing_data_are_clear_errors() {
    let err = |args: &[&str]| {
        let out = qpeft(args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["eval", MODEL, "--tasks", "arc_easy,squad"]);
    assert!(e.contains("unknown task `squad`") && e.contains("hellaswag"), "{e}");
    let e = err(&["eval", MODEL, "--tasks", "heldout"]);
    assert!(e.contains("--config"), "{e}");
    let e = err(&["eval", MODEL, "--tasks", "piqa", "--data-dir", "/nonexistent/datasets"]);
    assert!(e.contains("/nonexistent/datasets/piqa/valid.jsonl"), "{e}");
    let d = tempfile::tempdir().unwrap();

    // A run that fails at its second task keeps the first task's report.
    let data = d.path().join("datasets");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink(common::root().join("../shared/datasets/arc_easy"), data.join("arc_easy")).unwrap();
    let report = d.path().join("partial.json");
    let e = err(&[
        "eval",
        MODEL,
        "--tasks",
        "arc_easy,piqa",
        "--limit",
        "3",
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(e.contains("piqa/valid.jsonl"), "{e}");
    let kept = read_json(&report);
    assert_eq!(kept["arc_easy"]["items"].as_array().map(Vec::len), Some(3), "{kept}");
    assert!(kept.get("piqa").is_none());

    let cfg = config(d.path());
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"winogrande\"]", "\"winogrand\"]");
    std::fs::write(&cfg, text).unwrap();
    let e = err(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(e.contains("eval.tasks") && e.contains("winogrand"), "{e}");
}

/// `qpeft eval --json OUT` resumes: a run stopped by SIGINT keeps its finished tasks in OUT (exit 130), the same
/// command again runs only the rest, and a report made with other settings is refused and left as it was.
#[test]
fn an_interrupted_evaluation_resumes_from_its_finished_tasks() {
    use std::time::{Duration, Instant};
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("report.json");
    let out_s = out.to_str().unwrap();
    let args = ["--threads", "1", "eval", MODEL, "--tasks", "arc_easy,hellaswag", "--json", out_s];
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(args)
        .current_dir(common::root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The report appears when the first task (all of ARC-Easy) is done; HellaSwag (40,168 choices) is then running.
    let start = Instant::now();
    while !out.exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "no report appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped during hellaswag") && err.contains(out_s), "{err}");
    let first = read_json(&out);
    assert_eq!(first.as_object().unwrap().keys().collect::<Vec<_>>(), ["arc_easy"]);
    assert_eq!(first["arc_easy"]["settings"]["model"], MODEL);

    // Again, with ARC-Easy and a small PIQA: ARC-Easy is kept (not run again), PIQA runs.
    let args = ["--threads", "1", "eval", MODEL, "--tasks", "arc_easy,piqa", "--json", out_s];
    let o = qpeft(&args);
    let stdout = ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("arc_easy: finished in an earlier run"));
    assert!(stdout.contains("arc_easy") && stdout.contains("piqa"), "{stdout}");
    let second = read_json(&out);
    assert_eq!(second["arc_easy"], first["arc_easy"], "the finished task is kept as it was");
    assert_eq!(lls(&second, "piqa").len(), 1838);

    // Other settings (a limit) would mix two evaluations in one report: refused, the report untouched.
    let bytes = std::fs::read(&out).unwrap();
    let o = qpeft(&["eval", MODEL, "--tasks", "arc_easy", "--limit", "5", "--json", out_s]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("other settings") && err.contains("\"limit\":5"), "{err}");
    assert!(std::fs::read(&out).unwrap() == bytes);
}
