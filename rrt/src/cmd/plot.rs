//! A small SVG writer for benchmark plots, without dependencies: line charts (axes with
//! "nice" ticks, linear or logarithmic y, polylines with markers, dashed lines, legend) and
//! grouped bar charts. [`document`] lays charts out side by side in one standalone SVG 1.1
//! file that browsers and image viewers open as is.

use std::fmt::Write as _;

/// Series colours (distinguishable, also for the common colour-vision deficiencies).
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One line of a line chart.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in the given order. Non-finite values (and values <= 0 on a log
    /// axis) are skipped.
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Index into [`PALETTE`] (modulo its length); also picks the marker shape.
    pub color: usize,
}

#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub log_y: bool,
}

/// Bars grouped by category: each group has one bar per series.
#[derive(Clone, Debug, Default)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (series name, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
}

#[derive(Clone, Debug)]
pub enum Chart {
    Line(LineChart),
    Bar(BarChart),
}

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A standalone SVG document with the charts side by side, each `panel_w` x `panel_h`.
pub fn document(charts: &[Chart], panel_w: f64, panel_h: f64) -> String {
    let n = charts.len().max(1) as f64;
    let (w, h) = (panel_w * n, panel_h);
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8" standalone="no"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{w:.0}" height="{h:.0}" fill="#ffffff"/>"##
    );
    for (i, c) in charts.iter().enumerate() {
        let x0 = i as f64 * panel_w;
        let _ = writeln!(s, r#"<g transform="translate({x0:.1},0)">"#);
        match c {
            Chart::Line(l) => line_chart(&mut s, l, panel_w, panel_h),
            Chart::Bar(b) => bar_chart(&mut s, b, panel_w, panel_h),
        }
        s.push_str("</g>\n");
    }
    s.push_str("</svg>\n");
    s
}

/// The plotting area inside a panel.
#[derive(Clone, Copy)]
struct Frame {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

const MARGIN_LEFT: f64 = 72.0;
const MARGIN_RIGHT: f64 = 18.0;
const MARGIN_TOP: f64 = 36.0;
const MARGIN_BOTTOM: f64 = 52.0;

fn frame(panel_w: f64, panel_h: f64) -> Frame {
    Frame {
        x: MARGIN_LEFT,
        y: MARGIN_TOP,
        w: (panel_w - MARGIN_LEFT - MARGIN_RIGHT).max(10.0),
        h: (panel_h - MARGIN_TOP - MARGIN_BOTTOM).max(10.0),
    }
}

/// An axis: the data range it shows and its ticks.
#[derive(Clone, Debug)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub ticks: Vec<f64>,
}

impl Axis {
    /// Position of `v` in [0, 1] along the axis.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn shows(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }
}

/// The "nice" step (1, 2 or 5 times a power of ten) closest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let k = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * p
}

/// A linear axis covering [min, max] with about `target` ticks at nice values.
pub fn linear_axis(min: f64, max: f64, target: usize) -> Axis {
    let (mut min, mut max) = if min.is_finite() && max.is_finite() && min <= max {
        (min, max)
    } else {
        (0.0, 1.0)
    };
    if max - min < 1e-12 * max.abs().max(1.0) {
        // One value: a range around it.
        let d = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
        min -= d;
        max += d;
    }
    let step = nice_step((max - min) / target.max(2) as f64);
    let lo = (min / step).floor() * step;
    let hi = (max / step).ceil() * step;
    let n = ((hi - lo) / step).round() as usize;
    let ticks = (0..=n)
        .map(|i| lo + i as f64 * step)
        .map(|v| if v.abs() < step * 1e-9 { 0.0 } else { v })
        .collect();
    Axis {
        lo,
        hi,
        log: false,
        ticks,
    }
}

