//! `rrt coordinator`: the front door of a cluster. Finds nodes from a static list and/or DNS
//! names (re-resolved every poll), polls their load, and serves the client gRPC API
//! (`rrt.v1.Generation`, with health and reflection) and the OpenAI-compatible HTTP API.

use anyhow::{Context, Result};
use figment::Figment;
use rrt_coordinator::registry::NodeSource;
use rrt_coordinator::server::{self, Discovery};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (default: ./rrt.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Client gRPC address (`coordinator.grpc_listen`).
    #[arg(long)]
    pub grpc_listen: Option<SocketAddr>,
    /// OpenAI HTTP address (`coordinator.http_listen`).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Node addresses, comma-separated (`coordinator.nodes`).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    /// DNS names of nodes, `name:port`, comma-separated (`coordinator.dns`).
    #[arg(long, value_delimiter = ',')]
    pub dns: Option<Vec<String>>,
    /// Extra model name clients may use (`coordinator.served_model_name`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// The model answering requests that name none (`coordinator.default_model`; default: the
    /// first served, by name).
    #[arg(long)]
    pub default_model: Option<String>,
    /// Admission limit: requests in flight at once (`coordinator.max_in_flight`).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// File of API keys, one per line (`coordinator.api_keys_file`).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Seconds open streams get after SIGTERM (`coordinator.shutdown_seconds`).
    #[arg(long)]
    pub shutdown_seconds: Option<u64>,
    /// PEM certificate for clients (`coordinator.tls_cert`).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for clients (`coordinator.tls_key`).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of the nodes' certificates (`coordinator.node_ca`).
    #[arg(long)]
    pub node_ca: Option<PathBuf>,
    /// PEM client certificate presented to nodes (`coordinator.node_client_cert`).
    #[arg(long)]
    pub node_client_cert: Option<PathBuf>,
    /// PEM key of that certificate (`coordinator.node_client_key`).
    #[arg(long)]
    pub node_client_key: Option<PathBuf>,
    #[command(flatten)]
    pub telemetry: super::TelemetryArgs,
}

impl Args {
    pub fn figment(&self) -> Figment {
        use crate::config::flag;
        let f = crate::config::figment(self.config.as_deref());
        let f = flag(f, "coordinator.grpc_listen", &self.grpc_listen);
        let f = flag(f, "coordinator.http_listen", &self.http_listen);
        let f = flag(f, "coordinator.nodes", &self.nodes);
        let f = flag(f, "coordinator.dns", &self.dns);
        let f = flag(f, "coordinator.served_model_name", &self.served_model_name);
        let f = flag(f, "coordinator.default_model", &self.default_model);
        let f = flag(f, "coordinator.max_in_flight", &self.max_in_flight);
        let f = flag(f, "coordinator.api_keys_file", &self.api_keys_file);
        let f = flag(f, "coordinator.shutdown_seconds", &self.shutdown_seconds);
        let f = flag(f, "coordinator.tls_cert", &self.tls_cert);
        let f = flag(f, "coordinator.tls_key", &self.tls_key);
        let f = flag(f, "coordinator.node_ca", &self.node_ca);
        let f = flag(f, "coordinator.node_client_cert", &self.node_client_cert);
        let f = flag(f, "coordinator.node_client_key", &self.node_client_key);
        self.telemetry.apply(f)
    }
}

/// The coordinator settings of a configuration (reads the API key file).
pub fn settings(c: &crate::config::CoordinatorConfig) -> Result<rrt_coordinator::CoordinatorConfig> {
    let mut keys = c.api_keys.clone();
    if let Some(p) = &c.api_keys_file {
        keys.extend(
            rrt_coordinator::auth::ApiKeys::read_file(p)
                .with_context(|| format!("reading `coordinator.api_keys_file` {}", p.display()))?,
        );
    }
    use rrt_coordinator::tls::{NodeTls, PemIdentity};
    let client_tls = match (&c.tls_cert, &c.tls_key) {
        (Some(cert), Some(key)) => Some(PemIdentity::read(cert, key).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let node_tls = match &c.node_ca {
        Some(ca) => Some(NodeTls {
            ca: rrt_coordinator::tls::read(ca).map_err(anyhow::Error::msg)?,
            identity: match (&c.node_client_cert, &c.node_client_key) {
                (Some(cert), Some(key)) => Some(PemIdentity::read(cert, key).map_err(anyhow::Error::msg)?),
                _ => None,
            },
            domain: c.node_tls_domain.clone(),
        }),
        None => None,
    };
    Ok(rrt_coordinator::CoordinatorConfig {
        client_tls,
        node_tls,
        api_keys: rrt_coordinator::auth::ApiKeys::new(keys),
        max_body_bytes: c.max_body_bytes,
        served_model_name: c.served_model_name.clone(),
        default_model: c.default_model.clone(),
        node_timeout: Duration::from_millis(c.node_timeout_ms),
        max_migrations: c.max_migrations,
        max_in_flight: c.max_in_flight,
        prefix_affinity: c.prefix_affinity,
    })
}

pub fn run(a: Args) -> Result<()> {
    let cfg = crate::config::extract(&a.figment())?;
    let _telemetry = rrt_telemetry::init(&cfg.telemetry, "rrt-coordinator", "warn")?;
    let c = cfg.coordinator;
    if c.nodes.is_empty() && c.dns.is_empty() {
        anyhow::bail!("no nodes: set `coordinator.nodes` (--nodes) or `coordinator.dns` (--dns)");
    }
    let sources: Vec<NodeSource> = c
        .nodes
        .iter()
        .cloned()
        .map(NodeSource::Static)
        .chain(c.dns.iter().cloned().map(NodeSource::Dns))
        .collect();
    let discovery = Discovery {
        sources,
        poll_interval: Duration::from_millis(c.poll_ms),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let grpc = tokio::net::TcpListener::bind(c.grpc_listen)
            .await
            .with_context(|| format!("binding {}", c.grpc_listen))?;
        let http = tokio::net::TcpListener::bind(c.http_listen)
            .await
            .with_context(|| format!("binding {}", c.http_listen))?;
        let coord = server::start(&discovery, settings(&c)?).await;
        say!(
            "rrt coordinator: gRPC on {}, OpenAI HTTP on http://{} ({} of {} nodes healthy)",
            grpc.local_addr()?,
            http.local_addr()?,
            coord.healthy_nodes(),
            coord.registry.snapshot().len()
        );
        serve_bounded(coord, discovery, grpc, http, c.shutdown_seconds).await
    })
}

/// Serves until SIGTERM / Ctrl-C, then gives open streams `shutdown_seconds` to finish.
pub async fn serve_bounded(
    coord: std::sync::Arc<rrt_coordinator::Coordinator>,
    discovery: Discovery,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    shutdown_seconds: u64,
) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::serve(coord.clone(), discovery, grpc, http, async move {
        let _ = rx.await;
    }));
    super::node::wait_for_signal().await;
    // Readiness fails first, so load balancers stop sending before the listeners close.
    coord.begin_shutdown();
    tokio::time::sleep(Duration::from_millis((shutdown_seconds * 1000 / 4).min(2000))).await;
    let _ = tx.send(());
    match tokio::time::timeout(Duration::from_secs(shutdown_seconds), serving).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("open streams did not finish within {shutdown_seconds} s; exiting"),
    }
    Ok(())
}
