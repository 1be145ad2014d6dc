//! Fine-tuning: the run config, the optimizer and schedules, the run directory with atomic checkpoints, the
//! training loop and its loss plot.

pub mod base;
pub mod bench;
pub mod config;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod trainer;
