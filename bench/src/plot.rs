//! Benchmark plots as standalone SVG files, drawn with `plotters` (its SVG backend, no font
//! library: text stays `<text>` for the viewer to render): line charts (linear or logarithmic
//! y, solid or dashed series with markers, a legend) and grouped bar charts. [`document`] lays
//! charts out side by side in one file that browsers and image viewers open as is.

use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;

/// Series colours (distinguishable, also for the common colour-vision deficiencies).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
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

/// A chart that could not be drawn (the drawing backend's message).
#[derive(Debug, thiserror::Error)]
#[error("drawing the plot failed: {0}")]
pub struct PlotError(String);

fn err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError(format!("{e:?}"))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const FONT: &str = "sans-serif";
/// The grid lines at the ticks.
const GRID: RGBColor = RGBColor(0xe4, 0xe4, 0xe4);

/// A standalone SVG document with the charts side by side, each `panel_w` x `panel_h` pixels.
pub fn document(charts: &[Chart], panel_w: f64, panel_h: f64) -> Result<String, PlotError> {
    let n = charts.len().max(1);
    let size = ((panel_w * n as f64).round() as u32, panel_h.round() as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (chart, area) in charts.iter().zip(root.split_evenly((1, n))) {
            match chart {
                Chart::Line(c) => line_chart(&area, c)?,
                Chart::Bar(c) => bar_chart(&area, c)?,
            }
        }
        root.present().map_err(err)?;
    }
    Ok(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n{}",
        svg.trim_start()
    ))
}

/// `lo..hi` padded by 5 % of its span (a point span becomes a unit around it).
fn padded(lo: f64, hi: f64) -> Range<f64> {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        lo - pad..hi + pad
    } else {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.5 };
        lo - half..hi + half
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A caption and a centred "no data" note in an empty panel.
fn no_data(area: &Area<'_>, title: &str) -> Result<(), PlotError> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        title.to_string(),
        (w as i32 / 2, 12),
        TextStyle::from((FONT, 16).into_font()).pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(err)?;
    area.draw(&Text::new(
        "no data",
        (w as i32 / 2, h as i32 / 2),
        TextStyle::from((FONT, 14).into_font())
            .color(&RGBColor(0x88, 0x88, 0x88))
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))
    .map_err(err)
}

/// Tick labels: no more digits than the axis span needs (`2000`, `0.25`, `2e6`).
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}").replace(".0e", "e")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn line_chart(area: &Area<'_>, c: &LineChart) -> Result<(), PlotError> {
    let keep = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!c.log_y || y > 0.0);
    let series: Vec<(&Series, Vec<(f64, f64)>)> = c
        .series
        .iter()
        .map(|s| (s, s.points.iter().copied().filter(keep).collect::<Vec<_>>()))
        .collect();
    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (Some((x0, x1)), Some((y0, y1))) = (bounds(all().map(|p| p.0)), bounds(all().map(|p| p.1))) else {
        return no_data(area, &c.title);
    };
    let xr = padded(x0, x1);
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(&c.title, (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if c.log_y {
        let yr = if y1 > y0 {
            y0 / 1.25..y1 * 1.25
        } else {
            y0 / 2.0..y1 * 2.0
        };
        let mut ch = chart.build_cartesian_2d(xr, yr.log_scale()).map_err(err)?;
        draw_lines(&mut ch, c, &series)
    } else {
        let mut ch = chart
            .build_cartesian_2d(xr, padded(y0.min(0.0).max(y0 - (y1 - y0)), y1))
            .map_err(err)?;
        draw_lines(&mut ch, c, &series)
    }
}

type Chart2d<'a, Y> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>;

/// The axes, labels and series (with their legend) of a line chart on its coordinates.
fn draw_lines<'a, Y>(
    ch: &mut Chart2d<'a, Y>,
    c: &LineChart,
    series: &[(&Series, Vec<(f64, f64)>)],
) -> Result<(), PlotError>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    ch.configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_label_formatter(&|v| tick_label(*v))
        .y_label_formatter(&|v| tick_label(*v))
        .max_light_lines(0)
        .bold_line_style(GRID)
        .draw()
        .map_err(err)?;
    for (s, pts) in series {
        let color = PALETTE[s.color % PALETTE.len()];
        let style = color.stroke_width(2);
        let shape = s.color % 3;
        let ann = if s.dashed {
            ch.draw_series(DashedLineSeries::new(pts.iter().copied(), 6, 4, style))
                .map_err(err)?
        } else {
            ch.draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(err)?
        };
        ann.label(s.name.clone()).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (20, 0)], color.stroke_width(2))
                + marker(shape, (10, 0), color)
        });
        ch.draw_series(pts.iter().map(|&p| EmptyElement::at(p) + marker(shape, (0, 0), color)))
            .map_err(err)?;
    }
    legend(ch, SeriesLabelPosition::UpperLeft)
}

