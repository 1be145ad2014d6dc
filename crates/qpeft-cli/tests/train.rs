//! `qpeft train` end to end on a tiny model: a run stopped by SIGINT or SIGTERM, or killed with SIGKILL, and resumed
//! ends bit-identical to an uninterrupted one; a second signal quits at once; one writer per run directory; a full
//! disk during a checkpoint leaves the earlier checkpoints intact; adapters load in `generate`, `logits` and `merge`.

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

fn spawn_train(cfg: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "train", "--config", cfg.to_str().unwrap()])
        .args(extra)
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().unwrap().success());
}

/// The steps metrics.jsonl logs, in order.
fn steps_logged(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

fn newest_checkpoint(run: &Path) -> u64 {
    std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .max()
        .unwrap()
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// SIGINT (Ctrl-C) and SIGTERM finish the step in flight, checkpoint it, say how to resume and exit with 130 and
/// 143; the resumed run logs every step exactly once and ends with the adapter of an uninterrupted run.
#[test]
fn a_signal_checkpoints_the_step_in_flight_and_the_resumed_run_is_identical() {
    let steps = 40;
    let whole = tempfile::tempdir().unwrap();
    ok(&qpeft(&["--threads", "1", "train", "--config", config(whole.path(), steps).to_str().unwrap()]));
    let want = adapter_bytes(&whole.path().join("run"));
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), steps);
        let run = d.path().join("run");
        let child = spawn_train(&cfg, &[]);
        wait_for(&run.join("checkpoints/step-0000004"));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {err}");
        assert!(err.contains(&format!("interrupted (SIG{sig})")), "{err}");
        assert!(err.contains(&format!("qpeft train --resume {}", run.display())), "{err}");
        let last = newest_checkpoint(&run);
        assert!((4..steps).contains(&last), "checkpoint of step {last}");
        assert!(err.contains(&format!("stopped after step {last} of {steps}")), "{err}");
        assert!(!run.join("adapter").exists() && !run.join("summary.json").exists(), "the run is not finished");
        ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap()]));
        assert!(adapter_bytes(&run) == want, "SIG{sig}: the resumed run's adapter differs from the uninterrupted one");
        assert_eq!(steps_logged(&run), (1..=steps).collect::<Vec<_>>());
    }
}

/// A second signal ends the process at once, mid-step, and leaves every earlier checkpoint as it was.
#[test]
fn a_second_signal_quits_at_once_and_keeps_the_earlier_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 400);
    let run = d.path().join("run");
    // Long steps (32 micro-batches, ≥ 0.1 s), so that both signals arrive while step 9 is in flight: the first a
    // moment after checkpoint 8 appears (had it come before step 9 began, the run would stop at once, cleanly).
    let child = spawn_train(&cfg, &["--set", "train.grad_accum=32"]);
    wait_for(&run.join("checkpoints/step-0000008"));
    let before = snapshot(&run.join("checkpoints"));
    std::thread::sleep(Duration::from_millis(30));
    signal(&child, "INT");
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT again: quitting now"), "{err}");
    assert!(!err.contains("stopped after step"), "{err}");
    let after = snapshot(&run.join("checkpoints"));
    for (path, bytes) in &before {
        let now = after.iter().find(|(p, _)| p == path).map(|(_, b)| b);
        assert!(now == Some(bytes), "{} changed or vanished", path.display());
    }
    // The run resumes from its newest complete checkpoint.
    let steps = format!("train.steps={}", newest_checkpoint(&run) + 2);
    ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap(), "--set", &steps]));
}

