//! Dependency-free SVG line charts, used by `hotcopy bench cow --plot FILE.svg`.
//!
//! A [`Chart`] is a stack of [`Panel`]s drawn one above the other and sharing
//! one x axis (for the CoW bench: seconds since the start of the run). Each
//! panel has its own y axis, linear or logarithmic, a legend and any number of
//! [`Series`]; the chart's markers are vertical lines across every panel with
//! a label above the top one (the backup's start and end).
//!
//! * Ticks are "nice": 1-2-5 steps on linear axes, decades on log axes (with
//!   2 and 5 labelled too when the axis spans two decades or less).
//! * A panel with `log_y: None` goes logarithmic when all its values are
//!   positive and the largest is more than 100 times the smallest.
//! * NaN and infinite coordinates (and, on a log axis, values `<= 0`) are
//!   skipped and leave a gap in the line. A panel with nothing to draw still
//!   gets its axes and a "no data" note; a chart without panels says so too.
//! * All text is XML-escaped and the output is a standalone SVG document
//!   starting with `<svg` and ending with `</svg>`.
//!
//! ```
//! use hotcopy_bench::plot::{Chart, Panel, Series};
//! let chart = Chart {
//!     title: "write latency".into(),
//!     x_label: "seconds".into(),
//!     panels: vec![Panel {
//!         title: "latency".into(),
//!         y_label: "µs".into(),
//!         series: vec![Series {
//!             name: "p99".into(),
//!             points: vec![(0.0, 12.0), (1.0, 15.0)],
//!             dashed: false,
//!         }],
//!         ..Default::default()
//!     }],
//!     markers: vec![(0.5, "backup start".into())],
//! };
//! let svg = chart.to_svg();
//! assert!(svg.starts_with("<svg") && svg.contains("backup start"));
//! ```

use std::fmt::{self, Write as _};
use std::path::Path;

/// One line of a panel.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Shown in the panel's legend.
    pub name: String,
    /// `(x, y)` pairs, joined in the order given. A point with a NaN or
    /// infinite coordinate (or `y <= 0` on a log axis) is skipped and breaks
    /// the line.
    pub points: Vec<(f64, f64)>,
    /// Draw with a dashed stroke (e.g. a capacity line).
    pub dashed: bool,
}

/// One plot area with its own y axis; panels share the chart's x axis.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Logarithmic y axis. `None` chooses: log when every value is positive
    /// and max/min > 100.
    pub log_y: Option<bool>,
    /// Fixed lower end of the y axis; `None` fits the data (rounded out to a
    /// tick). Ignored when not finite, or not positive on a log axis.
    pub y_min: Option<f64>,
    /// Fixed upper end of the y axis, as `y_min`.
    pub y_max: Option<f64>,
}

/// Vertically stacked panels sharing the x axis.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub panels: Vec<Panel>,
    /// Vertical lines at x, each with a label, drawn across every panel.
    pub markers: Vec<(f64, String)>,
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        render(self)
    }

    /// Writes [`Chart::to_svg`] to `path`.
    pub fn write_svg(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_svg())
    }
}

// ---------------------------------------------------------------------------
// Layout constants (pixels).

const WIDTH: f64 = 900.0;
/// Minimum height of a panel's plot area; a panel is this plus its title row
/// and x tick row, 220 px in all.
const PLOT_H: f64 = 170.0;
const PANEL_TITLE_H: f64 = 24.0;
const X_TICK_H: f64 = 26.0;
const MARKER_ROW_H: f64 = 14.0;
const LEGEND_ROW_H: f64 = 16.0;
/// Rough advance of one character at the given font size, for layout only.
const CHAR_W: f64 = 0.6;
const FONT: &str = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif";
const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Pixel coordinates are clamped to this; anything that far out is clipped.
const PX_LIMIT: f64 = 1e5;
/// Data magnitudes are clamped to this so spans stay finite.
const VAL_LIMIT: f64 = 1e300;
/// Smallest value a log axis reaches.
const LOG_MIN: f64 = 1e-300;

/// `let _ = write!(...)`: writing to a `String` cannot fail.
macro_rules! w {
    ($($t:tt)*) => {{
        let _ = write!($($t)*);
    }};
}

/// A pixel coordinate, printed with one decimal and clamped.
struct P(f64);

impl fmt::Display for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.0.is_finite() {
            self.0.clamp(-PX_LIMIT, PX_LIMIT)
        } else {
            0.0
        };
        write!(f, "{v:.1}")
    }
}

/// Escapes text for XML content and attribute values, replacing tabs and
/// newlines with spaces and dropping other characters XML 1.0 forbids.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' | '\n' | '\r' => o.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => o.push(c),
        }
    }
    o
}

/// Approximate width of `s` in pixels at `size`.
fn text_w(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * CHAR_W
}

// ---------------------------------------------------------------------------
// Axes and ticks.

/// A resolved axis. For a log axis `lo`/`hi` are log10 of the ends.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    /// Labelled ticks (data values) with their labels.
    ticks: Vec<(f64, String)>,
    /// Unlabelled grid lines (2..9 × 10^k on short log axes).
    minor: Vec<f64>,
}

impl Axis {
    /// Where `v` falls, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        let t = if self.log { v.max(LOG_MIN).log10() } else { v };
        (t - self.lo) / (self.hi - self.lo)
    }
}

/// The 1-2-5 step giving at most about `target` intervals over `span`.
fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 + 1e-9 {
        1.0
    } else if norm <= 2.0 + 1e-9 {
        2.0
    } else if norm <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    let step = m * mag;
    if step.is_finite() && step > 0.0 {
        step
    } else {
        raw
    }
}

