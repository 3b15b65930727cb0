//! The client gRPC front door: `rrt.v1.Generation` over the [`Coordinator`]. Prost types stop
//! here.

use crate::core::Coordinator;
use crate::error::CoordError;
use crate::request::{Finish, GenEvent, GenRequest, Input};
use rrt_proto::v1 as api;
use rrt_proto::v1::node as pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct GenerationService {
    coord: Arc<Coordinator>,
}

impl GenerationService {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        Self { coord }
    }
}

/// The `grpc-timeout` header (`<digits><H|M|S|m|u|n>`) as a duration.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Result<Option<std::time::Duration>, CoordError> {
    let Some(v) = meta.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || CoordError::invalid("grpc-timeout", format!("{v:?} is not <digits><H|M|S|m|u|n>"));
    let s = v.to_str().map_err(|_| bad())?;
    if s.len() < 2 || s.len() > 9 {
        return Err(bad());
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().map_err(|_| bad())?;
    use std::time::Duration as D;
    Ok(Some(match unit {
        "H" => D::from_secs(n * 3600),
        "M" => D::from_secs(n * 60),
        "S" => D::from_secs(n),
        "m" => D::from_millis(n),
        "u" => D::from_micros(n),
        "n" => D::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// The call as the coordinator's request: the message plus its deadline.
fn from_call(req: Request<api::GenerateRequest>) -> Result<GenRequest, CoordError> {
    let timeout = grpc_timeout(req.metadata())?;
    let trace = rrt_telemetry::propagate::TraceHeaders::from_metadata(req.metadata());
    let mut g = to_gen_request(req.into_inner())?;
    g.trace = trace;
    g.deadline = timeout.map(|t| std::time::Instant::now() + t);
    Ok(g)
}

/// The wire request as the coordinator's own.
pub fn to_gen_request(r: api::GenerateRequest) -> Result<GenRequest, CoordError> {
    let input = match r.input {
        Some(api::generate_request::Input::Prompt(p)) => Input::Prompt(p),
        Some(api::generate_request::Input::Chat(c)) => {
            Input::Chat(c.messages.into_iter().map(|m| (m.role, m.content)).collect())
        }
        None => return Err(CoordError::invalid("input", "give `prompt` or `chat`")),
    };
    let mut g = GenRequest::new(input);
    g.id = r.request_id;
    g.model = r.model;
    if let Some(v) = r.max_new_tokens {
        g.max_new_tokens = Some(v);
    }
    if let Some(v) = r.temperature {
        g.temperature = v;
    }
    if let Some(v) = r.top_p {
        g.top_p = v;
    }
    if let Some(v) = r.top_k {
        g.top_k = v;
    }
    if let Some(v) = r.min_p {
        g.min_p = v;
    }
    if let Some(v) = r.repetition_penalty {
        g.repetition_penalty = v;
    }
    if let Some(v) = r.presence_penalty {
        g.presence_penalty = v;
    }
    if let Some(v) = r.frequency_penalty {
        g.frequency_penalty = v;
    }
    g.seed = r.seed;
    g.stop = r.stop;
    g.stop_token_ids = r.stop_token_ids;
    g.top_logprobs = r.logprobs;
    g.ignore_eos = r.ignore_eos;
    if let Some(d) = r.depth {
        g.full_depth = d.full_depth;
        g.exit_threshold = d.exit_threshold;
        g.max_loops = d.max_loops;
        g.prompt_exits = d.prompt_exits;
    }
    Ok(g)
}

fn finish_reason(f: Finish) -> api::FinishReason {
    match f {
        Finish::Length => api::FinishReason::Length,
        Finish::Stop => api::FinishReason::Stop,
        Finish::Eos => api::FinishReason::Eos,
        Finish::Cancelled => api::FinishReason::Cancelled,
    }
}

fn to_message(id: &str, e: GenEvent) -> api::GenerateStreamResponse {
    match e {
        GenEvent::Token(t) => api::GenerateStreamResponse {
            request_id: id.into(),
            text: t.text,
            token_id: Some(t.id),
            logprob: t.logprob,
            exit_loop: t.exit_loop,
            top_logprobs: t
                .top
                .into_iter()
                .map(|a| api::TopLogprob {
                    token_id: a.id,
                    token: a.text,
                    logprob: a.logprob,
                })
                .collect(),
            ..Default::default()
        },
        GenEvent::Done { finish, text, usage } => api::GenerateStreamResponse {
            request_id: id.into(),
            text,
            finish_reason: finish_reason(finish) as i32,
            usage: Some(api::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                mean_loops: usage.mean_loops,
            }),
            ..Default::default()
        },
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<api::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::generation_server::Generation for GenerationService {
    type GenerateStreamStream = GenStream;

    async fn generate(&self, req: Request<api::GenerateRequest>) -> Result<Response<api::GenerateResponse>, Status> {
        let g = from_call(req)?;
        let mut gen_ = self.coord.generate(g).await?;
        let mut out = api::GenerateResponse {
            request_id: gen_.id.clone(),
            ..Default::default()
        };
        while let Some(e) = gen_.next().await {
            match e? {
                GenEvent::Token(t) => {
                    out.text.push_str(&t.text);
                    out.token_ids.push(t.id);
                    out.logprobs.push(t.logprob);
                    out.exit_loops.push(t.exit_loop);
                }
                GenEvent::Done { finish, text, usage } => {
                    out.text.push_str(&text);
                    out.finish_reason = finish_reason(finish) as i32;
                    out.usage = Some(api::Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        mean_loops: usage.mean_loops,
                    });
                    return Ok(Response::new(out));
                }
            }
        }
        Err(Status::unavailable("the request ended without finishing"))
    }

    async fn generate_stream(&self, req: Request<api::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let g = from_call(req)?;
        let mut gen_ = self.coord.generate(g).await?;
        let id = gen_.id.clone();
        // The stream owns the generation: when tonic drops it (client gone), the request is
        // cancelled on its node.
        let s = relay_stream(
            move |tx: tokio::sync::mpsc::Sender<Result<api::GenerateStreamResponse, Status>>| async move {
                while let Some(e) = gen_.next().await {
                    let m = e.map(|e| to_message(&id, e)).map_err(Status::from);
                    let end = m.is_err() || m.as_ref().is_ok_and(|m| m.finish_reason != 0);
                    if tx.send(m).await.is_err() || end {
                        break;
                    }
                }
            },
        );
        Ok(Response::new(s))
    }

    async fn tokenize(&self, req: Request<api::TokenizeRequest>) -> Result<Response<api::TokenizeResponse>, Status> {
        let r = req.into_inner();
        let ids = self
            .coord
            .tokenize(
                &self.coord.resolve_model(&r.model)?,
                pb::TokenizeRequest {
                    input: Some(pb::tokenize_request::Input::Text(r.text)),
                    add_special: r.add_special,
                    parse_special: r.parse_special,
                },
            )
            .await?;
        Ok(Response::new(api::TokenizeResponse { token_ids: ids }))
    }

    async fn model_info(
        &self,
        req: Request<api::ModelInfoRequest>,
    ) -> Result<Response<api::ModelInfoResponse>, Status> {
        let i = self.coord.model_info(&req.into_inner().model).await?;
        Ok(Response::new(api::ModelInfoResponse {
            model: i.model,
            source: i.source,
            vocab_size: i.vocab_size,
            context_length: i.context_length,
            layers: i.layers,
            shared_layers: i.shared_layers,
            loops: i.loops,
            lora_ranks: i.lora_ranks,
            exit_criterion: i.exit_criterion,
            nodes: i.nodes,
            parameters: i.parameters,
            served_models: self.coord.served_models(),
            expected_mean_loops: i.expected_mean_loops,
        }))
    }
}

/// A stream fed by a task that ends (and drops what it owns) when the stream is dropped.
pub(crate) fn relay_stream<T, F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = T> + Send>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let fut = f(tx.clone());
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = tx.closed() => {}
        }
    });
    Box::pin(AbortOnDrop {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        task,
    })
}

struct AbortOnDrop<S> {
    inner: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Stream + Unpin> Stream for AbortOnDrop<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}
