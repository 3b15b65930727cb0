//! Tracing for rrt: `tracing` spans become OpenTelemetry spans (tracing-opentelemetry), sent
//! by OTLP/gRPC to a collector and/or written as JSON lines to a file, and W3C trace context
//! (`traceparent`, `tracestate`) travels over gRPC metadata and HTTP headers.
//!
//! Serving never waits for telemetry: ended spans go into a bounded queue (`queue` spans);
//! when it is full the span is dropped and counted ([`counters`]); one background thread
//! batches the queue to the exporters. Logs keep going to stderr (`RRT_LOG` filter) whatever
//! the exporters do.
//!
//! Span names and attributes (what `rrt capacity` reads back):
//! - `request` (coordinator): `request_id`, `node`, `queue_ms`, `migrations`, `prompt_tokens`,
//!   `tokens`, `finish_reason`, `mean_loops`;
//! - `node.request` (node, child of `request` through the propagated context): `request_id`,
//!   `prompt_tokens`, `kv_import`, `tokens`, `loops`, `finish_reason`; children `admission`,
//!   `prefill`, `decode`;
//! - `engine.step` (node): `rows`, `rows_per_depth`, `fill_rows`, `head_rows`, `ctx`
//!   (attended positions summed over rows), `tokens`, `exits_per_loop`, `step_ms`, linked
//!   (follows-from) to the `node.request` span of every request with a row in the step.

mod file;
pub mod propagate;

/// The span names and attribute keys above, as constants: the code that records them (the
/// engine, the node, the coordinator) and the code that reads them back (`rrt capacity`) name
/// them through these, so a rename cannot break the planner silently. `tracing`'s span macros
/// declare fields by identifier; a test in the node crate checks that the declared fields of
/// each span include every key listed here.
pub mod span_fields {
    /// `engine.step`: one pass of the engine.
    pub mod step {
        pub const NAME: &str = "engine.step";
        /// The served model's name (empty: unnamed).
        pub const MODEL: &str = "model";
        pub const ROWS: &str = "rows";
        pub const ROWS_PER_DEPTH: &str = "rows_per_depth";
        pub const FILL_ROWS: &str = "fill_rows";
        pub const HEAD_ROWS: &str = "head_rows";
        pub const CTX: &str = "ctx";
        pub const TOKENS: &str = "tokens";
        pub const EXITS_PER_LOOP: &str = "exits_per_loop";
        pub const STEP_MS: &str = "step_ms";
        pub const ALL: [&str; 9] = [
            MODEL,
            ROWS,
            ROWS_PER_DEPTH,
            FILL_ROWS,
            HEAD_ROWS,
            CTX,
            TOKENS,
            EXITS_PER_LOOP,
            STEP_MS,
        ];
    }
    /// `request`: the coordinator's span of one request.
    pub mod request {
        pub const NAME: &str = "request";
        pub const MODEL: &str = "model";
        pub const PROMPT_TOKENS: &str = "prompt_tokens";
        pub const TOKENS: &str = "tokens";
    }
    /// `node.request`: a node's span of one request.
    pub mod node_request {
        pub const NAME: &str = "node.request";
        pub const MODEL: &str = "model";
        pub const PROMPT_TOKENS: &str = "prompt_tokens";
        pub const GENERATED: &str = "generated";
        pub const TOKENS: &str = "tokens";
    }
    /// `node.start`: a node's scheduling settings, once at start.
    pub mod node_start {
        pub const NAME: &str = "node.start";
        pub const MODEL: &str = "model";
        pub const LOOPS: &str = "loops";
        pub const KV_BLOCKS: &str = "kv_blocks";
        pub const BLOCK_SIZE: &str = "block_size";
        pub const MAX_STEP_ROWS: &str = "max_step_rows";
        pub const MAX_RUNNING: &str = "max_running";
    }
}

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanProcessor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, mpsc};
use std::time::Duration;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The `telemetry.*` configuration keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector endpoint (e.g. `http://otel-collector:4317`); none: no OTLP.
    pub otlp_endpoint: Option<String>,
    /// JSON-lines span file (one span per line; what `rrt capacity` reads); none: no file.
    pub file: Option<PathBuf>,
    /// Fraction of new traces recorded (a sampled parent's decision is followed).
    pub sample_ratio: f64,
    /// Ended spans waiting for export; past it spans are dropped (and counted).
    pub queue: usize,
    /// `service.name` of the exported spans (default: the command, e.g. `rrt-node`).
    pub service_name: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            file: None,
            sample_ratio: 1.0,
            queue: 8192,
            service_name: None,
        }
    }
}

