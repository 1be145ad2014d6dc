//! Running a study: every cell is an ordinary run directory, `DIR/cells/<cell id>/`, trained and evaluated by the
//! same trainer as `qpeft train`. A finished cell (it has `summary.json`) is skipped and a started one resumed from
//! its newest checkpoint, so a study killed at any moment and run again ends with the results of an uninterrupted
//! one. Workers share a directory safely: each takes the cells of its shard (`--shard K/N`) and holds a lock file
//! per cell while it works on it, so workers on several devices or machines (a shared filesystem) never run the
//! same cell twice.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::spec::{Cell, Study};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::lockfile::LockFile;
use crate::train::base::load_model;
use crate::train::config::RunConfig;
use crate::train::run_dir::{RunDir, CONFIG, SUMMARY};
use crate::train::trainer::{Progress, Trainer};

pub const CELLS: &str = "cells";

/// The share of a study's cells one worker takes: cell i (0-based) when i mod `n` = `k` − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { k: 1, n: 1 };

    pub fn takes(self, index: usize) -> bool {
        index % self.n == self.k - 1
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::Invalid(format!("--shard `{s}`: expected K/N with 1 ≤ K ≤ N, e.g. 1/2"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if k == 0 || k > n {
            return Err(bad());
        }
        Ok(Shard { k, n })
    }
}

/// Where a cell stands in a study directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellState {
    /// Trained and evaluated (`summary.json` written).
    Done,
    /// Started: resumable from its newest checkpoint.
    Started,
    New,
}

pub fn cell_dir(dir: &Path, cell: &Cell) -> PathBuf {
    dir.join(CELLS).join(&cell.id)
}

pub fn cell_state(dir: &Path, cell: &Cell) -> CellState {
    let d = cell_dir(dir, cell);
    if d.join(SUMMARY).exists() {
        CellState::Done
    } else if d.join(CONFIG).exists() {
        CellState::Started
    } else {
        CellState::New
    }
}

/// A worker's claim on a cell: the lock file `cells/<id>.lock` (see `LockFile`), or None if a live worker holds it.
pub fn claim(dir: &Path, cell: &Cell) -> Result<Option<LockFile>> {
    let root = dir.join(CELLS);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    Ok(LockFile::try_acquire(&root.join(format!("{}.lock", cell.id)))?.ok())
}

/// What the study's progress display is told: a cell starts (its position and id), or its trainer reports.
pub enum StudyProgress<'a> {
    Cell { index: usize, total: usize, id: &'a str, done: usize },
    Train(&'a Progress),
}

/// The file in a cell's run directory naming the numerics it runs on (`Device::numerics`).
pub const NUMERICS: &str = "numerics";

/// How a worker's run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The cells this worker trained (to the end) in this call.
    pub ran: Vec<String>,
    /// `stop` ended it in the middle of a cell (checkpointed).
    pub interrupted: bool,
}

/// Runs this worker's share of `study` in `dir`, one cell after the other, each on a backend from `backend`, whose
/// numerics (`Device::numerics`) are `numerics`: a cell started on other numerics is refused rather than continued.
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend + 'static>(
    study: &Study,
    dir: &Path,
    shard: Shard,
    numerics: &str,
    backend: &dyn Fn() -> Result<B>,
    progress: &mut dyn FnMut(StudyProgress),
    stop: &AtomicBool,
) -> Result<Outcome> {
    let mut ran = Vec::new();
    let total = study.cells.len();
    for (index, cell) in study.cells.iter().enumerate() {
        if !shard.takes(index) || cell_state(dir, cell) == CellState::Done {
            continue;
        }
        let Some(_lock) = claim(dir, cell)? else { continue };
        // Another worker may have finished it between the check and the lock.
        if cell_state(dir, cell) == CellState::Done {
            continue;
        }
        let done = study.cells.iter().filter(|c| cell_state(dir, c) == CellState::Done).count();
        progress(StudyProgress::Cell { index, total, id: &cell.id, done });
        if run_cell(cell, dir, numerics, backend, progress, stop)? {
            return Ok(Outcome { ran, interrupted: true });
        }
        ran.push(cell.id.clone());
    }
    Ok(Outcome { ran, interrupted: false })
}

/// Trains (or resumes) and evaluates one cell; true if `stop` interrupted it.
fn run_cell<B: Backend + 'static>(
    cell: &Cell,
    dir: &Path,
    numerics: &str,
    backend: &dyn Fn() -> Result<B>,
    progress: &mut dyn FnMut(StudyProgress),
    stop: &AtomicBool,
) -> Result<bool> {
    let out = cell_dir(dir, cell);
    let cfg = RunConfig::parse(&cell.config.file, &cell.config.text, &[format!("train.out_dir={out:?}")])?;
    let resume = out.join(CONFIG).exists();
    let run = if resume {
        let saved = std::fs::read_to_string(out.join(CONFIG)).map_err(|e| Error::io(&out.join(CONFIG), e))?;
        if saved != cfg.text {
            return Err(Error::Invalid(format!(
                "{} was started with another config than the study now gives it: restore the study file, or remove \
                 that cell's directory to run it afresh",
                out.display()
            )));
        }
        let recorded = out.join(NUMERICS);
        match std::fs::read_to_string(&recorded) {
            Ok(was) if was.trim() != numerics => {
                return Err(Error::Invalid(format!(
                    "{} was started on {} and this worker runs {numerics}: continue it with --devices {0}, or remove \
                     that cell's directory to run it afresh",
                    out.display(),
                    was.trim()
                )))
            }
            Ok(_) => {}
            // Cells started before the numerics were recorded: from now on they are.
            Err(_) => crate::formats::write_atomic(&recorded, numerics.as_bytes())?,
        }
        RunDir::open(&out)?
    } else {
        // A directory without config.toml is a start that was killed before writing it: nothing in it to keep.
        if out.exists() {
            std::fs::remove_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        }
        let run = RunDir::start(&cfg, false)?;
        crate::formats::write_atomic(&out.join(NUMERICS), numerics.as_bytes())?;
        run
    };
    let (model, tok, _) = load_model(&cfg, backend()?, &mut |_, _| {})?;
    let mut trainer = Trainer::new(&cfg, &model, &tok, run, resume)?;
    let summary = trainer.run(&mut |p| progress(StudyProgress::Train(p)), stop)?;
    Ok(summary.interrupted)
}
