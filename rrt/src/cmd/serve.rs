//! `rrt serve`: the embedded cluster. One process runs N nodes per model (each with its own
//! engine thread, served on a loopback port) and the coordinator in front of them (client gRPC
//! and OpenAI HTTP), which routes each request by its `model`. Without models given it serves
//! the default SmolLM2 as is (`smollm2-135m`, the default) beside its conversion by the
//! `serve.*` recipe (`smollm2-135m-rrt-b2-r256`: B = 2, average init, rank-256
//! activation-aware SVD, exits calibrated at 95 % agreement), converting on first run and
//! reusing the cached checkpoint after.

use super::ModelArg;
use super::convert::{InitArg, SvdArg};
use anyhow::{Context, Result, bail};
use figment::Figment;
use rrt_coordinator::registry::NodeSource;
use rrt_coordinator::server::{self, Discovery};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (default: ./rrt.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A model to serve, `NAME=PATH` or `PATH` (named by its file name); repeat for several,
    /// the first answering requests that name none (`serve.models`). Default: the SmolLM2
    /// original and its recursive conversion.
    #[arg(long)]
    pub model: Vec<String>,
    /// In-process nodes per model (`serve.nodes`).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// OpenAI HTTP address (`coordinator.http_listen`).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Client gRPC address (`coordinator.grpc_listen`).
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// KV cache budget per node, MiB (`node.kv_mib`).
    #[arg(long)]
    pub kv_mib: Option<usize>,
    /// `int8` or `exact`: how the CPU multiplies with quantized weights (`node.cpu_products`).
    #[arg(long)]
    pub cpu_products: Option<String>,
    /// `f32` or `f16`: the CPU KV cache's value type (`node.kv_dtype`).
    #[arg(long)]
    pub kv_dtype: Option<String>,
    #[command(flatten)]
    pub telemetry: super::TelemetryArgs,
}

impl Args {
    pub fn figment(&self) -> Figment {
        use crate::config::flag;
        let f = crate::config::figment(self.config.as_deref());
        let models = (!self.model.is_empty()).then(|| self.model.clone());
        let f = flag(f, "serve.models", &models);
        let f = flag(f, "serve.nodes", &self.nodes);
        let f = flag(f, "coordinator.http_listen", &self.http_listen);
        let f = flag(f, "coordinator.grpc_listen", &self.grpc_listen);
        let f = flag(f, "node.kv_mib", &self.kv_mib);
        let f = flag(f, "node.cpu_products", &self.cpu_products);
        let f = flag(f, "node.kv_dtype", &self.kv_dtype);
        self.telemetry.apply(f)
    }
}

