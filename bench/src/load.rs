//! The load generator: load points against a running coordinator, through the client gRPC
//! API (`rrt.v1.Generation/GenerateStream`) or the OpenAI-compatible HTTP API
//! (`POST /v1/completions` with `stream: true`).
//!
//! A load point ([`run_point`]) is one offered [`Load`]: a Poisson rate (open loop) or a
//! number of requests in flight (closed loop). It lasts a warmup plus a measurement duration,
//! or until a given number of requests were sent after the warmup (whichever comes first when
//! both are given).
//!
//! - Open loop: arrivals at Poisson times (exponential gaps from a seeded RNG, the same
//!   sequence scaled by 1/rate at every rate), each request on its own task: nothing waits for
//!   completions, so the offered load is really offered. Requests still in flight when the
//!   sending stops are awaited (each one up to the request timeout) and counted.
//! - Closed loop: C workers, each sending its next request when the previous one finished.
//!
//! Requests: prompts are windows of words of a text (random start), as many words as the
//! sampled prompt length needs at the measured tokens-per-word ratio
//! ([`calibrate_tokens_per_word`]: the gRPC `Tokenize` RPC on a sample of the text, or the
//! `usage` of one-token HTTP completions); output lengths are sampled too and sent as
//! `max_new_tokens` / `max_tokens` with `ignore_eos`, so every request generates exactly its
//! sample. The i-th request of a point is the same at every load point (same seed): points
//! differ only in the load.
//!
//! Measurements (requests sent during the warmup run but are left out of the statistics):
//! - TTFT: from sending the request to its first token;
//! - TPOT: (last token - first token) / (tokens - 1), per request with at least 2 tokens;
//! - e2e: from sending to the final message;
//! - throughput: with a duration, output tokens that arrived inside the measurement window
//!   (whichever request they belong to) per second of the window, and requests that finished
//!   inside it per second: a steady-state rate, not diluted by the drain at the end. With a
//!   request count only, tokens and completions of the measured requests over the time from
//!   the end of the warmup to the last completion.
//! - exit loops: gRPC streams carry the loop each token exited at, giving a histogram; the HTTP
//!   stream does not, so HTTP reports the mean from `usage.mean_loops` (an extension) only.
//!
//! Over HTTP the request asks for `logprobs: 0`, which makes the server send one event per
//! token (even a token whose text is held back), so token times are exact; and for
//! `stream_options.include_usage` to get prompt tokens and mean loops.
//!
//! Output: [`table`] (one row per point, Markdown), [`Report`] (the JSON file of all results,
//! optionally every request, which `rrt capacity --validate` reads back) and [`plots`]
//! (PREFIX-latency.svg: TTFT and TPOT percentiles vs throughput or load; PREFIX-exits.svg: the
//! exit-loop histogram per point).

use crate::plot::{self, BarChart, Chart, LineChart, Series};
use crate::{BenchError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rrt_proto::v1 as api;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Which API of the coordinator the load goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `rrt.v1.Generation/GenerateStream`.
    Grpc,
    /// OpenAI-compatible `POST /v1/completions`, streamed.
    Http,
}

impl Api {
    /// The name to show: `gRPC` or `HTTP`.
    pub fn name(self) -> &'static str {
        match self {
            Api::Grpc => "gRPC",
            Api::Http => "HTTP",
        }
    }

    /// Where a coordinator listens by default.
    pub fn default_url(self) -> &'static str {
        match self {
            Api::Grpc => "http://127.0.0.1:7300",
            Api::Http => "http://127.0.0.1:8080",
        }
    }
}

/// The x axis of the latency plot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotX {
    /// Achieved output tokens/s.
    Throughput,
    /// The offered rate (open loop) or the concurrency (closed loop).
    Load,
}

/// The JSON report of a run of load points (`rrt bench load --json`): the settings and every
/// point's [`PointResult`]. `rrt capacity --validate` reads it back (as plain JSON).
#[derive(Serialize)]
pub struct Report<'a> {
    pub api: Api,
    pub target: &'a str,
    /// `open` (rates) or `closed` (concurrencies).
    pub mode: &'static str,
    /// The length distributions, as given (`fixed:128`...).
    pub prompt_tokens: String,
    pub output_tokens: String,
    pub tokens_per_word: f64,
    /// Where `tokens_per_word` came from: `measured`, `assumed` or the flag.
    pub tokens_per_word_source: &'static str,
    /// The text file the prompts were cut from.
    pub text: String,
    pub warmup_s: f64,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub timeout_s: f64,
    pub temperature: f32,
    pub full_depth: bool,
    pub max_loops: Option<u32>,
    pub exit_threshold: Option<f32>,
    pub connections: usize,
    pub seed: u64,
    pub points: &'a [PointResult],
}

// ---------------------------------------------------------------------------------------------
// Length distributions, arrivals, statistics
// ---------------------------------------------------------------------------------------------

/// A distribution of lengths in tokens; samples are rounded and at least 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dist {
    Fixed(u32),
    /// Uniform over the integers A..=B.
    Uniform(u32, u32),
    /// Normal with this mean and standard deviation (clamped to >= 1).
    Normal(f64, f64),
    /// Log-normal with this mean and standard deviation (of the lengths themselves, not of
    /// their logarithm).
    LogNormal(f64, f64),
}

impl FromStr for Dist {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self> {
        let err = |reason: String| BenchError::Dist {
            spec: s.trim().to_string(),
            reason,
        };
        let parts: Vec<&str> = s.trim().split(':').map(str::trim).collect();
        let int = |p: &str| -> Result<u32> {
            p.parse::<u32>()
                .map_err(|_| err(format!("`{p}` is not a whole number of tokens")))
        };
        let num = |p: &str| -> Result<f64> {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(format!("`{p}` is not a number")))
        };
        let d = match parts.as_slice() {
            [n] => Dist::Fixed(int(n)?),
            ["fixed", n] => Dist::Fixed(int(n)?),
            ["uniform", a, b] => Dist::Uniform(int(a)?, int(b)?),
            ["normal", m, sd] => Dist::Normal(num(m)?, num(sd)?),
            ["lognormal", m, sd] => Dist::LogNormal(num(m)?, num(sd)?),
            _ => {
                return Err(err(
                    "expected fixed:N, uniform:A:B, normal:MEAN:SD or lognormal:MEAN:SD".into(),
                ));
            }
        };
        match d {
            Dist::Fixed(0) => Err(err("a fixed length must be at least 1".into())),
            Dist::Uniform(a, b) if a == 0 || a > b => Err(err(format!("uniform:{a}:{b} needs 1 <= A <= B"))),
            Dist::Normal(m, sd) if m < 1.0 || sd < 0.0 => {
                Err(err(format!("normal:{m}:{sd} needs MEAN >= 1 and SD >= 0")))
            }
            Dist::LogNormal(m, sd) if m < 1.0 || sd < 0.0 => {
                Err(err(format!("lognormal:{m}:{sd} needs MEAN >= 1 and SD >= 0")))
            }
            d => Ok(d),
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Fixed(n) => write!(f, "fixed:{n}"),
            Dist::Uniform(a, b) => write!(f, "uniform:{a}:{b}"),
            Dist::Normal(m, sd) => write!(f, "normal:{m}:{sd}"),
            Dist::LogNormal(m, sd) => write!(f, "lognormal:{m}:{sd}"),
        }
    }
}

/// A standard normal sample (Box-Muller).
fn std_normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Dist {
    pub fn sample<R: Rng>(&self, rng: &mut R) -> u32 {
        let v = match *self {
            Dist::Fixed(n) => return n,
            Dist::Uniform(a, b) => return rng.random_range(a..=b),
            Dist::Normal(m, sd) => m + sd * std_normal(rng),
            Dist::LogNormal(m, sd) => {
                let s2 = (1.0 + (sd / m).powi(2)).ln();
                (m.ln() - s2 / 2.0 + s2.sqrt() * std_normal(rng)).exp()
            }
        };
        v.round().clamp(1.0, u32::MAX as f64) as u32
    }

    /// The mean (before rounding and clamping).
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed(n) => n as f64,
            Dist::Uniform(a, b) => (a as f64 + b as f64) / 2.0,
            Dist::Normal(m, _) | Dist::LogNormal(m, _) => m,
        }
    }
}

/// Poisson arrival times: exponential gaps of mean 1/rate from a seeded RNG. The unit gaps
/// depend on the seed only, so every rate sees the same sequence scaled.
struct Arrivals {
    rng: ChaCha8Rng,
    rate: f64,
    t: f64,
}

impl Arrivals {
    fn new(rate: f64, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        Self { rng, rate, t: 0.0 }
    }

