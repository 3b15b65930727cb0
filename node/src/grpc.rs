//! The gRPC ingress of a node: the internal `rrt.v1.node.Node` service over the engine actor.
//! Prost types stop here: requests become [`Request`]s, engine events become `RunEvent`s.

use crate::engine::{Event, GenParams, KvGeometry, KvState, LoadReport, Request};
use crate::engine_actor::{ActorError, EngineHandle};
use crate::outbound::Outbound;
use rrt_model::chat::{Message, Prompter};
use rrt_model::sampling::SamplingParams;
use rrt_proto::v1::node as pb;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status};

/// The Node service.
#[derive(Clone)]
pub struct NodeService {
    inner: Arc<Inner>,
}

/// What a node serves besides the engine: tokenization and the model's description.
#[derive(Clone)]
pub struct ServedModel {
    pub prompter: Prompter,
    pub info: rrt_proto::v1::ModelInfoResponse,
}

impl ServedModel {
    /// `name`: the model's file or directory name; `source`: "gguf", "huggingface" or
    /// "recursive"; `exit_criterion`: the calibrated criterion the engine uses, if any.
    pub fn new(
        name: &str,
        source: &str,
        model: &rrt_model::Model,
        prompter: Prompter,
        exit_criterion: Option<rrt_model::exit::Criterion>,
    ) -> Self {
        let c = &model.config;
        let loops = model.loops();
        let lora_ranks = model
            .recursion
            .as_ref()
            .map(|r| r.ranks.iter().map(|&r| r as u32).collect())
            .unwrap_or_default();
        let exit_criterion = exit_criterion
            .map(|c| {
                serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{c:?}"))
            })
            .unwrap_or_default();
        let lora_params: usize = model
            .recursion
            .as_ref()
            .map(|r| {
                r.lora
                    .iter()
                    .flat_map(|mods| mods.iter().flatten())
                    .map(|l| l.rank * (l.in_dim + l.out_dim))
                    .sum()
            })
            .unwrap_or(0);
        Self {
            prompter,
            info: rrt_proto::v1::ModelInfoResponse {
                model: name.into(),
                source: source.into(),
                vocab_size: c.vocab as u32,
                context_length: c.max_positions as u32,
                layers: c.n_layers as u32,
                shared_layers: (c.n_layers / loops.max(1)) as u32,
                loops: loops as u32,
                lora_ranks,
                exit_criterion,
                nodes: 0,
                parameters: (model.weights.n_params() + lora_params) as u64,
                served_models: Vec::new(),
                expected_mean_loops: 0.0,
            },
        }
    }

    /// The loops per token the checkpoint's calibration expects (`expected_mean_loops` of its
    /// `exit.calibration`), when it has one.
    pub fn with_expected_mean_loops(mut self, loops: Option<f64>) -> Self {
        self.info.expected_mean_loops = loops.unwrap_or(0.0) as f32;
        self
    }
}

struct Inner {
    node_id: String,
    loops: usize,
    served: ServedModel,
    engine: EngineHandle,
    draining: AtomicBool,
    /// Set when the engine thread died (its panic message): every call is refused from then
    /// on, and streams in flight end with UNAVAILABLE (the coordinator moves them).
    dead: OnceLock<String>,
    /// Coordinator request id -> engine request id, for `Cancel`.
    ids: Mutex<HashMap<String, u64>>,
    /// Output tokens since start (also for the recent rate), requests accepted and cancelled.
    tokens: AtomicU64,
    requests: AtomicU64,
    cancelled: AtomicU64,
    rate: Mutex<(Instant, u64, f32)>,
    /// The weights' fingerprint, hashed once from `fingerprint_source` (in the background at
    /// start, or by the first KV move that needs it before then).
    fingerprint: OnceLock<Result<String, String>>,
    fingerprint_source: OnceLock<std::path::PathBuf>,
    /// Imported states waiting for their Run, by ticket.
    staged: Mutex<HashMap<String, (KvState, Instant)>>,
    /// Exported states kept for a repeated Export, and the export streams being sent.
    outbound: Outbound,
    /// Adjusts every request before the engine sees it (a simulated node draws its exits).
    hook: Option<RequestHook>,
}

