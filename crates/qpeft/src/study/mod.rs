//! Studies: the papers' experiment grids as one command. A study file (`spec`) names a base run config, variants,
//! optional axes and seeds; every cell is an ordinary run directory trained and evaluated by the same trainer as
//! `qpeft train` (`run`: skips finished cells, resumes interrupted ones, shards cells over workers with a lock per
//! cell); `report` aggregates the cells with intervals and paired comparisons (`stats`) into tables and charts.

pub mod report;
pub mod run;
pub mod spec;
pub mod stats;

pub use spec::{Cell, Study};
