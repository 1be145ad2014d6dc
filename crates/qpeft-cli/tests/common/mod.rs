//! Helpers of the CLI tests: run the `qpeft` binary from the repository root.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn qpeft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpeft")).args(args).current_dir(root()).output().expect("qpeft runs")
}

/// stdout of a run that must succeed (stderr in the panic message otherwise).
pub fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