    /// The next gap in seconds.
    fn gap(&mut self) -> f64 {
        let u: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
        -u.ln() / self.rate
    }
}

impl Iterator for Arrivals {
    /// Seconds since the start.
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        self.t += self.gap();
        Some(self.t)
    }
}

/// The `p`-th percentile (0..=100) of sorted values, interpolating linearly between ranks;
/// None for no values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// Summary statistics of a sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// None for an empty sample; non-finite values are dropped.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p| percentile(&v, p).unwrap_or(f64::NAN);
        Some(Stats {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(50.0),
            p90: q(90.0),
            p99: q(99.0),
            max: v[v.len() - 1],
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

/// What the requests are made of.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The text the prompts are cut from, as words.
    pub words: Vec<String>,
    /// Tokens per word of that text under the served tokenizer.
    pub tokens_per_word: f64,
    pub prompt_tokens: Dist,
    pub output_tokens: Dist,
    /// Tokens at the start of every prompt that are the same for all requests (a shared
    /// system prompt: the text's first words), counted in the prompt length.
    pub shared_prefix_tokens: u32,
}

impl Workload {
    /// A workload over the words of `text`, assuming 1.3 tokens per word until calibrated.
    pub fn from_text(text: &str, prompt_tokens: Dist, output_tokens: Dist) -> Result<Self> {
        let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        if words.is_empty() {
            return Err(BenchError::Workload("the prompt text has no words".into()));
        }
        Ok(Self {
            words,
            tokens_per_word: 1.3,
            prompt_tokens,
            output_tokens,
            shared_prefix_tokens: 0,
        })
    }

    /// A prompt of about `tokens` tokens: consecutive words from a random start (wrapping).
    /// With a shared prefix, its words (the text's first) come first and the random window
    /// fills the rest.
    fn prompt<R: Rng>(&self, rng: &mut R, tokens: u32) -> (String, u32) {
        let n = ((tokens as f64 / self.tokens_per_word).round() as usize).max(1);
        let shared = ((self.shared_prefix_tokens as f64 / self.tokens_per_word).round() as usize).min(n);
        let start = rng.random_range(0..self.words.len());
        let mut s = String::with_capacity(n * 6);
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            let w = if i < shared { i } else { start + i };
            s.push_str(&self.words[w % self.words.len()]);
        }
        (s, n as u32)
    }
}

/// One request to send.
#[derive(Clone, Debug)]
struct Spec {
    index: u64,
    prompt: String,
    prompt_words: u32,
    prompt_tokens: u32,
    max_tokens: u32,
    seed: u64,
}

/// The deterministic sequence of requests of a point.
struct ReqGen {
    workload: Arc<Workload>,
    rng: ChaCha8Rng,
    seed: u64,
    next: u64,
}

impl ReqGen {
    fn new(workload: Arc<Workload>, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(2);
        Self {
            workload,
            rng,
            seed,
            next: 0,
        }
    }

    fn next_spec(&mut self) -> Spec {
        let w = &self.workload;
        let prompt_tokens = w.prompt_tokens.sample(&mut self.rng);
        let max_tokens = w.output_tokens.sample(&mut self.rng);
        let (prompt, prompt_words) = w.prompt(&mut self.rng, prompt_tokens);
        let index = self.next;
        self.next += 1;
        Spec {
            index,
            prompt,
            prompt_words,
            prompt_tokens,
            max_tokens,
            seed: self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target and requests
// ---------------------------------------------------------------------------------------------

/// Where the load goes.
#[derive(Clone, Debug)]
pub struct Target {
    pub api: Api,
    /// `http://host:port` (a missing scheme means http).
    pub url: String,
    pub api_key: Option<String>,
    /// CA certificate for an https gRPC target.
    pub ca: Option<PathBuf>,
}

impl Target {
    fn base(&self) -> String {
        let u = self.url.trim_end_matches('/');
        if u.contains("://") {
            u.to_string()
        } else {
            format!("http://{u}")
        }
    }

    fn completions_url(&self) -> String {
        let b = self.base();
        match b.strip_suffix("/v1") {
            Some(root) => format!("{root}/v1/completions"),
            None => format!("{b}/v1/completions"),
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel> {
        let url = self.base();
        let transport = |what: String| move |source| BenchError::Transport { what, source };
        let mut ep = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(transport(format!("bad target {url}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            match &self.ca {
                Some(ca) => {
                    let pem = std::fs::read(ca).map_err(|source| BenchError::Read {
                        path: ca.clone(),
                        source,
                    })?;
                    tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                }
                None => {
                    return Err(BenchError::Target {
                        url,
                        reason: "an https target needs --ca (the CA certificate of the server)".into(),
                    });
                }
            }
            ep = ep
                .tls_config(tls)
                .map_err(transport(format!("TLS settings for {url}")))?;
        }
        ep.connect().await.map_err(transport(format!("connecting to {url}")))
    }

    fn http_client(&self) -> Result<reqwest::Client> {
        let url = self.base();
        if url.starts_with("https://") {
            return Err(BenchError::Target {
                url,
                reason: "the HTTP client is built without TLS: use an http:// target (or --api grpc with --ca)".into(),
            });
        }
        // A new connection per request: a pooled keep-alive connection can be closed by the
        // server (llama-server closes them after a few requests) just as a request is sent on
        // it, which failed 1-10 of 64 requests per point as "error sending request".
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|source| BenchError::Http {
                what: "building the HTTP client".into(),
                source,
            })
    }

    /// The `authorization` metadata of a gRPC request, if there is an API key.
    fn grpc_auth(&self) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>> {
        self.bearer().map(|b| b.parse().map_err(BenchError::ApiKey)).transpose()
    }

    fn bearer(&self) -> Option<String> {
        self.api_key.as_ref().map(|k| format!("Bearer {k}"))
    }
}

/// Generation settings shared by all requests.
#[derive(Clone, Debug, Default)]
pub struct GenSettings {
    pub temperature: f32,
    pub full_depth: bool,
    pub max_loops: Option<u32>,
    pub exit_threshold: Option<f32>,
    /// HTTP `model` (empty: not sent).
    pub model: String,
}

/// Open connections to the target.
#[derive(Clone)]
enum Conn {
    Grpc {
        clients: Vec<api::generation_client::GenerationClient<tonic::transport::Channel>>,
        auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        auth: Option<String>,
    },
}

impl Conn {
    async fn open(t: &Target, connections: usize) -> Result<Conn> {
        match t.api {
            Api::Grpc => {
                let mut clients = Vec::new();
                for _ in 0..connections.max(1) {
                    clients.push(api::generation_client::GenerationClient::new(t.channel().await?));
                }
                let auth = t.grpc_auth()?;
                Ok(Conn::Grpc { clients, auth })
            }
            Api::Http => Ok(Conn::Http {
                client: t.http_client()?,
                url: t.completions_url(),
                auth: t.bearer(),
            }),
        }
    }
}

/// Why a request failed: a kind to count by, and a message.
#[derive(Debug)]
struct Fail {
    kind: String,
    message: String,
}

impl Fail {
    fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
        }
    }

    fn grpc(s: tonic::Status) -> Self {
        Self::new(format!("grpc {:?}", s.code()), s.message().to_string())
    }

    fn http(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "http connect"
        } else {
            "http transport"
        };
        Self::new(kind, format!("{e:#}"))
    }
}

/// Times of one request (the measurement window is shared by the point).
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
    measure_from: Instant,
    window_end: Option<Instant>,
}

impl Clock {
    fn in_window(&self, t: Instant) -> bool {
        t >= self.measure_from && self.window_end.is_none_or(|e| t < e)
    }

    fn offset(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.start).as_secs_f64()
    }
}

/// Counters the progress bar reads.
#[derive(Default)]
struct Live {
    tokens: AtomicU64,
    done: AtomicU64,
    in_flight: AtomicU64,
    errors: AtomicU64,
    sending_done: AtomicBool,
}

/// What one request saw while streaming.
struct Tracker<'a> {
    clock: Clock,
    live: &'a Live,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: u32,
    in_window: u32,
    exit_loops: BTreeMap<u32, u32>,
    finish: Option<String>,
    usage_prompt: Option<u32>,
    usage_completion: Option<u32>,
    usage_mean_loops: Option<f32>,
}

impl<'a> Tracker<'a> {
    fn new(clock: Clock, live: &'a Live) -> Self {
        Self {
            clock,
            live,
            first: None,
            last: None,
            tokens: 0,
            in_window: 0,
            exit_loops: BTreeMap::new(),
            finish: None,
            usage_prompt: None,
            usage_completion: None,
            usage_mean_loops: None,
        }
    }

