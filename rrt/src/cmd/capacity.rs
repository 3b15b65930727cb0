//! `rrt capacity`: how many nodes for a traffic and latency target, from a node's own traces
//! (the fit, simulation and planning of [`rrt_bench::capacity`]).
//!
//! Prints the fitted step costs and traffic mix, then either the per-node curve (TTFT and TPOT
//! percentiles against the offered rate), the highest rate one node sustains within
//! `--ttft-p99-ms` and `--tpot-p99-ms` and the nodes needed for `--rate`, or with
//! `--validate BENCH.json` each load point of an `rrt bench load --json` run predicted against
//! measured. With several served models in the traces, each is planned from its own nodes'
//! spans in turn.

use anyhow::{Context, Result};
use rrt_bench::capacity::{self, FitOptions, Limits, Planner, Report, SimSettings};
use rrt_bench::load::{Dist, Stats};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// JSON-lines span files (several: merged).
    #[arg(long, value_delimiter = ',', required = true)]
    pub traces: Vec<PathBuf>,
    /// Target request rate (requests/s) to size the cluster for.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Latency limits: p99 time to first token and p99 time per output token, in ms.
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_p99_ms: f64,
    #[arg(long, default_value_t = 200.0)]
    pub tpot_p99_ms: f64,
    /// Prompt / output length distributions (`fixed:N`, `uniform:A:B`, `normal:M:SD`,
    /// `lognormal:M:SD`) instead of the traced mix.
    #[arg(long)]
    pub prompt_tokens: Option<Dist>,
    #[arg(long)]
    pub output_tokens: Option<Dist>,
    /// Simulated requests per load point.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Offered rates of the per-node curve (default: 12 rates up to past saturation).
    #[arg(long, value_delimiter = ',')]
    pub curve: Vec<f64>,
    /// Node scheduling settings when the traces have no `node.start` span.
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    #[arg(long)]
    pub max_step_rows: Option<usize>,
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Compare with the load points of `rrt bench load --json FILE` (same rates and windows).
    #[arg(long)]
    pub validate: Option<PathBuf>,
    /// Nodes behind the router in `--validate` mode.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write PREFIX-capacity.svg (the per-node curve with the limits).
    #[arg(long)]
    pub plot: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated prompts begin with the same N tokens (one system prompt for all traffic).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Route with prefix affinity (`coordinator.prefix_affinity`).
    #[arg(long)]
    pub prefix_affinity: bool,
    /// Model whose tokenizer the simulated engines use (default: the cached SmolLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Plan for these served models (comma-separated names, as in requests' `model`), each
    /// from its own nodes' spans. Default: every model the traces hold, in turn.
    #[arg(long, value_delimiter = ',')]
    pub served_model: Vec<String>,
}

fn ms(s: &Option<Stats>, p99: bool) -> String {
    s.as_ref()
        .map_or("-".into(), |s| format!("{:.0}", if p99 { s.p99 } else { s.p50 }))
}

pub fn run(a: Args) -> Result<()> {
    let models = if a.served_model.is_empty() {
        capacity::models_in(&a.traces)?
    } else {
        a.served_model.clone()
    };
    if models.len() <= 1 {
        let mut one = a.clone();
        one.served_model = models;
        return run_one(&one);
    }
    // Several models: plan each from its own nodes' spans; outputs get the model's name.
    for m in &models {
        say!("\n== model {m} ==");
        let mut one = a.clone();
        one.served_model = vec![m.clone()];
        one.json = a.json.as_ref().map(|p| {
            let mut s = p.as_os_str().to_os_string();
            s.push(format!(".{m}.json"));
            PathBuf::from(s)
        });
        one.plot = a.plot.as_ref().map(|p| format!("{p}-{m}"));
        run_one(&one).with_context(|| format!("planning model `{m}`"))?;
    }
    Ok(())
}

