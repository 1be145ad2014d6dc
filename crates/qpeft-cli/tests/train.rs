//! `qpeft train` end to end on a tiny model: a run killed with SIGKILL and resumed ends bit-identical to an
//! uninterrupted one; a full disk during a checkpoint leaves the earlier checkpoints intact; adapters load in
//! `generate`, `logits` and `merge`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ok, qpeft, root};

/// A tiny run: NF4 base, LoRA with dropout (so resuming must reproduce the masks), grad accumulation,
/// length-grouped batches over several epochs, the 8-bit optimizer (8-bit states for tensors of ≥ 1000
/// elements, 32-bit for the rest), warm-up and a cosine schedule.
fn config(dir: &Path, steps: u64) -> PathBuf {
    let text = format!(
        r#"[model]
path = "tests/fixtures/gguf/tiny-llama-spm.gguf"
[quant]
format = "nf4"
[adapter]
method = "lora"
rank = 8
alpha = 16
dropout = 0.2
[data]
builtin = "dates"
builtin_size = 48
eval_size = 8
[train]
out_dir = {:?}
steps = {steps}
batch_size = 3
grad_accum = 2
lr = 1e-3
schedule = "cosine"
warmup_steps = 3
optimizer = "adamw-8bit"
min_8bit_size = 1000
checkpoint_every = 4
keep_checkpoints = 0
[eval]
every = 10
max_samples = 8
"#,
        dir.join("run")
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Ctrl-C (SIGINT) finishes the step in flight, checkpoints it, says how to resume and exits with 130; the resumed
/// run logs every step exactly once.
#[test]
fn ctrl_c_checkpoints_the_step_in_flight_and_says_how_to_resume() {
    let steps = 40;
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), steps);
    let run = d.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "train", "--config", cfg.to_str().unwrap()])
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run.join("checkpoints/step-0000004").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted") && err.contains(&format!("qpeft train --resume {}", run.display())), "{err}");
    let (last, _) = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .map(|s| (s, ()))
        .max()
        .unwrap();
    assert!((4..steps).contains(&last), "checkpoint of step {last}");
    assert!(err.contains(&format!("stopped after step {last} of {steps}")), "{err}");
    assert!(!run.join("adapter").exists() && !run.join("summary.json").exists(), "the run is not finished");
    ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap()]));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps_logged: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps_logged, (1..=steps).collect::<Vec<_>>());
}

#[test]
fn a_killed_run_resumes_to_a_bit_identical_adapter() {
    let steps = 60;
    let whole = tempfile::tempdir().unwrap();
    let cfg = config(whole.path(), steps);
    ok(&qpeft(&["--threads", "1", "train", "--config", cfg.to_str().unwrap()]));
    let want = adapter_bytes(&whole.path().join("run"));

    let killed = tempfile::tempdir().unwrap();
    let cfg = config(killed.path(), steps);
    let run = killed.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "train", "--config", cfg.to_str().unwrap()])
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) as soon as its second checkpoint exists, mid-training.
    let start = Instant::now();
    while !run.join("checkpoints/step-0000008").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!run.join("adapter").exists(), "killed before the end");
    let out = ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap()]));
    assert!(out.contains("after:"), "{out}");
    // The summary of a resumed run still has the evaluation before training (from metrics.jsonl).
    assert!(out.contains("before: held-out loss"), "{out}");
    assert!(adapter_bytes(&run) == want, "the resumed run's final adapter differs from the uninterrupted one");
    // The metrics of the resumed run cover every step exactly once.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps_logged: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps_logged, (1..=steps).collect::<Vec<_>>());
    assert!(run.join("loss.svg").exists() && run.join("summary.json").exists());

    // Starting again over the finished run is refused; the adapter loads in generate, logits and merge.
    let e = qpeft(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("already exists"));
    let adapter = run.join("adapter");
    let model = "tests/fixtures/gguf/tiny-llama-spm.gguf";
    ok(&qpeft(&[
        "generate",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "Date: May 1, 2000",
        "--max-new-tokens",
        "4",
    ]));
    let logits = killed.path().join("logits.safetensors");
    ok(&qpeft(&[
        "logits",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "Date",
        "-o",
        logits.to_str().unwrap(),
    ]));
    let merged = killed.path().join("merged");
    ok(&qpeft(&[
        "merge",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]));
    let merged_logits = killed.path().join("merged.safetensors");
    ok(&qpeft(&["logits", merged.to_str().unwrap(), "--prompt", "Date", "-o", merged_logits.to_str().unwrap()]));
    // The NF4 base is dequantized into the merged weights: adapter-on-NF4 and merged agree to f32 rounding.
    let read = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits")
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let (a, b) = (read(&logits), read(&merged_logits));
    let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-4 * max, "merged logits differ by {diff} (max {max})");
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_earlier_ones() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 8);
    let run = d.path().join("run");
    ok(&qpeft(&["--threads", "1", "train", "--config", cfg.to_str().unwrap()]));
    let before: Vec<(PathBuf, Vec<u8>)> = ["step-0000004", "step-0000008"]
        .iter()
        .flat_map(|s| std::fs::read_dir(run.join("checkpoints").join(s)).unwrap())
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    // Resume for more steps with files limited to 64 KiB (the optimizer state is larger): writing the step-12
    // checkpoint fails with EFBIG, as a full disk fails with ENOSPC. SIGXFSZ is ignored so the write returns
    // the error instead of killing the process.
    let bin = env!("CARGO_BIN_EXE_qpeft");
    let script = format!(
        "ulimit -f 64; trap '' XFSZ; exec {bin} --threads 1 train --resume {} --set train.steps=16",
        run.display()
    );
    let out = Command::new("sh").args(["-c", &script]).current_dir(root()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should fail");
    assert!(
        err.contains("checkpoint of step 12")
            && err.contains("earlier checkpoints are intact")
            && err.contains("File too large"),
        "{err}"
    );
    for (p, bytes) in &before {
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{} changed", p.display());
    }
    let names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["step-0000004", "step-0000008"], "no partial checkpoint is left behind");
    // With space again, the run resumes from step 8 and finishes.
    ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap(), "--set", "train.steps=16"]));
    assert!(run.join("checkpoints/step-0000016").exists());
}