/// See [`NodeService::with_request_hook`].
pub type RequestHook = Arc<dyn Fn(&mut Request) + Send + Sync>;

/// Staged state unused this long is dropped.
const STAGED_TTL: Duration = Duration::from_secs(60);
/// Most bytes of staged state held at once.
const STAGED_MAX_BYTES: usize = 1 << 30;
/// Bytes of keys/values per Export chunk (rounded down to whole positions).
const CHUNK_BYTES: usize = 1 << 20;

fn status(e: ActorError) -> Status {
    match e {
        ActorError::Closed => Status::unavailable("the node's engine has shut down"),
        ActorError::Engine(crate::engine::EngineError::InvalidRequest { field, msg }) => {
            Status::invalid_argument(format!("{field}: {msg}"))
        }
        // A request that can never fit this node's cache is the request's fault, not load.
        ActorError::Engine(e @ crate::engine::EngineError::TooLarge { .. }) => {
            Status::invalid_argument(format!("max_new_tokens: {e}"))
        }
        ActorError::Engine(e) => Status::internal(e.to_string()),
    }
}

/// Whether an imported header fits this node: same weights, same cache geometry, tokens for
/// every position.
fn check_import(h: &pb::KvHeader, geo: &KvGeometry, fingerprint: &str) -> Result<(), Status> {
    if h.request_id.is_empty() {
        return Err(Status::invalid_argument("request_id: empty"));
    }
    if h.model_fingerprint != fingerprint {
        return Err(Status::failed_precondition(format!(
            "model_fingerprint: the keys/values come from other weights ({} here, {} there)",
            fingerprint, h.model_fingerprint
        )));
    }
    let theirs = (h.layers as usize, h.kv_heads as usize, h.head_dim as usize);
    if theirs != (geo.layers, geo.kv_heads, geo.head_dim) {
        return Err(Status::failed_precondition(format!(
            "layers/kv_heads/head_dim: {theirs:?} there, {:?} here",
            (geo.layers, geo.kv_heads, geo.head_dim)
        )));
    }
    if h.positions as usize >= h.tokens.len() {
        return Err(Status::invalid_argument(format!(
            "positions: {} computed positions for {} tokens (the last token is never computed)",
            h.positions,
            h.tokens.len()
        )));
    }
    Ok(())
}

/// Converts a wire request into an engine request (a moved request's generated tokens extend
/// the prompt; they count against `max_new_tokens`).
pub fn to_request(r: &pb::RunRequest) -> Result<Request, Status> {
    let s = r.sampling.unwrap_or_default();
    let generated = r.generated.len() as u32;
    if r.max_new_tokens <= generated {
        return Err(Status::invalid_argument(format!(
            "max_new_tokens: {} is not above the {} tokens already generated",
            r.max_new_tokens, generated
        )));
    }
    let mut prompt = r.prompt.clone();
    prompt.extend_from_slice(&r.generated);
    let mut params = GenParams {
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            min_p: s.min_p,
            seed: s.seed,
            repetition_penalty: if s.repetition_penalty == 0.0 {
                1.0
            } else {
                s.repetition_penalty
            },
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
        },
        max_tokens: (r.max_new_tokens - generated) as usize,
        stop_ids: r.stop_token_ids.clone(),
        stop: r.stop.clone(),
        ignore_eos: r.ignore_eos,
        top_logprobs: r.top_logprobs as usize,
        resumed: r.generated.len(),
        ..Default::default()
    };
    params.exit.full_depth = r.full_depth;
    params.exit.threshold = r.exit_threshold;
    params.exit.max_loops = r.max_loops.map(|m| m as usize);
    params.exit.prompt_exits = r.prompt_exits;
    Ok(Request { prompt, params })
}