fn run_one(a: &Args) -> Result<()> {
    let f = capacity::fit(
        &a.traces,
        &FitOptions {
            model: a.served_model.first().cloned(),
            kv_blocks: a.kv_blocks,
            max_step_rows: a.max_step_rows,
            max_running: a.max_running,
        },
    )?;
    let tok = Arc::new(rrt_model::loader::load_tokenizer(&match &a.model {
        Some(p) => p.clone(),
        None => rrt_model::default_model_path().context("run scripts/fetch-model.sh first, or pass --model")?,
    })?);
    let c = &f.cost;
    say!(
        "fitted from {} steps: step = {:.2} ms + {:.4} ms/row + {:.6} ms/attended position + {:.4} ms/head row + {:.4} ms/fill row (R² {:.3}, mean |error| {:.1}%; {:.2} ms between passes)",
        f.steps,
        c.intercept * 1e3,
        c.per_row * 1e3,
        c.per_ctx * 1e3,
        c.per_head_row * 1e3,
        c.per_fill_row * 1e3,
        f.r2,
        f.mean_abs_rel_err * 100.0,
        f.overhead_s * 1e3
    );
    let mean = |v: &[u32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    say!(
        "node: B = {}, {} KV blocks of {}, {} rows/pass, {} running; traffic: {} requests, prompt {:.0} / output {:.0} tokens on average, exits per loop {:?}",
        f.loops,
        f.kv_blocks,
        f.block_size,
        f.max_step_rows,
        f.max_running,
        f.prompt_lengths.len(),
        mean(&f.prompt_lengths),
        mean(&f.output_lengths),
        f.exit_shares.iter().map(|s| format!("{:.2}", s)).collect::<Vec<_>>()
    );
    let limits = Limits {
        ttft_p99_ms: a.ttft_p99_ms,
        tpot_p99_ms: a.tpot_p99_ms,
    };
    let planner = Planner::new(
        &f,
        tok,
        SimSettings {
            prompt_tokens: a.prompt_tokens,
            output_tokens: a.output_tokens,
            requests: a.requests,
            seed: a.seed,
            shared_prefix: a.shared_prefix,
            prefix_affinity: a.prefix_affinity,
        },
    );
    let mut report = Report {
        fitted: &f,
        curve: Vec::new(),
        max_rate_per_node: None,
        plan: None,
        validation: Vec::new(),
    };
    if let Some(v) = &a.validate {
        let bench = capacity::read_bench(v)?;
        let points = capacity::bench_points(&bench)?;
        say!(
            "{:>8} {:>7} | {:>9} {:>9} {:>6} | {:>8} {:>8} | {:>8} {:>8}",
            "offered",
            "nodes",
            "tok/s",
            "predicted",
            "ratio",
            "TTFT p99",
            "pred.",
            "TPOT p99",
            "pred."
        );
        for p in points {
            let (rate, sp) = planner.validate_point(&bench, p, a.nodes)?;
            let measured = p["output_tok_s"].as_f64().unwrap_or(0.0);
            let get = |k: &str| p[k]["p99"].as_f64().map_or("-".into(), |x| format!("{x:.0}"));
            say!(
                "{:>8.2} {:>7} | {:>9.1} {:>9.1} {:>6.3} | {:>8} {:>8} | {:>8} {:>8}",
                rate,
                a.nodes,
                measured,
                sp.output_tok_s,
                sp.output_tok_s / measured.max(1e-9),
                get("ttft_ms"),
                ms(&sp.ttft_ms, true),
                get("tpot_ms"),
                ms(&sp.tpot_ms, true)
            );
            report.validation.push((p.clone(), sp));
        }
        // The highest offered rate within the limits, interpolated between load points, and
        // the output throughput there: measured and predicted.
        let at = capacity::rate_within_limits(&report.validation, &limits);
        match (at.measured, at.predicted) {
            (Some((mr, mt)), Some((pr, pt))) => say!(
                "within TTFT p99 <= {} ms and TPOT p99 <= {} ms: measured {:.3} requests/s ({:.1} tokens/s), predicted {:.3} requests/s ({:.1} tokens/s): ratio {:.3} (throughput {:.3})",
                a.ttft_p99_ms,
                a.tpot_p99_ms,
                mr,
                mt,
                pr,
                pt,
                pr / mr,
                pt / mt.max(1e-9)
            ),
            _ => say!("the limits are not met (or never exceeded) at the measured points: no rate to compare"),
        }
    } else {
        let probe = planner.saturation()?;
        let sat = probe.achieved_rps.max(1e-6);
        let rates: Vec<f64> = if a.curve.is_empty() {
            capacity::default_rates(sat)
        } else {
            a.curve.clone()
        };
        say!(
            "one node saturates near {:.2} requests/s ({:.0} output tokens/s)",
            sat,
            probe.output_tok_s
        );
        say!(
            "{:>9} | {:>9} {:>9} | {:>8} {:>8} | {:>8} {:>8} | {}",
            "offered",
            "req/s",
            "tok/s",
            "TTFT p50",
            "p99",
            "TPOT p50",
            "p99",
            "within limits"
        );
        report.curve = planner.curve(&rates, |r, p| {
            say!(
                "{:>9.2} | {:>9.2} {:>9.1} | {:>8} {:>8} | {:>8} {:>8} | {}",
                r,
                p.achieved_rps,
                p.output_tok_s,
                ms(&p.ttft_ms, false),
                ms(&p.ttft_ms, true),
                ms(&p.tpot_ms, false),
                ms(&p.tpot_ms, true),
                if limits.within(p) { "yes" } else { "no" }
            );
        })?;
        report.max_rate_per_node = planner.max_rate(&rates, &report.curve, &limits)?;
        match report.max_rate_per_node {
            Some(lo) => say!(
                "one node: at most {:.2} requests/s with TTFT p99 <= {} ms and TPOT p99 <= {} ms",
                lo,
                a.ttft_p99_ms,
                a.tpot_p99_ms
            ),
            None => say!(
                "no simulated rate meets TTFT p99 <= {} ms and TPOT p99 <= {} ms on one node",
                a.ttft_p99_ms,
                a.tpot_p99_ms
            ),
        }
        if let (Some(target), Some(per)) = (a.rate, report.max_rate_per_node) {
            let nodes = planner.nodes_for(target, per, &limits, |n, p, good| {
                say!(
                    "{n} nodes at {target} requests/s: TTFT p99 {} ms, TPOT p99 {} ms, {:.1} tokens/s: {}",
                    ms(&p.ttft_ms, true),
                    ms(&p.tpot_ms, true),
                    p.output_tok_s,
                    if good { "within limits" } else { "over" }
                );
            })?;
            match &nodes.plan {
                Some(p) => say!("plan: {} nodes of this kind for {target} requests/s", p.nodes),
                None => say!("not within the limits even with {} nodes", nodes.max_nodes),
            }
            report.plan = nodes.plan;
        }
        if let Some(prefix) = &a.plot {
            let x_max = rates.last().copied().unwrap_or(1.0);
            let path = format!("{prefix}-capacity.svg");
            std::fs::write(&path, capacity::curve_svg(&f, &report.curve, x_max, &limits)?)
                .with_context(|| format!("writing {path}"))?;
            say!("wrote {path}");
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "capacity",
            "--traces",
            "a.jsonl,b.jsonl",
            "--output-tokens",
            "fixed:20",
            "--prompt-tokens",
            "uniform:10:30",
            "--curve",
            "1,2.5",
        ])
        .unwrap();
        assert_eq!(c.a.traces, vec![PathBuf::from("a.jsonl"), PathBuf::from("b.jsonl")]);
        assert_eq!(
            (c.a.prompt_tokens, c.a.output_tokens),
            (Some(Dist::Uniform(10, 30)), Some(Dist::Fixed(20)))
        );
        assert_eq!((c.a.curve, c.a.ttft_p99_ms, c.a.nodes), (vec![1.0, 2.5], 2000.0, 1));
        assert!(Cli::try_parse_from(["capacity"]).is_err());
        assert!(Cli::try_parse_from(["capacity", "--traces", "t", "--prompt-tokens", "gamma:1"]).is_err());
    }
}