#[test]
fn qa_lora_merges_into_gptq_zero_points_and_stays_int4() {
    let d = tempfile::tempdir().unwrap();
    let int4 = d.path().join("int4");
    ok(&qpeft(&[
        "quantize",
        "tests/fixtures/gguf/tiny-llama-spm.gguf",
        "--format",
        "int4",
        "--group",
        "16",
        "-o",
        int4.to_str().unwrap(),
    ]));
    let cfg = d.path().join("qa.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {int4:?}\n[quant]\nformat = \"none\"\n[adapter]\nmethod = \"qa-lora\"\nrank = 2\nalpha = 16\ngroup_size = 16\n\
             [data]\nbuiltin = \"dates\"\nbuiltin_size = 24\neval_size = 4\n[train]\nout_dir = {:?}\nsteps = 6\nbatch_size = 2\ngrad_accum = 1\nlr = 5e-2\ncheckpoint_every = 0\n",
            d.path().join("run")
        ),
    )
    .unwrap();
    ok(&qpeft(&["--threads", "1", "train", "--config", cfg.to_str().unwrap()]));
    let adapter = d.path().join("run/adapter");
    let merged = d.path().join("merged");
    let out = qpeft(&[
        "merge",
        int4.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("GPTQ int4 with merged fp16 zero points"));
    // The merged directory holds int4 codes with fp16 zeros, and reproduces base + adapter.
    let bytes = std::fs::read(merged.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        st.tensor("model.layers.0.self_attn.q_proj.zeros").is_ok()
            && st.tensor("model.layers.0.self_attn.q_proj.qzeros").is_err()
    );
    assert_eq!(st.tensor("model.layers.0.self_attn.q_proj.qweight").unwrap().dtype(), safetensors::Dtype::I32);
    let read = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits")
            .unwrap()
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let logits = |model: &Path, adapter: Option<&Path>, name: &str| {
        let out = d.path().join(name);
        let mut args =
            vec!["logits", model.to_str().unwrap(), "--prompt", "Date: 4 July 1976", "-o", out.to_str().unwrap()];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        ok(&qpeft(&args));
        read(&out)
    };
    let (adapted, merged, base) =
        (logits(&int4, Some(&adapter), "a"), logits(&merged, None, "m"), logits(&int4, None, "b"));
    let max = adapted.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // The only loss is fp16 rounding of the new zero points (and of the dequantized fp16 weights).
    assert!(diff(&adapted, &merged) <= 2e-3 * max, "merged vs adapted: {} of {max}", diff(&adapted, &merged));
    assert!(diff(&adapted, &base) > 20.0 * diff(&adapted, &merged), "the adapter must move the logits");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 12);
    // Adam moves every weight by about lr per step: 1e30 overflows the activations at once.
    let out = qpeft(&[
        "--threads",
        "1",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.lr=1e30",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.checkpoint_every=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        (err.contains("the loss is NaN") || err.contains("the loss is inf") || err.contains("the gradient norm is"))
            && err.contains("step 2"),
        "{err}"
    );
    assert!(d.path().join("run/checkpoints/step-0000001").is_dir(), "the checkpoint before the divergence stays");
}