/// A logarithmic axis covering [min, max] (both > 0), ticks at powers of ten and, over few
/// decades, at 2 and 5 times them.
pub fn log_axis(min: f64, max: f64) -> Axis {
    let (min, max) = if min > 0.0 && max.is_finite() && min <= max {
        (min, max)
    } else {
        (1.0, 10.0)
    };
    let e_lo = min.log10().floor() as i32;
    let e_hi = (max.log10().ceil() as i32).max(e_lo + 1);
    let (mut lo, mut hi) = (10f64.powi(e_lo), 10f64.powi(e_hi));
    let decades = e_hi - e_lo;
    let mults: &[f64] = if decades <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut ticks = Vec::new();
    for e in e_lo..=e_hi {
        for &m in mults {
            let v = m * 10f64.powi(e);
            if v <= hi * 1.000001 {
                ticks.push(v);
            }
        }
    }
    // Tighten to the data when it stays within a decade sub-range marked by ticks.
    if decades <= 2 {
        if let Some(&t) = ticks.iter().rev().find(|&&t| t <= min) {
            lo = t;
        }
        if let Some(&t) = ticks.iter().find(|&&t| t >= max) {
            hi = t;
        }
        ticks.retain(|&t| t >= lo * 0.999999 && t <= hi * 1.000001);
    }
    Axis {
        lo,
        hi,
        log: true,
        ticks,
    }
}

/// A tick label: as few decimals as the step needs, exponent form for extreme magnitudes.
pub fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.1e}");
        // "2.0e3" -> "2e3"
        return s.replace(".0e", "e");
    }
    let decimals = if step > 0.0 && step < 1.0 {
        ((-step.log10()).ceil() as usize).min(6)
    } else {
        0
    };
    format!("{v:.decimals$}")
}

fn axes(s: &mut String, f: Frame, x: &Axis, y: &Axis, x_labels: Option<&[String]>) {
    let (bx, by) = (f.x, f.y + f.h);
    // Grid and y ticks.
    let ystep = y.ticks.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
    for &t in &y.ticks {
        let py = by - y.frac(t) * f.h;
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0" stroke-width="1"/>"##,
            f.x,
            f.x + f.w
        );
        let label = if y.log { tick_label(t, t) } else { tick_label(t, ystep) };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            f.x - 6.0,
            py + 4.0,
            esc(&label)
        );
    }
    match x_labels {
        Some(labels) => {
            let n = labels.len().max(1) as f64;
            for (i, l) in labels.iter().enumerate() {
                let px = f.x + (i as f64 + 0.5) / n * f.w;
                let _ = writeln!(
                    s,
                    r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    by + 16.0,
                    esc(l)
                );
            }
        }
        None => {
            let xstep = x.ticks.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min);
            for &t in &x.ticks {
                let px = f.x + x.frac(t) * f.w;
                let _ = writeln!(
                    s,
                    r##"<line x1="{px:.1}" y1="{by:.1}" x2="{px:.1}" y2="{:.1}" stroke="#333333" stroke-width="1"/>"##,
                    by + 4.0
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    by + 17.0,
                    esc(&tick_label(t, xstep))
                );
            }
        }
    }
    // Axis lines.
    let _ = writeln!(
        s,
        r##"<path d="M{:.1},{:.1} V{by:.1} H{:.1}" fill="none" stroke="#333333" stroke-width="1"/>"##,
        bx,
        f.y,
        f.x + f.w
    );
}

fn titles(s: &mut String, f: Frame, title: &str, x_label: &str, y_label: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        f.x + f.w / 2.0,
        f.y - 14.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        f.x + f.w / 2.0,
        f.y + f.h + 40.0,
        esc(x_label)
    );
    let (yx, yy) = (f.x - 56.0, f.y + f.h / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{yx:.1}" y="{yy:.1}" text-anchor="middle" transform="rotate(-90 {yx:.1} {yy:.1})">{}</text>"#,
        esc(y_label)
    );
}

