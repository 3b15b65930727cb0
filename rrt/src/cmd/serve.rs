//! `rrt serve`: the embedded cluster. One process runs N nodes (each with its own engine
//! thread, served on a loopback port) and the coordinator in front of them (client gRPC and
//! OpenAI HTTP). Without `model` it serves the default SmolLM2 converted by the `serve.*`
//! recipe (B = 2, average init, rank-256 activation-aware SVD, exits calibrated at 95 %
//! agreement), converting on first run and reusing the cached checkpoint after.

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
    /// Model to serve as is (key `model`); default: the converted SmolLM2.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// In-process nodes (`serve.nodes`).
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
    #[command(flatten)]
    pub telemetry: super::TelemetryArgs,
}

impl Args {
    pub fn figment(&self) -> Figment {
        use crate::config::flag;
        let f = crate::config::figment(self.config.as_deref());
        let f = flag(f, "model", &self.model);
        let f = flag(f, "serve.nodes", &self.nodes);
        let f = flag(f, "coordinator.http_listen", &self.http_listen);
        let f = flag(f, "coordinator.grpc_listen", &self.grpc_listen);
        let f = flag(f, "node.kv_mib", &self.kv_mib);
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
        "first run: converting {} into {} (B = {}, {} init, rank {}, {} SVD); this takes a few minutes once",
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
            criterion: super::calibrate::CriterionArg::MaxProb,
            tokens: 4096,
            dry_run: false,
            json: false,
        })?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

pub fn run(a: Args) -> Result<()> {
    let cfg = crate::config::extract(&a.figment())?;
    let _telemetry = rrt_telemetry::init(&cfg.telemetry, "rrt-serve", "warn")?;
    let path = match &cfg.model {
        Some(p) => p.clone(),
        None => default_checkpoint(&cfg.serve)?,
    };
    let n = cfg.serve.nodes;
    let mut models = Vec::with_capacity(n);
    for _ in 0..n {
        models.push(
            ModelArg {
                model: Some(path.clone()),
            }
            .load()?,
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let (stop_nodes, nodes_stop) = tokio::sync::watch::channel(false);
        let mut sources = Vec::new();
        let mut tasks = Vec::new();
        let mut threads = Vec::new();
        let mut loops = 0;
        for (i, lm) in models.into_iter().enumerate() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let node = rrt_node::server::start_on(
                lm,
                cfg.node.engine_config(),
                cfg.node.early_exit,
                &format!("node-{i}"),
                cfg.node.placement(),
            )?;
            loops = node.loops;
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
        let coord = server::start(&discovery, super::coordinator::settings(c)?).await;
        let http_addr = http.local_addr()?;
        let name = coord.model_info().await.map(|i| i.model).unwrap_or_default();
        say!(
            "rrt serve: {name} ({loops} loops) on {n} node(s); OpenAI HTTP on http://{http_addr}, gRPC on {}",
            grpc.local_addr()?
        );
        say!(
            "try: curl http://{http_addr}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}],\"max_tokens\":32}}'"
        );
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
