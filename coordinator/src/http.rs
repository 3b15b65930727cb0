//! The OpenAI-compatible HTTP API (axum): `POST /v1/completions`, `POST /v1/chat/completions`
//! (both streaming as server-sent events with `stream: true`), `GET /v1/models`, `GET /health`
//! (liveness), `GET /ready` (readiness: at least one healthy node), `GET /metrics`
//! (Prometheus). Errors use OpenAI's JSON shape `{"error": {"message", "type", "param",
//! "code"}}` with the matching status. A client that disconnects cancels its request.
//!
//! Beyond OpenAI's fields the requests accept `top_k`, `min_p`, `repetition_penalty`,
//! `ignore_eos`, `stop_token_ids` (as vLLM does) and the depth controls `full_depth`,
//! `exit_threshold`, `max_loops`, `prompt_exits`; `usage` adds `mean_loops` per output token.

use crate::core::{Coordinator, Generation};
use crate::error::CoordError;
use crate::request::{GenEvent, GenRequest, GenToken, GenUsage, Input};
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;

/// The router over a coordinator.
pub fn router(coord: Arc<Coordinator>) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError(CoordError::invalid("path", "no such endpoint")).with_status(StatusCode::NOT_FOUND)
        })
        .layer(axum::middleware::from_fn_with_state(coord.clone(), require_key));
    Router::new()
        // Liveness needs no key.
        .route("/health", get(|| async { "ok" }))
        .merge(protected)
        .layer(axum::extract::DefaultBodyLimit::max(coord.config().max_body_bytes))
        .with_state(coord)
}

/// Refuses requests without a valid API key (when keys are configured).
async fn require_key(
    State(coord): State<Arc<Coordinator>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(keys) = &coord.config().api_keys {
        let h = req.headers();
        let auth = h.get("authorization").and_then(|v| v.to_str().ok());
        let x = h.get("x-api-key").and_then(|v| v.to_str().ok());
        if !keys.check(auth, x) {
            return ApiError(CoordError::Unauthenticated).into_response();
        }
    }
    next.run(req).await
}

/// An error as OpenAI shapes it.
pub struct ApiError(pub CoordError);

impl ApiError {
    fn body(&self) -> Value {
        json!({"error": {
            "message": self.0.client_message(),
            "type": self.0.openai_type(),
            "param": self.0.param(),
            "code": match &self.0 {
                CoordError::ModelNotFound { .. } => Value::from("model_not_found"),
                CoordError::Unauthenticated => Value::from("invalid_api_key"),
                _ => Value::Null,
            },
        }})
    }

    fn with_status(self, s: StatusCode) -> Response {
        (s, Json(self.body())).into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let s = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let overloaded = matches!(self.0, CoordError::Overloaded { .. });
        let mut r = self.with_status(s);
        if overloaded {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        r
    }
}

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> Self {
        Self(e)
    }
}

fn json_error(r: JsonRejection) -> ApiError {
    ApiError(CoordError::invalid("body", r.body_text()))
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Deserialize, Default)]
struct Common {
    #[serde(default)]
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    // Extensions.
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    full_depth: bool,
    exit_threshold: Option<f32>,
    max_loops: Option<u32>,
    prompt_exits: Option<bool>,
    /// Seconds the whole request may take (504 past it).
    timeout: Option<f64>,
}

impl Common {
    fn apply(self, g: &mut GenRequest, default_max: Option<u32>) -> Result<(), CoordError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(CoordError::invalid("n", format!("only n = 1 is supported, not {n}")));
        }
        if self.logit_bias.is_some_and(|m| !m.is_empty()) {
            return Err(CoordError::invalid("logit_bias", "is not supported"));
        }
        g.max_new_tokens = self.max_completion_tokens.or(self.max_tokens).or(default_max);
        // OpenAI's default temperature is 1.
        g.temperature = self.temperature.unwrap_or(1.0);
        g.top_p = self.top_p.unwrap_or(1.0);
        g.stop = self.stop.map(OneOrMany::into_vec).unwrap_or_default();
        g.seed = self.seed;
        g.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        g.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        g.top_k = self.top_k.unwrap_or(0);
        g.min_p = self.min_p.unwrap_or(0.0);
        g.repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        g.ignore_eos = self.ignore_eos;
        g.stop_token_ids = self.stop_token_ids;
        g.full_depth = self.full_depth;
        g.exit_threshold = self.exit_threshold;
        g.max_loops = self.max_loops;
        g.prompt_exits = self.prompt_exits;
        if let Some(t) = self.timeout {
            if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
                return Err(CoordError::invalid(
                    "timeout",
                    format!("{t} is not in (0, 86400] seconds"),
                ));
            }
            g.deadline = Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(t));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Value,
    logprobs: Option<u32>,
    #[serde(default)]
    echo: bool,
    best_of: Option<u32>,
    suffix: Option<String>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    tools: Option<Vec<Value>>,
    #[serde(flatten)]
    common: Common,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default()
}