/// A marker at (x, y): circle, square, triangle or diamond by `shape`.
fn marker(s: &mut String, shape: usize, x: f64, y: f64, color: &str) {
    let r = 3.5;
    let _ = match shape % 4 {
        0 => writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}" fill="{color}"/>"#),
        1 => writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
            x - r,
            y - r,
            2.0 * r,
            2.0 * r
        ),
        2 => writeln!(
            s,
            r#"<path d="M{x:.1},{:.1} L{:.1},{:.1} L{:.1},{:.1} Z" fill="{color}"/>"#,
            y - r * 1.2,
            x + r * 1.1,
            y + r * 0.9,
            x - r * 1.1,
            y + r * 0.9
        ),
        _ => writeln!(
            s,
            r#"<path d="M{x:.1},{:.1} L{:.1},{y:.1} L{x:.1},{:.1} L{:.1},{y:.1} Z" fill="{color}"/>"#,
            y - r * 1.3,
            x + r * 1.3,
            y + r * 1.3,
            x - r * 1.3
        ),
    };
}

/// Legend entries (name, colour index, dashed, with marker) in the plot's top-left corner.
fn legend(s: &mut String, f: Frame, entries: &[(String, usize, bool, bool)]) {
    if entries.is_empty() {
        return;
    }
    let longest = entries.iter().map(|e| e.0.chars().count()).max().unwrap_or(0) as f64;
    let (w, h) = (40.0 + longest * 6.8, 8.0 + 16.0 * entries.len() as f64);
    let (x, y) = (f.x + 8.0, f.y + 6.0);
    let _ = writeln!(
        s,
        r##"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="#ffffff" fill-opacity="0.85" stroke="#bbbbbb"/>"##
    );
    for (i, (name, c, dashed, with_marker)) in entries.iter().enumerate() {
        let color = PALETTE[c % PALETTE.len()];
        let ly = y + 12.0 + 16.0 * i as f64;
        if *with_marker {
            let dash = if *dashed { r#" stroke-dasharray="5,3""# } else { "" };
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
                x + 6.0,
                x + 30.0
            );
            marker(s, *c, x + 18.0, ly, color);
        } else {
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="18" height="10" fill="{color}"/>"#,
                x + 9.0,
                ly - 5.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 36.0,
            ly + 4.0,
            esc(name)
        );
    }
}

fn no_data(s: &mut String, f: Frame) {
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888888">no data</text>"##,
        f.x + f.w / 2.0,
        f.y + f.h / 2.0
    );
}

fn line_chart(s: &mut String, c: &LineChart, pw: f64, ph: f64) {
    let f = frame(pw, ph);
    titles(s, f, &c.title, &c.x_label, &c.y_label);
    let pts = || {
        c.series
            .iter()
            .flat_map(|se| se.points.iter().copied())
            .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!c.log_y || y > 0.0))
    };
    if pts().next().is_none() {
        let x = linear_axis(0.0, 1.0, 5);
        let y = linear_axis(0.0, 1.0, 5);
        axes(s, f, &x, &y, None);
        no_data(s, f);
        return;
    }
    let (xmin, xmax) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
        (a.min(x), b.max(x))
    });
    let (ymin, ymax) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
        (a.min(y), b.max(y))
    });
    // Latencies and throughputs: start the linear axes at 0 when the data is positive.
    let xa = linear_axis(if xmin >= 0.0 { 0.0 } else { xmin }, xmax, 6);
    let ya = if c.log_y {
        log_axis(ymin, ymax)
    } else {
        linear_axis(if ymin >= 0.0 { 0.0 } else { ymin }, ymax, 6)
    };
    axes(s, f, &xa, &ya, None);
    let to_px = |x: f64, y: f64| (f.x + xa.frac(x) * f.w, f.y + f.h - ya.frac(y) * f.h);
    for se in &c.series {
        let color = PALETTE[se.color % PALETTE.len()];
        let p: Vec<(f64, f64)> = se
            .points
            .iter()
            .filter(|&&(x, y)| x.is_finite() && ya.shows(y))
            .map(|&(x, y)| to_px(x, y))
            .collect();
        if p.len() >= 2 {
            let coords: Vec<String> = p.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let dash = if se.dashed { r#" stroke-dasharray="5,3""# } else { "" };
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                coords.join(" ")
            );
        }
        for &(x, y) in &p {
            marker(s, se.color, x, y, color);
        }
    }
    let entries: Vec<_> = c
        .series
        .iter()
        .map(|se| (se.name.clone(), se.color, se.dashed, true))
        .collect();
    legend(s, f, &entries);
}