    fn tokens(&mut self, n: u32, exit_loop: Option<u32>) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.tokens += n;
        if self.clock.in_window(now) {
            self.in_window += n;
        }
        if let Some(l) = exit_loop {
            *self.exit_loops.entry(l).or_default() += n;
        }
        self.live.tokens.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn grpc_request(spec: &Spec, g: &GenSettings) -> api::GenerateRequest {
    let depth = (g.full_depth || g.max_loops.is_some() || g.exit_threshold.is_some()).then_some(api::DepthControls {
        full_depth: g.full_depth,
        exit_threshold: g.exit_threshold,
        max_loops: g.max_loops,
        prompt_exits: None,
    });
    api::GenerateRequest {
        input: Some(api::generate_request::Input::Prompt(spec.prompt.clone())),
        max_new_tokens: Some(spec.max_tokens),
        temperature: Some(g.temperature),
        seed: Some(spec.seed),
        ignore_eos: true,
        depth,
        model: g.model.clone(),
        ..Default::default()
    }
}

fn http_body(spec: &Spec, g: &GenSettings) -> Value {
    let mut b = json!({
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": g.temperature,
        "seed": spec.seed,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
        "logprobs": 0,
    });
    if !g.model.is_empty() {
        b["model"] = json!(g.model);
    }
    if g.full_depth {
        b["full_depth"] = json!(true);
    }
    if let Some(m) = g.max_loops {
        b["max_loops"] = json!(m);
    }
    if let Some(t) = g.exit_threshold {
        b["exit_threshold"] = json!(t);
    }
    b
}

async fn grpc_stream(
    mut client: api::generation_client::GenerationClient<tonic::transport::Channel>,
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    req: api::GenerateRequest,
    tr: &mut Tracker<'_>,
) -> Result<(), Fail> {
    let mut r = tonic::Request::new(req);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a);
    }
    let mut s = client.generate_stream(r).await.map_err(Fail::grpc)?.into_inner();
    while let Some(m) = s.message().await.map_err(Fail::grpc)? {
        if m.token_id.is_some() {
            tr.tokens(1, Some(m.exit_loop));
        }
        if m.finish_reason != 0 {
            if let Some(u) = m.usage {
                tr.usage_prompt = Some(u.prompt_tokens);
                tr.usage_completion = Some(u.completion_tokens);
                tr.usage_mean_loops = Some(u.mean_loops);
            }
            let name = api::FinishReason::try_from(m.finish_reason)
                .map(|f| {
                    f.as_str_name()
                        .trim_start_matches("FINISH_REASON_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_else(|_| m.finish_reason.to_string());
            tr.finish = Some(name);
            return Ok(());
        }
    }
    Err(Fail::new(
        "incomplete stream",
        "the stream ended without a finish reason",
    ))
}

/// Takes the next complete server-sent event off `buf` (with '\r' already removed) and
/// returns its data lines joined by '\n' (empty for comments / keep-alives).
fn take_sse_event(buf: &mut Vec<u8>) -> Option<String> {
    let pos = buf.windows(2).position(|w| w == b"\n\n")?;
    let ev: Vec<u8> = buf.drain(..pos + 2).collect();
    let text = String::from_utf8_lossy(&ev[..pos]);
    let data: Vec<&str> = text
        .split('\n')
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    Some(data.join("\n"))
}

/// Handles one SSE data payload of a streamed completion; true at `[DONE]`.
fn http_event(data: &str, tr: &mut Tracker<'_>) -> Result<bool, Fail> {
    if data == "[DONE]" {
        return Ok(true);
    }
    let v: Value =
        serde_json::from_str(data).map_err(|e| Fail::new("bad event", format!("{e}: {}", clip(data, 200))))?;
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let kind = e.get("type").and_then(Value::as_str).unwrap_or("error");
        let msg = e.get("message").and_then(Value::as_str).unwrap_or_default();
        return Err(Fail::new(format!("stream {kind}"), msg));
    }
    if let Some(c) = v.get("choices").and_then(|c| c.get(0)) {
        let finish = c.get("finish_reason").and_then(Value::as_str);
        // Not sent by the coordinator today: a per-token `exit_loop` extension would be used.
        let exit_loop = c.get("exit_loop").and_then(Value::as_u64).map(|l| l as u32);
        // With `logprobs` requested, one entry per token; otherwise one event per non-empty text.
        match c.pointer("/logprobs/tokens").and_then(Value::as_array) {
            Some(t) => tr.tokens(t.len() as u32, exit_loop),
            None => {
                let text = c.get("text").and_then(Value::as_str).unwrap_or_default();
                if finish.is_none() && !text.is_empty() {
                    tr.tokens(1, exit_loop);
                }
            }
        }
        if let Some(f) = finish {
            tr.finish = Some(f.to_string());
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|v| v as u32);
        tr.usage_prompt = n("prompt_tokens");
        tr.usage_completion = n("completion_tokens");
        tr.usage_mean_loops = u.get("mean_loops").and_then(Value::as_f64).map(|v| v as f32);
    }
    Ok(false)
}

fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

async fn http_stream(
    client: &reqwest::Client,
    url: &str,
    auth: Option<&str>,
    body: &Value,
    tr: &mut Tracker<'_>,
) -> Result<(), Fail> {
    let mut rb = client.post(url).json(body);
    if let Some(a) = auth {
        rb = rb.header(reqwest::header::AUTHORIZATION, a);
    }
    let mut resp = rb.send().await.map_err(Fail::http)?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(Fail::new(format!("http {}", status.as_u16()), clip(&text, 300)));
    }
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Fail::http)? {
        buf.extend(chunk.iter().copied().filter(|&b| b != b'\r'));
        while let Some(data) = take_sse_event(&mut buf) {
            if !data.is_empty() && http_event(&data, tr)? {
                return if tr.finish.is_some() {
                    Ok(())
                } else {
                    Err(Fail::new("incomplete stream", "[DONE] without a finish reason"))
                };
            }
        }
    }
    if tr.finish.is_some() {
        Ok(())
    } else {
        Err(Fail::new(
            "incomplete stream",
            "the stream ended without a finish reason",
        ))
    }
}

/// One request as measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    pub index: u64,
    /// Sent after the warmup (counted in the statistics).
    pub measured: bool,
    /// Seconds from the start of the point to sending / to the end.
    pub start_s: f64,
    pub end_s: f64,
    /// The sampled prompt length (tokens) and the words sent for it.
    pub prompt_tokens: u32,
    pub prompt_words: u32,
    /// The sampled output length, sent as the maximum.
    pub max_tokens: u32,
    /// Output tokens received.
    pub tokens: u32,
    /// Of them, those that arrived inside the measurement window.
    pub tokens_in_window: u32,
    pub ttft_s: Option<f64>,
    pub tpot_s: Option<f64>,
    pub e2e_s: f64,
    pub finish: Option<String>,
    /// From the final `usage`.
    pub usage_prompt_tokens: Option<u32>,
    pub usage_mean_loops: Option<f32>,
    /// Tokens per exit loop (gRPC only).
    pub exit_loops: BTreeMap<u32, u32>,
    /// The error kind (`grpc ResourceExhausted`, `http 429`, `timeout`...) and its message.
    pub error: Option<String>,
    pub error_message: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn one(
    conn: &Conn,
    spec: Spec,
    g: &GenSettings,
    clock: Clock,
    live: &Live,
    timeout: Duration,
    measured: bool,
) -> RequestRecord {
    live.in_flight.fetch_add(1, Ordering::Relaxed);
    let sent = Instant::now();
    let mut tr = Tracker::new(clock, live);
    let res = match conn {
        Conn::Grpc { clients, auth } => {
            let client = clients[(spec.index % clients.len() as u64) as usize].clone();
            let req = grpc_request(&spec, g);
            tokio::time::timeout(timeout, grpc_stream(client, auth.clone(), req, &mut tr)).await
        }
        Conn::Http { client, url, auth } => {
            let body = http_body(&spec, g);
            tokio::time::timeout(timeout, http_stream(client, url, auth.as_deref(), &body, &mut tr)).await
        }
    };
    let end = Instant::now();
    let mut fail = match res {
        Ok(r) => r.err(),
        Err(_) => Some(Fail::new(
            "timeout",
            format!("no finish after {:.1} s", timeout.as_secs_f64()),
        )),
    };
    if fail.is_none() && tr.finish.as_deref() == Some("cancelled") {
        fail = Some(Fail::new("cancelled", "the server cancelled the request"));
    }
    live.in_flight.fetch_sub(1, Ordering::Relaxed);
    if measured {
        live.done.fetch_add(1, Ordering::Relaxed);
    }
    if fail.is_some() {
        live.errors.fetch_add(1, Ordering::Relaxed);
    }
    // HTTP servers that merge tokens into one event: trust the usage count.
    let tokens = tr.tokens.max(tr.usage_completion.unwrap_or(0));
    let ttft = tr.first.map(|f| f.duration_since(sent).as_secs_f64());
    let tpot = match (tr.first, tr.last) {
        (Some(f), Some(l)) if tokens >= 2 => Some(l.duration_since(f).as_secs_f64() / (tokens - 1) as f64),
        _ => None,
    };
    RequestRecord {
        index: spec.index,
        measured,
        start_s: clock.offset(sent),
        end_s: clock.offset(end),
        prompt_tokens: spec.prompt_tokens,
        prompt_words: spec.prompt_words,
        max_tokens: spec.max_tokens,
        tokens,
        tokens_in_window: tr.in_window,
        ttft_s: ttft,
        tpot_s: tpot,
        e2e_s: end.duration_since(sent).as_secs_f64(),
        finish: tr.finish,
        usage_prompt_tokens: tr.usage_prompt,
        usage_mean_loops: tr.usage_mean_loops,
        exit_loops: tr.exit_loops,
        error: fail.as_ref().map(|f| f.kind.clone()),
        error_message: fail.map(|f| f.message),
    }
}

