//! The run's loss curve (`loss.svg`): training loss per step as a line, held-out loss as dots.

use crate::svg::{lines, Series};

/// An SVG of `train` (step, loss) as a line and `eval` (step, loss) as dots.
pub fn loss_svg(title: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    lines(
        title,
        "optimizer step",
        "loss",
        &[
            Series { name: "train loss", points: train, dots: false },
            Series { name: "held-out loss", points: eval, dots: true },
        ],
    )
}
