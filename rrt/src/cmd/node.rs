//! `rrt node`: one node process. Loads the model onto the CPU backend, starts the engine actor
//! and serves the internal `rrt.v1.node.Node` gRPC service with `grpc.health.v1` and server
//! reflection. On SIGTERM or Ctrl-C it reports NOT_SERVING at once, stops taking requests,
//! finishes those in flight (up to `--drain-seconds`) and exits.

use super::ModelArg;
use anyhow::{Context, Result};
use rrt_kernels::CpuBackend;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::grpc::NodeService;
use rrt_node::{Engine, EngineConfig, ExitRule, KvFill, ResidentModel};
use rrt_proto::v1::node::node_server::NodeServer;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7301", env = "RRT_NODE_LISTEN")]
    pub listen: SocketAddr,
    /// This node's id in load reports (default: the listen address).
    #[arg(long, env = "RRT_NODE_ID")]
    pub node_id: Option<String>,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 1024)]
    pub kv_mib: usize,
    /// Most rows (tokens x loops) per pass.
    #[arg(long, default_value_t = 256)]
    pub max_step_rows: usize,
    /// Most sequences holding KV at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Early exit with the checkpoint's calibrated thresholds (off: always full depth).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub early_exit: bool,
    /// How exited tokens get their deeper keys/values: propagate or recompute.
    #[arg(long, default_value = "propagate")]
    pub kv_fill: String,
    /// Seconds to finish in-flight requests after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
}

pub fn run(a: Args) -> Result<()> {
    let lm = a.model.load()?;
    let exit = if a.early_exit && lm.kind == rrt_model::loader::SourceKind::Recursive {
        ExitRule::from_checkpoint(&lm.path)?
    } else {
        None
    };
    let kv_fill = match a.kv_fill.as_str() {
        "propagate" => KvFill::Propagate,
        "recompute" => KvFill::Recompute,
        other => anyhow::bail!("--kv-fill must be propagate or recompute, got {other}"),
    };
    let cfg = EngineConfig {
        kv_bytes: a.kv_mib << 20,
        max_step_rows: a.max_step_rows,
        max_running: a.max_running,
        kv_fill,
        exit,
        ..Default::default()
    };
    let loops = lm.model.loops();
    let engine = Engine::new(ResidentModel::new(CpuBackend, lm.model), Arc::new(lm.tokenizer), cfg)?;
    let (handle, join) = EngineHandle::spawn(engine, 1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(a.listen, a.node_id, loops, handle, a.drain_seconds))?;
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