/// One writer per run directory: a second `qpeft train` on a run being written is refused (resume and overwrite
/// alike, deleting nothing); once the writer is gone (SIGKILL leaves its lock behind), the lock is taken over.
#[test]
fn a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 400);
    let run = d.path().join("run");
    let mut child = spawn_train(&cfg, &[]);
    wait_for(&run.join("checkpoints/step-0000004"));
    let pid = child.id().to_string();
    for args in [
        vec!["train", "--resume", run.to_str().unwrap()],
        vec!["train", "--config", cfg.to_str().unwrap(), "--overwrite"],
    ] {
        let out = qpeft(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran beside the writer");
        assert!(err.contains("is in use") && err.contains(&format!("process {pid}")), "{err}");
        assert!(err.contains(&run.join("writer.lock").display().to_string()), "{err}");
    }
    assert!(run.join("checkpoints/step-0000004").is_dir(), "the refused --overwrite deleted the run");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(run.join("writer.lock").exists(), "SIGKILL leaves the lock");
    let steps = format!("train.steps={}", newest_checkpoint(&run) + 2);
    let out = ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap(), "--set", &steps]));
    assert!(out.contains("after:"), "{out}");
    assert!(!run.join("writer.lock").exists(), "the lock is released at the end");
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
    let child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
        .args(["--threads", "1", "train", "--config", cfg.to_str().unwrap()])
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    kill_after_second_checkpoint(child, &run);
    let out = ok(&qpeft(&["--threads", "1", "train", "--resume", run.to_str().unwrap()]));
    assert!(out.contains("after:"), "{out}");
    // The summary of a resumed run still has the evaluation before training (from metrics.jsonl).
    assert!(out.contains("before: held-out loss"), "{out}");
    assert!(adapter_bytes(&run) == want, "the resumed run's final adapter differs from the uninterrupted one");
    // The metrics of the resumed run cover every step exactly once.
    assert_eq!(steps_logged(&run), (1..=steps).collect::<Vec<_>>());
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
        // Merge checks compare in f32 (`cpu` is bf16 where the CPU has AMX).
        "--device",
        "cpu:f32",
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
    ok(&qpeft(&[
        "--device",
        "cpu:f32",
        "logits",
        merged.to_str().unwrap(),
        "--prompt",
        "Date",
        "-o",
        merged_logits.to_str().unwrap(),
    ]));
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
    // The bound below is f32's (`cpu` trains in bf16 where the CPU has AMX).
    ok(&qpeft(&["--threads", "1", "--device", "cpu:f32", "train", "--config", cfg.to_str().unwrap()]));
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
            vec!["--device", "cpu:f32", "logits", model.to_str().unwrap(), "--prompt", "Date: 4 July 1976", "-o"];
        args.push(out.to_str().unwrap());
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

/// SIGKILL to a training run as soon as its second checkpoint (step 8) exists, mid-training.
fn kill_after_second_checkpoint(mut child: std::process::Child, run: &Path) {
    let start = Instant::now();
    while !run.join("checkpoints/step-0000008").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!run.join("adapter").exists(), "killed before the end");
}

