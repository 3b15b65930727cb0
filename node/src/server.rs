//! Starting a node: the model loaded onto its compute backend (CPU, or CUDA where built and
//! available: see `device.rs`), the engine actor on its own thread,
//! and the `rrt.v1.node.Node` gRPC service with `grpc.health.v1` and server reflection. Shared
//! by `rrt node` (one per process) and `rrt serve` (several in one process).
//!
//! Shutdown: when the given signal fires, health turns NOT_SERVING at once, new runs are
//! refused, in-flight requests finish or move (up to the drain deadline, then are cancelled),
//! the keys/values of those that moved finish streaming, and the server stops.

use crate::engine_actor::EngineHandle;
use crate::grpc::{NodeService, ServedModel};
use crate::supervisor::{EngineExit, EngineWatch};
use crate::{Device, Engine, EngineConfig, EngineError, ExitRule, GpuWeights, ResidentModel};
use rrt_kernels::{Backend, CpuBackend};
use rrt_model::LoadedModel;
use rrt_model::chat::Prompter;
use rrt_model::loader::SourceKind;
use rrt_proto::v1::node::node_server::NodeServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A node whose engine runs, not yet listening.
pub struct Node {
    pub service: NodeService,
    pub engine: EngineHandle,
    /// How the engine thread is doing (it is supervised: a dead engine makes the node stop
    /// serving, see [`crate::supervisor`]).
    pub engine_exit: EngineWatch,
    pub loops: usize,
    /// The name the model is served under.
    pub model: String,
    /// Parameters the model holds (embeddings, LM head and LoRAs included).
    pub parameters: u64,
    /// Loops per token its exit calibration expects (`None`: no calibration, or no exits).
    pub expected_mean_loops: Option<f64>,
    /// The backend the engine runs on, e.g. `cpu` or `cuda:0 (NVIDIA H100 ...)`.
    pub backend: String,
}

/// Where and how the engine computes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placement {
    pub device: Device,
    pub gpu_weights: GpuWeights,
}

/// Builds the engine on `backend` and starts its actor thread; returns the handle, the
/// thread and the KV blocks.
fn spawn_engine<B: Backend>(
    backend: B,
    model: rrt_model::Model,
    tokenizer: Arc<rrt_model::tokenizer::Tokenizer>,
    cfg: &EngineConfig,
    name: &str,
) -> Result<(EngineHandle, crate::engine_actor::EngineThread, usize), EngineError> {
    let engine = Engine::new(ResidentModel::new(backend, model)?, tokenizer, cfg.clone())?;
    let blocks = engine.kv_blocks().0;
    let (handle, thread) = EngineHandle::spawn_named(engine, 1024, None, name.to_string());
    Ok((handle, thread, blocks))
}

/// The engine on the device `place` asks for, or on the CPU (with one warning line) when that
/// device cannot be used.
fn launch(
    place: Placement,
    model: rrt_model::Model,
    tokenizer: Arc<rrt_model::tokenizer::Tokenizer>,
    cfg: &EngineConfig,
    name: &str,
) -> Result<(EngineHandle, crate::engine_actor::EngineThread, usize, String), EngineError> {
    if let Device::Cuda(n) = place.device {
        #[cfg(feature = "cuda")]
        {
            use rrt_kernels::cuda::{CudaBackend, WeightType};
            let wt = match place.gpu_weights {
                GpuWeights::Bf16 => WeightType::Bf16,
                GpuWeights::F16 => WeightType::F16,
            };
            match CudaBackend::with_weight_type(n, wt) {
                Ok(b) => {
                    let desc = format!("cuda:{n} ({})", b.info());
                    tracing::info!(backend = %desc, "engine on the CUDA backend");
                    let (h, t, k) = spawn_engine(b, model, tokenizer, cfg, name)?;
                    return Ok((h, t, k, desc));
                }
                Err(e) => tracing::warn!("cuda:{n} cannot be used ({e}): falling back to the CPU backend"),
            }
        }
        #[cfg(not(feature = "cuda"))]
        tracing::warn!(
            "device cuda:{n} asked for, but this rrt was built without CUDA support (cargo build --release --features cuda): falling back to the CPU backend"
        );
    }
    let (h, t, k) = spawn_engine(CpuBackend, model, tokenizer, cfg, name)?;
    Ok((h, t, k, "cpu".into()))
}

/// Moves the model onto the CPU backend and starts the engine actor. With `early_exit`, the
/// model's exit rule is used ([`ExitRule::for_model`]: a natively looped model's gate, a
/// recursive checkpoint's calibration; vanilla models always run B = 1).
pub fn start(lm: LoadedModel, cfg: EngineConfig, early_exit: bool, node_id: &str) -> Result<Node, EngineError> {
    start_on(lm, cfg, early_exit, node_id, Placement::default())
}

/// [`start`] on the device `place` names (falling back to the CPU, see [`Placement`]).
pub fn start_on(
    lm: LoadedModel,
    cfg: EngineConfig,
    early_exit: bool,
    node_id: &str,
    place: Placement,
) -> Result<Node, EngineError> {
    start_as(lm, cfg, early_exit, node_id, place, None)
}