/// Tokens per word of `words` under the target's tokenizer: the gRPC `Tokenize` RPC on a
/// sample, or over HTTP the prompt tokens in the `usage` of one-token completions.
pub async fn calibrate_tokens_per_word(target: &Target, model: &str, words: &[String]) -> Result<f64> {
    const WINDOWS: usize = 6;
    const WORDS: usize = 300;
    let samples: Vec<(String, usize)> = (0..WINDOWS)
        .map(|i| {
            let start = i * words.len() / WINDOWS;
            let n = WORDS.min(words.len());
            let text = (0..n)
                .map(|j| words[(start + j) % words.len()].as_str())
                .collect::<Vec<_>>()
                .join(" ");
            (text, n)
        })
        .collect();
    let (mut tokens, mut n_words) = (0usize, 0usize);
    let url = match target.api {
        Api::Grpc => target.base(),
        Api::Http => target.completions_url(),
    };
    match target.api {
        Api::Grpc => {
            let mut client = api::generation_client::GenerationClient::new(target.channel().await?);
            let auth = target.grpc_auth()?;
            for (text, n) in samples {
                let mut r = tonic::Request::new(api::TokenizeRequest {
                    text,
                    model: model.to_string(),
                    add_special: false,
                    parse_special: false,
                });
                if let Some(a) = &auth {
                    r.metadata_mut().insert("authorization", a.clone());
                }
                let resp = client.tokenize(r).await.map_err(|source| BenchError::Rpc {
                    what: format!("Tokenize on {url}"),
                    source,
                })?;
                tokens += resp.into_inner().token_ids.len();
                n_words += n;
            }
        }
        Api::Http => {
            let client = target.http_client()?;
            for (text, n) in samples.into_iter().take(3) {
                let mut body = json!({"prompt": text, "max_tokens": 1, "temperature": 0.0});
                if !model.is_empty() {
                    body["model"] = json!(model);
                }
                let mut rb = client.post(&url).json(&body);
                if let Some(b) = target.bearer() {
                    rb = rb.header(reqwest::header::AUTHORIZATION, b);
                }
                let resp = rb.send().await.map_err(|source| BenchError::Http {
                    what: format!("POST {url}"),
                    source,
                })?;
                let status = resp.status();
                let v: Value = resp.json().await.map_err(|source| BenchError::Http {
                    what: format!("HTTP {status} from {url}: reading the JSON body"),
                    source,
                })?;
                if !status.is_success() {
                    return Err(BenchError::Response {
                        url,
                        detail: format!("HTTP {status}: {v}"),
                    });
                }
                let p = v
                    .pointer("/usage/prompt_tokens")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| BenchError::Response {
                        url: url.clone(),
                        detail: "no usage.prompt_tokens in the response".into(),
                    })?;
                tokens += p as usize;
                n_words += n;
            }
        }
    }
    if tokens == 0 || n_words == 0 {
        return Err(BenchError::Response {
            url,
            detail: "no tokens counted".into(),
        });
    }
    Ok(tokens as f64 / n_words as f64)
}

// ---------------------------------------------------------------------------------------------
// Load points
// ---------------------------------------------------------------------------------------------

/// The load of a point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Open loop: Poisson arrivals at this many requests/s.
    Rate(f64),
    /// Closed loop: this many requests in flight.
    Concurrency(usize),
}

impl Load {
    /// The rate or the concurrency, as a number.
    pub fn value(&self) -> f64 {
        match *self {
            Load::Rate(r) => r,
            Load::Concurrency(c) => c as f64,
        }
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Load::Rate(r) => write!(f, "{r} req/s"),
            Load::Concurrency(c) => write!(f, "{c} in flight"),
        }
    }
}

/// Everything one load point needs.
#[derive(Clone, Debug)]
pub struct PointConfig {
    pub target: Target,
    pub load: Load,
    /// Measurement seconds after the warmup (None: until `requests`).
    pub duration_s: Option<f64>,
    /// Requests sent after the warmup (None: until `duration_s`).
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub workload: Arc<Workload>,
    pub generation: GenSettings,
    pub seed: u64,
    pub timeout_s: f64,
    /// gRPC channels.
    pub connections: usize,
    /// Keep every request's record in the result.
    pub keep_requests: bool,
    pub progress: bool,
    /// Prefix of the progress bar.
    pub label: String,
}

/// The measurements of one load point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PointResult {
    /// The served model measured (empty: the default one).
    #[serde(default)]
    pub model: String,
    pub load: Load,
    /// Measured requests (sent after the warmup): sent, finished without error, failed.
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// The first message of each error kind.
    pub error_examples: BTreeMap<String, String>,
    /// Requests sent during the warmup.
    pub warmup_requests: u64,
    /// Measured requests still running at the end of the window (awaited and counted).
    pub finished_after_window: u64,
    /// Completed requests with fewer tokens than asked (a stop despite `ignore_eos`).
    pub short_outputs: u64,
    /// The measurement window (`--duration`), or the time from the end of the warmup to the
    /// last measured completion.
    pub window_s: f64,
    /// Measured requests sent per second of sending.
    pub sent_rps: f64,
    /// Completed requests per second (see the module docs).
    pub achieved_rps: f64,
    /// Output tokens per second (see the module docs).
    pub output_tok_s: f64,
    /// Prompt tokens (from `usage`) of completed requests per second of the window.
    pub prompt_tok_s: f64,
    /// Means over completed requests: prompt tokens per `usage` (the sampled target is in
    /// the records) and output tokens.
    pub prompt_tokens_mean: Option<f64>,
    pub output_tokens_mean: Option<f64>,
    pub ttft_ms: Option<Stats>,
    pub tpot_ms: Option<Stats>,
    pub e2e_ms: Option<Stats>,
    /// "per_token" (gRPC), "usage" (HTTP: mean only) or "unavailable".
    pub loops_source: String,
    /// Output tokens per exit loop, over measured requests.
    pub loops_histogram: BTreeMap<u32, u64>,
    pub mean_loops: Option<f64>,
    /// How late the open-loop sender was at worst (a value near the gaps means the generator
    /// could not offer the rate).
    pub max_send_lag_ms: f64,
    /// Every request (only when asked for).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRecord>,
}

impl PointResult {
    /// A one-line summary for the log.
    pub fn one_line(&self) -> String {
        let ms = |s: &Option<Stats>, f: fn(&Stats) -> f64| s.as_ref().map_or("-".into(), |s| format!("{:.1}", f(s)));
        format!(
            "{}: {} sent, {} ok, {} errors | {:.2} req/s, {:.1} tok/s | TTFT p50 {} p99 {} ms | TPOT p50 {} p99 {} ms{}",
            self.load,
            self.sent,
            self.completed,
            self.errors,
            self.achieved_rps,
            self.output_tok_s,
            ms(&self.ttft_ms, |s| s.p50),
            ms(&self.ttft_ms, |s| s.p99),
            ms(&self.tpot_ms, |s| s.p50),
            ms(&self.tpot_ms, |s| s.p99),
            self.mean_loops
                .map_or(String::new(), |m| format!(" | {m:.2} loops/token")),
        )
    }
}

