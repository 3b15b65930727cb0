//! The coordinator's core, shared by both front doors: tokenization (on a node: the
//! coordinator holds no model files), routing, and one pump task per request that relays the
//! node's token stream to the client while recording every token in the request table (a
//! dashmap: request id -> node, prompt, tokens so far), so that a request can be moved to
//! another node with its tokens. A client that goes away (its [`Generation`]
//! dropped) cancels the request on its node at once.

use crate::error::CoordError;
use crate::metrics::Metrics;
use crate::pump::RequestPump;
use crate::registry::Registry;
use crate::request::{Finish, GenEvent, GenRequest, Input};
use crate::routing::route_with;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use rrt_proto::refusal::Refusal;
use rrt_proto::v1 as api;
use rrt_proto::v1::node as pb;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Instrument;

type NodeClient = pb::node_client::NodeClient<tonic::transport::Channel>;
/// An opened Run: its node, client, stream, and the node's pending count it holds.
pub(crate) type Opened = (String, NodeClient, tonic::Streaming<pb::RunEvent>, Pending);

/// How often a request is re-routed when its node refuses the connection.
const START_ATTEMPTS: usize = 3;
/// Exports of one move's keys/values (the first, and one more when its stream broke).
const EXPORT_ATTEMPTS: usize = 2;

/// A served model, as its nodes describe it.
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
    /// Healthy nodes serving it now.
    pub nodes: u32,
    /// Parameters held (embeddings, LM head and LoRAs included).
    pub parameters: u64,
    /// Loops per token its exit calibration expects (0: unknown, or no exits).
    pub expected_mean_loops: f32,
}

/// What the request table keeps per request.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub node: String,
    /// The model answering it.
    pub model: String,
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
    /// Extra name clients may use for the default model (besides its own name).
    pub served_model_name: Option<String>,
    /// The model that answers requests naming none (default: the first served, by name).
    pub default_model: Option<String>,
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
    /// Route requests sharing a prompt prefix to one node (see [`crate::routing`]); `None`:
    /// when every node that could take the request keeps a prefix cache.
    pub prefix_affinity: Option<bool>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            served_model_name: None,
            default_model: None,
            node_timeout: Duration::from_secs(5),
            max_migrations: 3,
            max_in_flight: 256,
            api_keys: None,
            max_body_bytes: 4 << 20,
            client_tls: None,
            node_tls: None,
            prefix_affinity: None,
        }
    }
}

pub struct Coordinator {
    pub registry: Registry,
    pub metrics: Metrics,
    requests: DashMap<String, Tracked>,
    /// Each served model's description, asked of one of its nodes once.
    info: tokio::sync::RwLock<std::collections::HashMap<String, ModelInfo>>,
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

pub(crate) fn node_error(node: &str, status: tonic::Status) -> CoordError {
    CoordError::Node {
        node: node.to_string(),
        status,
    }
}

/// A node error that means the node itself is gone (not the request's fault; a node that
/// refuses because it drains is not gone: [`Refusal`]).
pub(crate) fn node_is_down(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) && Refusal::of(status).is_none()
}

/// How a request's pump ended (the `rrt_requests_total` outcome label, the span's finish
/// reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The node finished it (length, stop, end of generation, or cancelled there).
    Finished(Finish),
    /// The client went away.
    Cancelled,
    /// Its deadline passed.
    Deadline,
    /// It failed and could not be moved (or it was its own fault).
    Error,
    /// Refused before it started.
    Rejected,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Finished(f) => f.label(),
            Outcome::Cancelled => "cancelled",
            Outcome::Deadline => "deadline",
            Outcome::Error => "error",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A request counted in its node's pending load from when it is sent there until it ends or
/// leaves the node: the count goes down exactly once, whatever path the request takes.
pub(crate) struct Pending {
    registry: Registry,
    node: String,
}

