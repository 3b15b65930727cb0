//! The coordinator's core, shared by both front doors: tokenization (on a node: the
//! coordinator holds no model files), routing, and one pump task per request that relays the
//! node's token stream to the client while recording every token in the request table (a
//! dashmap: request id -> node, prompt, tokens so far), so that a request can be moved to
//! another node with its tokens (issue E). A client that goes away (its [`Generation`]
//! dropped) cancels the request on its node at once.

use crate::error::CoordError;
use crate::metrics::{ExitLoop, Metrics};
use crate::registry::Registry;
use crate::request::{Alt, Finish, GenEvent, GenRequest, GenToken, GenUsage, Input};
use crate::routing::route_with;
use dashmap::DashMap;
use rrt_proto::v1 as api;
use rrt_proto::v1::node as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

type NodeClient = pb::node_client::NodeClient<tonic::transport::Channel>;

/// How often a request is re-routed when its node refuses the connection.
const START_ATTEMPTS: usize = 3;

/// The served model, as nodes describe it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelInfo {
    pub model: String,
    pub source: String,
    pub vocab_size: u32,
    pub context_length: u32,
    pub layers: u32,
    pub shared_layers: u32,
    pub loops: u32,
    pub lora_ranks: Vec<u32>,
    pub exit_criterion: String,
    pub nodes: u32,
}

/// What the request table keeps per request.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub node: String,
    pub prompt: Arc<Vec<u32>>,
    pub generated: Vec<u32>,
    pub arrived: Instant,
    /// Times the request moved to another node.
    pub migrations: u32,
    /// Asks the request's pump to move it to another node (its node is draining).
    pub move_now: Arc<tokio::sync::Notify>,
}

/// Coordinator settings.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Extra model name clients may use (besides the model's own name).
    pub served_model_name: Option<String>,
    /// Deadline of the coordinator's small calls to nodes (tokenize, info, cancel).
    pub node_timeout: Duration,
    /// Most times one request moves to another node after its node failed.
    pub max_migrations: u32,
    /// Admission limit: requests in flight (running or queued on nodes) at once; more are
    /// refused at once with RESOURCE_EXHAUSTED / 429.
    pub max_in_flight: usize,
    /// API keys (`None`: no authentication).
    pub api_keys: Option<crate::auth::ApiKeys>,
    /// Largest HTTP body and gRPC message accepted.
    pub max_body_bytes: usize,
    /// TLS for clients (gRPC and HTTP); `None`: plaintext.
    pub client_tls: Option<crate::tls::PemIdentity>,
    /// Mutual TLS to the nodes; `None`: plaintext.
    pub node_tls: Option<crate::tls::NodeTls>,
    /// Route requests sharing a prompt prefix to one node (see [`crate::routing`]).
    pub prefix_affinity: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            served_model_name: None,
            node_timeout: Duration::from_secs(5),
            max_migrations: 3,
            max_in_flight: 256,
            api_keys: None,
            max_body_bytes: 4 << 20,
            client_tls: None,
            node_tls: None,
            prefix_affinity: false,
        }
    }
}

pub struct Coordinator {
    pub registry: Registry,
    pub metrics: Metrics,
    requests: DashMap<String, Tracked>,
    info: tokio::sync::RwLock<Option<ModelInfo>>,
    cfg: CoordinatorConfig,
    /// Set when the coordinator is shutting down: readiness fails, new requests are refused.
    shutting_down: std::sync::atomic::AtomicBool,
    /// One permit per admitted request, held by its pump until the request is over.
    admission: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
    id_prefix: String,
}

/// A running generation: its events in order, the last one `Done` (or an error). Dropping it
/// cancels the request on its node.
pub struct Generation {
    pub id: String,
    pub node: String,
    pub prompt_tokens: usize,
    rx: mpsc::Receiver<Result<GenEvent, CoordError>>,
}

impl Generation {
    pub async fn next(&mut self) -> Option<Result<GenEvent, CoordError>> {
        self.rx.recv().await
    }
}

fn node_error(node: &str, status: tonic::Status) -> CoordError {
    CoordError::Node {
        node: node.to_string(),
        status,
    }
}

/// A node error that means the node itself is gone (not the request's fault).
fn node_is_down(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) && !status.message().contains("draining")
}