/// The series legend in a corner of the plotting area.
fn legend<'a, Y>(ch: &mut Chart2d<'a, Y>, corner: SeriesLabelPosition) -> Result<(), PlotError>
where
    Y: Ranged<ValueType = f64>,
{
    ch.configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xbb, 0xbb, 0xbb))
        .label_font((FONT, 12))
        .draw()
        .map_err(err)
}

/// A circle, a square or a triangle around `at` (pixel offsets), by series.
fn marker<DB: DrawingBackend>(shape: usize, at: (i32, i32), color: RGBColor) -> DynElement<'static, DB, (i32, i32)> {
    let fill = color.filled();
    match shape {
        0 => Circle::new(at, 3, fill).into_dyn(),
        1 => Rectangle::new([(at.0 - 3, at.1 - 3), (at.0 + 3, at.1 + 3)], fill).into_dyn(),
        _ => TriangleMarker::new(at, 4, fill).into_dyn(),
    }
}

fn bar_chart(area: &Area<'_>, c: &BarChart) -> Result<(), PlotError> {
    let n = c.categories.len();
    let values = || {
        c.series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
    };
    let Some((lo, hi)) = bounds(values()) else {
        return no_data(area, &c.title);
    };
    if n == 0 {
        return no_data(area, &c.title);
    }
    // Bars grow from 0: no padding below it when no value is negative.
    let mut yr = padded(lo.min(0.0), hi.max(0.0));
    if lo >= 0.0 {
        yr.start = 0.0;
    }
    let mut ch = ChartBuilder::on(area)
        .caption(&c.title, (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, yr)
        .map_err(err)?;
    let cats = &c.categories;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
                cats[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| tick_label(*v))
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .max_light_lines(0)
        .bold_line_style(GRID)
        .draw()
        .map_err(err)?;
    let k = c.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, vals)) in c.series.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        let x0 = -0.4 + j as f64 * width;
        ch.draw_series(vals.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| {
            let x = i as f64 + x0;
            Rectangle::new([(x, 0.0), (x + width * 0.92, v)], color.filled())
        }))
        .map_err(err)?
        .label(name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    legend(&mut ch, SeriesLabelPosition::UpperRight)
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
        let doc = document(&sample_charts(), 480.0, 320.0).unwrap();
        check_well_formed(&doc).unwrap();
        assert!(doc.contains("<polyline"), "solid series are polylines");
        assert!(doc.contains("TTFT &lt;p50 &amp; p99&gt;"), "titles are escaped text");
        assert!(doc.contains(r#"width="2400""#), "five panels of 480");
        assert!(!doc.contains("NaN") && !doc.contains("inf"));
        // Every series and category is labelled; the empty panels say so.
        for label in ["p99 &quot;tail&quot;", "rate 1", "rate 2", "no data", "share of tokens"] {
            assert!(doc.contains(label), "{label}");
        }
        assert_eq!(doc.matches("no data").count(), 2);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(2000.0), "2000");
        assert_eq!(tick_label(2e6), "2e6");
        assert_eq!(tick_label(2.5e6), "2.5e6");
        assert_eq!(tick_label(1e-4), "1e-4");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(12.5), "12.5");
        assert_eq!(tick_label(1.0 / 3.0), "0.333");
    }

    #[test]
    fn log_charts_skip_values_they_cannot_place() {
        let c = Chart::Line(LineChart {
            title: "t".into(),
            log_y: true,
            series: vec![Series {
                name: "s".into(),
                points: vec![(1.0, 0.0), (2.0, -1.0), (f64::INFINITY, 3.0)],
                ..Default::default()
            }],
            ..Default::default()
        });
        // Nothing left to draw: an empty panel, not a broken axis.
        let doc = document(&[c], 300.0, 200.0).unwrap();
        check_well_formed(&doc).unwrap();
        assert!(doc.contains("no data"));
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
}
