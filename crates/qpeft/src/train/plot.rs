//! The loss curve as a small self-contained SVG: training loss per step (line) and held-out loss (dots).
//! Written by hand rather than with a plotting crate: plotters needs a font backend to lay out text, which a
//! bare CI machine lacks; an SVG viewer lays out `<text>` itself.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..).map(|i| first + i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
}

/// An SVG of `train` (step, loss) as a line and `eval` (step, loss) as dots.
pub fn loss_svg(title: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let all = train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
    for t in ticks(y0, y1, 6) {
        let (x2, y, tx, ty, label) = (W - RIGHT, py(t), LEFT - 6.0, py(t) + 4.0, fmt(t));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##
        );
    }
    for t in ticks(x0, x1, 8) {
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, px(t), H - BOTTOM + 16.0, fmt(t));
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text>"#,
        (W + LEFT - RIGHT) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {0})">loss</text>"#,
        (H + TOP - BOTTOM) / 2.0
    );
    let points: Vec<String> =
        train.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
    if !points.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
    }
    for &(x, y) in eval.iter().filter(|p| p.1.is_finite()) {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d62728"/>"##, px(x), py(y));
    }
    let lx = W - RIGHT - 150.0;
    let (lx2, ly, tx, ty) = (lx + 20.0, TOP + 14.0, lx + 26.0, TOP + 18.0);
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{lx2}" y1="{ly}" y2="{ly}" stroke="#1f77b4" stroke-width="2"/><text x="{tx}" y="{ty}">train loss</text>"##
    );
    let _ = writeln!(
        s,
        r##"<circle cx="{}" cy="{}" r="4" fill="#d62728"/><text x="{}" y="{}">held-out loss</text>"##,
        lx + 10.0,
        TOP + 32.0,
        lx + 26.0,
        TOP + 36.0
    );
    s.push_str("</svg>\n");
    s
}

fn fmt(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(1.13, 2.71, 6);
        assert!(t.first().unwrap() >= &1.13 && t.last().unwrap() <= &2.71 && t.len() >= 3);
    }

    #[test]
    fn the_svg_has_one_point_per_step_and_a_dot_per_evaluation() {
        let svg = loss_svg("a <run>", &[(1.0, 2.0), (2.0, 1.5), (3.0, 1.2)], &[(0.0, 2.2), (3.0, 1.3)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert_eq!(line.matches(',').count(), 3);
        assert_eq!(svg.matches("<circle").count(), 3, "two evaluations and the legend");
        assert!(svg.contains("a &lt;run&gt;"));
    }
}