/// `run` as a call carrying the current span's trace context.
fn traced(run: &pb::RunRequest) -> tonic::Request<pb::RunRequest> {
    let mut r = tonic::Request::new(run.clone());
    rrt_telemetry::propagate::inject(&tracing::Span::current(), r.metadata_mut());
    r
}

/// What came of trying to move a request with its keys/values.
enum KvMove {
    /// Its state is staged on `node` under `ticket`; the old stream ends with "moved".
    Staged { node: String, ticket: String },
    /// The old node let go of it but no peer took its state: the old stream ends with
    /// "moved" and the request is replayed.
    HandedOff,
    /// The old node kept it (it cannot export, or the request is finishing there).
    Kept(tonic::Status),
}

impl Coordinator {
    pub fn new(registry: Registry, cfg: CoordinatorConfig) -> Arc<Self> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            registry,
            metrics: Metrics::default(),
            requests: DashMap::new(),
            info: tokio::sync::RwLock::new(None),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            admission: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight.max(1))),
            cfg,
            next_id: AtomicU64::new(0),
            id_prefix: format!("{:08x}", (t ^ (t >> 29)) as u32),
        })
    }

    fn new_id(&self) -> String {
        format!("{}-{}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// A snapshot of one request's state (node, prompt, tokens so far).
    pub fn tracked(&self, id: &str) -> Option<Tracked> {
        self.requests.get(id).map(|t| t.clone())
    }

    /// Starts shutting down: readiness turns 503 / NOT_SERVING and new requests are refused
    /// (UNAVAILABLE / 503); open streams continue.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Healthy, non-draining nodes.
    pub fn healthy_nodes(&self) -> usize {
        self.registry
            .snapshot()
            .iter()
            .filter(|n| n.healthy && !n.draining)
            .count()
    }

    /// Asks every request on a draining node to move to a peer (called after each registry
    /// refresh). Returns how many were asked.
    pub fn move_off_draining(&self) -> usize {
        let draining: Vec<String> = self
            .registry
            .snapshot()
            .into_iter()
            .filter(|n| n.draining)
            .map(|n| n.id)
            .collect();
        if draining.is_empty() {
            return 0;
        }
        let mut asked = 0;
        for t in self.requests.iter() {
            if draining.contains(&t.node) {
                t.move_now.notify_one();
                asked += 1;
            }
        }
        asked
    }

    /// Refreshes the node gauges (before a scrape).
    pub fn update_gauges(&self) {
        let s = self.registry.snapshot();
        self.metrics.nodes.set(s.len() as i64);
        self.metrics
            .healthy_nodes
            .set(s.iter().filter(|n| n.healthy && !n.draining).count() as i64);
        let live: Vec<_> = s.iter().filter(|n| n.healthy).collect();
        self.metrics
            .node_waiting_tokens
            .set(live.iter().map(|n| n.waiting_tokens as i64).sum());
        let depths = live.iter().map(|n| n.rows_per_depth.len()).max().unwrap_or(0);
        for d in 0..depths {
            let rows: usize = live.iter().filter_map(|n| n.rows_per_depth.get(d)).sum();
            self.metrics
                .rows_in_flight
                .get_or_create(&crate::metrics::Depth { depth: d as u32 })
                .set(rows as i64);
        }
        let total: usize = live.iter().map(|n| n.total_kv_blocks).sum();
        let free: usize = live.iter().map(|n| n.free_kv_blocks).sum();
        self.metrics.kv_usage.set(if total > 0 {
            1.0 - free as f64 / total as f64
        } else {
            0.0
        });
    }

    /// The least loaded healthy node for a call that is not a generation.
    fn any_node(
        &self,
    ) -> Result<
        (
            String,
            rrt_proto::v1::node::node_client::NodeClient<tonic::transport::Channel>,
        ),
        CoordError,
    > {
        let snap = self.registry.snapshot();
        let n = route_with(&snap, &[], 1, false).ok_or_else(|| CoordError::Unavailable(String::new()))?;
        let c = self
            .registry
            .client(&n.id)
            .ok_or_else(|| CoordError::Unavailable(String::new()))?;
        Ok((n.id.clone(), c))
    }

    /// Tokenizes on a node (the least loaded), retrying on another when one is down.
    pub async fn tokenize(&self, req: pb::TokenizeRequest) -> Result<Vec<u32>, CoordError> {
        let mut last = CoordError::Unavailable(String::new());
        for _ in 0..START_ATTEMPTS {
            let (node, mut c) = self.any_node()?;
            match tokio::time::timeout(self.cfg.node_timeout, c.tokenize(req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner().token_ids),
                Ok(Err(s)) if node_is_down(&s) => {
                    self.registry.mark_failed(&node);
                    last = node_error(&node, s);
                }
                Ok(Err(s)) => return Err(node_error(&node, s)),
                Err(_) => {
                    self.registry.mark_failed(&node);
                    last = CoordError::Unavailable(format!(" (node {node} did not answer in time)"));
                }
            }
        }
        Err(last)
    }

    async fn prompt_ids(&self, input: &Input) -> Result<Vec<u32>, CoordError> {
        let req = match input {
            Input::Prompt(p) => pb::TokenizeRequest {
                input: Some(pb::tokenize_request::Input::Text(p.clone())),
                add_special: true,
                parse_special: false,
            },
            Input::Chat(m) => pb::TokenizeRequest {
                input: Some(pb::tokenize_request::Input::Chat(api::Chat {
                    messages: m
                        .iter()
                        .map(|(role, content)| api::ChatMessage {
                            role: role.clone(),
                            content: content.clone(),
                        })
                        .collect(),
                })),
                ..Default::default()
            },
        };
        self.tokenize(req).await
    }

    /// The served model (asked of a node once, then cached; `nodes` is current).
    pub async fn model_info(&self) -> Result<ModelInfo, CoordError> {
        let cached = self.info.read().await.clone();
        let mut info = match cached {
            Some(i) => i,
            None => {
                let (node, mut c) = self.any_node()?;
                let r = tokio::time::timeout(self.cfg.node_timeout, c.info(pb::InfoRequest {}))
                    .await
                    .map_err(|_| CoordError::Unavailable(format!(" (node {node} did not answer in time)")))?
                    .map_err(|s| node_error(&node, s))?
                    .into_inner();
                let i = ModelInfo {
                    model: r.model,
                    source: r.source,
                    vocab_size: r.vocab_size,
                    context_length: r.context_length,
                    layers: r.layers,
                    shared_layers: r.shared_layers,
                    loops: r.loops,
                    lora_ranks: r.lora_ranks,
                    exit_criterion: r.exit_criterion,
                    nodes: 0,
                };
                *self.info.write().await = Some(i.clone());
                i
            }
        };
        info.nodes = self.healthy_nodes() as u32;
        Ok(info)
    }

    /// The names clients may use for the model.
    pub async fn model_names(&self) -> Result<Vec<String>, CoordError> {
        let mut v = vec![self.model_info().await?.model];
        if let Some(n) = &self.cfg.served_model_name {
            v.insert(0, n.clone());
        }
        Ok(v)
    }

    /// Checks a client's `model` field (empty is accepted).
    pub async fn check_model(&self, asked: &str) -> Result<(), CoordError> {
        if asked.is_empty() {
            return Ok(());
        }
        let names = self.model_names().await?;
        if names.iter().any(|n| n == asked) {
            Ok(())
        } else {
            Err(CoordError::ModelNotFound {
                asked: asked.into(),
                served: names.join("`, `"),
            })
        }
    }

    /// Validates, tokenizes, routes and starts a generation.
    pub async fn generate(self: &Arc<Self>, mut req: GenRequest) -> Result<Generation, CoordError> {
        let arrived = Instant::now();
        let span = tracing::info_span!(
            target: "rrt_coordinator",
            "request",
            request_id = tracing::field::Empty,
            node = tracing::field::Empty,
            queue_ms = tracing::field::Empty,
            migrations = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            tokens = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
            mean_loops = tracing::field::Empty,
        );
        req.trace.set_parent_of(&span);
        let r = self.start(&mut req, arrived).instrument(span.clone()).await;
        if let Err(e) = &r {
            self.metrics.outcome("rejected");
            self.metrics.rejected(e);
            span.record("finish_reason", format!("rejected: {e}"));
        }
        r
    }

    async fn start(self: &Arc<Self>, req: &mut GenRequest, arrived: Instant) -> Result<Generation, CoordError> {
        req.validate()?;
        if self.is_shutting_down() {
            return Err(CoordError::Unavailable(" (the coordinator is shutting down)".into()));
        }
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| CoordError::Overloaded {
                limit: self.cfg.max_in_flight,
            })?;
        let deadline = req.deadline;
        let before_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.admit(req, arrived, permit) => r,
            _ = before_deadline => Err(CoordError::DeadlineExceeded(arrived.elapsed())),
        }
    }

    async fn admit(
        self: &Arc<Self>,
        req: &mut GenRequest,
        arrived: Instant,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Generation, CoordError> {
        if req.id.is_empty() {
            req.id = self.new_id();
        } else if self.requests.contains_key(&req.id) {
            return Err(CoordError::invalid(
                "request_id",
                format!("`{}` is already in flight", req.id),
            ));
        }
        let prompt = self.prompt_ids(&req.input).await?;
        if prompt.is_empty() {
            return Err(CoordError::invalid("prompt", "tokenizes to no tokens"));
        }
        let info = self.model_info().await?;
        if let Some((i, &t)) = req
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|(_, t)| info.vocab_size > 0 && **t >= info.vocab_size)
        {
            return Err(CoordError::invalid(
                format!("stop_token_ids[{i}]"),
                format!("{t} is outside the vocabulary of {} tokens", info.vocab_size),
            ));
        }
        let ctx = info.context_length as usize;
        if ctx > 0 && prompt.len() >= ctx {
            return Err(CoordError::invalid(
                "prompt",
                format!("{} tokens do not fit the model's context of {ctx}", prompt.len()),
            ));
        }
        let max_new_tokens = req
            .max_new_tokens
            .unwrap_or_else(|| if ctx > 0 { (ctx - prompt.len()) as u32 } else { 256 });
        if ctx > 0 && prompt.len() + max_new_tokens as usize > ctx {
            return Err(CoordError::invalid(
                "max_new_tokens",
                format!(
                    "the prompt's {} tokens plus max_new_tokens {} exceed the model's context of {ctx}",
                    prompt.len(),
                    max_new_tokens
                ),
            ));
        }
        let run = pb::RunRequest {
            request_id: req.id.clone(),
            prompt: prompt.clone(),
            generated: Vec::new(),
            max_new_tokens,
            sampling: Some(pb::Sampling {
                temperature: req.temperature,
                top_k: req.top_k,
                top_p: req.top_p,
                min_p: req.min_p,
                repetition_penalty: req.repetition_penalty,
                presence_penalty: req.presence_penalty,
                frequency_penalty: req.frequency_penalty,
                seed: req.seed,
            }),
            stop: req.stop.clone(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            full_depth: req.full_depth,
            exit_threshold: req.exit_threshold,
            max_loops: req.max_loops,
            rng_draws: 0,
            kv_ticket: String::new(),
        };
        let (node, client, stream) = self.open_run(&run).await?;
        let prompt = Arc::new(prompt);
        let move_now = Arc::new(tokio::sync::Notify::new());
        self.requests.insert(
            req.id.clone(),
            Tracked {
                node: node.clone(),
                prompt: prompt.clone(),
                generated: Vec::new(),
                arrived,
                migrations: 0,
                move_now: move_now.clone(),
            },
        );
        self.metrics.prompt_tokens.inc_by(prompt.len() as u64);
        self.metrics.running.inc();
        self.metrics.queued.inc();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        let (id, n, deadline) = (req.id.clone(), node.clone(), req.deadline);
        let span = tracing::Span::current();
        span.record("request_id", req.id.as_str());
        span.record("node", node.as_str());
        span.record("prompt_tokens", prompt.len() as i64);
        span.record("queue_ms", arrived.elapsed().as_secs_f64() * 1e3);
        tokio::spawn(
            async move {
                me.pump(id, run, n, client, stream, tx, arrived, deadline, move_now)
                    .await;
                drop(permit);
            }
            .instrument(span),
        );
        Ok(Generation {
            id: req.id.clone(),
            node,
            prompt_tokens: prompt.len(),
            rx,
        })
    }

    /// Routes `run` (by its prompt plus generated tokens) and opens its stream, trying another
    /// node when one refuses the connection.
    async fn open_run(
        &self,
        run: &pb::RunRequest,
    ) -> Result<(String, NodeClient, tonic::Streaming<pb::RunEvent>), CoordError> {
        let mut last = CoordError::Unavailable(String::new());
        let mut tokens = run.prompt.clone();
        tokens.extend_from_slice(&run.generated);
        let remaining = run.max_new_tokens.saturating_sub(run.generated.len() as u32) as usize;
        for _ in 0..START_ATTEMPTS {
            let snap = self.registry.snapshot();
            let Some(node) = route_with(&snap, &tokens, remaining, self.cfg.prefix_affinity).map(|n| n.id.clone())
            else {
                break;
            };
            let Some(mut client) = self.registry.client(&node) else {
                continue;
            };
            self.registry.add_pending(&node, 1);
            match client.run(traced(run)).await {
                Ok(stream) => return Ok((node, client, stream.into_inner())),
                Err(s) => {
                    self.registry.add_pending(&node, -1);
                    if node_is_down(&s) {
                        tracing::warn!(node, error = %s, "node refused a request; routing again");
                        self.registry.mark_failed(&node);
                        last = node_error(&node, s);
                    } else {
                        return Err(node_error(&node, s));
                    }
                }
            }
        }
        Err(last)
    }

    /// Moves request `id` off node `from` with its state: `Export` there, piped into `Import`
    /// on the peer the request would be routed to now (the coordinator holds one chunk at a
    /// time).
    async fn move_kv(&self, id: &str, from: &str, client: &mut NodeClient, tokens: &[u32], remaining: usize) -> KvMove {
        let snap: Vec<_> = self.registry.snapshot().into_iter().filter(|n| n.id != from).collect();
        let Some(target) = route_with(&snap, tokens, remaining, self.cfg.prefix_affinity).map(|n| n.id.clone()) else {
            return KvMove::Kept(tonic::Status::unavailable("no peer to move to"));
        };
        let Some(mut to) = self.registry.client(&target) else {
            return KvMove::Kept(tonic::Status::unavailable("no connection to the peer"));
        };
        let req = pb::ExportRequest {
            request_id: id.to_string(),
        };
        // Generous: the old node first lets the request's rows finish their loops.
        let export = match tokio::time::timeout(self.cfg.node_timeout, client.export(req)).await {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => return KvMove::Kept(s),
            // It may still let go later; then its stream says "moved" and the request replays.
            Err(_) => return KvMove::Kept(tonic::Status::deadline_exceeded("export timed out")),
        };
        // A broken export ends the import short, which the peer refuses.
        let chunks = tokio_stream::StreamExt::map_while(export, |c| c.ok());
        let limit = self.cfg.node_timeout.max(Duration::from_secs(30));
        match tokio::time::timeout(limit, to.import(chunks)).await {
            Ok(Ok(r)) => KvMove::Staged {
                node: target,
                ticket: r.into_inner().ticket,
            },
            Ok(Err(s)) => {
                tracing::warn!(request = id, to = target, error = %s, "peer refused the keys/values; replaying");
                KvMove::HandedOff
            }
            Err(_) => {
                tracing::warn!(request = id, to = target, "moving keys/values timed out; replaying");
                KvMove::HandedOff
            }
        }
    }

    /// Opens `run` on `node` (a peer holding its staged state); anywhere else by replay
    /// when that fails.
    async fn open_run_on(
        &self,
        node: &str,
        run: &mut pb::RunRequest,
    ) -> Result<(String, NodeClient, tonic::Streaming<pb::RunEvent>), CoordError> {
        if let Some(mut client) = self.registry.client(node) {
            self.registry.add_pending(node, 1);
            match client.run(traced(run)).await {
                Ok(s) => {
                    run.kv_ticket.clear();
                    return Ok((node.to_string(), client, s.into_inner()));
                }
                Err(e) => {
                    self.registry.add_pending(node, -1);
                    tracing::warn!(node, error = %e, "peer holding the keys/values refused the run; replaying");
                }
            }
        }
        run.kv_ticket.clear();
        self.open_run(run).await
    }

    /// Relays one request's node stream to its client; cancels on the node when the client
    /// goes away.
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        self: Arc<Self>,
        id: String,
        mut run: pb::RunRequest,
        mut node: String,
        mut client: NodeClient,
        mut stream: tonic::Streaming<pb::RunEvent>,
        tx: mpsc::Sender<Result<GenEvent, CoordError>>,
        arrived: Instant,
        deadline: Option<Instant>,
        move_now: Arc<tokio::sync::Notify>,
    ) {
        let mut last_token: Option<Instant> = None;
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let (mut loops, mut tokens) = (0u64, 0u64);
        let mut migrations = 0u32;
        // A peer holding the request's keys/values, waiting for the old stream's "moved".
        let mut switching: Option<(String, String)> = None;
        let outcome: String = loop {
            let msg = tokio::select! {
                _ = tx.closed() => break "cancelled".into(),
                _ = move_now.notified(), if switching.is_none() => {
                    // The node is draining: move the request to a peer with its keys/values
                    // (by replay when that cannot be done), if there is a peer (otherwise it
                    // finishes where it is).
                    let snap = self.registry.snapshot();
                    // A notification stored while the request was already moving is stale:
                    // only a request on a draining node moves.
                    if !snap.iter().any(|n| n.id == node && n.draining) {
                        continue;
                    }
                    if !snap.iter().any(|n| n.id != node && n.healthy && !n.draining) {
                        continue;
                    }
                    let mut tokens = run.prompt.clone();
                    tokens.extend(self.requests.get(&id).map(|t| t.generated.clone()).unwrap_or_default());
                    let remaining = (run.max_new_tokens as usize + run.prompt.len()).saturating_sub(tokens.len());
                    match self.move_kv(&id, &node, &mut client, &tokens, remaining).await {
                        KvMove::Staged { node: to, ticket } => switching = Some((to, ticket)),
                        KvMove::HandedOff => {}
                        KvMove::Kept(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::DeadlineExceeded) => {}
                        KvMove::Kept(s) => {
                            tracing::info!(request = id, node, error = %s, "cannot move keys/values; replaying");
                            run.generated = self.requests.get(&id).map(|t| t.generated.clone()).unwrap_or_default();
                            match self.open_run(&run).await {
                                Ok((n, c, st)) => {
                                    let old = std::mem::replace(&mut client, c);
                                    drop(std::mem::replace(&mut stream, st));
                                    self.registry.add_pending(&node, -1);
                                    let req = pb::CancelRequest { request_id: id.clone() };
                                    let timeout = self.cfg.node_timeout;
                                    tokio::spawn(async move {
                                        let mut old = old;
                                        let _ = tokio::time::timeout(timeout, old.cancel(req)).await;
                                    });
                                    tracing::info!(request = id, from = node, to = n, "moved off a draining node by replay");
                                    node = n;
                                    migrations += 1;
                                    self.metrics.migrations.inc();
                                    if let Some(mut t) = self.requests.get_mut(&id) {
                                        t.node = node.clone();
                                        t.migrations = migrations;
                                    }
                                }
                                Err(e) => tracing::warn!(request = id, error = %e, "could not move off a draining node"),
                            }
                        }
                    }
                    continue;
                }
                _ = &mut deadline => {
                    let e = CoordError::DeadlineExceeded(arrived.elapsed());
                    let _ = tokio::time::timeout(Duration::from_millis(100), tx.send(Err(e))).await;
                    break "deadline".into();
                }
                m = stream.message() => m,
            };
            let failure = match msg {
                Ok(Some(pb::RunEvent { event: Some(e) })) => Ok(e),
                Ok(Some(pb::RunEvent { event: None })) => continue,
                Ok(None) => Err(CoordError::Unavailable(format!(
                    " (node {node} ended the stream before the request finished)"
                ))),
                Err(s) => Err(node_error(&node, s)),
            };
            let ev = match failure {
                Ok(e) => e,
                Err(e) => {
                    // The node failed the request (died, froze past the keepalive, or broke
                    // the stream): resume it elsewhere from its prompt and the tokens already
                    // streamed, unless the error is the request's own fault.
                    let own_fault = matches!(&e, CoordError::Node { status, .. } if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                    ));
                    if own_fault || migrations >= self.cfg.max_migrations {
                        let _ = tx.send(Err(e)).await;
                        break "error".into();
                    }
                    self.registry.mark_failed(&node);
                    self.registry.add_pending(&node, -1);
                    tracing::warn!(request = id, node, error = %e, "node failed mid-request; migrating");
                    run.generated = self.requests.get(&id).map(|t| t.generated.clone()).unwrap_or_default();
                    match self.open_run(&run).await {
                        Ok((n, c, s)) => {
                            migrations += 1;
                            self.metrics.migrations.inc();
                            if let Some(mut t) = self.requests.get_mut(&id) {
                                t.node = n.clone();
                                t.migrations = migrations;
                            }
                            (node, client, stream) = (n, c, s);
                            continue;
                        }
                        Err(e2) => {
                            // Nothing left to move to: the client hears it now, not later.
                            self.registry.add_pending(&node, 1);
                            let _ = tx.send(Err(e2)).await;
                            break "error".into();
                        }
                    }
                }
            };
            match ev {
                pb::run_event::Event::Finished(f) if f.finish_reason == "moved" => {
                    // The old node let go of the request after its last token: continue on
                    // the peer holding its keys/values, or replay it anywhere.
                    run.generated = self.requests.get(&id).map(|t| t.generated.clone()).unwrap_or_default();
                    let opened = match switching.take() {
                        Some((to, ticket)) => {
                            run.kv_ticket = ticket;
                            self.open_run_on(&to, &mut run).await
                        }
                        None => self.open_run(&run).await,
                    };
                    match opened {
                        Ok((n, c, st)) => {
                            self.registry.add_pending(&node, -1);
                            tracing::info!(request = id, from = node, to = n, "moved off a draining node");
                            (node, client, stream) = (n, c, st);
                            migrations += 1;
                            self.metrics.migrations.inc();
                            if let Some(mut t) = self.requests.get_mut(&id) {
                                t.node = node.clone();
                                t.migrations = migrations;
                            }
                            continue;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            break "error".into();
                        }
                    }
                }
                pb::run_event::Event::Token(t) => {
                    let now = Instant::now();
                    if last_token.is_none() {
                        self.metrics.queued.dec();
                    }
                    match last_token {
                        None => self
                            .metrics
                            .time_to_first_token
                            .observe(now.duration_since(arrived).as_secs_f64()),
                        Some(p) => self
                            .metrics
                            .time_per_output_token
                            .observe(now.duration_since(p).as_secs_f64()),
                    }
                    last_token = Some(now);
                    self.metrics.generation_tokens.inc();
                    loops += t.exit_loop as u64;
                    tokens += 1;
                    self.metrics
                        .token_exits
                        .get_or_create(&ExitLoop { exit_loop: t.exit_loop })
                        .inc();
                    if let Some(mut e) = self.requests.get_mut(&id) {
                        e.generated.push(t.token_id);
                    }
                    let token_text = t.token;
                    let g = GenToken {
                        id: t.token_id,
                        text: t.text,
                        token_text,
                        logprob: t.logprob,
                        exit_loop: t.exit_loop,
                        top: t
                            .top_logprobs
                            .into_iter()
                            .map(|a| Alt {
                                id: a.token_id,
                                text: a.token,
                                logprob: a.logprob,
                            })
                            .collect(),
                    };
                    if tx.send(Ok(GenEvent::Token(g))).await.is_err() {
                        break "cancelled".into();
                    }
                }
                pb::run_event::Event::Finished(f) => {
                    let finish = Finish::parse(&f.finish_reason);
                    // After a migration the node saw the earlier output as prompt.
                    let moved = run.generated.len() as u32;
                    let usage = GenUsage {
                        prompt_tokens: f.prompt_tokens - moved.min(f.prompt_tokens),
                        completion_tokens: f.completion_tokens + moved,
                        // Over the tokens streamed (the node's count also has the end token's).
                        mean_loops: if tokens > 0 { loops as f32 / tokens as f32 } else { 0.0 },
                    };
                    self.metrics.e2e_latency.observe(arrived.elapsed().as_secs_f64());
                    let _ = tx
                        .send(Ok(GenEvent::Done {
                            finish,
                            text: f.text,
                            usage,
                        }))
                        .await;
                    break f.finish_reason;
                }
            }
        };
        // Dropping the node stream resets it (the node cancels when it next sends); the
        // explicit Cancel frees the request's rows and KV at once.
        drop(stream);
        if outcome == "cancelled" || outcome == "deadline" {
            let req = pb::CancelRequest { request_id: id.clone() };
            let _ = tokio::time::timeout(self.cfg.node_timeout, client.cancel(req)).await;
        }
        self.requests.remove(&id);
        self.registry.add_pending(&node, -1);
        self.metrics.running.dec();
        if last_token.is_none() {
            self.metrics.queued.dec();
        }
        self.metrics.outcome(&outcome);
        let span = tracing::Span::current();
        span.record("node", node.as_str());
        span.record("migrations", migrations as i64);
        span.record("tokens", tokens as i64);
        span.record("finish_reason", outcome.as_str());
        span.record(
            "mean_loops",
            if tokens > 0 { loops as f64 / tokens as f64 } else { 0.0 },
        );
    }
}
