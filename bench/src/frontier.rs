//! The speed/quality frontier of an early-exit checkpoint (`scripts/exit-frontier.sh`): one
//! point per calibration target, its held-out quality (`rrt eval-exit --exit calibrated
//! --json`) and its engine speed against the vanilla model (`rrt bench engine --settings a,d
//! --json`), as a table and as an SVG.

use crate::plot::{self, Chart, LineChart, Series};
use serde::Deserialize;

/// A line of `frontier.jsonl`.
#[derive(Debug, Deserialize)]
struct Line {
    target: f64,
    eval: Vec<EvalRun>,
    engine: Vec<EngineRun>,
}

#[derive(Debug, Deserialize)]
struct EvalRun {
    run: String,
    ppl: f64,
    agreement: f64,
    mean_loops: f64,
}

#[derive(Debug, Deserialize)]
struct EngineRun {
    setting: String,
    concurrency: usize,
    tok_s: f64,
    mean_loops: f64,
}

/// One calibration target's results.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub target: f64,
    /// Held-out text, exits with propagated fill: mean loops, agreement with full depth,
    /// perplexity; and the full-depth perplexity of the same text.
    pub eval_loops: f64,
    pub agreement: f64,
    pub ppl: f64,
    pub full_ppl: f64,
    /// The engine: concurrency, mean loops per output token of (d), (d)/(a) output tok/s.
    pub concurrency: usize,
    pub engine_loops: f64,
    pub speedup: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontierError {
    #[error("line {line}: {msg}")]
    Line { line: usize, msg: String },
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// The points of `frontier.jsonl`, in file order.
pub fn parse(jsonl: &str) -> Result<Vec<Point>, FrontierError> {
    let mut out = Vec::new();
    for (i, text) in jsonl.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |msg: String| FrontierError::Line { line: i + 1, msg };
        let l: Line = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let eval = |prefix: &str| {
            l.eval
                .iter()
                .find(|r| r.run.starts_with(prefix))
                .ok_or_else(|| bad(format!("no eval run `{prefix}...`")))
        };
        let (full, exits) = (eval("full depth")?, eval("exit calibrated + propagate")?);
        let setting = |s: &str| {
            l.engine
                .iter()
                .find(|r| r.setting == s)
                .ok_or_else(|| bad(format!("no engine setting ({s})")))
        };
        let (a, d) = (setting("a")?, setting("d")?);
        out.push(Point {
            target: l.target,
            eval_loops: exits.mean_loops,
            agreement: exits.agreement,
            ppl: exits.ppl,
            full_ppl: full.ppl,
            concurrency: d.concurrency,
            engine_loops: d.mean_loops,
            speedup: d.tok_s / a.tok_s,
        });
    }
    Ok(out)
}

/// A Markdown table of the points.
pub fn table(points: &[Point]) -> String {
    let mut s = String::from(
        "| target agreement | held-out mean loops | agreement | perplexity (full depth) | engine mean loops | (d)/(a) |\n|---|---|---|---|---|---|\n",
    );
    for p in points {
        s += &format!(
            "| {:.2} | {:.2} | {:.3} | {:.1} ({:.1}) | {:.2} | {:.2}x |\n",
            p.target, p.eval_loops, p.agreement, p.ppl, p.full_ppl, p.engine_loops, p.speedup
        );
    }
    s
}

/// Speed and quality against mean loops, one panel each.
pub fn svg(points: &[Point], speed_target: f64) -> Result<String, FrontierError> {
    let mut by_loops = points.to_vec();
    by_loops.sort_by(|a, b| a.engine_loops.total_cmp(&b.engine_loops));
    let xs = |f: fn(&Point) -> (f64, f64)| by_loops.iter().map(f).collect::<Vec<_>>();
    let (lo, hi) = by_loops.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (
            lo.min(p.engine_loops).min(p.eval_loops),
            hi.max(p.engine_loops).max(p.eval_loops),
        )
    });
    let c = by_loops.first().map_or(0, |p| p.concurrency);
    let charts = [
        Chart::Line(LineChart {
            title: format!("engine output tok/s, (d) / (a), {c} in flight"),
            x_label: "mean loops per output token (engine)".into(),
            y_label: "(d) / (a)".into(),
            series: vec![
                Series {
                    name: "measured".into(),
                    points: xs(|p| (p.engine_loops, p.speedup)),
                    ..Default::default()
                },
                Series {
                    name: format!("target {speed_target}x"),
                    points: vec![(lo, speed_target), (hi, speed_target)],
                    dashed: true,
                    color: 1,
                },
            ],
            log_y: false,
        }),
        Chart::Line(LineChart {
            title: "held-out agreement with full depth".into(),
            x_label: "mean loops per token (held-out text)".into(),
            y_label: "agreement".into(),
            series: vec![Series {
                name: "exits, propagated fill".into(),
                points: xs(|p| (p.eval_loops, p.agreement)),
                color: 2,
                ..Default::default()
            }],
            log_y: false,
        }),
        Chart::Line(LineChart {
            title: "held-out perplexity".into(),
            x_label: "mean loops per token (held-out text)".into(),
            y_label: "perplexity".into(),
            series: vec![
                Series {
                    name: "exits, propagated fill".into(),
                    points: xs(|p| (p.eval_loops, p.ppl)),
                    color: 3,
                    ..Default::default()
                },
                Series {
                    name: "full depth".into(),
                    points: xs(|p| (p.eval_loops, p.full_ppl)),
                    dashed: true,
                    color: 4,
                },
            ],
            log_y: false,
        }),
    ];
    Ok(plot::document(&charts, 520.0, 380.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"target": 0.9, "eval": [{"run":"full depth","ppl":350.0,"agreement":1.0,"mean_loops":3.0,"tokens":10},{"run":"exit calibrated + propagate","ppl":360.0,"agreement":0.9,"mean_loops":2.0,"tokens":10},{"run":"exit calibrated + recompute","ppl":355.0,"agreement":0.95,"mean_loops":2.0,"tokens":10}], "engine": [{"setting":"a","concurrency":32,"tok_s":600.0,"mean_loops":1.0},{"setting":"d","concurrency":32,"tok_s":750.0,"mean_loops":2.1}]}"#;

    #[test]
    fn parses_points_and_draws_them() {
        let pts = parse(&format!("{LINE}\n\n{}\n", LINE.replace("0.9,", "0.8,"))).unwrap();
        assert_eq!(pts.len(), 2);
        let p = &pts[0];
        assert_eq!(
            (
                p.target,
                p.eval_loops,
                p.agreement,
                p.ppl,
                p.full_ppl,
                p.concurrency,
                p.engine_loops
            ),
            (0.9, 2.0, 0.9, 360.0, 350.0, 32, 2.1)
        );
        assert!((p.speedup - 1.25).abs() < 1e-12);
        assert!(table(&pts).contains("| 0.90 | 2.00 | 0.900 | 360.0 (350.0) | 2.10 | 1.25x |"));
        let svg = svg(&pts, 1.5).unwrap();
        assert!(svg.contains("<svg") && svg.contains("target 1.5x"), "{}", &svg[..200]);
    }

    #[test]
    fn a_line_without_setting_d_names_what_is_missing() {
        let e = parse(&LINE.replace("\"setting\":\"d\"", "\"setting\":\"e\"")).unwrap_err();
        assert_eq!(e.to_string(), "line 1: no engine setting (d)");
        assert!(parse("{").is_err());
    }
}