fn usage_json(u: &GenUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "mean_loops": u.mean_loops,
    })
}

/// What a request body says, converted: the generation request and how to answer it.
struct Parsed {
    gen_req: GenRequest,
    model: String,
    stream: bool,
    include_usage: bool,
    kind: Kind,
}

fn parse_completion(r: CompletionRequest) -> Result<Parsed, CoordError> {
    let prompt = match r.prompt {
        Value::String(s) => s,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => {
            return Err(CoordError::invalid(
                "prompt",
                "several prompts in one request are not supported",
            ));
        }
        _ => return Err(CoordError::invalid("prompt", "must be a string")),
    };
    if r.echo {
        return Err(CoordError::invalid("echo", "is not supported"));
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return Err(CoordError::invalid("best_of", "only best_of = 1 is supported"));
    }
    if r.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(CoordError::invalid("suffix", "is not supported"));
    }
    let mut g = GenRequest::new(Input::Prompt(prompt));
    let (model, stream) = (r.common.model.clone(), r.common.stream);
    let include_usage = r.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    // OpenAI's default for completions is 16 tokens.
    r.common.apply(&mut g, Some(16))?;
    g.top_logprobs = r.logprobs.unwrap_or(0);
    Ok(Parsed {
        gen_req: g,
        model,
        stream,
        include_usage,
        kind: Kind::Completion {
            logprobs: r.logprobs.is_some(),
        },
    })
}

fn parse_chat(r: ChatRequest) -> Result<Parsed, CoordError> {
    if r.tools.is_some_and(|t| !t.is_empty()) {
        return Err(CoordError::invalid("tools", "tool calling is not supported"));
    }
    let mut msgs = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let content = match m.content {
            Value::String(s) => s,
            Value::Null => String::new(),
            Value::Array(parts) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(CoordError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                "only text parts are supported",
                            ));
                        }
                    }
                }
                s
            }
            _ => {
                return Err(CoordError::invalid(
                    format!("messages[{i}].content"),
                    "must be a string or text parts",
                ));
            }
        };
        msgs.push((m.role, content));
    }
    let mut g = GenRequest::new(Input::Chat(msgs));
    let (model, stream) = (r.common.model.clone(), r.common.stream);
    let include_usage = r.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    // OpenAI's default for chat is "up to the context".
    r.common.apply(&mut g, None)?;
    if r.top_logprobs.is_some() && !r.logprobs {
        return Err(CoordError::invalid("top_logprobs", "needs `logprobs: true`"));
    }
    g.top_logprobs = r.top_logprobs.unwrap_or(0);
    Ok(Parsed {
        gen_req: g,
        model,
        stream,
        include_usage,
        kind: Kind::Chat { logprobs: r.logprobs },
    })
}

/// The request-validation path of both endpoints without a cluster behind it: a JSON body
/// (`chat`: of `/v1/chat/completions`, else of `/v1/completions`) to a validated request, or
/// the error the client would get. Used by the fuzz targets.
pub fn validate_body(chat: bool, body: &[u8]) -> Result<GenRequest, CoordError> {
    let p = if chat {
        parse_chat(serde_json::from_slice(body).map_err(|e| CoordError::invalid("body", e.to_string()))?)?
    } else {
        parse_completion(serde_json::from_slice(body).map_err(|e| CoordError::invalid("body", e.to_string()))?)?
    };
    p.gen_req.validate()?;
    Ok(p.gen_req)
}