/// The adapter's tensors (name, f32 values) of a finished run.
fn adapter_values(run: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = adapter_bytes(run);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Data-parallel on the CPU (issue 25): two thread ranks with one micro-batch each give the adapter of one rank
/// accumulating the same two micro-batches (same examples, same dropout masks; gradients summed across ranks), to
/// f32 summation-order noise — and a 2-rank run killed mid-training and resumed ends bit-identical to an
/// uninterrupted one, also when resumed on one rank with the global batch kept (grad_accum 2); two processes launched
/// torchrun-style give the thread ranks' adapter bit for bit.
#[test]
fn two_thread_ranks_train_as_one_rank_accumulating_and_resume_exactly() {
    let steps = 40;
    let ranks = ["--device", "cpu:f32,cpu:f32"];
    let one = tempfile::tempdir().unwrap();
    let cfg = config(one.path(), steps);
    ok(&qpeft(&["--threads", "1", "--device", "cpu:f32", "train", "--config", cfg.to_str().unwrap()]));
    let want = adapter_values(&one.path().join("run"));

    let two = tempfile::tempdir().unwrap();
    let cfg2 = config(two.path(), steps);
    let out = ok(&qpeft(
        &[
            &["--threads", "1"],
            &ranks[..],
            &["train", "--config", cfg2.to_str().unwrap(), "--set", "train.grad_accum=1"],
        ]
        .concat(),
    ));
    assert!(out.contains("after:"), "{out}");
    let run2 = two.path().join("run");
    let got = adapter_values(&run2);
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for ((n, g), (m, w)) in got.iter().zip(&want) {
        assert_eq!(n, m);
        let scale = w.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-12);
        worst = worst.max(g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale);
    }
    assert!(worst <= 1e-5, "2 ranks vs 1 rank accumulating 2: relative difference {worst:e}");
    assert_eq!(steps_logged(&run2), (1..=steps).collect::<Vec<_>>(), "rank 0 alone logs each step");
    let two_ranks = adapter_bytes(&run2);

    // The same two ranks as processes launched torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the
    // same sums in the same order, so the same bits.
    let procs = tempfile::tempdir().unwrap();
    let cfg3 = config(procs.path(), steps);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let launch = |rank: &str| {
        Command::new(env!("CARGO_BIN_EXE_qpeft"))
            .args(["--threads", "1", "--device", "cpu:f32", "train", "--config", cfg3.to_str().unwrap()])
            .args(["--set", "train.grad_accum=1"])
            .envs([("RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            .current_dir(root())
            .output()
            .unwrap()
    };
    let (zero, one) = std::thread::scope(|s| {
        let one = s.spawn(|| launch("1"));
        (launch("0"), one.join().unwrap())
    });
    assert!(
        zero.status.success() && one.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&zero.stderr),
        String::from_utf8_lossy(&one.stderr)
    );
    assert!(adapter_bytes(&procs.path().join("run")) == two_ranks, "two processes differ from two thread ranks");

    // Killed (SIGKILL) after its second checkpoint, resumed with the same ranks, and again on one rank.
    for resume_on in [&ranks[..], &["--device", "cpu:f32"][..]] {
        let killed = tempfile::tempdir().unwrap();
        let cfg = config(killed.path(), steps);
        let run = killed.path().join("run");
        let child = Command::new(env!("CARGO_BIN_EXE_qpeft"))
            .args([&["--threads", "1"], &ranks[..], &["train", "--config", cfg.to_str().unwrap()]].concat())
            .args(["--set", "train.grad_accum=1"])
            .current_dir(root())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        kill_after_second_checkpoint(child, &run);
        let accum =
            if resume_on.len() > 1 && resume_on[1].contains(',') { "train.grad_accum=1" } else { "train.grad_accum=2" };
        ok(&qpeft(
            &[&["--threads", "1"], resume_on, &["train", "--resume", run.to_str().unwrap(), "--set", accum]].concat(),
        ));
        assert_eq!(steps_logged(&run), (1..=steps).collect::<Vec<_>>());
        if accum.ends_with('1') {
            assert!(adapter_bytes(&run) == two_ranks, "the resumed 2-rank run differs from the uninterrupted one");
        } else {
            let got = adapter_values(&run);
            for ((n, g), (_, w)) in got.iter().zip(&adapter_values(&run2)) {
                let scale = w.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-12);
                let d = g.iter().zip(w).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale;
                assert!(d <= 1e-5, "{n}: resumed on one rank, relative difference {d:e}");
            }
        }
    }
}

/// The real-data benchmark's tools: `bench batches` writes the trainer's first micro-batches (refusing to overwrite a
/// file), and `bench train --batches` runs them padded or packed — the same examples, so the same loss.
#[test]
fn bench_batches_run_padded_and_packed_to_the_same_loss() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 4);
    let cfg = cfg.to_str().unwrap();
    let file = d.path().join("batches.jsonl");
    let out = file.to_str().unwrap();
    let write = ["bench", "batches", "--config", cfg, "--micro-batches", "3", "-o", out];
    ok(&qpeft(&write));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3 * 3, "3 micro-batches of batch_size 3");
    assert!(lines.iter().all(|l| l["ids"].as_array().unwrap().len() == l["labels"].as_array().unwrap().len()));
    let again = qpeft(&write);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"));
    let loss = |packing: &str| {
        let json = ok(&qpeft(&[
            "--device",
            "cpu:f32",
            "bench",
            "train",
            "--config",
            cfg,
            "--set",
            "adapter.dropout=0.0",
            "--set",
            &format!("data.packing={packing}"),
            "--batches",
            out,
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ]));
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["loss"].as_f64().unwrap()
    };
    let (padded, packed) = (loss("false"), loss("true"));
    assert!((padded - packed).abs() <= 1e-5 * padded, "padded {padded} vs packed {packed}");
}
