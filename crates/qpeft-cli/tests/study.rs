//! `qpeft study` end to end on a tiny model: a study killed with SIGKILL mid-cell and run again ends with every
//! cell's results identical to an uninterrupted study's; two workers taking `--shard 1/2` and `--shard 2/2` of one
//! directory give the same report as one worker.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ok, qpeft, root};
use serde_json::Value;

/// Two variants × two seeds on the tiny llama, evaluated on 4 ARC-Easy items.
fn study(dir: &Path) -> PathBuf {
    let base = dir.join("base.toml");
    std::fs::write(
        &base,
        r#"[model]
path = "tests/fixtures/gguf/tiny-llama-spm.gguf"
[quant]
format = "nf4"
[adapter]
method = "lora"
rank = 4
alpha = 8
dropout = 0.1
[data]
builtin = "dates"
builtin_size = 40
eval_size = 6
[train]
steps = 8
batch_size = 2
grad_accum = 2
lr = 1e-3
checkpoint_every = 2
[eval]
max_samples = 6
"#,
    )
    .unwrap();
    let file = dir.join("study.toml");
    std::fs::write(
        &file,
        r#"[study]
name = "tiny"
base = "base.toml"
seeds = [0, 1]
baseline = "r 4"
[eval]
tasks = ["arc_easy"]
limit = 4
[[variant]]
name = "r 4"
[[variant]]
name = "MLP r 2"
set = { "adapter.override" = [{ where = { kind = "mlp" }, rank = 2 }] }
[[finding]]
text = "r 4 beats MLP r 2"
better = "r 4"
worse = "MLP r 2"
metric = "heldout_loss"
"#,
    )
    .unwrap();
    file
}

/// Every cell's results without wall-clock numbers: its adapter bytes and its metrics records' losses and scores.
fn results(dir: &Path) -> Vec<(String, Vec<u8>, Vec<String>)> {
    let mut out = Vec::new();
    let mut cells: Vec<PathBuf> =
        std::fs::read_dir(dir.join("cells")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cells.sort();
    for c in cells {
        let adapter = std::fs::read(c.join("adapter/adapter_model.safetensors")).unwrap();
        let metrics = std::fs::read_to_string(c.join("metrics.jsonl")).unwrap();
        let records = metrics
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "tokens_per_s"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v.to_string()
            })
            .collect();
        out.push((c.file_name().unwrap().to_string_lossy().into_owned(), adapter, records));
    }
    out
}

/// The report's rows without wall-clock metrics.
fn report(dir: &Path) -> Vec<Value> {
    ok(&qpeft(&["study", "report", dir.to_str().unwrap()]));
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("report/results.json")).unwrap()).unwrap();
    r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| !["train_time_s", "tokens_per_s", "peak_memory_mib"].contains(&row["metric"].as_str().unwrap()))
        .cloned()
        .collect()
}

#[test]
fn a_killed_study_reruns_to_the_same_results_and_shards_share_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let file = study(d.path());
    let file = file.to_str().unwrap();
    let plan = ok(&qpeft(&["study", "plan", file]));
    assert!(plan.contains("4 cells") && plan.contains("MLP r 2"), "{plan}");

    // Uninterrupted.
    let whole = d.path().join("whole");
    ok(&qpeft(&["--threads", "1", "study", "run", file, "--out", whole.to_str().unwrap()]));
    let want = results(&whole);
    assert_eq!(want.len(), 4);
    let want_report = report(&whole);
    let md = std::fs::read_to_string(whole.join("report/report.md")).unwrap();
    assert!(md.contains("| MLP r 2 |") && md.contains("r 4 beats MLP r 2"), "{md}");
    for chart in ["heldout_loss.svg", "loss_curves.svg", "results.csv", "cells.csv"] {
        assert!(whole.join("report").join(chart).exists(), "{chart}");
    }

    // Killed with SIGKILL in the middle of the second cell, then the same command again.
    let killed = d.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "study", "run", file, "--out", killed.to_str().unwrap()])
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let second = killed.join("cells/r-4__seed-1/checkpoints/step-0000002");
    let start = Instant::now();
    while !second.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the second cell never checkpointed");
        assert!(child.try_wait().unwrap().is_none(), "the study ended before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("cells/r-4__seed-1/summary.json").exists(), "killed mid-cell");
    // The cell records its numerics; continuing it on others is refused (a result would mix two precisions).
    let numerics = std::fs::read_to_string(killed.join("cells/r-4__seed-1/numerics")).unwrap();
    let other = if numerics == "cpu:f32" { "cpu:bf16" } else { "cpu:f32" };
    let e = qpeft(&["--threads", "1", "study", "run", file, "--out", killed.to_str().unwrap(), "--devices", other]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains(&format!("was started on {numerics} and this worker runs {other}")),
        "{err}"
    );
    ok(&qpeft(&["--threads", "1", "study", "run", file, "--out", killed.to_str().unwrap()]));
    assert!(results(&killed) == want, "a killed and rerun study differs from an uninterrupted one");
    assert_eq!(report(&killed), want_report);

    // Stopped with SIGTERM (a scheduler's stop) in the second cell: it checkpoints that cell's step, exits with 143,
    // and the same command again ends as the uninterrupted study.
    let stopped = d.path().join("stopped");
    let child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "study", "run", file, "--out", stopped.to_str().unwrap()])
        .current_dir(root())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let second = stopped.join("cells/r-4__seed-1/checkpoints/step-0000002");
    let start = Instant::now();
    while !second.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the second cell never checkpointed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted (SIGTERM)") && err.contains("run the same command again"), "{err}");
    assert!(!stopped.join("cells/r-4__seed-1/summary.json").exists(), "stopped mid-cell");
    assert!(!stopped.join("cells/r-4__seed-1.lock").exists(), "the cell's lock is released");
    ok(&qpeft(&["--threads", "1", "study", "run", file, "--out", stopped.to_str().unwrap()]));
    assert!(results(&stopped) == want, "a stopped and rerun study differs from an uninterrupted one");

    // Two workers with a shard each, at the same time, on one directory.
    let shared = d.path().join("shared");
    let worker = |k: &str| {
        Command::new(env!("CARGO_BIN_EXE_qpeft"))
            .args(["--threads", "1", "study", "run", file, "--out", shared.to_str().unwrap(), "--shard", k])
            .current_dir(root())
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| worker("1/2"));
        let b = s.spawn(|| worker("2/2"));
        (a.join().unwrap(), b.join().unwrap())
    });
    ok(&a);
    ok(&b);
    assert!(results(&shared) == want, "sharded workers give other results");
    assert_eq!(report(&shared), want_report);
    let e = qpeft(&["study", "run", file, "--shard", "3/2"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("--shard `3/2`"));
}