/// Runs one load point against the target and measures it.
pub async fn run_point(cfg: &PointConfig) -> Result<PointResult> {
    if cfg.duration_s.is_none() && cfg.requests.is_none() {
        return Err(BenchError::Point(
            "a load point needs a duration or a request count".into(),
        ));
    }
    match cfg.load {
        Load::Rate(r) if !(r.is_finite() && r > 0.0) => {
            return Err(BenchError::Point("the rate must be positive".into()));
        }
        Load::Concurrency(0) => return Err(BenchError::Point("the concurrency must be positive".into())),
        _ => {}
    }
    let conn = Conn::open(&cfg.target, cfg.connections).await?;
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(cfg.warmup_s.max(0.0));
    let clock = Clock {
        start,
        measure_from,
        window_end: cfg.duration_s.map(|d| measure_from + Duration::from_secs_f64(d)),
    };
    let bar = progress_bar(cfg)?;
    let ticker = tokio::spawn(tick(bar.clone(), live.clone(), clock, cfg.requests));
    let (records, lag) = match cfg.load {
        Load::Rate(r) => open_loop(cfg, conn, clock, live.clone(), r).await,
        Load::Concurrency(c) => closed_loop(cfg, conn, clock, live.clone(), c).await,
    };
    ticker.abort();
    bar.finish_and_clear();
    Ok(summarize(cfg, clock, records, lag))
}

async fn open_loop(
    cfg: &PointConfig,
    conn: Conn,
    clock: Clock,
    live: Arc<Live>,
    rate: f64,
) -> (Vec<RequestRecord>, f64) {
    let mut arrivals = Arrivals::new(rate, cfg.seed);
    let mut reqs = ReqGen::new(cfg.workload.clone(), cfg.seed);
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut measured_sent, mut max_lag) = (0u64, 0f64);
    for t in arrivals.by_ref() {
        let at = clock.start + Duration::from_secs_f64(t);
        if clock.window_end.is_some_and(|e| at >= e) {
            break;
        }
        let measured = at >= clock.measure_from;
        if measured && cfg.requests.is_some_and(|n| measured_sent >= n) {
            break;
        }
        let spec = reqs.next_spec();
        tokio::time::sleep_until(at.into()).await;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(at).as_secs_f64());
        measured_sent += measured as u64;
        let (conn, g, live) = (conn.clone(), cfg.generation.clone(), live.clone());
        tasks.spawn(async move { one(&conn, spec, &g, clock, &live, timeout, measured).await });
    }
    live.sending_done.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(rec) = r {
            out.push(rec);
        }
    }
    out.sort_by_key(|r| r.index);
    (out, max_lag)
}

async fn closed_loop(
    cfg: &PointConfig,
    conn: Conn,
    clock: Clock,
    live: Arc<Live>,
    c: usize,
) -> (Vec<RequestRecord>, f64) {
    let reqs = Arc::new(std::sync::Mutex::new(ReqGen::new(cfg.workload.clone(), cfg.seed)));
    let measured_started = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (conn, g, live, reqs, started) = (
            conn.clone(),
            cfg.generation.clone(),
            live.clone(),
            reqs.clone(),
            measured_started.clone(),
        );
        let limit = cfg.requests;
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let now = Instant::now();
                if clock.window_end.is_some_and(|e| now >= e) {
                    break;
                }
                let measured = now >= clock.measure_from;
                if measured && limit.is_some_and(|n| started.fetch_add(1, Ordering::Relaxed) >= n) {
                    break;
                }
                let spec = reqs.lock().expect("request generator").next_spec();
                out.push(one(&conn, spec, &g, clock, &live, timeout, measured).await);
            }
            out
        });
    }
    let mut out = Vec::new();
    let mut stopped = 0;
    while let Some(r) = workers.join_next().await {
        stopped += 1;
        if stopped == c {
            live.sending_done.store(true, Ordering::Relaxed);
        }
        if let Ok(v) = r {
            out.extend(v);
        }
    }
    out.sort_by_key(|r| r.index);
    (out, 0.0)
}

fn progress_bar(cfg: &PointConfig) -> Result<ProgressBar> {
    if !cfg.progress {
        return Ok(ProgressBar::hidden());
    }
    let bar = match (cfg.duration_s, cfg.requests) {
        (Some(d), _) => {
            let total = cfg.warmup_s + d;
            ProgressBar::new((total * 1000.0) as u64).with_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix:>22}} [{{bar:30}}] {{elapsed:>4}}/{total:.0}s {{msg}}"
                ))?
                .progress_chars("=> "),
            )
        }
        (None, Some(n)) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} requests {msg}")?.progress_chars("=> "),
        ),
        (None, None) => ProgressBar::hidden(),
    };
    bar.set_prefix(cfg.label.clone());
    Ok(bar)
}

/// Refreshes the bar: position, and tokens/s over the last two seconds.
async fn tick(bar: ProgressBar, live: Arc<Live>, clock: Clock, requests: Option<u64>) {
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut iv = tokio::time::interval(Duration::from_millis(250));
    loop {
        iv.tick().await;
        let now = Instant::now();
        let tokens = live.tokens.load(Ordering::Relaxed);
        samples.push_back((now, tokens));
        while samples.len() > 2 && now.duration_since(samples[0].0) > Duration::from_secs(2) {
            samples.pop_front();
        }
        let (t0, k0) = samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        let rate = if dt > 0.0 { (tokens - k0) as f64 / dt } else { 0.0 };
        match (clock.window_end, requests) {
            (Some(_), _) => bar.set_position(now.duration_since(clock.start).as_millis() as u64),
            (None, Some(_)) => bar.set_position(live.done.load(Ordering::Relaxed)),
            _ => {}
        }
        let phase = if now < clock.measure_from {
            "warmup, "
        } else if live.sending_done.load(Ordering::Relaxed) || clock.window_end.is_some_and(|e| now >= e) {
            "draining, "
        } else {
            ""
        };
        bar.set_message(format!(
            "{phase}{rate:.0} tok/s, {} in flight, {} errors",
            live.in_flight.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed)
        ));
    }
}

