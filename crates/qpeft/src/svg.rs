//! Small self-contained SVG charts: lines and dots over numeric axes (loss curves) and bars with interval whiskers
//! (study reports). Written by hand rather than with a plotting crate: plotters needs a font backend to lay out
//! text, which a bare CI machine lacks; an SVG viewer lays out `<text>` itself.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;
const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// "Nice" tick values covering [lo, hi].
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..).map(|i| first + i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
}

fn fmt(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The chart area with its y axis from `y0` to `y1`, a title and axis labels; `x` maps to pixels by the caller.
struct Frame {
    s: String,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn new(title: &str, x_label: &str, y_label: &str, (y0, y1): (f64, f64)) -> Frame {
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        // A long title gets a smaller font, down to 10 px, then is squeezed to the chart's width: an SVG viewer
        // lays out text itself, so its width is estimated (≈ 0.55 em a character in a sans-serif font).
        let room = W - 20.0;
        let chars = title.chars().count().max(1) as f64;
        let size = (room / (0.55 * chars)).clamp(10.0, 15.0);
        let squeeze = if 0.55 * size * chars > room {
            format!(r#" textLength="{room}" lengthAdjust="spacingAndGlyphs""#)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="{size:.1}"{squeeze}>{}</text>"#,
            W / 2.0,
            escape(title)
        );
        let mut f = Frame { s, y0, y1 };
        for t in ticks(y0, y1, 6) {
            let (x2, y, tx, ty, label) = (W - RIGHT, f.py(t), LEFT - 6.0, f.py(t) + 4.0, fmt(t));
            let _ = writeln!(
                f.s,
                r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"##
            );
        }
        let _ = writeln!(
            f.s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        let _ = writeln!(
            f.s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (W + LEFT - RIGHT) / 2.0,
            H - 10.0,
            escape(x_label)
        );
        let _ = writeln!(
            f.s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {0})">{}</text>"#,
            (H + TOP - BOTTOM) / 2.0,
            escape(y_label)
        );
        f
    }

    fn py(&self, y: f64) -> f64 {
        TOP + (self.y1 - y) / (self.y1 - self.y0) * (H - TOP - BOTTOM)
    }

    /// A legend entry `k` (from the top right): a line or a dot in `color`.
    fn legend(&mut self, k: usize, name: &str, color: &str, dot: bool) {
        let (lx, ly) = (W - RIGHT - 190.0, TOP + 14.0 + 18.0 * k as f64);
        let mark = if dot {
            format!(r#"<circle cx="{}" cy="{ly}" r="4" fill="{color}"/>"#, lx + 10.0)
        } else {
            format!(r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#, lx + 20.0)
        };
        // A light backing keeps the entry readable over the curves it may cover.
        let _ = writeln!(
            self.s,
            r#"<rect x="{}" y="{}" width="190" height="18" fill="white" fill-opacity="0.85"/>{mark}<text x="{}" y="{}">{}</text>"#,
            lx - 4.0,
            ly - 9.0,
            lx + 26.0,
            ly + 4.0,
            escape(name)
        );
    }

    fn finish(mut self) -> String {
        self.s.push_str("</svg>\n");
        self.s
    }
}

/// The padded range of `values` (finite ones), or [0, 1] without any.
fn range(values: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in values.filter(|v| v.is_finite()) {
        (lo, hi) = (lo.min(v), hi.max(v));
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if include_zero {
        (lo, hi) = (lo.min(0.0), hi.max(0.0));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - if include_zero && lo == 0.0 { 0.0 } else { pad }, hi + pad)
}

/// A series of a line chart: drawn as a line, or as dots.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub dots: bool,
}

/// Every series over a shared numeric x axis.
pub fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = range(all().map(|p| p.0), false);
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (xa, xb) = (all().map(|p| p.0).fold(f64::MAX, f64::min), all().map(|p| p.0).fold(f64::MIN, f64::max));
    if xa <= xb {
        (x0, x1) = (xa, if xb - xa < 1e-9 { xa + 1.0 } else { xb });
    }
    let mut f = Frame::new(title, x_label, y_label, range(all().map(|p| p.1), false));
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    // Steps and counts get whole-number ticks only.
    let integral = all().all(|p| p.0.fract() == 0.0);
    for t in ticks(x0, x1, 8).into_iter().filter(|t| !integral || t.fract() == 0.0) {
        let _ =
            writeln!(f.s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, px(t), H - BOTTOM + 16.0, fmt(t));
    }
    for (k, s) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts = s.points.iter().filter(|p| p.1.is_finite());
        if s.dots {
            for &(x, y) in pts {
                let _ = writeln!(f.s, r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"#, px(x), f.py(y));
            }
        } else {
            let points: Vec<String> = pts.map(|&(x, y)| format!("{:.1},{:.1}", px(x), f.py(y))).collect();
            if !points.is_empty() {
                let _ = writeln!(
                    f.s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                    points.join(" ")
                );
            }
        }
    }
    // After every series, so that no curve is drawn over the legend.
    for (k, s) in series.iter().enumerate() {
        f.legend(k, s.name, COLORS[k % COLORS.len()], s.dots);
    }
    f.finish()
}

/// A bar with its 95% interval; the baseline's bar is drawn apart and its value marked across the chart.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub baseline: bool,
}

/// One bar per entry, with interval whiskers; labels under the bars. Bars rise from 0 with `from_zero` (accuracies),
/// else from the bottom of a range fitted to the values (losses, where 0 would flatten every difference).
pub fn bars(title: &str, y_label: &str, bars: &[Bar], from_zero: bool) -> String {
    let values = bars.iter().flat_map(|b| [Some(b.value), b.lo, b.hi]).flatten();
    let (y0, y1) = range(values, from_zero);
    let mut f = Frame::new(title, "", y_label, (y0, y1));
    let slot = (W - LEFT - RIGHT) / bars.len().max(1) as f64;
    if let Some(b) = bars.iter().find(|b| b.baseline) {
        let y = f.py(b.value);
        let _ = writeln!(
            f.s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#d62728" stroke-dasharray="5,4"/>"##,
            W - RIGHT
        );
    }
    let zero = f.py(if from_zero { 0.0 } else { y0 });
    for (i, b) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + slot * 0.2;
        let (width, y) = (slot * 0.6, f.py(b.value));
        let color = if b.baseline { "#d62728" } else { "#1f77b4" };
        let _ = writeln!(
            f.s,
            r#"<rect x="{x:.1}" y="{:.1}" width="{width:.1}" height="{:.1}" fill="{color}" fill-opacity="0.75"/>"#,
            y.min(zero),
            (zero - y).abs()
        );
        if let (Some(lo), Some(hi)) = (b.lo, b.hi) {
            let (cx, ylo, yhi) = (x + width / 2.0, f.py(lo), f.py(hi));
            let _ = writeln!(
                f.s,
                r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{ylo:.1}" y2="{yhi:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{ylo:.1}" y2="{ylo:.1}" stroke="black"/><line x1="{:.1}" x2="{:.1}" y1="{yhi:.1}" y2="{yhi:.1}" stroke="black"/>"#,
                cx - 6.0,
                cx + 6.0,
                cx - 6.0,
                cx + 6.0
            );
        }
        let label = if b.baseline { format!("{} (baseline)", b.label) } else { b.label.clone() };
        let _ = writeln!(
            f.s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"#,
            x + width / 2.0,
            H - BOTTOM + 16.0,
            escape(&label)
        );
    }
    f.finish()
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
    fn a_line_chart_has_one_point_per_value_and_a_dot_per_dot() {
        let train = [(1.0, 2.0), (2.0, 1.5), (3.0, 1.2)];
        let eval = [(0.0, 2.2), (3.0, 1.3)];
        let svg = lines(
            "a <run>",
            "step",
            "loss",
            &[
                Series { name: "train", points: &train, dots: false },
                Series { name: "eval", points: &eval, dots: true },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert_eq!(line.matches(',').count(), 3);
        assert_eq!(svg.matches("<circle").count(), 3, "two evaluations and the legend");
        assert!(svg.contains("a &lt;run&gt;"));
    }

    #[test]
    fn whole_number_axes_get_whole_ticks_and_long_titles_fit() {
        let steps: Vec<(f64, f64)> = (1..=20).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let long = "x".repeat(200);
        let svg = lines(&long, "step", "loss", &[Series { name: "a", points: &steps, dots: false }]);
        let x_ticks: Vec<&str> = svg
            .lines()
            .filter(|l| l.contains(&format!(r#"y="{}""#, H - BOTTOM + 16.0)))
            .map(|l| l.split('>').nth(1).unwrap().trim_end_matches("</text"))
            .collect();
        assert!(x_ticks.len() >= 3 && x_ticks.iter().all(|t| t.parse::<u32>().is_ok()), "{x_ticks:?}");
        let title = svg.lines().find(|l| l.contains(&long)).unwrap();
        assert!(title.contains(r#"font-size="10.0""#) && title.contains(&format!(r#"textLength="{}""#, W - 20.0)));
        let short = lines("short", "step", "loss", &[Series { name: "a", points: &steps, dots: false }]);
        assert!(short.contains(r#"font-size="15.0">short<"#));
    }

    #[test]
    fn bars_have_whiskers_where_intervals_are_given_and_mark_the_baseline() {
        let b = |label: &str, lo: Option<f64>, baseline| Bar {
            label: label.into(),
            value: 30.0,
            lo,
            hi: lo.map(|l| l + 4.0),
            baseline,
        };
        let svg =
            bars("t", "acc", &[b("base", Some(28.0), true), b("a", None, false), b("b", Some(27.0), false)], true);
        assert_eq!(svg.matches("<rect x=").count(), 4, "the frame and three bars");
        let whiskers = svg.lines().filter(|l| l.starts_with("<line") && l.contains(r#"stroke="black""#)).count();
        assert_eq!(whiskers, 2, "a whisker for each bar with an interval");
        assert!(svg.contains("base (baseline)") && svg.contains("stroke-dasharray"));
    }
}