fn bar_chart(s: &mut String, c: &BarChart, pw: f64, ph: f64) {
    let f = frame(pw, ph);
    titles(s, f, &c.title, &c.x_label, &c.y_label);
    let ymax = c
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    // Headroom above the bars for the legend (top-left corner).
    let legend_rows = if c.series.len() > 1 || c.series.first().is_some_and(|s| !s.0.is_empty()) {
        c.series.len()
    } else {
        0
    };
    let free = 1.0 - ((24.0 + 16.0 * legend_rows as f64) / f.h).min(0.6);
    let ya = linear_axis(0.0, if ymax > 0.0 { ymax / free } else { 1.0 }, 6);
    let xa = linear_axis(0.0, 1.0, 2);
    axes(s, f, &xa, &ya, Some(&c.categories));
    if c.categories.is_empty() || c.series.is_empty() {
        no_data(s, f);
        return;
    }
    let slot = f.w / c.categories.len() as f64;
    let n = c.series.len() as f64;
    let bw = slot * 0.8 / n;
    for (j, (_, values)) in c.series.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        for (i, &v) in values.iter().enumerate().take(c.categories.len()) {
            if !(v.is_finite() && v > 0.0) {
                continue;
            }
            let h = ya.frac(v) * f.h;
            let x = f.x + i as f64 * slot + slot * 0.1 + j as f64 * bw;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}"/>"#,
                f.y + f.h - h,
                (bw - 1.0).max(0.5)
            );
        }
    }
    if legend_rows > 0 {
        let entries: Vec<_> = c
            .series
            .iter()
            .enumerate()
            .map(|(j, (name, _))| (name.clone(), j, false, false))
            .collect();
        legend(s, f, &entries);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A rough well-formedness check: one XML declaration first, balanced and properly nested
    /// tags, quoted attributes, only the five predefined entities (or character references).
    pub(crate) fn check_well_formed(doc: &str) -> Result<(), String> {
        let body = doc
            .strip_prefix("<?xml")
            .and_then(|r| r.split_once("?>"))
            .map(|(_, r)| r)
            .ok_or("no XML declaration")?;
        let mut stack: Vec<String> = Vec::new();
        let mut rest = body;
        let mut roots = 0;
        while let Some(i) = rest.find(['<', '&']) {
            let (text, tail) = rest.split_at(i);
            if stack.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            if tail.starts_with('&') {
                let end = tail.find(';').ok_or("unterminated entity")?;
                let name = &tail[1..end];
                let ok =
                    matches!(name, "amp" | "lt" | "gt" | "quot" | "apos") || (name.starts_with('#') && name.len() > 1);
                if !ok {
                    return Err(format!("unknown entity &{name};"));
                }
                rest = &tail[end + 1..];
                continue;
            }
            let end = tail.find('>').ok_or("unterminated tag")?;
            let tag = &tail[1..end];
            rest = &tail[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("closing </{name}> without opening"))?;
                if open != name.trim() {
                    return Err(format!("<{open}> closed by </{name}>"));
                }
                continue;
            }
            if tag.contains('<') {
                return Err(format!("'<' inside a tag: {tag:?}"));
            }
            let self_closing = tag.ends_with('/');
            let inner = tag.trim_end_matches('/');
            let name = inner.split_whitespace().next().ok_or("empty tag")?.to_string();
            // Attributes: name="value" pairs, quotes balanced.
            if inner.matches('"').count() % 2 != 0 {
                return Err(format!("unbalanced quotes in <{inner}>"));
            }
            let mut attrs = &inner[name.len()..];
            while !attrs.trim().is_empty() {
                let a = attrs.trim_start();
                let eq = a.find('=').ok_or(format!("attribute without value in <{inner}>"))?;
                let v = a[eq + 1..]
                    .strip_prefix('"')
                    .ok_or(format!("unquoted attribute in <{inner}>"))?;
                let close = v.find('"').ok_or("unterminated attribute")?;
                attrs = &v[close + 1..];
            }
            if stack.is_empty() {
                roots += 1;
            }
            if !self_closing {
                stack.push(name);
            }
        }
        if !rest.trim().is_empty() {
            return Err("trailing text".into());
        }
        if !stack.is_empty() {
            return Err(format!("unclosed tags: {stack:?}"));
        }
        if roots != 1 {
            return Err(format!("{roots} root elements"));
        }
        Ok(())
    }

    fn sample_charts() -> Vec<Chart> {
        vec![
            Chart::Line(LineChart {
                title: "TTFT <p50 & p99>".into(),
                x_label: "output tokens/s".into(),
                y_label: "ms".into(),
                log_y: true,
                series: vec![
                    Series {
                        name: "p50".into(),
                        points: vec![(10.0, 5.0), (50.0, 8.0), (90.0, 40.0)],
                        dashed: false,
                        color: 0,
                    },
                    Series {
                        name: "p99 \"tail\"".into(),
                        points: vec![(10.0, 9.0), (50.0, f64::NAN), (90.0, 400.0)],
                        dashed: true,
                        color: 1,
                    },
                ],
            }),
            Chart::Line(LineChart {
                title: "one point".into(),
                series: vec![Series {
                    name: "x".into(),
                    points: vec![(3.0, 3.0)],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Chart::Line(LineChart::default()),
            Chart::Bar(BarChart {
                title: "exit loops".into(),
                x_label: "loop".into(),
                y_label: "share of tokens".into(),
                categories: vec!["1".into(), "2".into(), "3".into()],
                series: vec![
                    ("rate 1".into(), vec![0.2, 0.3, 0.5]),
                    ("rate 2".into(), vec![0.1, 0.0, 0.9]),
                ],
            }),
            Chart::Bar(BarChart::default()),
        ]
    }

    #[test]
    fn svg_is_well_formed() {
        let doc = document(&sample_charts(), 480.0, 320.0);
        check_well_formed(&doc).unwrap();
        assert!(doc.contains("<polyline"));
        assert!(doc.contains("stroke-dasharray"));
        assert!(doc.contains("TTFT &lt;p50 &amp; p99&gt;"));
        assert!(doc.contains(r#"width="2400""#));
        assert!(!doc.contains("NaN") && !doc.contains("inf"));
    }

    #[test]
    fn the_checker_rejects_broken_documents() {
        let head = r#"<?xml version="1.0"?>"#;
        assert!(check_well_formed(&format!("{head}<svg><g></svg>")).is_err());
        assert!(check_well_formed(&format!("{head}<svg><g></g>")).is_err());
        assert!(check_well_formed(&format!("{head}<svg a=b></svg>")).is_err());
        assert!(check_well_formed(&format!("{head}<svg>a & b</svg>")).is_err());
        assert!(check_well_formed(&format!("{head}<svg/><svg/>")).is_err());
        assert!(check_well_formed(&format!("{head}<svg x=\"1\"><g/>&lt;</svg>")).is_ok());
    }

    #[test]
    fn linear_ticks_are_nice() {
        let a = linear_axis(0.0, 87.0, 6);
        assert_eq!(a.lo, 0.0);
        assert_eq!(a.hi, 100.0);
        assert_eq!(a.ticks, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let b = linear_axis(0.013, 0.048, 5);
        assert!(b.lo <= 0.013 && b.hi >= 0.048 && b.ticks.len() >= 3);
        let c = linear_axis(5.0, 5.0, 5);
        assert!(c.lo < 5.0 && c.hi > 5.0);
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(tick_label(2000.0, 500.0), "2000");
        assert_eq!(tick_label(2e6, 1e6), "2e6");
    }

    #[test]
    fn log_ticks_cover_the_data() {
        let a = log_axis(3.0, 450.0);
        assert!(a.lo <= 3.0 && a.hi >= 450.0);
        assert!(a.ticks.contains(&10.0) && a.ticks.contains(&100.0));
        let b = log_axis(0.5, 5000.0);
        let want = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0];
        assert_eq!(b.ticks.len(), want.len());
        for (t, w) in b.ticks.iter().zip(want) {
            assert!((t / w - 1.0).abs() < 1e-12, "{t} vs {w}");
        }
    }
}