impl TelemetryConfig {
    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some() || self.file.is_some()
    }

    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(TelemetryError::Config(format!(
                "`telemetry.sample_ratio` must be in [0, 1], not {}",
                self.sample_ratio
            )));
        }
        if self.queue == 0 {
            return Err(TelemetryError::Config("`telemetry.queue` must be at least 1".into()));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(TelemetryError::Config(format!(
                "`telemetry.otlp_endpoint`: `{e}` is not an http:// or https:// URL"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("telemetry: {0}")]
    Setup(String),
}

/// Span counters since start: exported, dropped because the queue was full, lost in a failed
/// export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub exported: u64,
    pub dropped: u64,
    pub failed: u64,
}

static EXPORTED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// The span counters of this process (for `/metrics`).
pub fn counters() -> Counters {
    Counters {
        exported: EXPORTED.load(Ordering::Relaxed),
        dropped: DROPPED.load(Ordering::Relaxed),
        failed: FAILED.load(Ordering::Relaxed),
    }
}

/// Keeps the exporters running; dropping it flushes what is queued (bounded wait).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs to stderr filtered by `RRT_LOG` (default
/// `default_log`), and, when `cfg` names an exporter, the rrt crates' spans to it.
pub fn init(cfg: &TelemetryConfig, service: &str, default_log: &str) -> Result<Telemetry, TelemetryError> {
    cfg.validate()?;
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::try_from_env("RRT_LOG").unwrap_or_else(|_| default_log.into()));
    if !cfg.enabled() {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry { provider: None });
    }
    let provider = provider(cfg, service)?;
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("rrt"))
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("rrt_coordinator", tracing::Level::INFO)
                .with_target("rrt_node", tracing::Level::INFO),
        );
    let _ = tracing_subscriber::registry().with(logs).with(spans).try_init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// A tracer provider exporting through the bounded queue (also for tests that install their
/// own subscriber).
pub fn provider(cfg: &TelemetryConfig, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let processor = QueueProcessor::start(cfg)?;
    let name = cfg.service_name.clone().unwrap_or_else(|| service.to_string());
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_max_links_per_span(256)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}

enum Msg {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
    Stop(SyncSender<()>),
}

/// Ended spans into a bounded channel; a thread exports them in batches.
#[derive(Debug)]
struct QueueProcessor {
    tx: SyncSender<Msg>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Spans per export call.
const BATCH: usize = 512;

impl QueueProcessor {
    fn start(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let file = match &cfg.file {
            Some(p) => Some(
                file::JsonLines::create(p)
                    .map_err(|e| TelemetryError::Setup(format!("`telemetry.file` {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let endpoint = cfg.otlp_endpoint.clone();
        let thread = std::thread::Builder::new()
            .name("rrt-telemetry".into())
            .spawn(move || export_loop(rx, endpoint, file))
            .map_err(|e| TelemetryError::Setup(e.to_string()))?;
        Ok(Self {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn round_trip(&self, make: fn(SyncSender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = mpsc::sync_channel(1);
        self.tx
            .send(make(done))
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(timeout)
            .map_err(|_| opentelemetry_sdk::error::OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.round_trip(Msg::Flush, Duration::from_secs(10))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let r = self.round_trip(Msg::Stop, timeout);
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
        r
    }
}

fn export_loop(rx: Receiver<Msg>, endpoint: Option<String>, mut file: Option<file::JsonLines>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rrt telemetry: no runtime for the exporter: {e}");
            return;
        }
    };
    let otlp = endpoint.and_then(|e| {
        use opentelemetry_otlp::WithExportConfig;
        let built = rt.block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(e.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
        });
        match built {
            Ok(x) => Some(x),
            Err(err) => {
                eprintln!("rrt telemetry: OTLP exporter for {e}: {err}");
                None
            }
        }
    });
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    let mut flush = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let mut ok = true;
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write(batch)
        {
            tracing::warn!(error = %e, "writing the span file failed");
            ok = false;
        }
        if let Some(x) = &otlp {
            use opentelemetry_sdk::trace::SpanExporter as _;
            if let Err(e) = rt.block_on(x.export(std::mem::take(batch))) {
                tracing::warn!(error = %e, "OTLP export failed");
                ok = false;
            }
        }
        batch.clear();
        if ok {
            EXPORTED.fetch_add(n, Ordering::Relaxed);
        } else {
            FAILED.fetch_add(n, Ordering::Relaxed);
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                if batch.len() >= BATCH {
                    flush(&mut batch);
                }
            }
            Ok(Msg::Flush(done)) => {
                while let Ok(Msg::Span(s)) = rx.try_recv() {
                    batch.push(*s);
                }
                flush(&mut batch);
                let _ = done.send(());
            }
            Ok(Msg::Stop(done)) => {
                while let Ok(Msg::Span(s)) = rx.try_recv() {
                    batch.push(*s);
                }
                flush(&mut batch);
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => flush(&mut batch),
            Err(RecvTimeoutError::Disconnected) => {
                flush(&mut batch);
                return;
            }
        }
    }
}
