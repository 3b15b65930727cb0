//! `rrt bench coordinator`: the coordinator's own overhead, against fake nodes that produce
//! tokens without running a model (`rrt_node::fake`, a configurable step time).
//!
//! Three runtimes in one process: the fake nodes, the clients, and the coordinator on a
//! single-threaded runtime (one thread = one core at most). The same streams run twice: from
//! the clients straight to the nodes, and through the coordinator (client gRPC API). Each fake
//! token carries the time it was sent, so a client measures how long it took to arrive; the
//! difference between the two paths is the latency the coordinator adds per streamed token.
//! The coordinator thread's CPU time (`/proc/thread-self/schedstat`) over the run gives its
//! cost per token, hence the tokens per second one coordinator core can carry.

use anyhow::{Context, Result};
use rrt_coordinator::registry::NodeSource;
use rrt_coordinator::server::{self, Discovery};
use rrt_node::fake::FakeNode;
use rrt_proto::v1 as api;
use rrt_proto::v1::node as pb;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct CoordArgs {
    /// Fake nodes behind the coordinator.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Step times of the fake nodes in ms (0: as fast as the streams take tokens).
    #[arg(long, value_delimiter = ',', default_value = "20,0")]
    pub step_ms: Vec<u64>,
    /// Concurrent streams.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub concurrency: Vec<usize>,
    /// Tokens per request.
    #[arg(long, default_value_t = 100)]
    pub tokens: u32,
    /// Requests per stream slot, one after the other.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

#[derive(Default, serde::Serialize)]
struct PathStats {
    tokens: u64,
    wall_s: f64,
    tokens_per_s: f64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    latency_mean_us: f64,
}

fn stats(mut lat: Vec<u64>, wall: Duration) -> PathStats {
    lat.sort_unstable();
    let n = lat.len().max(1);
    let q = |p: f64| lat.get(((n as f64 - 1.0) * p) as usize).copied().unwrap_or(0) as f64;
    PathStats {
        tokens: lat.len() as u64,
        wall_s: wall.as_secs_f64(),
        tokens_per_s: lat.len() as f64 / wall.as_secs_f64(),
        latency_p50_us: q(0.5),
        latency_p99_us: q(0.99),
        latency_mean_us: lat.iter().sum::<u64>() as f64 / n as f64,
    }
}

#[derive(serde::Serialize)]
struct Row {
    step_ms: u64,
    concurrency: usize,
    direct: PathStats,
    coordinator: PathStats,
    added_p50_us: f64,
    added_mean_us: f64,
    coordinator_cpu_us_per_token: f64,
    tokens_per_coordinator_core_s: f64,
}

pub fn run(a: CoordArgs) -> Result<()> {
    let epoch = Instant::now();
    let nodes_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fake-nodes")
        .enable_all()
        .build()?;
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("clients")
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &step in &a.step_ms {
        // Fresh nodes and coordinator per step time.
        let mut node_addrs = Vec::new();
        for i in 0..a.nodes {
            let listener = nodes_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            node_addrs.push(listener.local_addr()?.to_string());
            let svc = FakeNode::new(format!("fake-{i}"), Duration::from_millis(step), 2, epoch);
            nodes_rt.spawn(
                tonic::transport::Server::builder()
                    .add_service(pb::node_server::NodeServer::new(svc))
                    .serve_with_incoming(
                        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    ),
            );
        }
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (cpu_tx, mut cpu_rx) = tokio::sync::mpsc::channel::<std::sync::mpsc::Sender<Duration>>(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sources: Vec<NodeSource> = node_addrs.iter().cloned().map(NodeSource::Static).collect();
        let coord_thread = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let discovery = Discovery {
                        sources,
                        poll_interval: Duration::from_millis(500),
                    };
                    let coord = server::start(&discovery, Default::default()).await;
                    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    addr_tx.send(grpc.local_addr()?)?;
                    // CPU-time queries answered on this thread.
                    tokio::spawn(async move {
                        while let Some(reply) = cpu_rx.recv().await {
                            let _ = reply.send(thread_cpu());
                        }
                    });
                    server::serve(coord, discovery, grpc, http, async move {
                        let _ = stop_rx.await;
                    })
                    .await?;
                    Ok(())
                })
            })?;
        let grpc_addr = addr_rx.recv().context("the coordinator did not start")?;
        let cpu = || -> Result<Duration> {
            let (tx, rx) = std::sync::mpsc::channel();
            cpu_tx.blocking_send(tx)?;
            Ok(rx.recv()?)
        };
        for &c in &a.concurrency {
            let direct = clients_rt.block_on(run_direct(&node_addrs, c, a.rounds, a.tokens, epoch))?;
            let cpu0 = cpu()?;
            let via = clients_rt.block_on(run_coordinator(grpc_addr, c, a.rounds, a.tokens, epoch))?;
            let cpu_used = cpu()?.saturating_sub(cpu0);
            let cpu_per_token = cpu_used.as_secs_f64() * 1e6 / via.tokens.max(1) as f64;
            let row = Row {
                step_ms: step,
                concurrency: c,
                added_p50_us: via.latency_p50_us - direct.latency_p50_us,
                added_mean_us: via.latency_mean_us - direct.latency_mean_us,
                coordinator_cpu_us_per_token: cpu_per_token,
                tokens_per_coordinator_core_s: 1e6 / cpu_per_token,
                direct,
                coordinator: via,
            };
            if a.json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                eprintln!(
                    "step {step} ms, {c} streams: direct {:.0} tok/s p50 {:.0} us; via coordinator {:.0} tok/s p50 {:.0} us p99 {:.0} us; added p50 {:.0} us, mean {:.0} us; coordinator CPU {:.1} us/token = {:.0} tok/s per core",
                    row.direct.tokens_per_s,
                    row.direct.latency_p50_us,
                    row.coordinator.tokens_per_s,
                    row.coordinator.latency_p50_us,
                    row.coordinator.latency_p99_us,
                    row.added_p50_us,
                    row.added_mean_us,
                    row.coordinator_cpu_us_per_token,
                    row.tokens_per_coordinator_core_s
                );
            }
            rows.push(row);
        }
        let _ = stop_tx.send(());
        drop(cpu_tx);
        coord_thread
            .join()
            .map_err(|_| anyhow::anyhow!("coordinator thread panicked"))??;
    }
    if !a.json {
        println!(
            "| step ms | streams | direct tok/s | via coord. tok/s | direct p50 us | direct p99 us | via p50 us | via p99 us | added p50 us | added mean us | coord. CPU us/token | tok/s per coord. core |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
                r.step_ms,
                r.concurrency,
                r.direct.tokens_per_s,
                r.coordinator.tokens_per_s,
                r.direct.latency_p50_us,
                r.direct.latency_p99_us,
                r.coordinator.latency_p50_us,
                r.coordinator.latency_p99_us,
                r.added_p50_us,
                r.added_mean_us,
                r.coordinator_cpu_us_per_token,
                r.tokens_per_coordinator_core_s
            );
        }
    }
    Ok(())
}

