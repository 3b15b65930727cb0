//! The node registry: which nodes exist (a static list and/or DNS names re-resolved
//! periodically, e.g. a Kubernetes headless service), whether they are healthy, and their last
//! load report. One poller task refreshes it; routing reads snapshots.

use crate::routing::NodeView;
use rrt_proto::v1::node as pb;
use rrt_proto::v1::node::node_client::NodeClient;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Where node addresses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeSource {
    /// A fixed address (`host:port` or `http://host:port`).
    Static(String),
    /// A DNS name (`name:port`) whose A/AAAA records are the nodes; re-resolved every refresh.
    Dns(String),
}

/// HTTP/2 keepalive ping interval and the time a ping may go unanswered.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Consecutive failed polls after which a node is marked unhealthy.
pub const FAILURES_UNHEALTHY: u32 = 2;

struct Entry {
    view: NodeView,
    client: NodeClient<Channel>,
    failures: u32,
}

/// Shared registry of nodes, keyed by URL (`http://ip:port`).
#[derive(Clone, Default)]
pub struct Registry {
    nodes: Arc<RwLock<BTreeMap<String, Entry>>>,
    /// Mutual TLS to the nodes (their URLs are then `https://`).
    tls: Option<tonic::transport::ClientTlsConfig>,
}

fn url_of(addr: &str, tls: bool) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry that reaches its nodes over (mutual) TLS.
    pub fn with_tls(tls: tonic::transport::ClientTlsConfig) -> Self {
        Self {
            tls: Some(tls),
            ..Self::default()
        }
    }

    /// The current view of every known node (healthy or not).
    pub fn snapshot(&self) -> Vec<NodeView> {
        self.nodes
            .read()
            .expect("registry lock")
            .values()
            .map(|e| e.view.clone())
            .collect()
    }

    /// A client for the node `id` (its URL).
    pub fn client(&self, id: &str) -> Option<NodeClient<Channel>> {
        self.nodes
            .read()
            .expect("registry lock")
            .get(id)
            .map(|e| e.client.clone())
    }

    /// Counts a request sent to `id` that its next load report will include (+1), or that
    /// finished (-1).
    pub fn add_pending(&self, id: &str, delta: isize) {
        if let Some(e) = self.nodes.write().expect("registry lock").get_mut(id) {
            e.view.pending = (e.view.pending as isize + delta).max(0) as usize;
        }
    }

    /// Marks a node draining at once (it refused a request with the typed drain refusal);
    /// its next load report confirms or clears it.
    pub fn mark_draining(&self, id: &str) {
        if let Some(e) = self.nodes.write().expect("registry lock").get_mut(id) {
            e.view.draining = true;
        }
    }

    /// Marks a node unhealthy at once (e.g. its stream broke).
    pub fn mark_failed(&self, id: &str) {
        if let Some(e) = self.nodes.write().expect("registry lock").get_mut(id) {
            e.failures = FAILURES_UNHEALTHY;
            e.view.healthy = false;
        }
    }

    /// Resolves the sources, adds new nodes, forgets those no source names any more, then
    /// polls every node's load (with `timeout`).
    pub async fn refresh(&self, sources: &[NodeSource], timeout: Duration) {
        let mut urls = Vec::new();
        for s in sources {
            match s {
                NodeSource::Static(a) => urls.push(url_of(a, self.tls.is_some())),
                NodeSource::Dns(name) => match tokio::net::lookup_host(name.as_str()).await {
                    Ok(addrs) => urls.extend(addrs.map(|a| url_of(&a.to_string(), self.tls.is_some()))),
                    Err(e) => tracing::warn!(name, error = %e, "DNS resolution of nodes failed"),
                },
            }
        }
        urls.sort();
        urls.dedup();
        {
            let mut nodes = self.nodes.write().expect("registry lock");
            nodes.retain(|u, _| urls.contains(u));
            for u in &urls {
                if nodes.contains_key(u) {
                    continue;
                }
                let Ok(ep) = Endpoint::from_shared(u.clone()) else {
                    tracing::warn!(url = u, "invalid node address");
                    continue;
                };
                // HTTP/2 pings find a frozen node (SIGSTOP, a hung host: the TCP connection
                // stays open) within KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT; its streams then
                // fail and their requests move.
                let mut ep = ep
                    .connect_timeout(timeout)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true);
                if let Some(tls) = &self.tls {
                    ep = match ep.tls_config(tls.clone()) {
                        Ok(ep) => ep,
                        Err(e) => {
                            tracing::warn!(url = u, error = %e, "TLS configuration refused");
                            continue;
                        }
                    };
                }
                nodes.insert(
                    u.clone(),
                    Entry {
                        view: NodeView {
                            id: u.clone(),
                            ..Default::default()
                        },
                        client: NodeClient::new(ep.connect_lazy()),
                        failures: 0,
                    },
                );
            }
        }
        let targets: Vec<(String, NodeClient<Channel>)> = self
            .nodes
            .read()
            .expect("registry lock")
            .iter()
            .map(|(u, e)| (u.clone(), e.client.clone()))
            .collect();
        let polls = targets.into_iter().map(|(u, mut c)| async move {
            let r = tokio::time::timeout(timeout, c.load(pb::LoadRequest {})).await;
            (u, r.ok().and_then(|r| r.ok()).map(|r| r.into_inner()))
        });
        let results = futures_join_all(polls).await;
        let mut nodes = self.nodes.write().expect("registry lock");
        for (u, report) in results {
            let Some(e) = nodes.get_mut(&u) else { continue };
            match report {
                Some(l) => {
                    e.failures = 0;
                    e.view = NodeView {
                        id: u.clone(),
                        model: l.model,
                        fingerprint: l.model_fingerprint,
                        healthy: true,
                        draining: l.draining,
                        loops: l.loops as usize,
                        rows_per_depth: l.rows_per_depth.iter().map(|&r| r as usize).collect(),
                        waiting_tokens: l.waiting_tokens as usize,
                        free_kv_blocks: l.free_kv_blocks as usize,
                        total_kv_blocks: l.total_kv_blocks as usize,
                        kv_block_size: l.kv_block_size as usize,
                        // A fresh report includes what was sent before it.
                        pending: 0,
                        prefix_cache: l.prefix_cache_bytes > 0,
                    };
                }
                None => {
                    e.failures += 1;
                    if e.failures >= FAILURES_UNHEALTHY {
                        e.view.healthy = false;
                    }
                }
            }
        }
    }

    /// Refreshes every `interval` until the returned handle is aborted.
    pub fn spawn_poller(&self, sources: Vec<NodeSource>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let reg = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                reg.refresh(&sources, interval.max(Duration::from_millis(200))).await;
            }
        })
    }
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("poll task"));
    }
    out
}
