//! The run-config options shared by every command that reads a run config: the base file and fragments
//! (`--config`, repeatable), and edits (`--set`, `--unset`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use qpeft::config_doc::Edits;
use qpeft::plan::Plan;
use qpeft::train::config::RunConfig;

#[derive(Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// A run config (TOML). Repeat it to merge fragments over a base, in order: tables key by key,
    /// `[[adapter.override]]` rules appended, other values replaced.
    #[arg(long = "config", value_name = "RUN.toml")]
    pub configs: Vec<PathBuf>,
    /// Set a config value, e.g. --set train.steps=200 (repeatable; a value that is not TOML is a string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Remove a config key before the --set edits, e.g. --unset data.builtin (repeatable).
    #[arg(long = "unset", value_name = "KEY")]
    pub unsets: Vec<String>,
}

impl ConfigArgs {
    pub fn edits(&self) -> Edits {
        Edits { unset: self.unsets.clone(), set: self.sets.clone() }
    }

    pub fn given(&self) -> bool {
        !self.configs.is_empty()
    }

    pub fn run_config(&self) -> Result<RunConfig> {
        if !self.given() {
            bail!("give the run config with --config RUN.toml");
        }
        Ok(RunConfig::compose(&self.configs, &self.edits())?)
    }

    /// The `[adapter]` plan alone (fragments such as configs/study/*.toml have nothing else).
    pub fn plan(&self) -> Result<Plan> {
        if !self.given() {
            bail!("give the run config with --config RUN.toml");
        }
        Ok(Plan::compose(&self.configs, &self.edits())?)
    }
}
