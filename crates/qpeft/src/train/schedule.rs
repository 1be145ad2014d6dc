//! Learning-rate schedules as transformers defines them (`get_scheduler`): the multiplier of the base rate at
//! optimizer step k (0-based) of `total`. `constant` ignores warm-up, as HF's does (methods.md §2: QLoRA's
//! `warmup_ratio` is inert under its constant schedule).

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn multiplier(self, k: u64, warmup: u64, total: u64) -> f64 {
        let (k, w, t) = (k as f64, warmup as f64, total as f64);
        if self != Schedule::Constant && k < w {
            return k / w.max(1.0);
        }
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((t - k) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (k - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// HF's warm-up steps from a ratio: ⌈total · ratio⌉.
pub fn warmup_from_ratio(total: u64, ratio: f64) -> u64 {
    (total as f64 * ratio).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(Schedule::Constant.multiplier(0, 10, 100), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.multiplier(0, 10, 100), 0.0);
        assert_eq!(Schedule::ConstantWithWarmup.multiplier(5, 10, 100), 0.5);
        assert_eq!(Schedule::ConstantWithWarmup.multiplier(50, 10, 100), 1.0);
        assert_eq!(Schedule::Linear.multiplier(10, 10, 100), 1.0);
        assert_eq!(Schedule::Linear.multiplier(55, 10, 100), 0.5);
        assert_eq!(Schedule::Linear.multiplier(100, 10, 100), 0.0);
        assert!((Schedule::Cosine.multiplier(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.multiplier(100, 10, 100)).abs() < 1e-12);
        assert_eq!(warmup_from_ratio(1875, 0.03), 57);
    }
}
