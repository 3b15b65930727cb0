//! `rrt bench load`: the load generator of [`rrt_bench::load`] driven from the command line.
//!
//! Each value of `--rate` (open loop: Poisson arrivals) or `--concurrency` (closed loop) is one
//! load point, run one after the other (for each `--model` in turn); a point lasts `--warmup`
//! seconds plus `--duration` seconds, or until `--requests` requests were sent after the
//! warmup (whichever comes first when both are given). Before the first point of a model the
//! text's tokens per word are measured on the server, unless `--tokens-per-word` is given.
//!
//! Output: a table (one row per point) on stdout, `--json FILE` (all results, optionally
//! every request) and `--plot PREFIX` (PREFIX-latency.svg: TTFT and TPOT percentiles vs
//! throughput or load; PREFIX-exits.svg: the exit-loop histogram per point). When a point
//! fails, what was measured before it is still printed and written, then the error returned.

use anyhow::{Context, Result, ensure};
use rrt_bench::load::{self, Dist, GenSettings, Load, PointConfig, PointResult, Target, Workload};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("load").required(true).args(["rate", "concurrency"])))]
pub struct LoadArgs {
    /// The coordinator: `http://host:port` of its client gRPC API (default
    /// http://127.0.0.1:7300) or, with `--api http`, the base URL of its HTTP API (default
    /// http://127.0.0.1:8080).
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// Which API to drive.
    #[arg(long, value_enum, default_value_t = Api::Grpc)]
    pub api: Api,
    /// API key, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "RRT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to verify an `https://` gRPC target with.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Open loop: Poisson arrival rates in requests/s, comma-separated, one load point each.
    #[arg(long, value_delimiter = ',', value_name = "R1,R2,...")]
    pub rate: Vec<f64>,
    /// Closed loop: requests in flight, comma-separated, one load point each.
    #[arg(long, value_delimiter = ',', value_name = "C1,C2,...")]
    pub concurrency: Vec<usize>,
    /// Seconds of measurement per load point (after the warmup). Default 30 unless
    /// `--requests` is given.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per load point (after the warmup).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Seconds at the start of each load point whose requests are left out of the statistics.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds of pause between load points (lets the server drain queues).
    #[arg(long, default_value_t = 0.0)]
    pub cooldown: f64,
    /// Prompt length in tokens: `fixed:N`, `uniform:A:B`, `normal:MEAN:SD`, `lognormal:MEAN:SD`.
    #[arg(long, value_name = "DIST", default_value = "fixed:128")]
    pub prompt_tokens: Dist,
    /// Output length in tokens (same forms); sent as the request's maximum with `ignore_eos`.
    #[arg(long, value_name = "DIST", default_value = "fixed:128")]
    pub output_tokens: Dist,
    /// Tokens at the start of every prompt shared by all requests (a common system prompt:
    /// the text's first words), within `--prompt-tokens`; 0: every prompt distinct.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: u32,
    /// Text the prompts are cut from (default: the repository's data/calibration.txt).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Tokens per word of the text (default: measured on the server before the first point).
    #[arg(long)]
    pub tokens_per_word: Option<f64>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of arrivals, prompts, lengths and the requests' sampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds a request may take before it is abandoned (cancelled) as a "timeout" error.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// gRPC connections (HTTP/2) the requests are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Served model(s) to load, comma-separated: each is measured in turn at every load
    /// point and reported on its own (none: the coordinator's default model).
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<String>,
    /// Run every loop for every token (no early exit).
    #[arg(long)]
    pub full_depth: bool,
    /// Most loops per token.
    #[arg(long)]
    pub max_loops: Option<u32>,
    /// One exit threshold for every loop, replacing the calibrated ones.
    #[arg(long)]
    pub exit_threshold: Option<f32>,
    /// Write all results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Include every request in the JSON file.
    #[arg(long)]
    pub per_request: bool,
    /// Write SVG plots PREFIX-latency.svg and PREFIX-exits.svg.
    #[arg(long, value_name = "PREFIX")]
    pub plot: Option<PathBuf>,
    /// The x axis of the latency plot.
    #[arg(long, value_enum, default_value_t = PlotX::Throughput)]
    pub plot_x: PlotX,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// `--api`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Grpc,
    Http,
}