fn latency(text: &str, epoch: Instant) -> u64 {
    let sent: u64 = text.parse().unwrap_or(0);
    (epoch.elapsed().as_micros() as u64).saturating_sub(sent)
}

async fn run_direct(nodes: &[String], c: usize, rounds: usize, tokens: u32, epoch: Instant) -> Result<PathStats> {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(pb::node_client::NodeClient::connect(format!("http://{n}")).await?);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..c {
        let mut client = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for r in 0..rounds {
                let req = pb::RunRequest {
                    request_id: format!("d{i}-{r}"),
                    prompt: vec![1; 16],
                    max_new_tokens: tokens,
                    ..Default::default()
                };
                let mut s = client.run(req).await?.into_inner();
                while let Some(e) = s.message().await? {
                    if let Some(pb::run_event::Event::Token(t)) = e.event {
                        lat.push(latency(&t.text, epoch));
                    }
                }
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(stats(all, t.elapsed()))
}

async fn run_coordinator(
    addr: std::net::SocketAddr,
    c: usize,
    rounds: usize,
    tokens: u32,
    epoch: Instant,
) -> Result<PathStats> {
    let client = api::generation_client::GenerationClient::connect(format!("http://{addr}")).await?;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..rounds {
                let req = api::GenerateRequest {
                    input: Some(api::generate_request::Input::Prompt("sixteen bytes!!!".into())),
                    max_new_tokens: Some(tokens),
                    ..Default::default()
                };
                let mut s = client.generate_stream(req).await?.into_inner();
                while let Some(m) = s.message().await? {
                    if m.token_id.is_some() {
                        lat.push(latency(&m.text, epoch));
                    }
                }
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(stats(all, t.elapsed()))
}