fn to_event(e: Event, prompter: &Prompter) -> pb::RunEvent {
    let event = match e {
        Event::Token(t) => pb::run_event::Event::Token(pb::Token {
            token: prompter.tokenizer().decode(&[t.id], false).unwrap_or_default(),
            token_id: t.id,
            text: t.text,
            logprob: t.logprob,
            exit_loop: t.loops as u32,
            top_logprobs: t
                .top_logprobs
                .into_iter()
                .map(|(token_id, logprob)| pb::TopLogprob {
                    token_id,
                    logprob,
                    token: prompter.tokenizer().decode(&[token_id], false).unwrap_or_default(),
                })
                .collect(),
        }),
        Event::Done {
            finish_reason,
            text,
            usage,
        } => pb::run_event::Event::Finished(pb::Finished {
            reason: finish_to_pb(finish_reason) as i32,
            text,
            prompt_tokens: usage.prompt_tokens as u32,
            completion_tokens: usage.completion_tokens as u32,
            loops: usage.loops as u64,
            preemptions: usage.preemptions as u32,
        }),
    };
    pb::RunEvent { event: Some(event) }
}

/// The engine's finish reason on the wire.
pub fn finish_to_pb(f: crate::engine::FinishReason) -> pb::FinishReason {
    use crate::engine::FinishReason as F;
    match f {
        F::Length => pb::FinishReason::Length,
        F::Stop => pb::FinishReason::Stop,
        F::Eos => pb::FinishReason::Eos,
        F::Cancelled => pb::FinishReason::Cancelled,
        F::Moved => pb::FinishReason::Moved,
    }
}

fn to_load(node_id: &str, loops: usize, l: LoadReport, rate: f32, draining: bool) -> pb::LoadReport {
    pb::LoadReport {
        node_id: node_id.into(),
        waiting_requests: l.waiting_requests as u32,
        running_requests: l.running_requests as u32,
        rows_per_depth: l.rows_per_depth.iter().map(|&r| r as u32).collect(),
        waiting_tokens: l.waiting_tokens as u64,
        free_kv_blocks: l.free_blocks as u64,
        total_kv_blocks: l.total_blocks as u64,
        kv_block_size: l.block_size as u32,
        recent_tokens_per_second: rate,
        loops: loops as u32,
        draining,
        prefill_tokens_total: l.prefill_tokens,
        kv_imports_total: l.kv_imports,
        kv_exports_total: l.kv_exports,
        kv_import_fallbacks_total: l.kv_import_fallbacks,
        prefix_cache_bytes: l.prefix_cache_bytes as u64,
        prefix_hits_total: l.prefix_hits,
        prefix_hit_tokens_total: l.prefix_hit_tokens,
        ..Default::default()
    }
}

