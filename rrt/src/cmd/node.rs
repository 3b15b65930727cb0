//! `rrt node`: one node process. Loads the model onto the CPU backend, starts the engine actor
//! and serves the internal `rrt.v1.node.Node` gRPC service with `grpc.health.v1` and server
//! reflection. On SIGTERM or Ctrl-C it reports NOT_SERVING at once, stops taking requests,
//! finishes those in flight (up to `--drain-seconds`) and exits.

use super::ModelArg;
use anyhow::{Context, Result};
use figment::Figment;
use figment::providers::Serialized;
use rrt_kernels::CpuBackend;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::grpc::NodeService;
use rrt_node::{Engine, EngineConfig, ExitRule, ResidentModel};
use rrt_proto::v1::node::node_server::NodeServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (default: ./rrt.toml when it exists). Flags override it and the
    /// `RRT_*` environment (`rrt config` prints the result; keys: `rrt/src/config.rs`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// GGUF file, Hugging Face directory or recursive checkpoint (key `model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
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
}

impl Args {
    /// The configuration with these flags on top.
    pub fn figment(&self) -> Figment {
        let mut f = crate::config::figment(self.config.as_deref());
        macro_rules! flag {
            ($field:ident, $key:literal) => {
                if let Some(v) = &self.$field {
                    f = f.merge(Serialized::default($key, v));
                }
            };
        }
        flag!(model, "model");
        flag!(listen, "node.listen");
        flag!(node_id, "node.id");
        flag!(kv_mib, "node.kv_mib");
        flag!(max_step_rows, "node.max_step_rows");
        flag!(max_running, "node.max_running");
        flag!(early_exit, "node.early_exit");
        flag!(kv_fill, "node.kv_fill");
        flag!(drain_seconds, "node.drain_seconds");
        f
    }
}

pub fn run(a: Args) -> Result<()> {
    let cfg = crate::config::extract(&a.figment())?;
    let model = ModelArg {
        model: cfg.model.clone(),
    };
    let lm = model.load()?;
    let n = &cfg.node;
    let exit = if n.early_exit && lm.kind == rrt_model::loader::SourceKind::Recursive {
        ExitRule::from_checkpoint(&lm.path)?
    } else {
        None
    };
    let ecfg = EngineConfig {
        block_size: n.block_size,
        kv_bytes: n.kv_mib << 20,
        max_step_rows: n.max_step_rows,
        max_running: n.max_running,
        kv_fill: n.kv_fill,
        exit,
        ..Default::default()
    };
    let loops = lm.model.loops();
    let engine = Engine::new(ResidentModel::new(CpuBackend, lm.model), Arc::new(lm.tokenizer), ecfg)?;
    let (handle, join) = EngineHandle::spawn(engine, 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(n.listen, n.id.clone(), loops, handle, n.drain_seconds))?;
    join.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    Ok(())
}

async fn serve(
    listen: SocketAddr,
    node_id: Option<String>,
    loops: usize,
    handle: EngineHandle,
    drain_seconds: u64,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let id = node_id.unwrap_or_else(|| addr.to_string());
    let svc = NodeService::new(id.clone(), loops, handle.clone());
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<NodeServer<NodeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rrt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    println!("rrt node {id} listening on {addr} ({loops} loops)");
    let shutdown = {
        let handle = handle.clone();
        let svc = svc.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: draining");
            health_reporter.set_not_serving::<NodeServer<NodeService>>().await;
            svc.start_draining();
            let drain = handle.shutdown(true);
            if tokio::time::timeout(std::time::Duration::from_secs(drain_seconds), drain)
                .await
                .is_err()
            {
                tracing::warn!("drain deadline passed; cancelling what is left");
                let _ = handle.shutdown(false).await;
            }
        }
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(NodeServer::new(svc))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

async fn wait_for_signal() {
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
