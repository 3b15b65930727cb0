//! `rrt bench sim-cluster`: a cluster of simulated nodes in one process, for checking
//! `rrt capacity` at a scale this machine cannot run for real (64 nodes).
//!
//! Each node is the real node service and engine actor over the real [`rrt_node::Engine`] on
//! the compute-free [`rrt_node::sim::SimBackend`], paced so that every pass lasts what the
//! cost model fitted by `rrt capacity` (its `--json` report) gives it; each request's exit
//! loops are drawn from the traced exit mix. The coordinator in front is the real one. Drive it
//! with `rrt bench load` and compare with `rrt capacity --validate ... --nodes N`.

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rrt_bench::capacity::{draw_exits, read_fitted};
use rrt_coordinator::registry::NodeSource;
use rrt_coordinator::server::{self, Discovery};
use rrt_node::engine_actor::EngineHandle;
use rrt_node::grpc::{NodeService, ServedModel};
use rrt_node::{EngineConfig, sim};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(clap::Args)]
pub struct SimArgs {
    /// The `rrt capacity --json` report whose fitted costs, node settings and exit mix the
    /// simulated nodes use.
    #[arg(long)]
    pub fitted: PathBuf,
    /// Simulated nodes.
    #[arg(long, default_value_t = 64)]
    pub nodes: usize,
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub grpc_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Model whose tokenizer the nodes use (default: the cached SmolLM2).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(a: SimArgs) -> Result<()> {
    let f = read_fitted(&a.fitted)?;
    let path = match &a.model {
        Some(p) => p.clone(),
        None => rrt_model::default_model_path().context("run scripts/fetch-model.sh first, or pass --model")?,
    };
    let tok = Arc::new(rrt_model::loader::load_tokenizer(&path)?);
    let prompter = rrt_model::chat::Prompter::new(tok.clone(), None)?;
    let vocab = tok.vocab_size();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let mut sources = Vec::new();
        for i in 0..a.nodes {
            let cfg = EngineConfig {
                block_size: f.block_size,
                max_step_rows: f.max_step_rows,
                max_running: f.max_running,
                ..Default::default()
            };
            let engine = sim::engine(f.loops, cfg, f.kv_blocks, tok.clone(), sim::SIM_VOCAB)?;
            let (handle, thread) = EngineHandle::spawn_paced(engine, 1024, Some(f.cost.pace()));
            let served = ServedModel {
                prompter: prompter.clone(),
                info: rrt_proto::v1::ModelInfoResponse {
                    model: "simulated".into(),
                    source: "simulated".into(),
                    vocab_size: vocab as u32,
                    context_length: 8192,
                    layers: f.loops as u32,
                    shared_layers: 1,
                    loops: f.loops as u32,
                    ..Default::default()
                },
            };
            let rng = Mutex::new(ChaCha8Rng::seed_from_u64(a.seed + i as u64));
            let shares = f.exit_shares.clone();
            let svc = NodeService::new(format!("sim-{i}"), served, handle.clone()).with_request_hook(Arc::new(
                move |r: &mut rrt_node::Request| {
                    let mut rng = rng.lock().expect("rng lock");
                    r.params.exit.schedule = Some(draw_exits(&mut rng, &shares, r.params.max_tokens));
                    // Token ids do not matter without a model; a small vocabulary keeps the
                    // (all-zero) logits of every pass cheap.
                    for t in &mut r.prompt {
                        *t %= sim::SIM_VOCAB as u32;
                    }
                },
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            sources.push(NodeSource::Static(listener.local_addr()?.to_string()));
            let exit = {
                let svc = svc.clone();
                rrt_node::supervisor::EngineWatch::spawn(thread, move |e| {
                    if let rrt_node::supervisor::EngineExit::Died(m) = e {
                        svc.engine_died(m);
                    }
                })
            };
            tokio::spawn(rrt_node::server::serve(
                listener,
                svc,
                handle,
                exit,
                Duration::from_secs(5),
                None,
                std::future::pending(),
            ));
        }
        let discovery = Discovery {
            sources,
            poll_interval: Duration::from_millis(500),
        };
        let grpc = tokio::net::TcpListener::bind(a.grpc_listen).await?;
        let http = tokio::net::TcpListener::bind(a.http_listen).await?;
        let cfg = rrt_coordinator::CoordinatorConfig {
            max_in_flight: 256 * a.nodes.max(1),
            ..Default::default()
        };
        let coord = server::start(&discovery, cfg).await;
        say!(
            "rrt sim cluster: {} simulated nodes ({} healthy); gRPC on {}, OpenAI HTTP on http://{}",
            a.nodes,
            coord.healthy_nodes(),
            grpc.local_addr()?,
            http.local_addr()?
        );
        super::coordinator::serve_bounded(coord, discovery, grpc, http, 5).await
    })
}