async fn answer(coord: Arc<Coordinator>, headers: &HeaderMap, p: Parsed, prefix: &str) -> Result<Response, ApiError> {
    // Echo the name the client used (the served name when it gave none).
    let resolved = coord.resolve_model(&p.model)?;
    let model = if p.model.is_empty() {
        resolved.clone()
    } else {
        p.model.clone()
    };
    let mut g = p.gen_req;
    g.model = resolved;
    g.id = request_id(headers);
    g.trace = rrt_telemetry::propagate::TraceHeaders::from_http(headers);
    let generation = coord.generate(g).await?;
    let id = format!("{prefix}-{}", generation.id);
    if p.stream {
        Ok(sse(generation, id, model, p.kind, p.include_usage))
    } else {
        whole(generation, id, model, p.kind).await
    }
}

async fn completions(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body.map_err(json_error)?;
    answer(coord, &headers, parse_completion(r)?, "cmpl").await
}

async fn chat_completions(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body.map_err(json_error)?;
    answer(coord, &headers, parse_chat(r)?, "chatcmpl").await
}

#[derive(Clone, Copy)]
enum Kind {
    Completion { logprobs: bool },
    Chat { logprobs: bool },
}

impl Kind {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Kind::Completion { .. }, _) => "text_completion",
            (Kind::Chat { .. }, false) => "chat.completion",
            (Kind::Chat { .. }, true) => "chat.completion.chunk",
        }
    }

    fn logprobs(self) -> bool {
        match self {
            Kind::Completion { logprobs } | Kind::Chat { logprobs } => logprobs,
        }
    }

    /// Logprobs of some tokens in this endpoint's format (`offset`: text offset of the first).
    fn logprobs_json(self, tokens: &[GenToken], mut offset: usize) -> Value {
        if !self.logprobs() {
            return Value::Null;
        }
        match self {
            Kind::Completion { .. } => {
                let mut text_offset = Vec::new();
                for t in tokens {
                    text_offset.push(offset);
                    offset += t.text.len();
                }
                json!({
                    "tokens": tokens.iter().map(|t| t.token_text.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top.iter().map(|a| (a.text.clone(), Value::from(a.logprob))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": text_offset,
                })
            }
            Kind::Chat { .. } => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": t.token_text,
                    "logprob": t.logprob,
                    "bytes": t.token_text.as_bytes(),
                    "top_logprobs": t.top.iter().map(|a| json!({
                        "token": a.text, "logprob": a.logprob, "bytes": a.text.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

/// Collects a whole generation into one response.
async fn whole(mut g: Generation, id: String, model: String, kind: Kind) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(e) = g.next().await {
        match e? {
            GenEvent::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            GenEvent::Done {
                finish,
                text: tail,
                usage,
            } => {
                text.push_str(&tail);
                let logprobs = kind.logprobs_json(&tokens, 0);
                let choice = match kind {
                    Kind::Completion { .. } => json!({
                        "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.openai(),
                    }),
                    Kind::Chat { .. } => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish.openai(),
                    }),
                };
                return Ok(Json(json!({
                    "id": id,
                    "object": kind.object(false),
                    "created": unix_now(),
                    "model": model,
                    "choices": [choice],
                    "usage": usage_json(&usage),
                }))
                .into_response());
            }
        }
    }
    Err(CoordError::Unavailable(" (the request ended without finishing)".into()).into())
}

/// Streams a generation as server-sent events, ending with `data: [DONE]`.
fn sse(mut g: Generation, id: String, model: String, kind: Kind, include_usage: bool) -> Response {
    let created = unix_now();
    let chunk = move |choice: Value| {
        json!({
            "id": id, "object": kind.object(true), "created": created, "model": model, "choices": [choice],
        })
    };
    let stream = crate::grpc::relay_stream(
        move |tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>| async move {
            let send = |v: Value| {
                let tx = tx.clone();
                async move { tx.send(Ok(Event::default().data(v.to_string()))).await.is_ok() }
            };
            if let Kind::Chat { .. } = kind
                && !send(chunk(json!({
                    "index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null,
                })))
                .await
            {
                return;
            }
            let mut offset = 0usize;
            while let Some(e) = g.next().await {
                match e {
                    Ok(GenEvent::Token(t)) => {
                        if t.text.is_empty() && !kind.logprobs() {
                            continue;
                        }
                        let logprobs = kind.logprobs_json(std::slice::from_ref(&t), offset);
                        offset += t.text.len();
                        let c = match kind {
                            Kind::Completion { .. } => json!({
                                "index": 0, "text": t.text, "logprobs": logprobs, "finish_reason": null,
                            }),
                            Kind::Chat { .. } => json!({
                                "index": 0, "delta": {"content": t.text}, "logprobs": logprobs, "finish_reason": null,
                            }),
                        };
                        if !send(chunk(c)).await {
                            return;
                        }
                    }
                    Ok(GenEvent::Done { finish, text, usage }) => {
                        let c = match kind {
                            Kind::Completion { .. } => json!({
                                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.openai(),
                            }),
                            Kind::Chat { .. } => json!({
                                "index": 0,
                                "delta": if text.is_empty() { json!({}) } else { json!({"content": text}) },
                                "logprobs": null,
                                "finish_reason": finish.openai(),
                            }),
                        };
                        let mut last = chunk(c);
                        if include_usage {
                            if !send(last).await {
                                return;
                            }
                            last = chunk(Value::Null);
                            last["choices"] = json!([]);
                            last["usage"] = usage_json(&usage);
                        }
                        if send(last).await {
                            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
                        }
                        return;
                    }
                    Err(e) => {
                        let _ = send(ApiError(e).body()).await;
                        return;
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn models(State(coord): State<Arc<Coordinator>>) -> Result<Response, ApiError> {
    let infos = coord.all_model_info().await?;
    let entry = |id: &str, i: &crate::core::ModelInfo| {
        json!({
            "id": id, "object": "model", "created": 0, "owned_by": "rrt",
            "max_model_len": i.context_length,
            "loops": i.loops,
            "parameters": i.parameters,
            "expected_mean_loops": (i.expected_mean_loops > 0.0).then_some(i.expected_mean_loops),
            "exit_criterion": (!i.exit_criterion.is_empty()).then_some(i.exit_criterion.as_str()),
            "source": i.source,
            "nodes": i.nodes,
        })
    };
    let mut data: Vec<Value> = infos.iter().map(|i| entry(&i.model, i)).collect();
    // The configured extra name of the default model is listed as a model of its own.
    if let (Some(alias), Some(first)) = (&coord.config().served_model_name, infos.first()) {
        data.insert(0, entry(alias, first));
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn ready(State(coord): State<Arc<Coordinator>>) -> Response {
    let n = coord.healthy_nodes();
    if coord.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n").into_response()
    } else if n > 0 {
        (StatusCode::OK, format!("ready: {n} healthy nodes\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no healthy node\n").into_response()
    }
}

async fn metrics(State(coord): State<Arc<Coordinator>>) -> Response {
    coord.update_gauges();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        coord.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_controls_reach_the_generation_request() {
        let body = json!({
            "messages": [{"role": "user", "content": "hi"}],
            "full_depth": false,
            "exit_threshold": 0.4,
            "max_loops": 2,
            "prompt_exits": true,
        });
        let r: ChatRequest = serde_json::from_value(body).unwrap();
        let mut g = GenRequest::new(Input::Prompt(String::new()));
        r.common.apply(&mut g, None).unwrap();
        assert_eq!(
            (g.full_depth, g.exit_threshold, g.max_loops, g.prompt_exits),
            (false, Some(0.4), Some(2), Some(true))
        );
        let r: ChatRequest = serde_json::from_value(json!({"messages": [], "prompt_exits": false})).unwrap();
        r.common.apply(&mut g, None).unwrap();
        assert_eq!(g.prompt_exits, Some(false));
        let r: ChatRequest = serde_json::from_value(json!({"messages": []})).unwrap();
        r.common.apply(&mut g, None).unwrap();
        assert_eq!(g.prompt_exits, None, "unset: the node decides");
        assert!(serde_json::from_value::<ChatRequest>(json!({"messages": [], "prompt_exits": "yes"})).is_err());
    }
}
