//! A node without a model, for measuring everything around the engine (the coordinator's
//! overhead, routing, client libraries): it serves the same `rrt.v1.node.Node` service, but
//! each request simply produces `max_new_tokens` tokens, one every `step` (zero: as fast as
//! the stream takes them). A token's `text` is the time it was sent, in microseconds since
//! the `epoch` given at construction, so a client in the same process can measure exactly how
//! long the token took to reach it.

use rrt_proto::v1 as api;
use rrt_proto::v1::node as pb;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct FakeNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    step: Duration,
    /// Refuses new runs (the typed drain refusal) and reports draining.
    draining: std::sync::atomic::AtomicBool,
    loops: u32,
    epoch: Instant,
    running: AtomicU64,
    requests: AtomicU64,
    tokens: AtomicU64,
    cancels: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl FakeNode {
    pub fn new(id: impl Into<String>, step: Duration, loops: u32, epoch: Instant) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: id.into(),
                step,
                draining: std::sync::atomic::AtomicBool::new(false),
                loops: loops.max(1),
                epoch,
                running: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                tokens: AtomicU64::new(0),
                cancels: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl FakeNode {
    /// Starts (or stops) draining: new runs are refused with the typed drain refusal, running
    /// ones go on.
    pub fn set_draining(&self, on: bool) {
        self.inner.draining.store(on, Ordering::Relaxed);
    }

    /// Requests started, and requests running now.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.requests.load(Ordering::Relaxed),
            self.inner.running.load(Ordering::Relaxed),
        )
    }
}

type RunStream = Pin<Box<dyn Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for FakeNode {
    type RunStream = RunStream;

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<RunStream>, Status> {
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(rrt_proto::refusal::Refusal::Draining.status("the node is draining"));
        }
        let r = req.into_inner();
        let n = r.max_new_tokens.saturating_sub(r.generated.len() as u32);
        let (tx, rx) = mpsc::channel(16);
        let (cancel_tx, mut cancel_rx) = oneshot::channel();
        self.inner
            .cancels
            .lock()
            .expect("cancels lock")
            .insert(r.request_id.clone(), cancel_tx);
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.running.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let prompt_tokens = r.prompt.len() as u32;
        tokio::spawn(async move {
            let mut next = tokio::time::Instant::now();
            let mut finished = true;
            for i in 0..n {
                if inner.step.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    next += inner.step;
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        _ = &mut cancel_rx => { finished = false; break; }
                    }
                }
                let t = pb::Token {
                    token_id: i,
                    text: inner.epoch.elapsed().as_micros().to_string(),
                    logprob: -0.5,
                    exit_loop: 1 + i % inner.loops,
                    top_logprobs: Vec::new(),
                    token: String::new(),
                };
                let e = pb::RunEvent {
                    event: Some(pb::run_event::Event::Token(t)),
                };
                if tx.send(Ok(e)).await.is_err() {
                    finished = false;
                    break;
                }
                inner.tokens.fetch_add(1, Ordering::Relaxed);
            }
            if finished {
                let f = pb::Finished {
                    reason: pb::FinishReason::Length as i32,
                    text: String::new(),
                    prompt_tokens,
                    completion_tokens: n,
                    loops: (0..n).map(|i| (1 + i % inner.loops) as u64).sum(),
                    preemptions: 0,
                };
                let _ = tx
                    .send(Ok(pb::RunEvent {
                        event: Some(pb::run_event::Event::Finished(f)),
                    }))
                    .await;
            }
            inner.running.fetch_sub(1, Ordering::Relaxed);
            inner.cancels.lock().expect("cancels lock").remove(&r.request_id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let c = self
            .inner
            .cancels
            .lock()
            .expect("cancels lock")
            .remove(&req.get_ref().request_id);
        let found = c.map(|c| c.send(()).is_ok()).unwrap_or(false);
        Ok(Response::new(pb::CancelResponse { found }))
    }

    async fn load(&self, _req: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        let running = self.inner.running.load(Ordering::Relaxed) as u32;
        Ok(Response::new(pb::LoadReport {
            node_id: self.inner.id.clone(),
            running_requests: running,
            rows_per_depth: vec![running; self.inner.loops as usize],
            free_kv_blocks: 1 << 30,
            total_kv_blocks: 1 << 30,
            kv_block_size: 16,
            loops: self.inner.loops,
            requests_total: self.inner.requests.load(Ordering::Relaxed),
            tokens_total: self.inner.tokens.load(Ordering::Relaxed),
            draining: self.inner.draining.load(Ordering::Relaxed),
            model: "fake".into(),
            ..Default::default()
        }))
    }

    async fn drain(&self, _req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(pb::DrainResponse::default()))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        // One token per byte of text (or of every message).
        let n = match req.into_inner().input {
            Some(pb::tokenize_request::Input::Text(t)) => t.len(),
            Some(pb::tokenize_request::Input::Chat(c)) => c.messages.iter().map(|m| m.content.len() + 4).sum(),
            None => return Err(Status::invalid_argument("input: give text or a chat")),
        };
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: (0..n as u32).map(|i| i % 256).collect(),
        }))
    }

    type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::KvChunk, Status>> + Send>>;

    /// A fake node has no keys/values: the coordinator moves its requests by replay.
    async fn export(&self, _req: Request<pb::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("a fake node has no keys/values to export"))
    }

    async fn import(
        &self,
        _req: Request<tonic::Streaming<pb::KvChunk>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        Err(Status::unimplemented("a fake node has no keys/values to import"))
    }

    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<api::ModelInfoResponse>, Status> {
        Ok(Response::new(api::ModelInfoResponse {
            model: "fake".into(),
            source: "fake".into(),
            vocab_size: 256,
            context_length: 1 << 24,
            layers: 2 * self.inner.loops,
            shared_layers: 2,
            loops: self.inner.loops,
            ..Default::default()
        }))
    }
}
