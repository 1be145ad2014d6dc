//! The run directory: `config.toml` (the run's config after `--set`), `metrics.jsonl` (one JSON object per
//! logged step or evaluation), `checkpoints/step-NNNNNNN/` (adapter, optimizer state, trainer state), the final
//! `adapter/`, `loss.svg`, `evals/step-NNNNNN.json` (every benchmark item's prediction at each evaluation) and
//! `summary.json`. Only this type writes them.
//!
//! A checkpoint is written into a hidden temporary directory, every file synced, then renamed into place, so a
//! crash or a full disk leaves either the complete checkpoint or none; earlier checkpoints are never touched
//! before the new one is complete.
//!
//! One process writes a run at a time: starting or resuming one takes the lock file `writer.lock` in it (see
//! `LockFile`), so a second `qpeft train` on the same directory is refused while the first is alive.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::RunConfig;
use super::metrics::Record;
use crate::config_doc::Edits;
use crate::error::{Error, Result};
use crate::formats::write_atomic;
use crate::lockfile::LockFile;

pub const CONFIG: &str = "config.toml";
pub const METRICS: &str = "metrics.jsonl";
pub const CHECKPOINTS: &str = "checkpoints";
pub const FINAL_ADAPTER: &str = "adapter";
pub const PLOT: &str = "loss.svg";
pub const SUMMARY: &str = "summary.json";
pub const EVALS: &str = "evals";
pub const LOCK: &str = "writer.lock";

pub struct RunDir {
    pub path: PathBuf,
    /// Held while this process writes the run (None for a run opened to be read).
    _lock: Option<LockFile>,
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

impl RunDir {
    /// A new run directory. An existing non-empty one is refused unless `overwrite`, and even then only if it is
    /// a qpeft run directory (has `config.toml`), so nothing else of the user's is deleted.
    pub fn create(path: &Path, overwrite: bool) -> Result<RunDir> {
        let non_empty = path.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false);
        // A run another process is writing is neither resumed over nor deleted.
        let lock = if non_empty && path.join(CONFIG).exists() {
            Some(LockFile::acquire(&path.join(LOCK), path)?)
        } else {
            None
        };
        if non_empty {
            if !overwrite {
                return Err(Error::Invalid(format!(
                    "run directory {} already exists; resume it with --resume {0}, choose another train.out_dir, or pass --overwrite",
                    path.display()
                )));
            }
            if !path.join(CONFIG).exists() {
                return Err(Error::Invalid(format!(
                    "{} is not a qpeft run directory (no {CONFIG}); refusing to delete it",
                    path.display()
                )));
            }
            // Everything but the lock this process now holds.
            for entry in path.read_dir().map_err(|e| Error::io(path, e))? {
                let p = entry.map_err(|e| Error::io(path, e))?.path();
                if p.file_name().is_some_and(|n| n == LOCK) {
                    continue;
                }
                let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                removed.map_err(|e| Error::io(&p, e))?;
            }
        }
        std::fs::create_dir_all(path.join(CHECKPOINTS)).map_err(|e| Error::io(path, e))?;
        let lock = match lock {
            Some(l) => l,
            None => LockFile::acquire(&path.join(LOCK), path)?,
        };
        Ok(RunDir { path: path.to_path_buf(), _lock: Some(lock) })
    }

    /// A new run directory for `cfg` at its `train.out_dir` (see `create`), holding the config as run.
    pub fn start(cfg: &RunConfig, overwrite: bool) -> Result<RunDir> {
        let run = RunDir::create(&cfg.train.out_dir, overwrite)?;
        write_atomic(&run.file(CONFIG), cfg.text.as_bytes())?;
        Ok(run)
    }

    /// The run directory `path` resumed with `edits` applied to its config, which it keeps from now on.
    pub fn resume(path: &Path, edits: &Edits) -> Result<(RunDir, RunConfig)> {
        let opened = RunDir::open(path)?;
        let run = RunDir { _lock: Some(LockFile::acquire(&path.join(LOCK), path)?), ..opened };
        let cfg = RunConfig::compose(&[run.file(CONFIG)], edits)?;
        write_atomic(&run.file(CONFIG), cfg.text.as_bytes())?;
        Ok((run, cfg))
    }

    pub fn open(path: &Path) -> Result<RunDir> {
        if !path.join(CONFIG).exists() {
            return Err(Error::Invalid(format!("{} is not a qpeft run directory (no {CONFIG})", path.display())));
        }
        Ok(RunDir { path: path.to_path_buf(), _lock: None })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn append_metrics(&self, record: &Record) -> Result<()> {
        let path = self.file(METRICS);
        let line = serde_json::to_string(record).expect("records serialize");
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&path, e))
    }

    /// Starts metrics.jsonl over (a resumed run that had no checkpoint yet).
    pub fn clear_metrics(&self) -> Result<()> {
        write_atomic(&self.file(METRICS), b"")
    }

    /// Every metrics record, in order.
    pub fn metrics(&self) -> Result<Vec<Record>> {
        let path = self.file(METRICS);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        // A crash can leave a partial last line; it is dropped.
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// Keeps only the records up to and including `step` (a resumed run rewrites what came after).
    pub fn truncate_metrics(&self, step: u64) -> Result<()> {
        let kept: Vec<String> = self
            .metrics()?
            .into_iter()
            .filter(|r| r.step() <= step)
            .map(|r| serde_json::to_string(&r).expect("records serialize"))
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(&self.file(METRICS), text.as_bytes())
    }

    /// The predictions of every benchmark item evaluated at `step`.
    pub fn write_eval_report(&self, step: u64, report: &impl Serialize) -> Result<()> {
        let dir = self.file(EVALS);
        std::fs::create_dir_all(&dir).map_err(|err| Error::io(&dir, err))?;
        write_atomic(&dir.join(format!("step-{step:06}.json")), &serde_json::to_vec(report).expect("reports serialize"))
    }

    /// The run's outcome (`summary.json`).
    pub fn write_summary(&self, summary: &impl Serialize) -> Result<()> {
        write_atomic(&self.file(SUMMARY), &serde_json::to_vec_pretty(summary).expect("summaries serialize"))
    }

    pub fn write_plot(&self, svg: &str) -> Result<()> {
        write_atomic(&self.file(PLOT), svg.as_bytes())
    }

    fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.path.join(CHECKPOINTS).join(format!("step-{step:07}"))
    }

    /// Writes checkpoint `step`: `fill` writes its files into the directory it is given; then the directory is
    /// synced and renamed into place. On failure the partial directory is removed and the error names the step.
    pub fn save_checkpoint(&self, step: u64, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let root = self.path.join(CHECKPOINTS);
        let tmp = root.join(format!(".step-{step:07}.partial"));
        let done = self.checkpoint_dir(step);
        let result = (|| {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            fill(&tmp)?;
            sync_dir(&tmp)?;
            if done.exists() {
                std::fs::remove_dir_all(&done).map_err(|e| Error::io(&done, e))?;
            }
            std::fs::rename(&tmp, &done).map_err(|e| Error::io(&done, e))?;
            sync_dir(&root)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::Invalid(format!(
                "writing checkpoint of step {step} failed (earlier checkpoints are intact): {e}"
            )));
        }
        Ok(done)
    }

    /// Complete checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let root = self.path.join(CHECKPOINTS);
        let mut out = Vec::new();
        let entries = match root.read_dir() {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&root, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes all but the newest `keep` checkpoints (0 keeps all).
    pub fn prune(&self, keep: usize) -> Result<()> {
        let all = self.checkpoints()?;
        if keep == 0 || all.len() <= keep {
            return Ok(());
        }
        for (_, dir) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }
}