fn summarize(cfg: &PointConfig, clock: Clock, records: Vec<RequestRecord>, max_lag_s: f64) -> PointResult {
    let warmup = clock.offset(clock.measure_from);
    let window_end = clock.window_end.map(|e| clock.offset(e));
    let measured: Vec<&RequestRecord> = records.iter().filter(|r| r.measured).collect();
    let ok: Vec<&RequestRecord> = measured.iter().copied().filter(|r| r.error.is_none()).collect();
    let mut errors_by_kind = BTreeMap::new();
    let mut error_examples = BTreeMap::new();
    for r in &measured {
        if let Some(k) = &r.error {
            *errors_by_kind.entry(k.clone()).or_insert(0u64) += 1;
            error_examples
                .entry(k.clone())
                .or_insert_with(|| r.error_message.clone().unwrap_or_default());
        }
    }
    let last_end = measured.iter().map(|r| r.end_s).fold(warmup, f64::max);
    let (window_s, achieved_rps, output_tok_s, prompt_tok_s, sent_span);
    match window_end {
        Some(end) => {
            window_s = end - warmup;
            // Everything that happened inside the window, whichever request it belongs to.
            let done_in = records
                .iter()
                .filter(|r| r.error.is_none() && r.end_s >= warmup && r.end_s < end)
                .collect::<Vec<_>>();
            achieved_rps = done_in.len() as f64 / window_s;
            output_tok_s = records.iter().map(|r| r.tokens_in_window as f64).sum::<f64>() / window_s;
            prompt_tok_s = done_in
                .iter()
                .filter_map(|r| r.usage_prompt_tokens)
                .map(f64::from)
                .sum::<f64>()
                / window_s;
            sent_span = window_s;
        }
        None => {
            window_s = (last_end - warmup).max(1e-9);
            achieved_rps = ok.len() as f64 / window_s;
            output_tok_s = measured.iter().map(|r| r.tokens as f64).sum::<f64>() / window_s;
            prompt_tok_s = ok
                .iter()
                .filter_map(|r| r.usage_prompt_tokens)
                .map(f64::from)
                .sum::<f64>()
                / window_s;
            let last_start = measured.iter().map(|r| r.start_s).fold(warmup, f64::max);
            sent_span = match cfg.load {
                // n arrivals over the span of n gaps: estimate the span as (n) / (n - 1) times
                // first-to-last.
                Load::Rate(_) if measured.len() > 1 => {
                    (last_start - warmup) * measured.len() as f64 / (measured.len() - 1) as f64
                }
                _ => window_s,
            };
        }
    }
    let mut hist: BTreeMap<u32, u64> = BTreeMap::new();
    for r in &measured {
        for (&l, &n) in &r.exit_loops {
            *hist.entry(l).or_default() += n as u64;
        }
    }
    let (loops_source, mean_loops) = if !hist.is_empty() {
        let (sum, n) = hist
            .iter()
            .fold((0f64, 0u64), |(s, c), (&l, &n)| (s + l as f64 * n as f64, c + n));
        ("per_token", Some(sum / n as f64))
    } else {
        let (sum, n) = ok
            .iter()
            .filter_map(|r| r.usage_mean_loops.map(|m| (m as f64, r.tokens as f64)))
            .fold((0.0, 0.0), |(s, c), (m, t)| (s + m * t, c + t));
        if n > 0.0 {
            ("usage", Some(sum / n))
        } else {
            ("unavailable", None)
        }
    };
    let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    PointResult {
        model: cfg.generation.model.clone(),
        load: cfg.load,
        sent: measured.len() as u64,
        completed: ok.len() as u64,
        errors: (measured.len() - ok.len()) as u64,
        errors_by_kind,
        error_examples,
        warmup_requests: (records.len() - measured.len()) as u64,
        finished_after_window: window_end.map_or(0, |e| measured.iter().filter(|r| r.end_s >= e).count() as u64),
        short_outputs: ok.iter().filter(|r| r.tokens < r.max_tokens).count() as u64,
        window_s,
        sent_rps: if sent_span > 0.0 {
            measured.len() as f64 / sent_span
        } else {
            0.0
        },
        achieved_rps,
        output_tok_s,
        prompt_tok_s,
        prompt_tokens_mean: mean(ok.iter().filter_map(|r| r.usage_prompt_tokens).map(f64::from).collect()),
        output_tokens_mean: mean(ok.iter().map(|r| r.tokens as f64).collect()),
        ttft_ms: Stats::of(ok.iter().filter_map(|r| r.ttft_s).map(|s| s * 1e3)),
        tpot_ms: Stats::of(ok.iter().filter_map(|r| r.tpot_s).map(|s| s * 1e3)),
        e2e_ms: Stats::of(ok.iter().map(|r| r.e2e_s * 1e3)),
        loops_source: loops_source.into(),
        loops_histogram: hist,
        mean_loops,
        max_send_lag_ms: max_lag_s * 1e3,
        requests: if cfg.keep_requests { records } else { Vec::new() },
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// The results as a Markdown table (one row per point), followed by notes on each point's
/// errors, short outputs, late sending and exit loops; no final newline.
pub fn table(points: &[PointResult]) -> String {
    let mut out: Vec<String> = Vec::new();
    let f = |s: &Option<Stats>, g: fn(&Stats) -> f64, scale: f64, d: usize| {
        s.as_ref().map_or("-".to_string(), |s| format!("{:.d$}", g(s) * scale))
    };
    out.push(
        "| load | sent | ok | errors | req/s | out tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT p50 ms | TPOT p90 ms | TPOT p99 ms | e2e p50 s | e2e p99 s | loops/token |"
            .into(),
    );
    out.push("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    for p in points {
        out.push(format!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.load,
            p.sent,
            p.completed,
            p.errors,
            p.achieved_rps,
            p.output_tok_s,
            f(&p.ttft_ms, |s| s.p50, 1.0, 1),
            f(&p.ttft_ms, |s| s.p90, 1.0, 1),
            f(&p.ttft_ms, |s| s.p99, 1.0, 1),
            f(&p.tpot_ms, |s| s.p50, 1.0, 2),
            f(&p.tpot_ms, |s| s.p90, 1.0, 2),
            f(&p.tpot_ms, |s| s.p99, 1.0, 2),
            f(&p.e2e_ms, |s| s.p50, 1e-3, 2),
            f(&p.e2e_ms, |s| s.p99, 1e-3, 2),
            p.mean_loops.map_or("-".into(), |m| format!("{m:.2}")),
        ));
    }
    for p in points {
        if !p.errors_by_kind.is_empty() {
            let kinds: Vec<String> = p
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{k}: {n} (\"{}\")", clip(p.error_examples.get(k).map_or("", |s| s), 80)))
                .collect();
            out.push(format!("errors at {}: {}", p.load, kinds.join("; ")));
        }
        if p.short_outputs > 0 {
            out.push(format!(
                "{}: {} requests finished before their max_tokens",
                p.load, p.short_outputs
            ));
        }
        if p.max_send_lag_ms > 50.0 {
            out.push(format!(
                "{}: the sender ran up to {:.0} ms late: the offered rate may not have been reached",
                p.load, p.max_send_lag_ms
            ));
        }
        let total: u64 = p.loops_histogram.values().sum();
        if total > 0 {
            let h: Vec<String> = p
                .loops_histogram
                .iter()
                .map(|(l, n)| format!("{l}: {:.1}%", 100.0 * *n as f64 / total as f64))
                .collect();
            out.push(format!("exit loops at {}: {}", p.load, h.join(", ")));
        }
    }
    out.join("\n")
}

/// The SVG plots: (path, document): PREFIX-latency.svg, and PREFIX-exits.svg when per-token
/// exit loops were measured (gRPC with tokens).
pub fn plots(points: &[PointResult], x: PlotX, prefix: &Path) -> Result<Vec<(PathBuf, String)>> {
    let path = |suffix: &str| {
        let mut s = prefix.as_os_str().to_os_string();
        s.push(suffix);
        PathBuf::from(s)
    };
    let mut out = vec![(path("-latency.svg"), latency_svg(points, x)?)];
    if let Some(svg) = exits_svg(points)? {
        out.push((path("-exits.svg"), svg));
    }
    Ok(out)
}

fn latency_svg(points: &[PointResult], x: PlotX) -> Result<String> {
    let x_of = |p: &PointResult| match x {
        PlotX::Throughput => p.output_tok_s,
        PlotX::Load => p.load.value(),
    };
    let x_label = match (x, points.first().map(|p| p.load)) {
        (PlotX::Throughput, _) => "achieved output tokens/s",
        (PlotX::Load, Some(Load::Concurrency(_))) => "concurrency (requests in flight)",
        (PlotX::Load, _) => "offered load (requests/s)",
    };
    let mut sorted: Vec<&PointResult> = points.iter().collect();
    sorted.sort_by(|a, b| x_of(a).total_cmp(&x_of(b)));
    let chart = |title: &str, get: fn(&PointResult) -> Option<&Stats>| {
        let series = |name: &str, q: fn(&Stats) -> f64, dashed, color| Series {
            name: name.into(),
            points: sorted.iter().filter_map(|p| get(p).map(|s| (x_of(p), q(s)))).collect(),
            dashed,
            color,
        };
        let s = vec![
            series("p50", |s| s.p50, false, 0),
            series("p90", |s| s.p90, true, 2),
            series("p99", |s| s.p99, true, 1),
        ];
        let ys: Vec<f64> = s
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|y| *y > 0.0)
            .collect();
        let (lo, hi) = ys.iter().fold((f64::INFINITY, 0f64), |(a, b), &y| (a.min(y), b.max(y)));
        Chart::Line(LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: "milliseconds".into(),
            series: s,
            // Latencies explode near saturation: a log scale keeps the low end readable.
            log_y: !ys.is_empty() && hi / lo > 20.0,
        })
    };
    Ok(plot::document(
        &[
            chart("Time to first token", |p| p.ttft_ms.as_ref()),
            chart("Time per output token", |p| p.tpot_ms.as_ref()),
        ],
        540.0,
        380.0,
    )?)
}