impl NodeService {
    pub fn new(node_id: impl Into<String>, served: ServedModel, engine: EngineHandle) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id: node_id.into(),
                loops: served.info.loops as usize,
                served,
                engine,
                draining: AtomicBool::new(false),
                dead: OnceLock::new(),
                ids: Mutex::new(HashMap::new()),
                tokens: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                cancelled: AtomicU64::new(0),
                rate: Mutex::new((Instant::now(), 0, 0.0)),
                fingerprint: OnceLock::new(),
                fingerprint_source: OnceLock::new(),
                staged: Mutex::new(HashMap::new()),
                outbound: Outbound::new(STAGED_MAX_BYTES),
                hook: None,
            }),
        }
    }

    /// The same service with `hook` applied to every request before it is submitted (the
    /// simulated nodes of `rrt bench sim-cluster` set each request's exit loops with it).
    /// Call before cloning the service.
    pub fn with_request_hook(mut self, hook: RequestHook) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.hook = Some(hook);
        }
        self
    }

    /// The model files the weights' fingerprint is computed from. Until one is set the node
    /// neither exports nor imports keys/values.
    pub fn set_fingerprint_source(&self, path: std::path::PathBuf) {
        let _ = self.inner.fingerprint_source.set(path);
    }

    /// Hashes the model files once (concurrent callers wait for that one computation; the
    /// result, error included, is kept). `None` while no source is set.
    pub fn compute_fingerprint(&self) -> Option<&Result<String, String>> {
        let path = self.inner.fingerprint_source.get()?;
        Some(
            self.inner
                .fingerprint
                .get_or_init(|| crate::fingerprint::of_path(path).map_err(|e| e.to_string())),
        )
    }

    /// What the node serves (the `Info` answer).
    pub fn info(&self) -> &rrt_proto::v1::ModelInfoResponse {
        &self.inner.served.info
    }

    /// The fingerprint if it has been computed.
    fn known_fingerprint(&self) -> Option<String> {
        match self.inner.fingerprint.get() {
            Some(Ok(f)) => Some(f.clone()),
            _ => None,
        }
    }

    /// Refuses a run meant for another model or other weights.
    fn check_model(&self, r: &pb::RunRequest) -> Result<(), Status> {
        let mine = &self.inner.served.info.model;
        if !r.model.is_empty() && r.model != *mine {
            return Err(Status::failed_precondition(format!(
                "model: this node serves `{mine}`, not `{}`",
                r.model
            )));
        }
        if !r.model_fingerprint.is_empty()
            && let Some(f) = self.known_fingerprint()
            && f != r.model_fingerprint
        {
            return Err(Status::failed_precondition(format!(
                "model_fingerprint: this node's weights are {f}, the request's {}",
                r.model_fingerprint
            )));
        }
        Ok(())
    }

    /// The fingerprint, computed now (off the async runtime) if the node's background hashing
    /// has not finished: a KV move right after start is not refused.
    async fn fingerprint(&self) -> Result<String, Status> {
        let r = match self.inner.fingerprint.get() {
            Some(r) => Some(r.clone()),
            None => {
                let svc = self.clone();
                tokio::task::spawn_blocking(move || svc.compute_fingerprint().cloned())
                    .await
                    .map_err(|e| Status::internal(format!("fingerprint task: {e}")))?
            }
        };
        match r {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(Status::failed_precondition(format!(
                "cannot fingerprint the model: {e}"
            ))),
            None => Err(Status::failed_precondition("the model's fingerprint is unknown")),
        }
    }

    /// The engine thread died (called by its supervisor): refuse everything from now on.
    pub fn engine_died(&self, message: &str) {
        let _ = self.inner.dead.set(message.to_string());
    }

    /// UNAVAILABLE when the engine died.
    fn alive(&self) -> Result<(), Status> {
        match self.inner.dead.get() {
            Some(m) => Err(Status::unavailable(format!("the node's engine died: {m}"))),
            None => Ok(()),
        }
    }

    /// Refuses new requests from now on (in-flight ones continue).
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Resolves once no export stream is being sent and the coordinator released every
    /// export (or [`crate::outbound::RETAIN_FOR`] passed): a draining node waits for this
    /// before it closes its connections, since a cut export makes the peer recompute the
    /// prompt.
    pub async fn exports_settled(&self) {
        self.inner.outbound.settled().await
    }

    /// `Export`'s stream for `state`: the header, then whole positions up to [`CHUNK_BYTES`]
    /// per chunk; counted as open until dropped.
    fn export_stream(
        &self,
        rid: String,
        state: Arc<KvState>,
        geo: &KvGeometry,
        fingerprint: String,
    ) -> <Self as pb::node_server::Node>::ExportStream {
        let header = pb::KvHeader {
            request_id: rid,
            tokens: state.tokens.clone(),
            prompt_tokens: state.prompt_tokens as u32,
            positions: state.positions as u32,
            layers: geo.layers as u32,
            kv_heads: geo.kv_heads as u32,
            head_dim: geo.head_dim as u32,
            model_fingerprint: fingerprint,
        };
        let per_chunk = (CHUNK_BYTES / (geo.position_floats() * 4)).max(1) * geo.position_floats();
        let guard = self.inner.outbound.stream();
        let chunks = std::iter::once(pb::kv_chunk::Chunk::Header(header)).chain(
            (0..state.data.len().div_ceil(per_chunk)).map(move |i| {
                let _sending = &guard;
                let part = &state.data[i * per_chunk..((i + 1) * per_chunk).min(state.data.len())];
                pb::kv_chunk::Chunk::Data(part.iter().flat_map(|f| f.to_le_bytes()).collect())
            }),
        );
        Box::pin(tokio_stream::iter(chunks.map(|c| Ok(pb::KvChunk { chunk: Some(c) }))))
    }

    /// The engine's load as the `Node/Load` report: what the node serves and its counters.
    fn report(&self, l: LoadReport) -> pb::LoadReport {
        let draining = self.inner.draining.load(Ordering::Relaxed);
        let info = &self.inner.served.info;
        pb::LoadReport {
            model: info.model.clone(),
            model_fingerprint: self.known_fingerprint().unwrap_or_default(),
            parameters: info.parameters,
            expected_mean_loops: info.expected_mean_loops,
            requests_total: self.inner.requests.load(Ordering::Relaxed),
            cancelled_total: self.inner.cancelled.load(Ordering::Relaxed),
            tokens_total: self.inner.tokens.load(Ordering::Relaxed),
            ..to_load(&self.inner.node_id, self.inner.loops, l, self.recent_rate(), draining)
        }
    }

    /// The load report (as `Node/Load` answers) and the engine's counters, for `/metrics`.
    pub async fn snapshot(&self) -> Result<(pb::LoadReport, crate::EngineStats), ActorError> {
        let l = self.inner.engine.load().await?;
        let (stats, _) = self.inner.engine.stats().await?;
        let r = self.report(l);
        Ok((r, stats))
    }

    /// Output tokens per second since the previous call that was at least a second ago.
    fn recent_rate(&self) -> f32 {
        let mut r = self.inner.rate.lock().expect("rate lock");
        let now = Instant::now();
        let dt = now.duration_since(r.0).as_secs_f32();
        if dt >= 1.0 {
            let total = self.inner.tokens.load(Ordering::Relaxed);
            r.2 = (total - r.1) as f32 / dt;
            *r = (now, total, r.2);
        }
        r.2
    }
}

type RunStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    type RunStream = RunStream;

    async fn run(&self, req: GrpcRequest<pb::RunRequest>) -> Result<Response<RunStream>, Status> {
        self.alive()?;
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(rrt_proto::refusal::Refusal::Draining.status("the node is draining"));
        }
        let span = tracing::info_span!(
            target: "rrt_node",
            "node.request",
            model = self.inner.served.info.model.as_str(),
            request_id = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
            generated = tracing::field::Empty,
            kv_import = tracing::field::Empty,
            tokens = tracing::field::Empty,
            loops = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
        );
        rrt_telemetry::propagate::TraceHeaders::from_metadata(req.metadata()).set_parent_of(&span);
        let admission = tracing::info_span!(target: "rrt_node", parent: &span, "admission");
        let r = req.into_inner();
        self.check_model(&r)?;
        span.record("request_id", r.request_id.as_str());
        span.record("prompt_tokens", r.prompt.len() as i64);
        span.record("generated", r.generated.len() as i64);
        let mut request = to_request(&r)?;
        if let Some(h) = &self.inner.hook {
            h(&mut request);
        }
        let import = if r.kv_ticket.is_empty() {
            None
        } else {
            let staged = self.inner.staged.lock().expect("staged lock").remove(&r.kv_ticket);
            match staged {
                Some((state, _)) => Some(state),
                None => {
                    tracing::warn!(ticket = r.kv_ticket, "unknown kv ticket: recomputing");
                    None
                }
            }
        };
        span.record("kv_import", import.is_some());
        let mut stream = self
            .inner
            .engine
            .submit_with(request, import, span.clone())
            .await
            .map_err(status)?;
        drop(admission);
        let rid = if r.request_id.is_empty() {
            format!("{}-{}", self.inner.node_id, stream.id)
        } else {
            r.request_id.clone()
        };
        self.inner.ids.lock().expect("ids lock").insert(rid.clone(), stream.id);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut phase = tracing::info_span!(target: "rrt_node", parent: &span, "prefill");
            let mut first = true;
            let mut finished = false;
            while let Some(e) = stream.next().await {
                let done = matches!(e, Event::Done { .. });
                if matches!(e, Event::Token(_)) {
                    inner.tokens.fetch_add(1, Ordering::Relaxed);
                    if first {
                        first = false;
                        phase = tracing::info_span!(target: "rrt_node", parent: &span, "decode");
                    }
                }
                if let Event::Done {
                    finish_reason, usage, ..
                } = &e
                {
                    span.record("finish_reason", finish_reason.as_str());
                    span.record("tokens", usage.completion_tokens as i64);
                    span.record("loops", usage.loops as i64);
                }
                if tx.send(Ok(to_event(e, &inner.served.prompter))).await.is_err() {
                    // The client went away: dropping `stream` cancels the request.
                    inner.cancelled.fetch_add(1, Ordering::Relaxed);
                    finished = true;
                    break;
                }
                if done {
                    finished = true;
                    break;
                }
            }
            if !finished {
                // The engine went away under the request (it died): say so, so the
                // coordinator moves the request instead of waiting. Its supervisor records
                // the cause a moment after the channels closed.
                for _ in 0..40 {
                    if inner.dead.get().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let why = match inner.dead.get() {
                    Some(m) => format!("the node's engine died: {m}"),
                    None => "the node's engine stopped".to_string(),
                };
                let _ = tx.send(Err(Status::unavailable(why))).await;
            }
            drop(phase);
            inner.ids.lock().expect("ids lock").remove(&rid);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(&self, req: GrpcRequest<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        // A moved request: the coordinator is done with its export.
        if self.inner.outbound.release(&req.get_ref().request_id) {
            return Ok(Response::new(pb::CancelResponse { found: true }));
        }
        let id = self
            .inner
            .ids
            .lock()
            .expect("ids lock")
            .get(&req.get_ref().request_id)
            .copied();
        if let Some(id) = id {
            self.inner.engine.cancel(id).await.map_err(status)?;
            self.inner.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Response::new(pb::CancelResponse { found: id.is_some() }))
    }

    async fn load(&self, _req: GrpcRequest<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        self.alive()?;
        let l = self.inner.engine.load().await.map_err(status)?;
        let r = self.report(l);
        Ok(Response::new(r))
    }

    async fn drain(&self, req: GrpcRequest<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        self.inner.draining.store(true, Ordering::Relaxed);
        let r = req.into_inner();
        if r.wait {
            let deadline =
                (r.deadline_ms > 0).then(|| Instant::now() + std::time::Duration::from_millis(r.deadline_ms));
            loop {
                let l = self.inner.engine.load().await.map_err(status)?;
                if l.running_requests + l.waiting_requests == 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let unfinished = self.inner.ids.lock().expect("ids lock").keys().cloned().collect();
        Ok(Response::new(pb::DrainResponse { unfinished }))
    }

    type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::KvChunk, Status>> + Send>>;

    async fn export(&self, req: GrpcRequest<pb::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        let rid = req.into_inner().request_id;
        let fingerprint = self.fingerprint().await?;
        if let Some(state) = self.inner.outbound.again(&rid) {
            // Asked again: the first transfer broke. The engine let go of it already.
            let (_, geo) = self.inner.engine.stats().await.map_err(status)?;
            tracing::info!(request = rid, "exporting a request's keys/values again");
            return Ok(Response::new(self.export_stream(rid, state, &geo, fingerprint)));
        }
        let id = self.inner.ids.lock().expect("ids lock").get(&rid).copied();
        let Some(id) = id else {
            return Err(Status::not_found(format!("request `{rid}` is not on this node")));
        };
        let (_, geo) = self.inner.engine.stats().await.map_err(status)?;
        // Counted before the engine lets go: a draining node whose engine just finished its
        // last request must still wait for this export.
        self.inner.outbound.reserve(&rid);
        let state = match self.inner.engine.export(id).await {
            Ok(Some(state)) => Ok(state),
            Ok(None) => Err(Status::not_found(format!(
                "request `{rid}` finished before it could move"
            ))),
            Err(e) => Err(status(e)),
        }
        .inspect_err(|_| {
            self.inner.outbound.release(&rid);
        })?;
        tracing::info!(
            request = rid,
            positions = state.positions,
            "exporting a request with its keys/values"
        );
        let state = self.inner.outbound.retain(&rid, state);
        Ok(Response::new(self.export_stream(rid, state, &geo, fingerprint)))
    }

    async fn import(
        &self,
        req: GrpcRequest<tonic::Streaming<pb::KvChunk>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(rrt_proto::refusal::Refusal::Draining.status("the node is draining"));
        }
        let fingerprint = self.fingerprint().await?;
        let (_, geo) = self.inner.engine.stats().await.map_err(status)?;
        let mut chunks = req.into_inner();
        let header = match chunks.message().await? {
            Some(pb::KvChunk {
                chunk: Some(pb::kv_chunk::Chunk::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("chunk: the first chunk must be the header")),
        };
        check_import(&header, &geo, &fingerprint)?;
        let want = header.positions as usize * geo.position_floats();
        let bytes = want * 4;
        {
            let mut staged = self.inner.staged.lock().expect("staged lock");
            staged.retain(|_, (_, at)| at.elapsed() < STAGED_TTL);
            let held: usize = staged.values().map(|(s, _)| s.data.len() * 4).sum();
            if held + bytes > STAGED_MAX_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "{bytes} bytes of keys/values do not fit next to the {held} bytes already staged"
                )));
            }
        }
        let mut data: Vec<f32> = Vec::with_capacity(want);
        while let Some(c) = chunks.message().await? {
            let Some(pb::kv_chunk::Chunk::Data(b)) = c.chunk else {
                return Err(Status::invalid_argument("chunk: only data may follow the header"));
            };
            if b.len() % 4 != 0 || data.len() + b.len() / 4 > want {
                return Err(Status::invalid_argument(format!(
                    "data: more than the header's {} positions, or not whole floats",
                    header.positions
                )));
            }
            data.extend(b.chunks_exact(4).map(|q| f32::from_le_bytes([q[0], q[1], q[2], q[3]])));
        }
        if data.len() != want {
            return Err(Status::invalid_argument(format!(
                "data: {} floats of the header's {want} arrived",
                data.len()
            )));
        }
        let ticket = header.request_id.clone();
        let state = KvState {
            tokens: header.tokens,
            prompt_tokens: header.prompt_tokens as usize,
            positions: header.positions as usize,
            data,
        };
        self.inner
            .staged
            .lock()
            .expect("staged lock")
            .insert(ticket.clone(), (state, Instant::now()));
        Ok(Response::new(pb::ImportResponse { ticket }))
    }

    /// Tokenization and chat templating run on tokio's blocking pool (as TGI runs its
    /// tokenizers on their own workers): a long prompt never stalls the node's two async
    /// workers, which also carry every token stream.
    async fn tokenize(&self, req: GrpcRequest<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = req.into_inner();
        let inner = self.inner.clone();
        let ids = tokio::task::spawn_blocking(move || {
            let p = &inner.served.prompter;
            match r.input {
                Some(pb::tokenize_request::Input::Text(t)) => p.text(&t, r.add_special, r.parse_special),
                Some(pb::tokenize_request::Input::Chat(c)) => {
                    let msgs: Vec<Message> = c
                        .messages
                        .into_iter()
                        .map(|m| Message::new(m.role, m.content))
                        .collect();
                    p.chat(&msgs)
                }
                None => return Err(Status::invalid_argument("input: give text or a chat")),
            }
            .map_err(|e| Status::invalid_argument(e.to_string()))
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizer task: {e}")))??;
        Ok(Response::new(pb::TokenizeResponse { token_ids: ids }))
    }

    async fn info(
        &self,
        _req: GrpcRequest<pb::InfoRequest>,
    ) -> Result<Response<rrt_proto::v1::ModelInfoResponse>, Status> {
        Ok(Response::new(self.inner.served.info.clone()))
    }
}