/// The name a model is served under by default: its file or directory name.
pub fn default_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The loops per token a recursive checkpoint's calibration expects at its thresholds.
fn expected_mean_loops(lm: &LoadedModel) -> Option<f64> {
    if lm.kind != SourceKind::Recursive {
        return None;
    }
    let cfg = rrt_model::checkpoint::read_config(&lm.path).ok()?;
    cfg.exit.calibration.get("expected_mean_loops")?.as_f64()
}

/// [`start_on`], serving the model under `name` (what clients put in `model`; default: the
/// file or directory name).
pub fn start_as(
    lm: LoadedModel,
    mut cfg: EngineConfig,
    early_exit: bool,
    node_id: &str,
    place: Placement,
    name: Option<&str>,
) -> Result<Node, EngineError> {
    cfg.exit = if early_exit { ExitRule::for_model(&lm)? } else { None };
    let name = name.map(str::to_string).unwrap_or_else(|| default_name(&lm.path));
    let mean_loops = if cfg.exit.is_some() {
        expected_mean_loops(&lm)
    } else {
        None
    };
    let source = match lm.kind {
        SourceKind::Gguf => "gguf",
        SourceKind::HuggingFace => "huggingface",
        SourceKind::Recursive => "recursive",
    };
    let tokenizer = Arc::new(lm.tokenizer);
    let prompter = Prompter::new(tokenizer.clone(), lm.chat_template)?;
    let served = ServedModel::new(
        &name,
        source,
        &lm.model,
        prompter,
        cfg.exit.as_ref().map(|e| e.criterion),
    )
    .with_expected_mean_loops(mean_loops);
    let loops = lm.model.loops();
    let (handle, engine_thread, kv_blocks, backend) = launch(place, lm.model, tokenizer, &cfg, &name)?;
    // What `rrt capacity` needs to simulate this node: its scheduling settings.
    tracing::info_span!(
        target: "rrt_node",
        "node.start",
        node_id,
        model = name.as_str(),
        backend = backend.as_str(),
        loops = loops as i64,
        kv_blocks = kv_blocks as i64,
        block_size = cfg.block_size as i64,
        max_step_rows = cfg.max_step_rows as i64,
        max_running = cfg.max_running as i64,
    )
    .in_scope(|| ());
    let service = NodeService::new(node_id, served, handle.clone());
    let engine_exit = {
        let service = service.clone();
        EngineWatch::spawn(engine_thread, move |e| {
            if let EngineExit::Died(m) = e {
                service.engine_died(m);
            }
        })
    };
    {
        // Hashing the weights takes a while: start it now; a KV move asked for before it is
        // done waits for the same computation.
        service.set_fingerprint_source(lm.path.clone());
        let (service, path) = (service.clone(), lm.path.clone());
        std::thread::spawn(move || {
            if let Some(Err(e)) = service.compute_fingerprint() {
                tracing::warn!(error = %e, path = %path.display(), "cannot fingerprint the model: no KV moves");
            }
        });
    }
    Ok(Node {
        model: name,
        parameters: service.info().parameters,
        expected_mean_loops: mean_loops,
        service,
        engine: handle,
        engine_exit,
        loops,
        backend,
    })
}

/// Serves the node on `listener` until `shutdown` fires, then drains (see the module docs),
/// or until its engine dies: then health turns NOT_SERVING at once and the server stops (the
/// caller sees the death in `engine_exit` and exits non-zero). With `tls`, only TLS clients
/// (and, when it names a client CA, only those with a certificate that CA signed) get through.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: NodeService,
    engine: EngineHandle,
    engine_exit: EngineWatch,
    drain: Duration,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<NodeServer<NodeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rrt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let stop = {
        let service = service.clone();
        async move {
            tokio::select! {
                _ = shutdown => {
                    tracing::info!("shutdown requested: draining");
                    health_reporter.set_not_serving::<NodeServer<NodeService>>().await;
                    service.start_draining();
                    let deadline = tokio::time::Instant::now() + drain;
                    if tokio::time::timeout_at(deadline, engine.shutdown(true)).await.is_err() {
                        tracing::warn!("drain deadline passed; cancelling what is left");
                        let _ = engine.shutdown(false).await;
                    }
                    // Requests that moved to peers may still be streaming their keys/values:
                    // the connections close once the coordinator released them all.
                    if tokio::time::timeout_at(deadline, service.exports_settled()).await.is_err() {
                        tracing::warn!("drain deadline passed with keys/values still being exported");
                    }
                }
                e = engine_exit.ended() => {
                    tracing::error!(exit = ?e, "the engine stopped: the node stops serving");
                    health_reporter.set_not_serving::<NodeServer<NodeService>>().await;
                    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    // Let the failed streams' last messages go out before the server closes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(NodeServer::new(service))
        // TCP_NODELAY: tokens are small writes that Nagle's algorithm would hold back.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop,
        )
        .await
}