fn exits_svg(points: &[PointResult]) -> Result<Option<String>> {
    let max_loop = points.iter().filter_map(|p| p.loops_histogram.keys().max()).max();
    let min_loop = points.iter().filter_map(|p| p.loops_histogram.keys().min()).min();
    let (Some(&min_loop), Some(&max_loop)) = (min_loop, max_loop) else {
        return Ok(None);
    };
    let loops: Vec<u32> = (min_loop..=max_loop).collect();
    let series: Vec<(String, Vec<f64>)> = points
        .iter()
        .filter(|p| !p.loops_histogram.is_empty())
        .map(|p| {
            let total: u64 = p.loops_histogram.values().sum();
            let v = loops
                .iter()
                .map(|l| *p.loops_histogram.get(l).unwrap_or(&0) as f64 / total.max(1) as f64)
                .collect();
            (
                format!(
                    "{}{}",
                    p.load,
                    p.mean_loops.map_or(String::new(), |m| format!(" (mean {m:.2})"))
                ),
                v,
            )
        })
        .collect();
    Ok(Some(plot::document(
        &[Chart::Bar(BarChart {
            title: "Exit loop per output token".into(),
            x_label: "loops run before the token was decoded".into(),
            y_label: "share of output tokens".into(),
            categories: loops.iter().map(u32::to_string).collect(),
            series,
        })],
        640.0,
        380.0,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_print() {
        assert_eq!("fixed:5".parse::<Dist>().ok(), Some(Dist::Fixed(5)));
        assert_eq!("7".parse::<Dist>().ok(), Some(Dist::Fixed(7)));
        assert_eq!("uniform:2:9".parse::<Dist>().ok(), Some(Dist::Uniform(2, 9)));
        assert_eq!(" normal:100:20 ".parse::<Dist>().ok(), Some(Dist::Normal(100.0, 20.0)));
        assert_eq!(
            "lognormal:100:50.5".parse::<Dist>().ok(),
            Some(Dist::LogNormal(100.0, 50.5))
        );
        for bad in [
            "",
            "fixed:0",
            "fixed:-1",
            "fixed:1.5",
            "uniform:9:2",
            "uniform:0:3",
            "uniform:3",
            "normal:1",
            "normal:10:-1",
            "normal:0:1",
            "lognormal:x:1",
            "gamma:1:2",
            "normal:nan:1",
        ] {
            assert!(bad.parse::<Dist>().is_err(), "{bad:?} parsed");
        }
        let e = "gamma:1:2".parse::<Dist>().unwrap_err().to_string();
        assert!(e.contains("`gamma:1:2`") && e.contains("expected fixed:N"), "{e}");
        let e = "uniform:x:3".parse::<Dist>().unwrap_err().to_string();
        assert!(e.contains("`x` is not a whole number"), "{e}");
        for s in ["fixed:5", "uniform:2:9", "normal:100:20", "lognormal:100:50.5"] {
            assert_eq!(s.parse::<Dist>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn distributions_sample_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!((0..100).all(|_| Dist::Fixed(42).sample(&mut rng) == 42));
        let u: Vec<u32> = (0..10_000).map(|_| Dist::Uniform(2, 9).sample(&mut rng)).collect();
        assert!(u.iter().all(|v| (2..=9).contains(v)));
        assert!(u.contains(&2) && u.contains(&9));
        assert!((0..10_000).all(|_| Dist::Normal(1.0, 100.0).sample(&mut rng) >= 1));
        let n = 40_000;
        let mean = |d: Dist, rng: &mut ChaCha8Rng| (0..n).map(|_| d.sample(rng) as f64).sum::<f64>() / n as f64;
        assert!((mean(Dist::Normal(200.0, 30.0), &mut rng) - 200.0).abs() < 2.0);
        let ln: Vec<f64> = (0..n)
            .map(|_| Dist::LogNormal(100.0, 50.0).sample(&mut rng) as f64)
            .collect();
        let m = ln.iter().sum::<f64>() / n as f64;
        let sd = (ln.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((m - 100.0).abs() < 2.5, "lognormal mean {m}");
        assert!((sd - 50.0).abs() < 5.0, "lognormal sd {sd}");
    }

    #[test]
    fn percentiles_interpolate() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 50.0), Some(50.5));
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let s = Stats::of([3.0, 1.0, f64::NAN, 2.0]).unwrap();
        assert_eq!((s.n, s.mean, s.p50, s.max), (3, 2.0, 2.0, 3.0));
        assert!(Stats::of([]).is_none());
    }

    #[test]
    fn poisson_arrivals_have_the_rate() {
        let rate = 5.0;
        let n = 10_000;
        let mut a = Arrivals::new(rate, 1);
        let gaps: Vec<f64> = (0..n).map(|_| a.gap()).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
        // Exponential: the standard deviation equals the mean.
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((sd / mean - 1.0).abs() < 0.05, "cv {}", sd / mean);
        assert!(gaps.iter().all(|g| *g > 0.0 && g.is_finite()));
        // Times are increasing; the same seed gives the same sequence, scaled by the rate.
        let t: Vec<f64> = Arrivals::new(2.0, 9).take(100).collect();
        assert!(t.windows(2).all(|w| w[1] > w[0]));
        let t2: Vec<f64> = Arrivals::new(4.0, 9).take(100).collect();
        assert!(t.iter().zip(&t2).all(|(a, b)| (a / 2.0 - b).abs() < 1e-9));
    }

    #[test]
    fn requests_are_deterministic_and_sized() {
        let text = "one two three four five six seven eight nine ten";
        let mut w = Workload::from_text(text, Dist::Uniform(5, 20), Dist::Fixed(3)).unwrap();
        w.tokens_per_word = 2.0;
        let w = Arc::new(w);
        let a: Vec<Spec> = {
            let mut g = ReqGen::new(w.clone(), 4);
            (0..50).map(|_| g.next_spec()).collect()
        };
        let mut g = ReqGen::new(w, 4);
        for s in &a {
            let b = g.next_spec();
            assert_eq!((&s.prompt, s.max_tokens, s.seed), (&b.prompt, b.max_tokens, b.seed));
            assert_eq!(s.prompt.split(' ').count() as u32, s.prompt_words);
            assert_eq!(s.prompt_words, ((s.prompt_tokens as f64 / 2.0).round() as u32).max(1));
            assert_eq!(s.max_tokens, 3);
        }
        assert!(Workload::from_text("  \n ", Dist::Fixed(1), Dist::Fixed(1)).is_err());
    }

    #[test]
    fn sse_events_split_across_chunks() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                buf.extend_from_slice(part);
                while let Some(e) = take_sse_event(&mut buf) {
                    got.push(e);
                }
            }
            assert_eq!(got, vec!["{\"a\":1}", "", "x\ny", "[DONE]"], "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn http_events_count_tokens_and_usage() {
        let live = Live::default();
        let now = Instant::now();
        let clock = Clock {
            start: now,
            measure_from: now,
            window_end: None,
        };
        let mut tr = Tracker::new(clock, &live);
        let tok = r#"{"choices":[{"index":0,"text":"","logprobs":{"tokens":["a"],"token_logprobs":[-1.0]},"finish_reason":null}]}"#;
        assert!(!http_event(tok, &mut tr).unwrap());
        assert!(!http_event(tok, &mut tr).unwrap());
        let last = r#"{"choices":[{"index":0,"text":"tail","logprobs":null,"finish_reason":"length"}]}"#;
        assert!(!http_event(last, &mut tr).unwrap());
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"mean_loops":2.5}}"#;
        assert!(!http_event(usage, &mut tr).unwrap());
        assert!(http_event("[DONE]", &mut tr).unwrap());
        assert_eq!(tr.tokens, 2);
        assert_eq!(tr.finish.as_deref(), Some("length"));
        assert_eq!(
            (tr.usage_prompt, tr.usage_completion, tr.usage_mean_loops),
            (Some(9), Some(2), Some(2.5))
        );
        assert_eq!(live.tokens.load(Ordering::Relaxed), 2);
        let err = r#"{"error":{"message":"busy","type":"overloaded_error","param":null,"code":null}}"#;
        let f = http_event(err, &mut tr).unwrap_err();
        assert_eq!(
            (f.kind.as_str(), f.message.as_str()),
            ("stream overloaded_error", "busy")
        );
        assert!(http_event("{not json", &mut tr).is_err());
    }

    fn record(
        index: u64,
        measured: bool,
        start: f64,
        end: f64,
        tokens: u32,
        in_window: u32,
        error: Option<&str>,
    ) -> RequestRecord {
        RequestRecord {
            index,
            measured,
            start_s: start,
            end_s: end,
            prompt_tokens: 10,
            prompt_words: 8,
            max_tokens: 4,
            tokens,
            tokens_in_window: in_window,
            ttft_s: Some(0.1 * (index + 1) as f64),
            tpot_s: Some(0.01),
            e2e_s: end - start,
            finish: Some("length".into()),
            usage_prompt_tokens: Some(10),
            usage_mean_loops: None,
            exit_loops: [(1, tokens / 2), (3, tokens - tokens / 2)].into_iter().collect(),
            error: error.map(str::to_string),
            error_message: error.map(|_| "details".to_string()),
        }
    }

    fn config(load: Load, duration_s: Option<f64>, requests: Option<u64>) -> PointConfig {
        PointConfig {
            target: Target {
                api: Api::Grpc,
                url: "127.0.0.1:1".into(),
                api_key: None,
                ca: None,
            },
            load,
            duration_s,
            requests,
            warmup_s: 1.0,
            workload: Arc::new(Workload::from_text("a b", Dist::Fixed(1), Dist::Fixed(1)).unwrap()),
            generation: GenSettings::default(),
            seed: 1,
            timeout_s: 10.0,
            connections: 1,
            keep_requests: false,
            progress: false,
            label: String::new(),
        }
    }

    #[test]
    fn summaries_count_the_window() {
        let now = Instant::now();
        let clock = Clock {
            start: now,
            measure_from: now + Duration::from_secs(1),
            window_end: Some(now + Duration::from_secs(11)),
        };
        let records = vec![
            record(0, false, 0.5, 1.5, 4, 2, None), // warmup request, tokens partly inside
            record(1, true, 2.0, 3.0, 4, 4, None),  // inside
            record(2, true, 4.0, 5.0, 2, 2, Some("grpc ResourceExhausted")),
            record(3, true, 10.5, 12.0, 4, 1, None), // finishes after the window
            record(4, true, 6.0, 6.5, 4, 4, Some("timeout")),
        ];
        let r = summarize(&config(Load::Rate(1.0), Some(10.0), None), clock, records, 0.002);
        assert_eq!((r.sent, r.completed, r.errors, r.warmup_requests), (4, 2, 2, 1));
        assert_eq!(r.errors_by_kind.get("timeout"), Some(&1));
        assert_eq!(r.errors_by_kind.get("grpc ResourceExhausted"), Some(&1));
        assert_eq!(r.finished_after_window, 1);
        assert!((r.window_s - 10.0).abs() < 1e-9);
        // Tokens inside the window: 2 + 4 + 2 + 1 + 4; completions inside: requests 0 and 1.
        assert!((r.output_tok_s - 1.3).abs() < 1e-9);
        assert!((r.achieved_rps - 0.2).abs() < 1e-9);
        assert!((r.sent_rps - 0.4).abs() < 1e-9);
        assert_eq!(r.loops_source, "per_token");
        // Measured requests' tokens: loop 1: 2+1+2+2, loop 3: 2+1+2+2.
        assert_eq!(r.loops_histogram, [(1, 7), (3, 7)].into_iter().collect());
        assert_eq!(r.mean_loops, Some(2.0));
        let ttft = r.ttft_ms.unwrap();
        assert_eq!(ttft.n, 2);
        assert!((ttft.p50 - 300.0).abs() < 1e-6);
        assert!(r.requests.is_empty());
        assert!((r.max_send_lag_ms - 2.0).abs() < 1e-9);
    }

    #[test]
    fn summaries_by_request_count() {
        let now = Instant::now();
        let clock = Clock {
            start: now,
            measure_from: now + Duration::from_secs(1),
            window_end: None,
        };
        let records = vec![
            record(0, true, 1.0, 2.0, 4, 4, None),
            record(1, true, 2.0, 5.0, 4, 4, None),
        ];
        let mut cfg = config(Load::Concurrency(2), None, Some(2));
        cfg.keep_requests = true;
        let r = summarize(&cfg, clock, records, 0.0);
        assert!((r.window_s - 4.0).abs() < 1e-9);
        assert!((r.achieved_rps - 0.5).abs() < 1e-9);
        assert!((r.output_tok_s - 2.0).abs() < 1e-9);
        assert_eq!(r.requests.len(), 2);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["load"], json!({"concurrency": 2}));
        let back: PointResult = serde_json::from_value(json).unwrap();
        assert_eq!(back.loops_histogram, r.loops_histogram);
    }

    #[test]
    fn plots_are_well_formed_svg() {
        let now = Instant::now();
        let clock = Clock {
            start: now,
            measure_from: now + Duration::from_secs(1),
            window_end: Some(now + Duration::from_secs(11)),
        };
        let points: Vec<PointResult> = [1.0, 2.0, 4.0]
            .iter()
            .map(|&rate| {
                let records = vec![
                    record(1, true, 2.0, 3.0, 4, 4, None),
                    record(2, true, 2.0, 3.5, 6, 6, None),
                ];
                summarize(&config(Load::Rate(rate), Some(10.0), None), clock, records, 0.0)
            })
            .collect();
        for x in [PlotX::Throughput, PlotX::Load] {
            for (path, svg) in plots(&points, x, Path::new("/tmp/out/bench")).unwrap() {
                plot::tests::check_well_formed(&svg).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(path.to_string_lossy().ends_with(".svg"));
            }
        }
        assert_eq!(plots(&points, PlotX::Load, Path::new("p")).unwrap().len(), 2);
        // No per-token loops: no exits plot, still a latency plot.
        assert_eq!(plots(&[], PlotX::Load, Path::new("p")).unwrap().len(), 1);
        plot::tests::check_well_formed(&latency_svg(&[], PlotX::Throughput).unwrap()).unwrap();
    }

    /// A coordinator in front of one fake node (no model: 2 ms per token, exit loops cycling
    /// 1, 2, 3), on loopback ports; returns the gRPC and HTTP addresses.
    async fn fake_cluster() -> (
        std::net::SocketAddr,
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
    ) {
        use rrt_coordinator::registry::NodeSource;
        use rrt_coordinator::server::{self, Discovery};
        use rrt_proto::v1::node as pb;
        let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node_addr = node.local_addr().unwrap().to_string();
        let svc = rrt_node::fake::FakeNode::new("fake-0", Duration::from_millis(2), 3, Instant::now());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::node_server::NodeServer::new(svc))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(node)),
        );
        let discovery = Discovery {
            sources: vec![NodeSource::Static(node_addr)],
            poll_interval: Duration::from_millis(500),
        };
        let coord = server::start(&discovery, Default::default()).await;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server::serve(coord, discovery, grpc, http, async move {
            let _ = stop_rx.await;
        }));
        (addrs.0, addrs.1, stop_tx)
    }

    #[test]
    fn load_points_against_fake_nodes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (grpc, http, stop) = fake_cluster().await;
            let text = "the quick brown fox jumps over the lazy dog again and again";
            let mut cfg = config(Load::Concurrency(4), None, Some(12));
            cfg.warmup_s = 0.0;
            cfg.target.url = format!("http://{grpc}");
            let mut w = Workload::from_text(text, Dist::Uniform(4, 40), Dist::Fixed(5)).unwrap();
            // The fake node's tokenizer: one token per byte.
            let tpw = calibrate_tokens_per_word(&cfg.target, "", &w.words).await.unwrap();
            assert!(tpw > 3.0 && tpw < 7.0, "tokens per word {tpw}");
            w.tokens_per_word = tpw;
            cfg.workload = Arc::new(w);

            // gRPC, closed loop, by request count.
            let r = run_point(&cfg).await.unwrap();
            assert_eq!(
                (r.sent, r.completed, r.errors, r.short_outputs),
                (12, 12, 0, 0),
                "{r:?}"
            );
            assert_eq!(r.output_tokens_mean, Some(5.0));
            assert_eq!(r.loops_source, "per_token");
            assert_eq!(r.loops_histogram, [(1, 24), (2, 24), (3, 12)].into_iter().collect());
            let tpot = r.tpot_ms.as_ref().unwrap();
            assert!(tpot.p50 > 0.0 && tpot.p50 < 500.0, "{tpot:?}");
            assert!(r.ttft_ms.as_ref().unwrap().n == 12 && r.output_tok_s > 0.0);

            // HTTP, open loop, for a duration (with a warmup).
            cfg.target.api = Api::Http;
            cfg.target.url = format!("http://{http}");
            cfg.load = Load::Rate(40.0);
            cfg.requests = None;
            cfg.duration_s = Some(0.5);
            cfg.warmup_s = 0.2;
            cfg.keep_requests = true;
            let r = run_point(&cfg).await.unwrap();
            assert!(r.sent > 5 && r.completed == r.sent && r.errors == 0, "{r:?}");
            assert!(r.warmup_requests > 0);
            assert!(
                r.requests
                    .iter()
                    .all(|q| q.tokens == 5 && q.finish.as_deref() == Some("length"))
            );
            assert_eq!(r.loops_source, "usage");
            assert!(
                r.mean_loops.is_some_and(|m| (1.0..=3.0).contains(&m)),
                "{:?}",
                r.mean_loops
            );
            assert!(r.prompt_tokens_mean.is_some_and(|p| p > 0.0));

            // Requests that cannot finish in time are counted as timeouts.
            cfg.load = Load::Concurrency(2);
            cfg.duration_s = None;
            cfg.requests = Some(2);
            cfg.warmup_s = 0.0;
            cfg.timeout_s = 0.05;
            cfg.workload = Arc::new(Workload {
                output_tokens: Dist::Fixed(200),
                ..(*cfg.workload).clone()
            });
            let r = run_point(&cfg).await.unwrap();
            assert_eq!((r.completed, r.errors), (0, 2));
            assert_eq!(r.errors_by_kind.get("timeout"), Some(&2));

            // Nothing listening: an error for the point, not a hang.
            cfg.target.api = Api::Grpc;
            cfg.target.url = "http://127.0.0.1:1".into();
            assert!(run_point(&cfg).await.is_err());
            let _ = stop.send(());
        });
    }

    #[test]
    fn targets_build_urls() {
        let t = |u: &str| Target {
            api: Api::Http,
            url: u.into(),
            api_key: None,
            ca: None,
        };
        assert_eq!(
            t("127.0.0.1:8080").completions_url(),
            "http://127.0.0.1:8080/v1/completions"
        );
        assert_eq!(t("http://h:1/").completions_url(), "http://h:1/v1/completions");
        assert_eq!(t("http://h:1/v1").completions_url(), "http://h:1/v1/completions");
    }
}