/// Multiples of `step` within `[lo, hi]`; empty when there would be
/// unreasonably many (the step is lost in the precision of the ends).
fn linear_ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let k0 = (lo / step - 1e-9).ceil();
    let k1 = (hi / step + 1e-9).floor();
    if !(k0.is_finite() && k1.is_finite()) || k1 < k0 || k1 - k0 > 1000.0 {
        return Vec::new();
    }
    (0..=(k1 - k0) as i64)
        .map(|i| {
            let v = (k0 + i as f64) * step;
            if v.abs() < step * 1e-9 {
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// Labels for linear ticks `step` apart: k/M/G suffixes for large values,
/// just enough decimals for the step, exponent form for extreme magnitudes.
fn linear_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let max = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    if max >= 1e12 || (max > 0.0 && max < 1e-4) {
        let p = (max.log10().floor() - step.log10().floor()).clamp(0.0, 12.0) as usize;
        return ticks
            .iter()
            .map(|&t| {
                if t == 0.0 {
                    "0".to_string()
                } else {
                    format!("{t:.p$e}")
                }
            })
            .collect();
    }
    let (div, suffix) = if max >= 1e9 {
        (1e9, "G")
    } else if max >= 1e6 {
        (1e6, "M")
    } else if max >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let dec = (-(step / div).log10() - 1e-9).ceil().clamp(0.0, 12.0) as usize;
    ticks
        .iter()
        .map(|&t| {
            let s = format!("{:.*}", dec, t / div);
            if s.trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
            {
                "0".to_string()
            } else {
                format!("{s}{suffix}")
            }
        })
        .collect()
}

/// The label of `m × 10^d` on a log axis: "500", "1k", "20M", "0.05", "1e-7".
fn log_label(m: u32, d: i32) -> String {
    let int = |e: i32| u64::from(m) * 10u64.pow(e as u32);
    match d {
        12.. | ..=-5 => format!("{m}e{d}"),
        9..=11 => format!("{}G", int(d - 9)),
        6..=8 => format!("{}M", int(d - 6)),
        3..=5 => format!("{}k", int(d - 3)),
        0..=2 => format!("{}", int(d)),
        _ => format!("{:.*}", (-d) as usize, f64::from(m) * 10f64.powi(d)),
    }
}

/// Shortest readable form of an arbitrary value, for fallback labels.
fn any_label(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else if v.abs() >= 1e6 || v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{:.4}", v)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// A linear axis over `lo < hi`; an end that is not fixed is rounded out to a
/// multiple of the tick step.
fn linear_axis(mut lo: f64, mut hi: f64, fixed_lo: bool, fixed_hi: bool, target: usize) -> Axis {
    let step = nice_step(hi - lo, target);
    if !fixed_lo {
        let l = (lo / step + 1e-9).floor() * step;
        if l.is_finite() {
            lo = l;
        }
    }
    if !fixed_hi {
        let h = (hi / step - 1e-9).ceil() * step;
        if h.is_finite() {
            hi = h;
        }
    }
    let values = linear_ticks(lo, hi, step);
    let ticks = if values.is_empty() {
        vec![(lo, any_label(lo)), (hi, any_label(hi))]
    } else {
        let labels = linear_labels(&values, step);
        values.into_iter().zip(labels).collect()
    };
    Axis {
        lo,
        hi,
        log: false,
        ticks,
        minor: Vec::new(),
    }
}

/// A log axis over `0 < lo < hi`; an end that is not fixed is rounded out to
/// a decade.
fn log_axis(lo: f64, hi: f64, fixed_lo: bool, fixed_hi: bool) -> Axis {
    let mut a = lo.clamp(LOG_MIN, VAL_LIMIT).log10();
    let mut b = hi.clamp(LOG_MIN, VAL_LIMIT).log10();
    if !fixed_lo {
        a = (a + 1e-9).floor();
    }
    if !fixed_hi {
        b = (b - 1e-9).ceil();
    }
    if b - a < 1e-9 {
        b = a + 1.0;
    }
    let in_range = |v: f64| {
        let t = v.log10();
        t >= a - 1e-9 && t <= b + 1e-9
    };
    let d0 = (a - 1e-9).ceil() as i32;
    let d1 = (b + 1e-9).floor() as i32;
    let stride = ((b - a) / 8.0).ceil().max(1.0) as i32;
    let mut ticks: Vec<(f64, String)> = (d0..=d1)
        .filter(|d| d.rem_euclid(stride) == 0)
        .map(|d| (10f64.powi(d), log_label(1, d)))
        .collect();
    let mut minor = Vec::new();
    let short = b - a <= 2.0 + 1e-9;
    if b - a <= 4.0 + 1e-9 {
        for d in (a.floor() as i32)..=(b.ceil() as i32) {
            for m in 2..=9u32 {
                let v = f64::from(m) * 10f64.powi(d);
                if !in_range(v) {
                    continue;
                }
                if short && (m == 2 || m == 5) {
                    ticks.push((v, log_label(m, d)));
                } else {
                    minor.push(v);
                }
            }
        }
    }
    ticks.sort_by(|x, y| x.0.total_cmp(&y.0));
    if ticks.is_empty() {
        let (l, h) = (10f64.powf(a), 10f64.powf(b));
        ticks = vec![(l, any_label(l)), (h, any_label(h))];
    }
    Axis {
        lo: a,
        hi: b,
        log: true,
        ticks,
        minor,
    }
}

/// Whether a point can be drawn on an axis with the given scale.
fn plottable(p: (f64, f64), log: bool) -> bool {
    p.0.is_finite() && p.1.is_finite() && (!log || p.1 > 0.0)
}

/// Whether a panel left on automatic gets a log axis: every value positive
/// and max/min > 100.
fn auto_log(panel: &Panel) -> bool {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in &panel.series {
        for &p in &s.points {
            if plottable(p, false) {
                if p.1 <= 0.0 {
                    return false;
                }
                lo = lo.min(p.1);
                hi = hi.max(p.1);
            }
        }
    }
    lo.is_finite() && hi / lo > 100.0
}

/// The y axis of a panel.
fn y_axis(panel: &Panel, log: bool) -> Axis {
    let mut dlo = f64::INFINITY;
    let mut dhi = f64::NEG_INFINITY;
    for s in &panel.series {
        for &p in &s.points {
            if plottable(p, log) {
                let y = p.1.clamp(-VAL_LIMIT, VAL_LIMIT);
                dlo = dlo.min(y);
                dhi = dhi.max(y);
            }
        }
    }
    let data = (dlo <= dhi).then_some((dlo, dhi));
    let user = |v: Option<f64>| {
        v.filter(|v| v.is_finite() && (!log || *v > 0.0))
            .map(|v| v.clamp(-VAL_LIMIT, VAL_LIMIT))
    };
    let (mut ulo, mut uhi) = (user(panel.y_min), user(panel.y_max));
    if let (Some(l), Some(h)) = (ulo, uhi) {
        if l > h {
            (ulo, uhi) = (Some(h), Some(l));
        }
    }
    if log {
        let (mut lo, mut hi) = match (ulo.or(data.map(|d| d.0)), uhi.or(data.map(|d| d.1))) {
            (Some(l), Some(h)) => (l, h),
            (Some(l), None) => (l, l * 10.0),
            (None, Some(h)) => (h / 10.0, h),
            (None, None) => (1.0, 10.0),
        };
        if lo > hi {
            std::mem::swap(&mut lo, &mut hi);
        }
        if hi <= lo * (1.0 + 1e-9) {
            if ulo.is_none() || uhi.is_some() {
                lo /= 10.0;
            }
            if uhi.is_none() {
                hi *= 10.0;
            }
        }
        log_axis(lo, hi, ulo.is_some(), uhi.is_some())
    } else {
        let (mut lo, mut hi) = match (ulo.or(data.map(|d| d.0)), uhi.or(data.map(|d| d.1))) {
            (Some(l), Some(h)) => (l, h),
            (Some(l), None) => (l, l + l.abs().max(1.0)),
            (None, Some(h)) => (h - h.abs().max(1.0), h),
            (None, None) => (0.0, 1.0),
        };
        if lo > hi {
            std::mem::swap(&mut lo, &mut hi);
        }
        // Start at zero when the data sits well clear of it on one side.
        if ulo.is_none() && lo > 0.0 && lo <= hi * 0.5 {
            lo = 0.0;
        }
        if uhi.is_none() && hi < 0.0 && hi >= lo * 0.5 {
            hi = 0.0;
        }
        if hi - lo <= lo.abs().max(hi.abs()) * 1e-12 {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            let both = ulo.is_some() && uhi.is_some();
            if ulo.is_none() || both {
                lo -= pad;
            }
            if uhi.is_none() || both {
                hi += pad;
            }
        }
        linear_axis(lo, hi, ulo.is_some(), uhi.is_some(), 5)
    }
}

/// The shared x range: every drawable point and marker, tight, starting at
/// zero when the data starts close to it.
fn x_range(chart: &Chart) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    let xs = chart
        .panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| &s.points)
        .filter(|p| plottable(**p, false))
        .map(|p| p.0)
        .chain(chart.markers.iter().map(|m| m.0).filter(|x| x.is_finite()));
    for x in xs {
        let x = x.clamp(-VAL_LIMIT, VAL_LIMIT);
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo <= lo.abs().max(hi.abs()) * 1e-12 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    if lo > 0.0 && lo < 0.05 * (hi - lo) {
        lo = 0.0;
    }
    (lo, hi)
}

// ---------------------------------------------------------------------------
// Rendering.

/// A panel with its axis resolved and its place on the page.
struct PanelPlan<'a> {
    panel: &'a Panel,
    y: Axis,
    has_data: bool,
    plot_h: f64,
    /// Legend entries: display name and whether the series has nothing to draw.
    legend: Vec<(String, bool)>,
}

/// A marker label placed in the band above the first panel.
struct MarkerLabel {
    px: f64,
    text: String,
    anchor_end: bool,
    row: usize,
}

fn series_name(s: &Series, i: usize) -> String {
    if s.name.trim().is_empty() {
        format!("series {}", i + 1)
    } else {
        s.name.clone()
    }
}

fn render(chart: &Chart) -> String {
    let plans: Vec<PanelPlan> = chart
        .panels
        .iter()
        .map(|panel| {
            let log = panel.log_y.unwrap_or_else(|| auto_log(panel));
            let has_data = panel
                .series
                .iter()
                .any(|s| s.points.iter().any(|p| plottable(*p, log)));
            let legend: Vec<(String, bool)> = panel
                .series
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let empty = !s.points.iter().any(|p| plottable(*p, log));
                    (series_name(s, j), empty)
                })
                .collect();
            let legend_h = legend.len() as f64 * LEGEND_ROW_H + 14.0;
            PanelPlan {
                panel,
                y: y_axis(panel, log),
                has_data,
                plot_h: PLOT_H.max(legend_h),
                legend,
            }
        })
        .collect();

    // Horizontal layout: y tick labels on the left, legends on the right.
    let widest_tick = plans
        .iter()
        .flat_map(|p| &p.y.ticks)
        .map(|t| text_w(&t.1, 11.0))
        .fold(0.0, f64::max);
    let left = (widest_tick + 44.0).clamp(64.0, 180.0);
    let widest_name = plans
        .iter()
        .flat_map(|p| &p.legend)
        .map(|(name, empty)| {
            text_w(name, 12.0)
                + if *empty {
                    text_w(" (no data)", 12.0)
                } else {
                    0.0
                }
        })
        .fold(0.0, f64::max);
    let legend_w = (widest_name + 50.0).clamp(120.0, 240.0);
    let (pl, pr) = (left, WIDTH - legend_w);
    let (xlo, xhi) = x_range(chart);
    let x_axis = linear_axis(xlo, xhi, true, true, ((pr - pl) / 90.0) as usize);
    let xpx = |v: f64| pl + x_axis.frac(v.clamp(-VAL_LIMIT, VAL_LIMIT)) * (pr - pl);

    // Marker labels, stacked in rows where they would overlap.
    let mut row_ends: Vec<f64> = Vec::new();
    let mut markers: Vec<MarkerLabel> = Vec::new();
    let mut sorted: Vec<&(f64, String)> =
        chart.markers.iter().filter(|m| m.0.is_finite()).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (x, text) in sorted {
        let px = xpx(*x);
        let w = text_w(text, 11.0);
        let anchor_end = px + 4.0 + w > WIDTH - 4.0 && px - 4.0 - w >= 4.0;
        let (start, end) = if anchor_end {
            (px - 4.0 - w, px)
        } else {
            (px, px + 4.0 + w)
        };
        let row = match row_ends.iter().position(|&e| start > e + 6.0) {
            Some(r) => r,
            None => {
                row_ends.push(f64::NEG_INFINITY);
                row_ends.len() - 1
            }
        };
        row_ends[row] = end;
        markers.push(MarkerLabel {
            px,
            text: text.clone(),
            anchor_end,
            row,
        });
    }
    let marker_band = if row_ends.is_empty() {
        0.0
    } else {
        row_ends.len() as f64 * MARKER_ROW_H + 6.0
    };

    // Vertical layout.
    let top = if chart.title.trim().is_empty() {
        12.0
    } else {
        42.0
    };
    let mut height = top;
    let mut plot_tops = Vec::with_capacity(plans.len());
    for (i, p) in plans.iter().enumerate() {
        height += PANEL_TITLE_H;
        if i == 0 {
            height += marker_band;
        }
        plot_tops.push(height);
        height += p.plot_h + X_TICK_H;
    }
    height += if plans.is_empty() { 60.0 } else { 26.0 };
    let height = height.ceil();

    let mut o = String::with_capacity(16 * 1024);
    w!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"{FONT}\" font-size=\"12\" fill=\"#222\">\n",
        w = WIDTH,
        h = height
    );
    w!(
        o,
        "<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>\n",
        WIDTH,
        height
    );
    if !chart.title.trim().is_empty() {
        w!(
            o,
            "<text x=\"{}\" y=\"26\" text-anchor=\"middle\" font-size=\"16\" \
             font-weight=\"bold\">{}</text>\n",
            P(WIDTH / 2.0),
            esc(&chart.title)
        );
    }
    if plans.is_empty() {
        w!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\" \
             font-style=\"italic\" fill=\"#999\">no data</text>\n",
            P(WIDTH / 2.0),
            P(top + 30.0)
        );
        o.push_str("</svg>\n");
        return o;
    }

    // Clip paths, one per plot area (a little wider so edge lines show whole).
    o.push_str("<defs>\n");
    for (i, p) in plans.iter().enumerate() {
        w!(
            o,
            "<clipPath id=\"hcplot-clip-{i}\"><rect x=\"{}\" y=\"{}\" width=\"{}\" \
             height=\"{}\"/></clipPath>\n",
            P(pl - 2.0),
            P(plot_tops[i] - 2.0),
            P(pr - pl + 4.0),
            P(p.plot_h + 4.0)
        );
    }
    o.push_str("</defs>\n");

    let last = plans.len() - 1;
    for (i, plan) in plans.iter().enumerate() {
        let pt = plot_tops[i];
        let pb = pt + plan.plot_h;
        let title_y = pt - if i == 0 { marker_band } else { 0.0 } - 7.0;
        let ypx = |v: f64| pb - plan.y.frac(v) * plan.plot_h;
        let panel = plan.panel;
        w!(o, "<g>\n");
        if !panel.title.trim().is_empty() {
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}</text>\n",
                P(pl),
                P(title_y),
                esc(&panel.title)
            );
        }
        w!(
            o,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fbfbfb\"/>\n",
            P(pl),
            P(pt),
            P(pr - pl),
            P(plan.plot_h)
        );
        // Grid.
        for &v in &plan.y.minor {
            let y = ypx(v);
            w!(
                o,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eeeeee\" \
                 stroke-width=\"1\"/>\n",
                P(pl),
                P(pr),
                y = P(y)
            );
        }
        for (v, label) in &plan.y.ticks {
            let y = ypx(*v);
            w!(
                o,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#dcdcdc\" \
                 stroke-width=\"1\"/>\n",
                P(pl),
                P(pr),
                y = P(y)
            );
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\" \
                 fill=\"#444\">{}</text>\n",
                P(pl - 6.0),
                P(y + 4.0),
                esc(label)
            );
        }
        for (v, label) in &x_axis.ticks {
            let x = xpx(*v);
            w!(
                o,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#dcdcdc\" \
                 stroke-width=\"1\"/>\n",
                P(pt),
                P(pb),
                x = P(x)
            );
            w!(
                o,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#888\" \
                 stroke-width=\"1\"/>\n",
                P(pb),
                P(pb + 4.0),
                x = P(x)
            );
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" \
                 fill=\"#444\">{}</text>\n",
                P(x),
                P(pb + 16.0),
                esc(label)
            );
        }
        w!(
            o,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" \
             stroke=\"#888\" stroke-width=\"1\"/>\n",
            P(pl),
            P(pt),
            P(pr - pl),
            P(plan.plot_h)
        );
        if !panel.y_label.trim().is_empty() {
            w!(
                o,
                "<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\" \
                 font-size=\"12\" fill=\"#333\">{}</text>\n",
                P(pt + plan.plot_h / 2.0),
                esc(&panel.y_label)
            );
        }
        // Markers: through the plot area, and up to the label on the top panel;
        // the labels go on top with a white halo where a line crosses them.
        for m in &markers {
            let y1 = if i == 0 {
                pt - 4.0 - m.row as f64 * MARKER_ROW_H - 8.0
            } else {
                pt
            };
            w!(
                o,
                "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#555\" \
                 stroke-width=\"1.2\" stroke-dasharray=\"5 3\"/>\n",
                P(y1),
                P(pb),
                x = P(m.px)
            );
        }
        if i == 0 {
            for m in &markers {
                let (tx, anchor) = if m.anchor_end {
                    (m.px - 4.0, "end")
                } else {
                    (m.px + 4.0, "start")
                };
                w!(
                    o,
                    "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" font-size=\"11\" \
                     fill=\"#333\" stroke=\"#ffffff\" stroke-width=\"3\" \
                     stroke-linejoin=\"round\" paint-order=\"stroke\">{}</text>\n",
                    P(tx),
                    P(pt - 6.0 - m.row as f64 * MARKER_ROW_H),
                    esc(&m.text)
                );
            }
        }
        // Series.
        w!(o, "<g clip-path=\"url(#hcplot-clip-{i})\" fill=\"none\">\n");
        for (j, s) in panel.series.iter().enumerate() {
            let color = PALETTE[j % PALETTE.len()];
            let dash = if s.dashed {
                " stroke-dasharray=\"7 4\""
            } else {
                ""
            };
            let mut segs: Vec<Vec<(f64, f64)>> = Vec::new();
            let mut cur: Vec<(f64, f64)> = Vec::new();
            for &p in &s.points {
                if plottable(p, plan.y.log) {
                    let q = (xpx(p.0), ypx(p.1.clamp(-VAL_LIMIT, VAL_LIMIT)));
                    let same = cur.last().is_some_and(|l: &(f64, f64)| {
                        (l.0 - q.0).abs() < 0.05 && (l.1 - q.1).abs() < 0.05
                    });
                    if !same {
                        cur.push(q);
                    }
                } else if !cur.is_empty() {
                    segs.push(std::mem::take(&mut cur));
                }
            }
            if !cur.is_empty() {
                segs.push(cur);
            }
            for seg in segs {
                if let [(x, y)] = seg[..] {
                    w!(
                        o,
                        "<circle cx=\"{}\" cy=\"{}\" r=\"2.2\" fill=\"{color}\"/>\n",
                        P(x),
                        P(y)
                    );
                    continue;
                }
                w!(o, "<polyline points=\"");
                for (k, (x, y)) in seg.iter().enumerate() {
                    if k > 0 {
                        o.push(' ');
                    }
                    w!(o, "{},{}", P(*x), P(*y));
                }
                w!(
                    o,
                    "\" stroke=\"{color}\" stroke-width=\"1.6\" stroke-linejoin=\"round\" \
                     stroke-linecap=\"round\"{dash}/>\n"
                );
            }
        }
        o.push_str("</g>\n");
        if !plan.has_data {
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\" \
                 font-style=\"italic\" fill=\"#999\">no data</text>\n",
                P((pl + pr) / 2.0),
                P(pt + plan.plot_h / 2.0 + 5.0)
            );
        }
        // Legend.
        let lx = pr + 14.0;
        let max_chars = ((WIDTH - lx - 36.0) / (12.0 * CHAR_W)).max(4.0) as usize;
        for (j, s) in panel.series.iter().enumerate() {
            let color = PALETTE[j % PALETTE.len()];
            let ly = pt + 14.0 + j as f64 * LEGEND_ROW_H;
            let dash = if s.dashed {
                " stroke-dasharray=\"5 3\""
            } else {
                ""
            };
            w!(
                o,
                "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{color}\" \
                 stroke-width=\"2\"{dash}/>\n",
                P(lx),
                P(lx + 22.0),
                y = P(ly - 4.0)
            );
            let (name, empty) = (&plan.legend[j].0, plan.legend[j].1);
            let mut shown = if empty {
                format!("{name} (no data)")
            } else {
                name.clone()
            };
            let long = shown.chars().count() > max_chars;
            if long {
                shown = shown.chars().take(max_chars - 1).collect::<String>() + "…";
            }
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" font-size=\"12\"{}>",
                P(lx + 28.0),
                P(ly),
                if empty { " fill=\"#888\"" } else { "" }
            );
            if long {
                w!(o, "<title>{}</title>", esc(name));
            }
            w!(o, "{}</text>\n", esc(&shown));
        }
        if i == last && !chart.x_label.trim().is_empty() {
            w!(
                o,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" \
                 fill=\"#333\">{}</text>\n",
                P((pl + pr) / 2.0),
                P(pb + 38.0),
                esc(&chart.x_label)
            );
        }
        o.push_str("</g>\n");
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal XML well-formedness check for what `render` emits: one root
    /// `<svg>`, balanced tags, quoted attributes without `<`, valid entity
    /// references, and finite numbers in every geometry attribute.
    fn check_xml(svg: &str) -> Result<(), String> {
        let s = svg.trim();
        if !s.starts_with("<svg") || !s.ends_with("</svg>") {
            return Err("not a <svg> ... </svg> document".into());
        }
        let check_entities = |t: &str| -> Result<(), String> {
            let mut rest = t;
            while let Some(i) = rest.find('&') {
                let after = &rest[i + 1..];
                let end = after.find(';').ok_or("unterminated entity")?;
                let name = &after[..end];
                if !matches!(name, "amp" | "lt" | "gt" | "quot" | "apos") {
                    return Err(format!("unknown entity &{name};"));
                }
                rest = &after[end + 1..];
            }
            Ok(())
        };
        let numeric = [
            "x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "r", "width", "height",
        ];
        let b = s.as_bytes();
        let mut stack: Vec<String> = Vec::new();
        let mut closed_root = false;
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'<' {
                let j = s[i..].find('<').map_or(b.len(), |k| i + k);
                let text = &s[i..j];
                if text.contains('>') {
                    return Err(format!("raw '>' in text {text:?}"));
                }
                check_entities(text)?;
                if (stack.is_empty() || closed_root) && !text.trim().is_empty() {
                    return Err(format!("text outside the root: {text:?}"));
                }
                i = j;
                continue;
            }
            if closed_root {
                return Err("content after the root element".into());
            }
            i += 1;
            let closing = b.get(i) == Some(&b'/');
            if closing {
                i += 1;
            }
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b"-_:".contains(&b[i])) {
                i += 1;
            }
            let name = s[start..i].to_string();
            if name.is_empty() {
                return Err(format!("bad tag at byte {start}"));
            }
            let mut self_closing = false;
            loop {
                while i < b.len() && b[i].is_ascii_whitespace() {
                    i += 1;
                }
                match b.get(i) {
                    None => return Err("unterminated tag".into()),
                    Some(b'>') => {
                        i += 1;
                        break;
                    }
                    Some(b'/') if !closing && b.get(i + 1) == Some(&b'>') => {
                        self_closing = true;
                        i += 2;
                        break;
                    }
                    Some(_) if closing => return Err(format!("junk in </{name}>")),
                    Some(_) => {}
                }
                let a0 = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"-_:".contains(&b[i])) {
                    i += 1;
                }
                let attr = &s[a0..i];
                if attr.is_empty() || b.get(i) != Some(&b'=') || b.get(i + 1) != Some(&b'"') {
                    return Err(format!("bad attribute in <{name}> at byte {a0}"));
                }
                i += 2;
                let v_end = s[i..].find('"').ok_or("unterminated attribute")? + i;
                let value = &s[i..v_end];
                if value.contains('<') {
                    return Err(format!("'<' in attribute {attr}"));
                }
                check_entities(value)?;
                if numeric.contains(&attr) && !value.ends_with('%') {
                    let v: f64 = value
                        .parse()
                        .map_err(|_| format!("{attr}={value:?} is not a number"))?;
                    if !v.is_finite() {
                        return Err(format!("{attr}={value:?} is not finite"));
                    }
                }
                if attr == "points" {
                    for pair in value.split(' ') {
                        let (x, y) = pair.split_once(',').ok_or("bad point")?;
                        for c in [x, y] {
                            let v: f64 = c.parse().map_err(|_| format!("bad point {pair:?}"))?;
                            if !v.is_finite() {
                                return Err(format!("point {pair:?} is not finite"));
                            }
                        }
                    }
                }
                i = v_end + 1;
            }
            if closing {
                match stack.pop() {
                    Some(open) if open == name => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
                if stack.is_empty() {
                    closed_root = true;
                }
            } else if self_closing {
                if stack.is_empty() {
                    return Err("self-closing root".into());
                }
            } else {
                stack.push(name);
            }
        }
        if !stack.is_empty() || !closed_root {
            return Err(format!("unclosed elements {stack:?}"));
        }
        Ok(())
    }

    fn series(name: &str, points: Vec<(f64, f64)>, dashed: bool) -> Series {
        Series {
            name: name.into(),
            points,
            dashed,
        }
    }

    /// Deterministic xorshift64* generator for the tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// What `hotcopy bench cow --plot` draws: a 60 s run with a backup from
    /// 10 s to 45 s.
    fn example_chart() -> Chart {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (start, end) = (10.0, 45.0);
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut used = Vec::new();
        let mut progress = Vec::new();
        for i in 0..=120 {
            let t = i as f64 * 0.5;
            let during = t >= start && t <= end;
            let jitter = 1.0 + 0.25 * (rng.unit() - 0.5);
            let (l50, l99) = if during {
                (38.0 * jitter, (900.0 + 2500.0 * rng.unit()) * jitter)
            } else {
                (18.0 * jitter, 60.0 * jitter)
            };
            p50.push((t, l50));
            p99.push((t, l99));
            let frac = ((t - start) / (end - start)).clamp(0.0, 1.0);
            let slots = if during {
                3100.0 * (std::f64::consts::PI * frac).sin() * jitter
            } else {
                0.0
            };
            used.push((t, slots));
            if t >= start {
                progress.push((t, 100.0 * frac));
            }
        }
        // A bucket without writes: a gap in the latency lines.
        p50[30].1 = f64::NAN;
        p99[30].1 = f64::NAN;
        Chart {
            title: "hotcopy bench cow: randwrite 4k QD32 on m0 <during backup>".into(),
            x_label: "seconds since the start of the run".into(),
            panels: vec![
                Panel {
                    title: "foreground write latency".into(),
                    y_label: "latency (µs)".into(),
                    series: vec![series("p50", p50, false), series("p99", p99, false)],
                    ..Default::default()
                },
                Panel {
                    title: "container fill".into(),
                    y_label: "slots".into(),
                    series: vec![
                        series("slots used", used, false),
                        series("capacity", vec![(0.0, 4096.0), (60.0, 4096.0)], true),
                    ],
                    y_min: Some(0.0),
                    ..Default::default()
                },
                Panel {
                    title: "copy progress".into(),
                    y_label: "chunks done (%)".into(),
                    series: vec![series("copied", progress, false)],
                    y_min: Some(0.0),
                    y_max: Some(100.0),
                    ..Default::default()
                },
            ],
            markers: vec![(start, "backup start".into()), (end, "backup end".into())],
        }
    }

    #[test]
    fn nice_linear_ticks_use_1_2_5_steps() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(63.2, 8), 10.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(0.003, 5), 0.001);
        assert_eq!(nice_step(45.0, 10), 5.0);
        assert_eq!(
            linear_ticks(0.0, 100.0, 20.0),
            [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(linear_ticks(-3.7, 12.1, 5.0), [0.0, 5.0, 10.0]);
        // The ends of an automatic axis round out to a tick.
        let a = linear_axis(3.0, 97.0, false, false, 5);
        assert_eq!((a.lo, a.hi), (0.0, 100.0));
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0", "20", "40", "60", "80", "100"]);
        // Fixed ends stay; ticks fall inside.
        let a = linear_axis(0.3, 59.8, true, true, 7);
        assert_eq!((a.lo, a.hi), (0.3, 59.8));
        assert_eq!(a.ticks.first().unwrap().1, "10");
        assert_eq!(a.ticks.last().unwrap().1, "50");
        // Decimals follow the step; large values get a suffix; no "-0".
        let a = linear_axis(0.0, 0.5, true, true, 5);
        assert_eq!(a.ticks[1].1, "0.1");
        let a = linear_axis(-0.25, 0.25, true, true, 5);
        assert!(a.ticks.iter().any(|t| t.1 == "0"), "{:?}", a.ticks);
        assert!(!a.ticks.iter().any(|t| t.1 == "-0" || t.1 == "-0.0"));
        let a = linear_axis(0.0, 3_000_000.0, false, false, 5);
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0", "1M", "2M", "3M"]);
        let a = linear_axis(0.0, 2_400_000.0, false, false, 5);
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0", "0.5M", "1.0M", "1.5M", "2.0M", "2.5M"]);
        let a = linear_axis(0.0, 40_000.0, false, false, 5);
        assert_eq!(a.ticks[1].1, "10k");
        assert_eq!(linear_labels(&[1500.0, 2000.0], 500.0), ["1500", "2000"]);
        // Every tick count stays small for any span.
        for span in [1e-9, 0.07, 1.0, 3.3, 999.0, 1e7, 1e300] {
            let a = linear_axis(-span / 3.0, span, false, false, 5);
            assert!((2..=12).contains(&a.ticks.len()), "{span}: {:?}", a.ticks);
        }
    }

    #[test]
    fn nice_log_ticks_use_decades() {
        let a = log_axis(3.0, 45_000.0, false, false);
        assert_eq!((a.lo, a.hi), (0.0, 5.0));
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["1", "10", "100", "1k", "10k", "100k"]);
        assert!(a.minor.is_empty(), "five decades: no minor grid");
        let a = log_axis(3.0, 4500.0, false, false);
        assert_eq!((a.lo, a.hi), (0.0, 4.0));
        assert_eq!(a.ticks.len(), 5);
        assert!(a.minor.contains(&20.0) && a.minor.contains(&9000.0));
        assert_eq!(a.minor.len(), 4 * 8);
        // Two decades or less: 2 and 5 get labels as well.
        let a = log_axis(0.5, 8.0, false, false);
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0.1", "0.2", "0.5", "1", "2", "5", "10"]);
        // Many decades: every other one (or fewer) is labelled.
        let a = log_axis(1e-10, 1e10, false, false);
        assert!(a.ticks.len() <= 11, "{:?}", a.ticks);
        assert!(a.ticks.iter().any(|t| t.1 == "1"));
        assert!(a.minor.is_empty());
        // Less than a decade, fixed ends: still labelled.
        let a = log_axis(20.0, 80.0, true, true);
        let labels: Vec<&str> = a.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["20", "50"]);
        let a = log_axis(21.0, 29.0, true, true);
        assert_eq!(a.ticks.len(), 2);
        assert_eq!(log_label(1, 6), "1M");
        assert_eq!(log_label(5, -2), "0.05");
        assert_eq!(log_label(2, -7), "2e-7");
        assert_eq!(log_label(1, 15), "1e15");
    }

    #[test]
    fn log_scale_is_chosen_when_the_range_exceeds_100x() {
        let mut p = Panel {
            series: vec![series("a", vec![(0.0, 10.0), (1.0, 2000.0)], false)],
            ..Default::default()
        };
        assert!(auto_log(&p));
        assert!(y_axis(&p, true).log);
        p.series[0].points[1].1 = 900.0;
        assert!(!auto_log(&p));
        p.series[0].points.push((2.0, 0.0));
        p.series[0].points.push((3.0, 1e6));
        assert!(!auto_log(&p), "a zero rules log out");
        // Linear automatic axes start at zero when the data is well above it.
        let p = Panel {
            series: vec![series("a", vec![(0.0, 40.0), (1.0, 95.0)], false)],
            ..Default::default()
        };
        let a = y_axis(&p, false);
        assert_eq!((a.lo, a.hi), (0.0, 100.0));
        // Bounds given the wrong way round are swapped, not fatal.
        let p = Panel {
            y_min: Some(10.0),
            y_max: Some(0.0),
            ..Default::default()
        };
        let a = y_axis(&p, false);
        assert_eq!((a.lo, a.hi), (0.0, 10.0));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("a<b & \"c\" 'd' >"),
            "a&lt;b &amp; &quot;c&quot; &apos;d&apos; &gt;"
        );
        assert_eq!(esc("x\u{0}y\u{1b}z\tw\nµs"), "xyz w µs");
        let chart = Chart {
            title: "<t&itle>".into(),
            x_label: "x \"label\"".into(),
            panels: vec![Panel {
                title: "p<1>".into(),
                y_label: "y&y".into(),
                series: vec![series("a&b<c>", vec![(0.0, 1.0), (1.0, 2.0)], false)],
                ..Default::default()
            }],
            markers: vec![(0.5, "m'1\"<".into())],
        };
        let svg = chart.to_svg();
        check_xml(&svg).unwrap();
        for s in [
            "&lt;t&amp;itle&gt;",
            "a&amp;b&lt;c&gt;",
            "m&apos;1&quot;&lt;",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
        assert!(!svg.contains("<t&"));
    }

    #[test]
    fn empty_data_draws_axes_and_a_note() {
        let svg = Chart::default().to_svg();
        check_xml(&svg).unwrap();
        assert!(svg.contains("no data"));

        let chart = Chart {
            title: "empty".into(),
            x_label: "s".into(),
            panels: vec![
                Panel::default(),
                Panel {
                    title: "empty series".into(),
                    series: vec![
                        Series::default(),
                        series("nan", vec![(f64::NAN, 1.0)], false),
                    ],
                    ..Default::default()
                },
                Panel {
                    title: "log without positives".into(),
                    log_y: Some(true),
                    series: vec![series("neg", vec![(0.0, -1.0), (1.0, 0.0)], false)],
                    ..Default::default()
                },
                Panel {
                    title: "one point".into(),
                    series: vec![series("one", vec![(2.0, 5.0)], false)],
                    ..Default::default()
                },
            ],
            markers: vec![(f64::NAN, "nowhere".into()), (1.0, "here".into())],
        };
        let svg = chart.to_svg();
        check_xml(&svg).unwrap();
        assert_eq!(svg.matches(">no data</text>").count(), 3, "{svg}");
        assert!(svg.contains("series 1 (no data)"));
        assert!(svg.contains("nan (no data)"));
        assert!(svg.contains("<circle"), "a lone point is drawn as a dot");
        assert!(svg.contains(">here</text>"));
        assert!(!svg.contains("nowhere"));
        // Axes are drawn even with nothing to plot.
        assert_eq!(svg.matches("fill=\"none\" stroke=\"#888\"").count(), 4);
    }

    #[test]
    fn nan_and_inf_points_are_skipped_and_break_the_line() {
        let chart = Chart {
            panels: vec![Panel {
                series: vec![series(
                    "gappy",
                    vec![
                        (0.0, 1.0),
                        (1.0, 2.0),
                        (2.0, f64::NAN),
                        (f64::INFINITY, 3.0),
                        (3.0, 3.0),
                        (4.0, f64::NEG_INFINITY),
                        (5.0, 4.0),
                        (6.0, 5.0),
                    ],
                    false,
                )],
                ..Default::default()
            }],
            ..Default::default()
        };
        let svg = chart.to_svg();
        check_xml(&svg).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn full_chart_round_trips_through_a_file() {
        let chart = example_chart();
        // Left in the temp directory for a look: /tmp/plot-example.svg.
        let path = std::env::temp_dir().join("plot-example.svg");
        chart.write_svg(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg, chart.to_svg());
        check_xml(&svg).unwrap();
        for s in [
            "p50",
            "p99",
            "slots used",
            "capacity",
            "copied",
            "backup start",
            "backup end",
            "foreground write latency",
            "latency (µs)",
            "seconds since the start of the run",
            "&lt;during backup&gt;",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
        // Latency spans more than 100x, so its axis is in decades.
        assert!(svg.contains(">1k</text>") && svg.contains(">100</text>"));
        // The capacity line is dashed, the three plot areas clipped.
        assert!(svg.contains("stroke-dasharray=\"7 4\""));
        assert_eq!(svg.matches("<clipPath").count(), 3);
        // The NaN bucket breaks both latency lines in two.
        assert_eq!(svg.matches("<polyline").count(), 2 * 2 + 2 + 1);
        let height: f64 = svg
            .split("height=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((600.0..800.0).contains(&height), "{height}");
    }

    #[test]
    fn random_charts_never_panic_and_stay_well_formed() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let charset: Vec<char> = "abcXYZ 09_<>&\"'µ-\t\u{1}".chars().collect();
        let text = |rng: &mut Rng| -> String {
            (0..rng.below(12))
                .map(|_| charset[rng.below(charset.len() as u64) as usize])
                .collect()
        };
        let value = |rng: &mut Rng| -> f64 {
            match rng.below(20) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => 0.0,
                4 => -rng.unit() * 1e3,
                5 => 1e300 * rng.unit(),
                6 => 1e-300 * rng.unit(),
                7 => 42.0,
                8 => f64::MAX,
                _ => rng.unit() * 10f64.powi(rng.below(12) as i32 - 4),
            }
        };
        for round in 0..400 {
            let mut chart = Chart {
                title: text(&mut rng),
                x_label: text(&mut rng),
                ..Default::default()
            };
            for _ in 0..rng.below(4) {
                let mut panel = Panel {
                    title: text(&mut rng),
                    y_label: text(&mut rng),
                    log_y: [None, Some(true), Some(false)][rng.below(3) as usize],
                    ..Default::default()
                };
                if rng.below(3) == 0 {
                    panel.y_min = Some(value(&mut rng));
                }
                if rng.below(3) == 0 {
                    panel.y_max = Some(value(&mut rng));
                }
                for _ in 0..rng.below(5) {
                    let n = rng.below(60);
                    let mut t = value(&mut rng);
                    let points = (0..n)
                        .map(|_| {
                            t = if rng.below(5) == 0 {
                                value(&mut rng)
                            } else {
                                t + rng.unit()
                            };
                            (t, value(&mut rng))
                        })
                        .collect();
                    panel.series.push(Series {
                        name: text(&mut rng),
                        points,
                        dashed: rng.below(2) == 0,
                    });
                }
                chart.panels.push(panel);
            }
            for _ in 0..rng.below(4) {
                chart.markers.push((value(&mut rng), text(&mut rng)));
            }
            let svg = chart.to_svg();
            if let Err(e) = check_xml(&svg) {
                panic!("round {round}: {e}\n{chart:#?}\n{svg}");
            }
            for s in chart.panels.iter().flat_map(|p| &p.series) {
                if !s.name.trim().is_empty() {
                    assert!(svg.contains(&esc(&s.name)), "round {round}: {:?}", s.name);
                }
            }
            for (x, label) in &chart.markers {
                if x.is_finite() && !chart.panels.is_empty() {
                    assert!(svg.contains(&esc(label)), "round {round}: {label:?}");
                }
            }
        }
    }
}