impl Pending {
    fn new(registry: &Registry, node: &str) -> Self {
        registry.add_pending(node, 1);
        Self {
            registry: registry.clone(),
            node: node.to_string(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.registry.add_pending(&self.node, -1);
    }
}

/// An id reserved in the request table (the atomic check-and-insert of an id); released
/// again when dropped before [`Reservation::keep`] (a request refused after reserving).
struct Reservation<'a> {
    table: &'a DashMap<String, Tracked>,
    id: String,
    kept: bool,
}

impl Reservation<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.table.remove(&self.id);
        }
    }
}

/// `run` as a call carrying the current span's trace context.
fn traced(run: &pb::RunRequest) -> tonic::Request<pb::RunRequest> {
    let mut r = tonic::Request::new(run.clone());
    rrt_telemetry::propagate::inject(&tracing::Span::current(), r.metadata_mut());
    r
}

/// What came of trying to move a request with its keys/values.
pub(crate) enum KvMove {
    /// Its state is staged on `node` under `ticket`; the old stream ends with "moved".
    Staged { node: String, ticket: String },
    /// The old node let go of it but no peer took its state: the old stream ends with
    /// "moved" and the request is replayed.
    HandedOff,
    /// The old node kept it (it cannot export, or the request is finishing there).
    Kept(tonic::Status),
}

impl Coordinator {
    /// Deadline of load polls and small calls to nodes.
    pub fn node_timeout(&self) -> std::time::Duration {
        self.cfg.node_timeout
    }

    /// Whether routing among `nodes` uses prefix affinity: as configured, else when every
    /// usable node keeps a prefix cache (requests sharing a system prompt then find it
    /// cached on the node the previous ones went to).
    fn affinity(&self, nodes: &[crate::routing::NodeView]) -> bool {
        self.cfg.prefix_affinity.unwrap_or_else(|| {
            let mut usable = nodes.iter().filter(|n| n.usable()).peekable();
            usable.peek().is_some() && usable.all(|n| n.prefix_cache)
        })
    }

    pub fn new(registry: Registry, cfg: CoordinatorConfig) -> Arc<Self> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            registry,
            metrics: Metrics::default(),
            requests: DashMap::new(),
            info: tokio::sync::RwLock::new(std::collections::HashMap::new()),
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

    /// The tokens request `id` has streamed so far.
    pub(crate) fn tracked_generated(&self, id: &str) -> Vec<u32> {
        self.requests.get(id).map(|t| t.generated.clone()).unwrap_or_default()
    }

    pub(crate) fn push_generated(&self, id: &str, token: u32) {
        if let Some(mut t) = self.requests.get_mut(id) {
            t.generated.push(token);
        }
    }

    pub(crate) fn set_tracked_node(&self, id: &str, node: &str, migrations: u32) {
        if let Some(mut t) = self.requests.get_mut(id) {
            t.node = node.to_string();
            t.migrations = migrations;
        }
    }

    /// Removes a finished request from the table.
    pub(crate) fn forget(&self, id: &str) {
        self.requests.remove(id);
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

    /// Every model a healthy node serves: the default first, then by name.
    pub fn served_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .registry
            .snapshot()
            .into_iter()
            .filter(|n| n.healthy && !n.model.is_empty())
            .map(|n| n.model)
            .collect();
        names.sort();
        names.dedup();
        if let Some(d) = &self.cfg.default_model
            && let Some(i) = names.iter().position(|n| n == d)
        {
            let d = names.remove(i);
            names.insert(0, d);
        }
        names
    }

    /// The served model a client's `model` field names: empty or the configured
    /// `served_model_name` is the default model; an unknown name is
    /// [`CoordError::ModelNotFound`] listing what is served.
    pub fn resolve_model(&self, asked: &str) -> Result<String, CoordError> {
        let served = self.served_models();
        let Some(default) = served.first() else {
            return Err(CoordError::Unavailable(String::new()));
        };
        if asked.is_empty() || self.cfg.served_model_name.as_deref() == Some(asked) {
            return Ok(default.clone());
        }
        if served.iter().any(|n| n == asked) {
            return Ok(asked.to_string());
        }
        let mut names = served;
        if let Some(alias) = &self.cfg.served_model_name {
            names.insert(0, alias.clone());
        }
        Err(CoordError::ModelNotFound {
            asked: asked.into(),
            served: names.join("`, `"),
        })
    }

