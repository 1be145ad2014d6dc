//! The `qpeft` binary end to end: output formats, exit codes and error messages.

mod common;

use common::{ok, qpeft, root};

#[test]
fn info_reports_the_architecture_and_parameter_count() {
    let out = qpeft(&["info", "tests/fixtures/tiny-qwen2", "--json", "--tensors"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["architecture"], "qwen2");
    assert_eq!(doc["kv_heads"], 2);
    // Sum of the tensor shapes as listed, computed independently of `parameters`.
    let listed: u64 = doc["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>())
        .sum();
    assert_eq!(doc["parameters"].as_u64().unwrap(), listed);
    assert_eq!(doc["dtypes"]["bf16"]["parameters"].as_u64().unwrap(), listed);
}

#[test]
fn perplexity_json_matches_the_transformers_reference() {
    // f32, the reference precision (`cpu` is bf16 where the CPU has AMX).
    let out = qpeft(&[
        "--device",
        "cpu:f32",
        "perplexity",
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "tests/fixtures/smollm2/prose.txt",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/smollm2/reference.json")).unwrap())
            .unwrap();
    let want = reference["perplexity"].as_array().unwrap().iter().find(|c| c["file"] == "prose.txt").unwrap();
    let (g, w) = (got["perplexity"].as_f64().unwrap(), want["perplexity"].as_f64().unwrap());
    assert!((g - w).abs() / w < 1e-3, "{g} vs {w}");
}

#[test]
fn chat_generation_answers() {
    let out = qpeft(&[
        "generate",
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "The capital of France is Paris.");
}

/// `qpeft eval MODEL` without --tasks lists the tasks with their sizes instead of starting a 100-minute MMLU run.
#[test]
fn eval_without_tasks_lists_them() {
    let out = ok(&qpeft(&["eval", "tests/fixtures/gguf/tiny-llama-spm.gguf"]));
    assert!(out.contains("mmlu") && out.contains("14042 test questions in 57 subjects"), "{out}");
    assert!(out.contains("hellaswag") && out.contains("10042 items") && out.contains("heldout"), "{out}");
    let e = qpeft(&["eval", "tests/fixtures/gguf/tiny-llama-spm.gguf", "--tasks", "held"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("`held`") && err.contains("heldout"), "{err}");
}

#[test]
fn bad_model_path_fails_with_a_named_error() {
    let out = qpeft(&["info", "no/such/model.gguf"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/model.gguf") && err.contains("no such file"), "{err}");
    // Said once: the I/O error is not repeated as a "caused by".
    assert_eq!(err.to_lowercase().matches("no such file").count(), 1, "{err}");
    let out = qpeft(&["perplexity", "tests/fixtures/gguf/tiny-llama-spm.gguf", "no/such/text.txt"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.to_lowercase().matches("no such file").count(), 1, "{err}");
    let out = qpeft(&["perplexity", "tests/fixtures/tiny-llama", "tests/fixtures/smollm2/prose.txt"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tiny-llama") && err.contains("no tokenizer.json"), "{err}");
}

#[test]
fn quantize_writes_a_loadable_directory_with_a_report() {
    let dir = std::env::temp_dir().join(format!("qpeft-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out_dir = dir.join("nf4");
    let o = out_dir.to_str().unwrap();
    let out = qpeft(&["quantize", "tests/fixtures/tiny-llama", "--format", "nf4", "--double-quant", "-o", o]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("layers.1.mlp.down_proj") && stdout.contains("nf4+dq") && stdout.contains("14 linear layers"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("quantize_report.json")).unwrap()).unwrap();
    assert_eq!(report.as_array().unwrap().len(), 14);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    // The quantized directory is a model qpeft can inspect and run.
    let info = qpeft(&["info", o, "--json"]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    // Writing over it again is refused, and bad options name the problem.
    let again = qpeft(&["quantize", "tests/fixtures/tiny-llama", "--format", "nf4", "-o", o]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already contains a model"));
    let bad = qpeft(&[
        "quantize",
        "tests/fixtures/tiny-llama",
        "--format",
        "int4",
        "--group",
        "48",
        "-o",
        dir.join("x").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("group size 48"), "{}", String::from_utf8_lossy(&bad.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn params_reports_groups_and_change_against_the_baseline() {
    let out = qpeft(&["params", "--arch", "llama-7b", "--config", "configs/study/rank-mlp-div2.toml", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // MLP at r 32: 32 layers · 3 · 32 · (4096 + 11008); attention at r 64: 32 · 4 · 64 · 8192.
    assert_eq!(doc["groups"]["mlp"]["params"], 32 * 3 * 32 * 15104);
    assert_eq!(doc["groups"]["attention"]["params"], 32 * 4 * 64 * 8192);
    assert_eq!(doc["groups"]["total"]["baseline"], 159_907_840);
    let pct = doc["groups"]["total"]["change_percent"].as_f64().unwrap();
    assert!((pct + 29.016).abs() < 0.01, "{pct}");
    // An explicit baseline file is honoured: QA-HiRA (4, 8) has 202,375,168.
    let out = qpeft(&[
        "params",
        "--arch",
        "llama-7b",
        "--config",
        "configs/qlora.toml",
        "--baseline",
        "configs/qa-hira.toml",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("total") && l.contains("159,907,840") && l.contains("202,375,168")),
        "{text}"
    );
    // A model directory: tiny-llama's k/v are 64 → 32, so rank 64 is refused, naming the module.
    let out = qpeft(&["params", "tests/fixtures/tiny-llama", "--config", "configs/qlora.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.layers.0.self_attn.k_proj") && err.contains("rank = 64"), "{err}");
    let out = qpeft(&["params", "--arch", "gpt-9", "--config", "configs/qlora.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("llama-7b"));
}