impl From<Api> for load::Api {
    fn from(a: Api) -> Self {
        match a {
            Api::Grpc => load::Api::Grpc,
            Api::Http => load::Api::Http,
        }
    }
}

/// `--plot-x`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotX {
    /// Achieved output tokens/s.
    Throughput,
    /// The offered rate (open loop) or the concurrency (closed loop).
    Load,
}

impl From<PlotX> for load::PlotX {
    fn from(x: PlotX) -> Self {
        match x {
            PlotX::Throughput => load::PlotX::Throughput,
            PlotX::Load => load::PlotX::Load,
        }
    }
}

/// The repository's calibration text, from the working directory or the source tree.
pub fn default_text() -> Option<PathBuf> {
    [
        PathBuf::from("data/calibration.txt"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

pub fn run(a: LoadArgs) -> Result<()> {
    ensure!(
        a.rate.iter().all(|r| r.is_finite() && *r > 0.0),
        "every --rate must be positive"
    );
    ensure!(!a.concurrency.contains(&0), "every --concurrency must be positive");
    ensure!(
        a.duration.is_none_or(|d| d.is_finite() && d > 0.0),
        "--duration must be positive"
    );
    ensure!(a.requests != Some(0), "--requests must be positive");
    ensure!(a.warmup.is_finite() && a.warmup >= 0.0, "--warmup must be >= 0");
    ensure!(
        a.timeout_s.is_finite() && a.timeout_s > 0.0,
        "--timeout-s must be positive"
    );
    ensure!(a.connections > 0, "--connections must be positive");
    let loads: Vec<Load> = if a.rate.is_empty() {
        a.concurrency.iter().map(|&c| Load::Concurrency(c)).collect()
    } else {
        a.rate.iter().map(|&r| Load::Rate(r)).collect()
    };
    let duration = match (a.duration, a.requests) {
        (None, None) => Some(30.0),
        (d, _) => d,
    };
    let text_path = match &a.text {
        Some(p) => p.clone(),
        None => default_text().context("no --text given and data/calibration.txt not found")?,
    };
    let text = std::fs::read_to_string(&text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let api = load::Api::from(a.api);
    let target = Target {
        api,
        url: a.target.clone().unwrap_or_else(|| api.default_url().into()),
        api_key: a.api_key.clone(),
        ca: a.ca.clone(),
    };
    let gen_settings = GenSettings {
        temperature: a.temperature,
        full_depth: a.full_depth,
        max_loops: a.max_loops,
        exit_threshold: a.exit_threshold,
        model: String::new(),
    };
    let models: Vec<String> = if a.model.is_empty() {
        vec![String::new()]
    } else {
        a.model.clone()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results: Vec<PointResult> = Vec::new();
    let (tpw, tpw_source, outcome) = rt.block_on(async {
        let mut workload = Workload::from_text(&text, a.prompt_tokens, a.output_tokens)?;
        workload.shared_prefix_tokens = a.shared_prefix_tokens;
        let mut measured = (1.3, "assumed");
        let n = loads.len() * models.len();
        let mut k = 0;
        for model in &models {
            let mut gen_settings = gen_settings.clone();
            gen_settings.model = model.clone();
            let (tpw, source) = match a.tokens_per_word {
                Some(r) => (r, "--tokens-per-word"),
                None => match load::calibrate_tokens_per_word(&target, model, &workload.words).await {
                    Ok(r) => (r, "measured"),
                    Err(e) => {
                        eprintln!(
                            "warning: could not measure tokens per word ({:#}); assuming 1.3",
                            anyhow::Error::from(e)
                        );
                        (1.3, "assumed")
                    }
                },
            };
            measured = (tpw, source);
            ensure!(
                tpw.is_finite() && tpw > 0.0,
                "tokens per word must be positive, not {tpw}"
            );
            workload.tokens_per_word = tpw;
            eprintln!(
                "{} {}{} | prompts {} tokens (mean {:.0}; {tpw:.3} tokens/word, {source}) | outputs {} tokens (mean {:.0})",
                api.name(),
                target.url,
                if model.is_empty() { String::new() } else { format!(" model {model}") },
                a.prompt_tokens,
                a.prompt_tokens.mean(),
                a.output_tokens,
                a.output_tokens.mean()
            );
            let shared = Arc::new(workload.clone());
            for &load in loads.iter() {
                if k > 0 && a.cooldown > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(a.cooldown)).await;
                }
                k += 1;
                let cfg = PointConfig {
                    target: target.clone(),
                    load,
                    duration_s: duration,
                    requests: a.requests,
                    warmup_s: a.warmup,
                    workload: shared.clone(),
                    generation: gen_settings.clone(),
                    seed: a.seed,
                    timeout_s: a.timeout_s,
                    connections: a.connections,
                    keep_requests: a.per_request,
                    progress: !a.quiet,
                    label: if model.is_empty() {
                        format!("[{k}/{n}] {load}")
                    } else {
                        format!("[{k}/{n}] {model} {load}")
                    },
                };
                match load::run_point(&cfg).await {
                    Ok(r) => {
                        eprintln!("{}", r.one_line());
                        results.push(r);
                    }
                    // Keep what was measured: the outputs are written, then the error returned.
                    Err(e) => {
                        let e = anyhow::Error::from(e).context(format!("load point {load}"));
                        return Ok((measured.0, measured.1, Err(e)));
                    }
                }
            }
        }
        let (tpw, source) = measured;
        anyhow::Ok((tpw, source, Ok(())))
    })?;
    let mut models_seen: Vec<&str> = results.iter().map(|r| r.model.as_str()).collect();
    models_seen.dedup();
    for m in &models_seen {
        let of_model: Vec<PointResult> = results.iter().filter(|r| r.model == *m).cloned().collect();
        if models_seen.len() > 1 {
            say!("\nmodel {m}:");
        }
        say!("{}", load::table(&of_model));
    }
    if let Some(path) = &a.json {
        let report = load::Report {
            api,
            target: &target.url,
            mode: if a.rate.is_empty() { "closed" } else { "open" },
            prompt_tokens: a.prompt_tokens.to_string(),
            output_tokens: a.output_tokens.to_string(),
            tokens_per_word: tpw,
            tokens_per_word_source: tpw_source,
            text: text_path.display().to_string(),
            warmup_s: a.warmup,
            duration_s: duration,
            requests: a.requests,
            timeout_s: a.timeout_s,
            temperature: a.temperature,
            full_depth: a.full_depth,
            max_loops: a.max_loops,
            exit_threshold: a.exit_threshold,
            connections: a.connections,
            seed: a.seed,
            points: &results,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(prefix) = &a.plot {
        for m in &models_seen {
            let of_model: Vec<PointResult> = results.iter().filter(|r| r.model == *m).cloned().collect();
            // One set of plots per model (the model's name joins the prefix when there are several).
            let prefix = if models_seen.len() > 1 {
                let mut p = prefix.as_os_str().to_os_string();
                p.push(format!("-{m}"));
                PathBuf::from(p)
            } else {
                prefix.clone()
            };
            let plots = load::plots(&of_model, a.plot_x.into(), &prefix)?;
            if plots.len() < 2 {
                eprintln!("no per-token exit loops measured (HTTP API or no tokens): no exits plot");
            }
            for (path, svg) in plots {
                std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        use clap::{CommandFactory, Parser};
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: LoadArgs,
        }
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "x",
            "--rate",
            "1,2.5",
            "--prompt-tokens",
            "uniform:10:20",
            "--api",
            "http",
        ])
        .unwrap();
        assert_eq!(c.a.rate, vec![1.0, 2.5]);
        assert_eq!(c.a.prompt_tokens, Dist::Uniform(10, 20));
        assert_eq!(c.a.output_tokens, Dist::Fixed(128));
        assert_eq!(c.a.api, Api::Http);
        let c = Cli::try_parse_from(["x", "--concurrency", "2,4", "--requests", "10"]).unwrap();
        assert_eq!((c.a.concurrency, c.a.requests), (vec![2, 4], Some(10)));
        // Exactly one of --rate and --concurrency; bad distributions are refused.
        assert!(Cli::try_parse_from(["x"]).is_err());
        assert!(Cli::try_parse_from(["x", "--rate", "1", "--concurrency", "2"]).is_err());
        assert!(Cli::try_parse_from(["x", "--rate", "1", "--output-tokens", "normal:5"]).is_err());
    }
}
