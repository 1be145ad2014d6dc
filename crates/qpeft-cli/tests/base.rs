//! The adapter knows its base: `qpeft train` records the model, a fingerprint of its weights and the quantization
//! recipe in the adapter; `qpeft eval --adapter` rebuilds that base, so it reproduces the trainer's held-out loss, and
//! refuses another model unless asked. Also: a run config switched to other data from the command line (`--unset`).

mod common;

use std::path::{Path, PathBuf};

use common::{ok, qpeft, root};
use serde_json::Value;

const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Two steps of QLoRA (NF4 re-quantization of the GGUF's weights) on SmolLM2 with a held-out loss at the end.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{SMOLLM2}"
[quant]
format = "nf4"
double_quant = true
[adapter]
method = "lora"
rank = 4
alpha = 8
[data]
builtin = "dates"
builtin_size = 40
eval_size = 6
source_max_len = 48
target_max_len = 16
[train]
out_dir = {:?}
steps = 2
batch_size = 2
grad_accum = 1
lr = 1e-3
checkpointing = false
[eval]
max_samples = 6
batch_size = 4
"#,
        dir.join("run")
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn eval_rebuilds_the_adapters_base_and_refuses_another_model() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let cfg = cfg.to_str().unwrap();
    ok(&qpeft(&["train", "--config", cfg]));
    let run = d.path().join("run");
    let adapter = run.join("adapter");
    let adapter = adapter.to_str().unwrap();

    // The trainer's last held-out loss, as metrics.jsonl logged it.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let logged = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|r| r.get("eval_loss").and_then(Value::as_f64))
        .next_back()
        .expect("an evaluation was logged");

    // The adapter records its base.
    let base = json(&run.join("adapter/adapter_config.json"))["qpeft"]["base"].clone();
    assert_eq!(base["model"], SMOLLM2);
    assert_eq!(base["quant"]["format"], "nf4");
    let fingerprint = base["fingerprint"].as_str().unwrap().to_string();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");

    // eval rebuilds it (NF4 re-quantized, as trained) and says so; the loss is the trainer's to the printed digits.
    let report = d.path().join("eval.json");
    let out = qpeft(&[
        "eval",
        SMOLLM2,
        "--adapter",
        adapter,
        "--tasks",
        "heldout",
        "--config",
        cfg,
        "--json",
        report.to_str().unwrap(),
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("re-quantized to nf4 (block 64, double quant)") && stderr.contains("as "), "{stderr}");
    let evaluated = json(&report)["heldout"]["loss"].as_f64().unwrap();
    assert_eq!(format!("{evaluated:.4}"), format!("{logged:.4}"), "eval {evaluated} vs trainer {logged}");
    assert!((evaluated - logged).abs() <= 1e-6 * logged, "eval {evaluated} vs trainer {logged}");

    // A copy of the GGUF with one weight byte changed is another base: refused, both fingerprints named.
    let other = d.path().join("other.gguf");
    let mut bytes = std::fs::read(root().join(SMOLLM2)).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 1;
    std::fs::write(&other, bytes).unwrap();
    let out = qpeft(&["eval", other.to_str().unwrap(), "--adapter", adapter, "--tasks", "heldout", "--config", cfg]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&fingerprint) && err.contains(SMOLLM2) && err.contains("--other-base"), "{err}");
    assert_eq!(err.matches("sha256:").count(), 2, "both fingerprints: {err}");
    // … unless asked for.
    let out = qpeft(&[
        "eval",
        other.to_str().unwrap(),
        "--adapter",
        adapter,
        "--tasks",
        "heldout",
        "--config",
        cfg,
        "--other-base",
    ]);
    let stdout = ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the model it was trained on"));
    assert!(stdout.contains("heldout"), "{stdout}");
}

#[test]
fn unset_switches_the_quickstart_to_alpaca_from_the_command_line() {
    let d = tempfile::tempdir().unwrap();
    let out_dir = format!("train.out_dir=\"{}\"", d.path().join("run").display());
    let common = [
        "train",
        "--config",
        "configs/quickstart.toml",
        "--set",
        "data.path=\"../shared/datasets/alpaca/alpaca_data.json.gz\"",
        "--set",
        "data.eval_size=4",
        "--set",
        "data.max_train_examples=16",
        "--set",
        "train.steps=1",
        "--set",
        "eval.max_samples=2",
        "--set",
        "eval.exact_match=0",
        "--set",
        &out_dir,
    ];
    // Without --unset the built-in task and the file clash, and the error says which option set what.
    let out = qpeft(&common);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only one of `path` and `builtin`") && err.contains("--unset data.builtin"), "{err}");
    let mut args = common.to_vec();
    args.extend(["--unset", "data.builtin"]);
    ok(&qpeft(&args));
    let config = std::fs::read_to_string(d.path().join("run/config.toml")).unwrap();
    assert!(config.contains("alpaca_data.json.gz") && !config.contains("builtin ="), "{config}");
    // Removing a key that is not there names the option and the key.
    let out =
        qpeft(&["params", "--arch", "smollm2-135m", "--config", "configs/qlora.toml", "--unset", "adapter.lambda"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--unset adapter.lambda") && err.contains("no such key"), "{err}");
}

/// `params --set`: LLaMA-7B's LoRA count at rank 8 on all seven linears, by hand: 8 · 32 layers ·
/// (4 · (4096 + 4096) + 2 · (4096 + 11008) + (11008 + 4096)) = 19,988,480.
#[test]
fn params_takes_set() {
    let out = ok(&qpeft(&[
        "params",
        "--arch",
        "llama-7b",
        "--config",
        "configs/qlora.toml",
        "--set",
        "adapter.rank=8",
        "--json",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let c = &v["counts"];
    let total: u64 =
        ["attn_first", "attn_second", "mlp_first", "mlp_second"].iter().map(|k| c[*k].as_u64().unwrap()).sum();
    assert_eq!(total, 19_988_480);
    let e = qpeft(&["params", "--arch", "llama-7b", "--config", "configs/qlora.toml", "--set", "adapter.rank=eight"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(err.contains("--set adapter.rank=eight") && err.contains("eight"), "{err}");
}