/// The calibration text: `serve.calibration`, else the repository's `data/calibration.txt`.
fn calibration_text(cfg: &crate::config::ServeConfig) -> Option<PathBuf> {
    if let Some(p) = &cfg.calibration {
        return Some(p.clone());
    }
    [
        PathBuf::from("data/calibration.txt"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The name the default recursive conversion is served under.
pub fn default_recursive_name(cfg: &crate::config::ServeConfig) -> String {
    format!("smollm2-135m-rrt-b{}-r{}", cfg.loops, cfg.lora_rank)
}

/// The name the default model is served under as is.
pub const DEFAULT_ORIGINAL_NAME: &str = "smollm2-135m";

/// What `rrt serve` serves: `serve.models`, else `model`, else the default pair (the original
/// SmolLM2 first, then its conversion, converted when not cached).
pub fn models_to_serve(cfg: &crate::config::Config) -> Result<Vec<crate::config::ServedSpec>> {
    use crate::config::ServedSpec;
    if !cfg.serve.models.is_empty() {
        return cfg.serve.models.iter().map(|m| ServedSpec::parse(m)).collect();
    }
    if let Some(p) = &cfg.model {
        return Ok(vec![ServedSpec {
            name: rrt_node::server::default_name(p),
            path: p.clone(),
        }]);
    }
    Ok(vec![
        ServedSpec {
            name: DEFAULT_ORIGINAL_NAME.into(),
            path: rrt_model::default_model_path()?,
        },
        ServedSpec {
            name: default_recursive_name(&cfg.serve),
            path: default_checkpoint(&cfg.serve)?,
        },
    ])
}

/// The default model converted by the `serve.*` recipe, converting it when not cached.
pub fn default_checkpoint(cfg: &crate::config::ServeConfig) -> Result<PathBuf> {
    let gguf = rrt_model::default_model_path()?;
    let cache = match &cfg.cache {
        Some(c) => c.clone(),
        None => gguf.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let name = format!(
        "SmolLM2-135M-Instruct-rrt-b{}-{}-r{}-{}",
        cfg.loops, cfg.init, cfg.lora_rank, cfg.svd
    );
    let dir = cache.join(&name);
    if dir.join(rrt_model::checkpoint::CONFIG_FILE).is_file() {
        return Ok(dir);
    }
    let calibration = calibration_text(cfg);
    if cfg.svd == "activation" && calibration.is_none() {
        bail!("`serve.svd = activation` needs calibration text: set `serve.calibration`");
    }
    eprintln!(
        "first run: converting {} into {} (B = {}, {} init, rank {}, {} SVD), then calibrating its early exits: about 4 minutes on 2 CPU cores, once (progress bars follow)",
        gguf.display(),
        dir.display(),
        cfg.loops,
        cfg.init,
        cfg.lora_rank,
        cfg.svd
    );
    let tmp = cache.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    super::convert::run(super::convert::Args {
        model: ModelArg {
            model: Some(gguf.clone()),
        },
        out: tmp.clone(),
        loops: cfg.loops,
        init: match cfg.init.as_str() {
            "stepwise" => InitArg::Stepwise,
            "lower" => InitArg::Lower,
            _ => InitArg::Average,
        },
        lora_rank: cfg.lora_rank,
        lora_ranks: None,
        svd: if cfg.svd == "activation" {
            SvdArg::Activation
        } else {
            SvdArg::Plain
        },
        calibration: calibration.clone(),
        calibration_tokens: 4096,
        clamp_ranks: true,
        quant: super::convert::QuantArg::F32,
    })?;
    if let Some(text) = &calibration
        && cfg.loops > 1
    {
        eprintln!("calibrating early exits on {}", text.display());
        super::calibrate::run(super::calibrate::Args {
            model: ModelArg {
                model: Some(tmp.clone()),
            },
            text: text.clone(),
            agreement: 0.95,
            also_agreement: Vec::new(),
            mean_loops: None,
            criterion: Some(super::calibrate::CriterionArg::MaxProb),
            fit_gate: false,
            gate_l2: rrt_model::exit_fit::FitOptions::default().l2,
            tokens: 4096,
            self_generated: 0,
            self_generated_prompt: super::calibrate::SELF_GENERATED_PROMPT,
            self_generated_tokens: super::calibrate::SELF_GENERATED_TOKENS,
            dry_run: false,
            json: false,
            quiet: true,
        })?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

/// One line per served model for the startup banner.
fn banner_rows(nodes: &[(String, usize, u64, Option<f64>)], default: &str) -> Vec<String> {
    let cells: Vec<[String; 4]> = nodes
        .iter()
        .map(|(name, loops, params, mean)| {
            let label = if name == default {
                format!("{name} (default)")
            } else {
                name.clone()
            };
            let mean = match (loops, mean) {
                (1, _) => "1.00".to_string(),
                (_, Some(m)) => format!("{m:.2} (calibrated)"),
                (b, None) => format!("up to {b} (no calibration)"),
            };
            [label, loops.to_string(), format!("{:.1} M", *params as f64 / 1e6), mean]
        })
        .collect();
    let head = ["model", "loops", "parameters", "mean loops/token"].map(String::from);
    let w: Vec<usize> = (0..4)
        .map(|j| {
            std::iter::once(&head)
                .chain(&cells)
                .map(|c| c[j].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    std::iter::once(&head)
        .chain(&cells)
        .map(|c| {
            format!(
                "  {:<a$}  {:>b$}  {:>c$}  {:<d$}",
                c[0],
                c[1],
                c[2],
                c[3],
                a = w[0],
                b = w[1],
                c = w[2],
                d = w[3]
            )
            .trim_end()
            .to_string()
        })
        .collect()
}

pub fn run(a: Args) -> Result<()> {
    let cfg = crate::config::extract(&a.figment())?;
    let _telemetry = rrt_telemetry::init(&cfg.telemetry, "rrt-serve", "warn")?;
    // Conversion (first run) computes exactly; serving uses the configured products.
    let specs = models_to_serve(&cfg)?;
    crate::config::apply_cpu_products(cfg.node.cpu_products);
    crate::config::apply_kv_dtype(cfg.node.kv_dtype);
    let n = cfg.serve.nodes;
    let mut models = Vec::with_capacity(n * specs.len());
    for spec in &specs {
        for _ in 0..n {
            let lm = ModelArg {
                model: Some(spec.path.clone()),
            }
            .load()
            .with_context(|| format!("loading model `{}` from {}", spec.name, spec.path.display()))?;
            models.push((spec.name.clone(), lm));
        }
    }
    let default = specs.first().map(|s| s.name.clone()).unwrap_or_default();
    rt_run(cfg, models, default)
}

fn rt_run(cfg: crate::config::Config, models: Vec<(String, rrt_model::LoadedModel)>, default: String) -> Result<()> {
    let total = models.len();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let (stop_nodes, nodes_stop) = tokio::sync::watch::channel(false);
        let mut sources = Vec::new();
        let mut tasks = Vec::new();
        let mut threads = Vec::new();
        let mut described: Vec<(String, usize, u64, Option<f64>)> = Vec::new();
        for (i, (name, lm)) in models.into_iter().enumerate() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let node = rrt_node::server::start_as(
                lm,
                cfg.node.engine_config(),
                cfg.node.early_exit,
                &format!("node-{i}"),
                cfg.node.placement(),
                Some(&name),
            )?;
            if !described.iter().any(|d| d.0 == node.model) {
                described.push((node.model.clone(), node.loops, node.parameters, node.expected_mean_loops));
            }
            sources.push(NodeSource::Static(addr.to_string()));
            let mut rx = nodes_stop.clone();
            tasks.push(tokio::spawn(rrt_node::server::serve(
                listener,
                node.service,
                node.engine,
                node.engine_exit.clone(),
                Duration::from_secs(cfg.node.drain_seconds),
                // In-process nodes listen on loopback only.
                None,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )));
            threads.push(node.engine_exit);
        }
        let c = &cfg.coordinator;
        let discovery = Discovery {
            sources,
            poll_interval: Duration::from_millis(c.poll_ms.min(500)),
        };
        let grpc = tokio::net::TcpListener::bind(c.grpc_listen)
            .await
            .with_context(|| format!("binding {}", c.grpc_listen))?;
        let http = tokio::net::TcpListener::bind(c.http_listen)
            .await
            .with_context(|| format!("binding {}", c.http_listen))?;
        let mut settings = super::coordinator::settings(c)?;
        let default = settings.default_model.clone().unwrap_or(default);
        settings.default_model = Some(default.clone());
        let coord = server::start(&discovery, settings).await;
        let http_addr = http.local_addr()?;
        let names: Vec<&str> = described.iter().map(|d| d.0.as_str()).collect();
        say!(
            "rrt serve: {} on {total} node(s); OpenAI HTTP on http://{http_addr}, gRPC on {}",
            names.join(", "),
            grpc.local_addr()?
        );
        for row in banner_rows(&described, &default) {
            say!("{row}");
        }
        let q = "What is the capital of France?";
        for name in &names {
            say!(
                "try: curl -s http://{http_addr}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{q}\"}}],\"max_tokens\":32,\"temperature\":0}}'"
            );
        }
        super::coordinator::serve_bounded(coord, discovery, grpc, http, c.shutdown_seconds).await?;
        let _ = stop_nodes.send(true);
        for t in tasks {
            t.await??;
        }
        for t in threads {
            if let rrt_node::supervisor::EngineExit::Died(m) = t.ended().await {
                anyhow::bail!("an engine thread died: {m}");
            }
        }
        Ok(())
    })
}
