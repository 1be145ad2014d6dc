//! Corrupt, truncated and unsupported inputs give errors that name the file and the problem (what the fuzzer,
//! `scripts/fuzz.sh`, checks at scale: that nothing panics and every error names a file of the input).

use std::path::{Path, PathBuf};

use qpeft_fuzz::targets::load_and_run;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn err_of(path: &Path) -> String {
    match load_and_run(path) {
        Ok(()) => panic!("{} loaded without error", path.display()),
        Err(e) => e.to_string(),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Offset just past the first occurrence of `needle`.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    bytes.windows(needle.len()).position(|w| w == needle).expect("needle present") + needle.len()
}

fn gguf_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("gguf/tiny-llama-spm.gguf")).unwrap()
}

#[test]
fn truncated_gguf_names_the_file_and_the_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = gguf_bytes();
    for cut in [0, 3, 10, 30, 500, bytes.len() / 2, bytes.len() - 1] {
        let p = write(tmp.path(), "cut.gguf", &bytes[..cut]);
        let e = err_of(&p);
        assert!(e.contains("cut.gguf"), "cut at {cut}: {e}");
        assert!(e.contains("truncated") || e.contains("not a GGUF file"), "cut at {cut}: {e}");
    }
}

#[test]
fn unknown_gguf_tensor_type_is_reported_with_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixtures().join("gguf/quants.gguf")).unwrap();
    // Tensor info: name, n_dims (u32) = 2, two u64 dims, then the type (u32).
    let at = after(&bytes, b"Q4_0") + 4 + 16;
    assert_eq!(bytes[at..at + 4], 2u32.to_le_bytes());
    bytes[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = write(tmp.path(), "types.gguf", &bytes);
    let e = qpeft::formats::gguf::GgufFile::open(&p).err().expect("type 99 must be refused").to_string();
    assert!(e.contains("types.gguf") && e.contains("Other(99)") && e.contains("`Q4_0`"), "{e}");
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = gguf_bytes();
    let at = after(&bytes, b"general.architecture") + 4 + 8;
    bytes[at..at + 5].copy_from_slice(b"rwkv7");
    let e = err_of(&write(tmp.path(), "arch.gguf", &bytes));
    assert!(e.contains("arch.gguf") && e.contains("architecture `rwkv7`"), "{e}");

    let dir = tmp.path().join("neox");
    std::fs::create_dir(&dir).unwrap();
    let cfg = std::fs::read_to_string(fixtures().join("tiny-llama/config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = err_of(&dir);
    assert!(e.contains("config.json") && e.contains("architecture `gpt_neox`"), "{e}");
}

#[test]
fn missing_or_invalid_config_keys_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cases: [(&str, Option<serde_json::Value>, &str); 4] = [
        ("hidden_size", None, "missing"),
        ("num_key_value_heads", Some(serde_json::json!(3)), "does not divide"),
        ("intermediate_size", Some(serde_json::json!("big")), "expected a non-negative integer"),
        ("intermediate_size", Some(serde_json::json!(100)), "has shape"),
    ];
    for (i, (key, value, expect)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        let mut cfg = original.clone();
        match value {
            None => drop(cfg.as_object_mut().unwrap().remove(key)),
            Some(v) => cfg[key] = v,
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let e = err_of(&dir);
        assert!(e.contains(expect), "{key}: {e}");
        assert!(e.contains(key) || e.contains("mlp.gate_proj"), "{key}: {e}");
        assert!(e.contains(&format!("case{i}")), "{key}: error does not name the file: {e}");
    }
}

#[test]
fn corrupt_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    for (i, cut) in [0usize, 7, 100, bytes.len() - 1].into_iter().enumerate() {
        let dir = tmp.path().join(format!("t{i}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        write(&dir, "model.safetensors", &bytes[..cut]);
        let e = err_of(&dir);
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "cut {cut}: {e}");
    }
}
