//! Plots of an uptraining run (`log.jsonl` of the training tool): every loop's KL from the
//! teacher on the training batches (a 10-step moving mean, log scale) and every loop's
//! held-out perplexity at each evaluation, both against tokens seen.

use crate::plot::{self, Chart, LineChart, Series};
use serde_json::Value;

/// What an uptraining log could not be plotted from.
#[derive(Debug, thiserror::Error)]
pub enum UptrainPlotError {
    #[error("line {line} of the log is not JSON")]
    Json {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("the log has no training steps with `kl_teacher`")]
    NoSteps,
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// Steps of the moving mean of the training-batch KL.
const SMOOTH: usize = 10;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        .unwrap_or_default()
}

/// The SVG of the run whose `log.jsonl` text is `log`.
pub fn uptrain_svg(log: &str) -> Result<String, UptrainPlotError> {
    let mut steps: Vec<(f64, Vec<f64>)> = Vec::new();
    let mut evals: Vec<(f64, Vec<f64>)> = Vec::new();
    for (i, line) in log.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|source| UptrainPlotError::Json { line: i + 1, source })?;
        let tokens = v["tokens"].as_f64().unwrap_or(f64::NAN);
        if v["eval"].as_bool() == Some(true) {
            evals.push((tokens, floats(&v["ppl"])));
        } else if v.get("kl_teacher").is_some() {
            steps.push((tokens, floats(&v["kl_teacher"])));
        }
    }
    let loops = steps.iter().map(|s| s.1.len()).max().ok_or(UptrainPlotError::NoSteps)?;
    if loops == 0 {
        return Err(UptrainPlotError::NoSteps);
    }
    let name = |b: usize| {
        if b + 1 == loops {
            format!("loop {} (last)", b + 1)
        } else {
            format!("loop {}", b + 1)
        }
    };
    let kl = (0..loops)
        .map(|b| {
            let ys: Vec<f64> = steps.iter().map(|s| s.1.get(b).copied().unwrap_or(f64::NAN)).collect();
            let points = (0..ys.len())
                .map(|i| {
                    let w = &ys[i.saturating_sub(SMOOTH - 1)..=i];
                    (steps[i].0, w.iter().sum::<f64>() / w.len() as f64)
                })
                .collect();
            Series {
                name: name(b),
                points,
                dashed: false,
                color: b,
            }
        })
        .collect();
    let ppl = (0..loops)
        .map(|b| Series {
            name: name(b),
            points: evals
                .iter()
                .map(|e| (e.0, e.1.get(b).copied().unwrap_or(f64::NAN)))
                .collect(),
            dashed: b + 1 != loops,
            color: b,
        })
        .collect();
    let charts = [
        Chart::Line(LineChart {
            title: format!("KL(teacher || loop) per training batch ({SMOOTH}-step mean)"),
            x_label: "tokens seen".into(),
            y_label: "KL (nats / token)".into(),
            series: kl,
            log_y: true,
        }),
        Chart::Line(LineChart {
            title: "held-out perplexity at each evaluation".into(),
            x_label: "tokens seen".into(),
            y_label: "perplexity".into(),
            series: ppl,
            log_y: true,
        }),
    ];
    Ok(plot::document(&charts, 640.0, 400.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two loops, 30 steps and evaluations every 10: both panels, every loop named, the
    /// last one marked; a broken line and a log without steps are errors.
    #[test]
    fn a_run_log_plots_and_bad_logs_are_errors() {
        let mut log = String::new();
        for s in 0..30u32 {
            let t = s * 4096;
            let (a, b) = (2.0 / (s as f64 + 1.0), 1.0 / (s as f64 + 1.0));
            log.push_str(&format!("{{\"step\":{s},\"tokens\":{t},\"kl_teacher\":[{a},{b}]}}\n"));
            if s % 10 == 0 {
                let p = 300.0 - s as f64;
                log.push_str(&format!(
                    "{{\"eval\":true,\"step\":{s},\"tokens\":{t},\"ppl\":[{p},{}]}}\n",
                    p / 3.0
                ));
            }
        }
        let svg = uptrain_svg(&log).unwrap();
        plot::tests::check_well_formed(&svg).unwrap();
        for label in ["loop 1", "loop 2 (last)", "held-out perplexity", "tokens seen"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(matches!(
            uptrain_svg("{\"step\":1}\nnot json\n"),
            Err(UptrainPlotError::Json { line: 2, .. })
        ));
        assert!(matches!(
            uptrain_svg("{\"eval\":true,\"ppl\":[3]}"),
            Err(UptrainPlotError::NoSteps)
        ));
    }
}