    /// The nodes a request for `model` on the weights `fingerprint` (empty: any) may go to.
    pub fn nodes_for(&self, model: &str, fingerprint: &str) -> Vec<crate::routing::NodeView> {
        self.registry
            .snapshot()
            .into_iter()
            .filter(|n| n.serves(model, fingerprint))
            .collect()
    }

    /// The least loaded healthy node of `model` for a call that is not a generation.
    fn any_node(
        &self,
        model: &str,
    ) -> Result<
        (
            String,
            rrt_proto::v1::node::node_client::NodeClient<tonic::transport::Channel>,
        ),
        CoordError,
    > {
        let snap = self.nodes_for(model, "");
        let n = route_with(&snap, &[], 1, false).ok_or_else(|| CoordError::Unavailable(String::new()))?;
        let c = self
            .registry
            .client(&n.id)
            .ok_or_else(|| CoordError::Unavailable(String::new()))?;
        Ok((n.id.clone(), c))
    }

    /// Tokenizes with `model`'s tokenizer on one of its nodes (the least loaded), retrying on
    /// another when one is down.
    pub async fn tokenize(&self, model: &str, req: pb::TokenizeRequest) -> Result<Vec<u32>, CoordError> {
        let mut last = CoordError::Unavailable(String::new());
        for _ in 0..START_ATTEMPTS {
            let (node, mut c) = self.any_node(model)?;
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

    async fn prompt_ids(&self, model: &str, input: &Input) -> Result<Vec<u32>, CoordError> {
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
        self.tokenize(model, req).await
    }

    /// The served model `asked` names (see [`Self::resolve_model`]; asked of one of its
    /// nodes once, then cached; `nodes` is current).
    pub async fn model_info(&self, asked: &str) -> Result<ModelInfo, CoordError> {
        let model = self.resolve_model(asked)?;
        let cached = self.info.read().await.get(&model).cloned();
        let mut info = match cached {
            Some(i) => i,
            None => {
                let (node, mut c) = self.any_node(&model)?;
                let r = tokio::time::timeout(self.cfg.node_timeout, c.info(pb::InfoRequest {}))
                    .await
                    .map_err(|_| CoordError::Unavailable(format!(" (node {node} did not answer in time)")))?
                    .map_err(|s| node_error(&node, s))?
                    .into_inner();
                let i = ModelInfo {
                    // The name routing knows it by (what the node reports in its load).
                    model: model.clone(),
                    source: r.source,
                    vocab_size: r.vocab_size,
                    context_length: r.context_length,
                    layers: r.layers,
                    shared_layers: r.shared_layers,
                    loops: r.loops,
                    lora_ranks: r.lora_ranks,
                    exit_criterion: r.exit_criterion,
                    nodes: 0,
                    parameters: r.parameters,
                    expected_mean_loops: r.expected_mean_loops,
                };
                self.info.write().await.insert(model.clone(), i.clone());
                i
            }
        };
        info.nodes = self
            .nodes_for(&model, "")
            .iter()
            .filter(|n| n.healthy && !n.draining)
            .count() as u32;
        Ok(info)
    }

    /// Every served model, described (the default first).
    pub async fn all_model_info(&self) -> Result<Vec<ModelInfo>, CoordError> {
        let mut out = Vec::new();
        for m in self.served_models() {
            out.push(self.model_info(&m).await?);
        }
        Ok(out)
    }

    /// Validates, tokenizes, routes and starts a generation.
    pub async fn generate(self: &Arc<Self>, mut req: GenRequest) -> Result<Generation, CoordError> {
        let arrived = Instant::now();
        let span = tracing::info_span!(
            target: "rrt_coordinator",
            "request",
            request_id = tracing::field::Empty,
            model = tracing::field::Empty,
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
            self.metrics.outcome(Outcome::Rejected);
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
        }
        let move_now = Arc::new(tokio::sync::Notify::new());
        // Reserve the id at once (check and insert in one step): a second request with the
        // same id, however close behind, is refused here.
        let reservation = match self.requests.entry(req.id.clone()) {
            Entry::Occupied(_) => return Err(CoordError::AlreadyExists(req.id.clone())),
            Entry::Vacant(v) => {
                v.insert(Tracked {
                    node: String::new(),
                    model: String::new(),
                    prompt: Arc::new(Vec::new()),
                    generated: Vec::new(),
                    arrived,
                    migrations: 0,
                    move_now: move_now.clone(),
                });
                Reservation {
                    table: &self.requests,
                    id: req.id.clone(),
                    kept: false,
                }
            }
        };
        let model = self.resolve_model(&req.model)?;
        if let Some(mut t) = self.requests.get_mut(&req.id) {
            t.model = model.clone();
        }
        tracing::Span::current().record("model", model.as_str());
        let prompt = self.prompt_ids(&model, &req.input).await?;
        if prompt.is_empty() {
            return Err(CoordError::invalid("prompt", "tokenizes to no tokens"));
        }
        let info = self.model_info(&model).await?;
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
            prompt_exits: req.prompt_exits,
            rng_draws: 0,
            kv_ticket: String::new(),
            model: model.clone(),
            model_fingerprint: String::new(),
        };
        let mut run = run;
        let (node, client, stream, pending) = self.open_run(&mut run).await?;
        let prompt = Arc::new(prompt);
        if let Some(mut t) = self.requests.get_mut(&req.id) {
            t.node = node.clone();
            t.prompt = prompt.clone();
        }
        reservation.keep();
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
        let pump = RequestPump {
            coord: me,
            id,
            run,
            node: n,
            client,
            stream,
            pending,
            tx,
            arrived,
            move_now,
            last_token: None,
            loops: 0,
            tokens: 0,
            migrations: 0,
            switching: None,
        };
        tokio::spawn(
            async move {
                pump.run(deadline).await;
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

    /// Routes `run` (by its prompt plus generated tokens, among the nodes of its model and
    /// weights) and opens its stream, trying another node when one refuses the connection.
    /// The first node it opens on pins the request's weights (`run.model_fingerprint`, once
    /// that node has hashed them): it moves only between nodes of the same weights.
    pub(crate) async fn open_run(&self, run: &mut pb::RunRequest) -> Result<Opened, CoordError> {
        let mut last = CoordError::Unavailable(String::new());
        let mut tokens = run.prompt.clone();
        tokens.extend_from_slice(&run.generated);
        let remaining = run.max_new_tokens.saturating_sub(run.generated.len() as u32) as usize;
        for _ in 0..START_ATTEMPTS {
            let snap = self.nodes_for(&run.model, &run.model_fingerprint);
            let Some(view) = route_with(&snap, &tokens, remaining, self.affinity(&snap)) else {
                break;
            };
            let node = view.id.clone();
            if run.model_fingerprint.is_empty() {
                run.model_fingerprint = view.fingerprint.clone();
            }
            let Some(mut client) = self.registry.client(&node) else {
                continue;
            };
            let pending = Pending::new(&self.registry, &node);
            match client.run(traced(run)).await {
                Ok(stream) => return Ok((node, client, stream.into_inner(), pending)),
                Err(s) => {
                    drop(pending);
                    if Refusal::of(&s) == Some(Refusal::Draining) {
                        // It started draining after the last load report: route elsewhere.
                        tracing::info!(node, "node is draining; routing the request again");
                        self.registry.mark_draining(&node);
                        last = node_error(&node, s);
                    } else if node_is_down(&s) {
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
    /// time). The pump releases the export on the old node once its stream said "moved"
    /// (`RequestPump::cancel_on_node`).
    pub(crate) async fn move_kv(
        &self,
        run: &pb::RunRequest,
        from: &str,
        client: &mut NodeClient,
        tokens: &[u32],
        remaining: usize,
    ) -> KvMove {
        let id = run.request_id.as_str();
        let snap: Vec<_> = self
            .nodes_for(&run.model, &run.model_fingerprint)
            .into_iter()
            .filter(|n| n.id != from)
            .collect();
        let Some(target) = route_with(&snap, tokens, remaining, self.affinity(&snap)).map(|n| n.id.clone()) else {
            return KvMove::Kept(tonic::Status::unavailable("no peer to move to"));
        };
        let Some(mut to) = self.registry.client(&target) else {
            return KvMove::Kept(tonic::Status::unavailable("no connection to the peer"));
        };
        self.transfer(id, from, client, &target, &mut to).await
    }

    /// `Export` on `client` piped into `Import` on `to`. A transfer whose export stream broke,
    /// or that the peer refused as malformed (cut short), is tried once more: the old node
    /// keeps what it exported for a while (`rrt_node::outbound`) and sends the same bytes
    /// again.
    async fn transfer(
        &self,
        id: &str,
        from: &str,
        client: &mut NodeClient,
        target: &str,
        to: &mut NodeClient,
    ) -> KvMove {
        for attempt in 0..EXPORT_ATTEMPTS {
            let req = pb::ExportRequest {
                request_id: id.to_string(),
            };
            // Generous: the old node first lets the request's rows finish their loops.
            let export = match tokio::time::timeout(self.cfg.node_timeout, client.export(req)).await {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(s)) if attempt == 0 => return KvMove::Kept(s),
                Ok(Err(s)) => {
                    tracing::warn!(request = id, from, error = %s, "the keys/values could not be exported again; replaying");
                    return KvMove::HandedOff;
                }
                // It may still let go later; then its stream says "moved" and the request replays.
                Err(_) if attempt == 0 => return KvMove::Kept(tonic::Status::deadline_exceeded("export timed out")),
                Err(_) => return KvMove::HandedOff,
            };
            // A broken export ends the import short, which the peer refuses.
            let broke = Arc::new(Mutex::new(None::<tonic::Status>));
            let chunks = {
                let broke = broke.clone();
                tokio_stream::StreamExt::map_while(export, move |c| match c {
                    Ok(c) => Some(c),
                    Err(s) => {
                        *broke.lock().expect("export error lock") = Some(s);
                        None
                    }
                })
            };
            let limit = self.cfg.node_timeout.max(Duration::from_secs(30));
            let refused = match tokio::time::timeout(limit, to.import(chunks)).await {
                Ok(Ok(r)) => {
                    return KvMove::Staged {
                        node: target.to_string(),
                        ticket: r.into_inner().ticket,
                    };
                }
                Ok(Err(s)) => s,
                Err(_) => {
                    tracing::warn!(request = id, to = target, "moving keys/values timed out; replaying");
                    return KvMove::HandedOff;
                }
            };
            let broke = broke.lock().expect("export error lock").take();
            match broke {
                Some(e) => tracing::warn!(
                    request = id,
                    from,
                    to = target,
                    attempt,
                    error = %e,
                    "the keys/values' export stream broke"
                ),
                // Cut short without an error: the same bytes may still come whole.
                None if refused.code() == tonic::Code::InvalidArgument => tracing::warn!(
                    request = id,
                    from,
                    to = target,
                    attempt,
                    error = %refused,
                    "the peer refused a cut-short export"
                ),
                None => {
                    tracing::warn!(request = id, to = target, error = %refused, "peer refused the keys/values; replaying");
                    return KvMove::HandedOff;
                }
            }
        }
        tracing::warn!(
            request = id,
            from,
            to = target,
            "the keys/values could not be moved; replaying"
        );
        KvMove::HandedOff
    }

    /// Opens `run` on `node` (a peer holding its staged state); anywhere else by replay
    /// when that fails.
    pub(crate) async fn open_run_on(&self, node: &str, run: &mut pb::RunRequest) -> Result<Opened, CoordError> {
        if let Some(mut client) = self.registry.client(node) {
            let pending = Pending::new(&self.registry, node);
            match client.run(traced(run)).await {
                Ok(s) => {
                    run.kv_ticket.clear();
                    return Ok((node.to_string(), client, s.into_inner(), pending));
                }
                Err(e) => {
                    drop(pending);
                    tracing::warn!(node, error = %e, "peer holding the keys/values refused the run; replaying");
                }
            }
        }
        run.kv_ticket.clear();
        self.open_run(run).await
    }
}
