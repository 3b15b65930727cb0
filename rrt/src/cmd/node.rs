//! `rrt node`: one node process. Loads the model onto its backend (`--device`; CPU by default), starts the engine actor
//! and serves the internal `rrt.v1.node.Node` gRPC service with `grpc.health.v1` and server
//! reflection. On SIGTERM or Ctrl-C it reports NOT_SERVING at once, stops taking requests,
//! finishes those in flight (up to `--drain-seconds`) and exits.

use super::ModelArg;
use anyhow::{Context, Result};
use figment::Figment;
use rrt_node::server;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (default: ./rrt.toml when it exists). Flags override it and the
    /// `RRT_*` environment (`rrt config` prints the result; keys: `rrt/src/config.rs`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// GGUF file, Hugging Face directory or recursive checkpoint (key `model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The name clients put in `model` to reach this node's model (`node.model_name`;
    /// default: the model's file or directory name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address to listen on; port 0 picks a free port, printed at start (`node.listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// This node's id in load reports (`node.id`).
    #[arg(long)]
    pub node_id: Option<String>,
    /// KV cache budget in MiB (`node.kv_mib`).
    #[arg(long)]
    pub kv_mib: Option<usize>,
    /// Most rows (tokens x loops) per pass (`node.max_step_rows`).
    #[arg(long)]
    pub max_step_rows: Option<usize>,
    /// Most sequences holding KV at once (`node.max_running`).
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Early exit at the checkpoint's calibrated thresholds (`node.early_exit`).
    #[arg(long)]
    pub early_exit: Option<bool>,
    /// `propagate` or `recompute` (`node.kv_fill`).
    #[arg(long)]
    pub kv_fill: Option<String>,
    /// Seconds to finish in-flight requests after SIGTERM (`node.drain_seconds`).
    #[arg(long)]
    pub drain_seconds: Option<u64>,
    /// PEM certificate: serve TLS only (`node.tls_cert`).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM key of that certificate (`node.tls_key`).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates it signed (`node.tls_client_ca`).
    #[arg(long)]
    pub tls_client_ca: Option<PathBuf>,
    /// HTTP address of the node's Prometheus `/metrics` and `/health`; port 0 picks a free port
    /// (`node.metrics_listen`; default: none).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// `cpu`, `cuda` or `cuda:N` (`node.device`); a GPU that cannot be used falls back to the
    /// CPU with a warning.
    #[arg(long)]
    pub device: Option<String>,
    /// `bf16` or `f16`: weight precision on a GPU (`node.gpu_weights`).
    #[arg(long)]
    pub gpu_weights: Option<String>,
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
    /// The configuration with these flags on top.
    pub fn figment(&self) -> Figment {
        let mut f = crate::config::figment(self.config.as_deref());
        macro_rules! flag {
            ($field:ident, $key:literal) => {
                f = crate::config::flag(f, $key, &self.$field);
            };
        }
        flag!(model, "model");
        flag!(listen, "node.listen");
        flag!(model_name, "node.model_name");
        flag!(node_id, "node.id");
        flag!(kv_mib, "node.kv_mib");
        flag!(max_step_rows, "node.max_step_rows");
        flag!(max_running, "node.max_running");
        flag!(early_exit, "node.early_exit");
        flag!(kv_fill, "node.kv_fill");
        flag!(drain_seconds, "node.drain_seconds");
        flag!(tls_cert, "node.tls_cert");
        flag!(tls_key, "node.tls_key");
        flag!(tls_client_ca, "node.tls_client_ca");
        flag!(metrics_listen, "node.metrics_listen");
        flag!(device, "node.device");
        flag!(gpu_weights, "node.gpu_weights");
        flag!(cpu_products, "node.cpu_products");
        flag!(kv_dtype, "node.kv_dtype");
        self.telemetry.apply(f)
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg = crate::config::extract(&a.figment())?;
    let _telemetry = rrt_telemetry::init(&cfg.telemetry, "rrt-node", "warn")?;
    crate::config::apply_cpu_products(cfg.node.cpu_products);
    crate::config::apply_kv_dtype(cfg.node.kv_dtype);
    let lm = ModelArg {
        model: cfg.model.clone(),
    }
    .load()?;
    let n = &cfg.node;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(n.listen)
            .await
            .with_context(|| format!("binding {}", n.listen))?;
        let addr = listener.local_addr()?;
        let id = n.id.clone().unwrap_or_else(|| addr.to_string());
        let tls = match (&n.tls_cert, &n.tls_key) {
            (Some(cert), Some(key)) => {
                let id = rrt_coordinator::tls::PemIdentity::read(cert, key).map_err(anyhow::Error::msg)?;
                let mut t = tonic::transport::ServerTlsConfig::new().identity(id.tonic());
                if let Some(ca) = &n.tls_client_ca {
                    let ca = rrt_coordinator::tls::read(ca).map_err(anyhow::Error::msg)?;
                    t = t.client_ca_root(tonic::transport::Certificate::from_pem(ca));
                }
                Some(t)
            }
            _ => None,
        };
        let node = server::start_as(
            lm,
            n.engine_config(),
            n.early_exit,
            &id,
            n.placement(),
            n.model_name.as_deref(),
        )?;
        let mut metrics = String::new();
        if let Some(m) = n.metrics_listen {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("binding {m} (node.metrics_listen)"))?;
            metrics = format!(", metrics on http://{}/metrics", l.local_addr()?);
            tokio::spawn(rrt_node::metrics::serve(
                l,
                node.service.clone(),
                std::future::pending(),
            ));
        }
        say!(
            "rrt node {id} listening on {addr} (model {}, {} loops, backend {}){metrics}",
            node.model,
            node.loops,
            node.backend
        );
        server::serve(
            listener,
            node.service,
            node.engine,
            node.engine_exit.clone(),
            Duration::from_secs(n.drain_seconds),
            tls,
            wait_for_signal(),
        )
        .await?;
        // A dead engine stopped the server: exit non-zero (the supervisor restarts the pod).
        match node.engine_exit.ended().await {
            rrt_node::supervisor::EngineExit::Died(m) => anyhow::bail!("the engine thread died: {m}"),
            _ => Ok(()),
        }
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
