//! Prometheus metrics of the coordinator (`GET /metrics`), named like vLLM's and TGI's with
//! the `rrt_` prefix. Issue F extends them (per-loop exits, migrations, node-side metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// length, stop, eos, cancelled, deadline, error, rejected ([`crate::core::Outcome`]).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// invalid, model_not_found, unavailable, overloaded, deadline, duplicate_id,
    /// unauthenticated, internal.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Depth {
    pub depth: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLoop {
    pub exit_loop: u32,
}

/// The span exporter's counters, read at scrape time.
#[derive(Debug)]
struct SpanCounters;

impl prometheus_client::collector::Collector for SpanCounters {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        let c = rrt_telemetry::counters();
        for (name, help, v) in [
            ("rrt_trace_spans_exported", "Spans exported", c.exported),
            (
                "rrt_trace_spans_dropped",
                "Spans dropped because the export queue was full",
                c.dropped,
            ),
            ("rrt_trace_spans_failed", "Spans lost in failed exports", c.failed),
        ] {
            let counter = ConstCounter::new(v);
            let m = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(m)?;
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Outcome, Counter>,
    pub running: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub token_exits: Family<ExitLoop, Counter>,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
    pub healthy_nodes: Gauge,
    pub nodes: Gauge,
    pub migrations: Counter,
    /// Requests admitted that have not streamed their first token yet.
    pub queued: Gauge,
    pub rejections: Family<Reason, Counter>,
    /// Over the healthy nodes, from their last load reports.
    pub node_waiting_tokens: Gauge,
    pub rows_in_flight: Family<Depth, Gauge>,
    pub kv_usage: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        let running = Gauge::default();
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        let token_exits = Family::<ExitLoop, Counter>::default();
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let time_per_output_token = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let e2e_latency = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let healthy_nodes = Gauge::default();
        let nodes = Gauge::default();
        let migrations = Counter::default();
        let queued = Gauge::default();
        let rejections = Family::<Reason, Counter>::default();
        let node_waiting_tokens = Gauge::default();
        let rows_in_flight = Family::<Depth, Gauge>::default();
        let kv_usage = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_collector(Box::new(SpanCounters));
        registry.register(
            "rrt_requests_waiting",
            "Requests admitted that have not streamed their first token yet (the queue)",
            queued.clone(),
        );
        registry.register(
            "rrt_rejections",
            "Requests refused before reaching a node, by reason",
            rejections.clone(),
        );
        registry.register(
            "rrt_nodes_waiting_tokens",
            "Prompt and decode tokens waiting on the nodes (last load reports)",
            node_waiting_tokens.clone(),
        );
        registry.register(
            "rrt_rows_in_flight",
            "Rows in flight on the nodes by loop depth (last load reports)",
            rows_in_flight.clone(),
        );
        registry.register(
            "rrt_kv_cache_usage_ratio",
            "Fraction of the nodes' KV blocks in use (last load reports)",
            kv_usage.clone(),
        );
        registry.register(
            "rrt_migrations",
            "Requests moved to another node after theirs failed",
            migrations.clone(),
        );
        registry.register("rrt_requests", "Requests finished, by outcome", requests.clone());
        registry.register("rrt_requests_running", "Requests streaming now", running.clone());
        registry.register(
            "rrt_prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        registry.register("rrt_generation_tokens", "Tokens generated", generation_tokens.clone());
        registry.register(
            "rrt_token_exits",
            "Generated tokens by the loop they exited at",
            token_exits.clone(),
        );
        registry.register(
            "rrt_time_to_first_token_seconds",
            "Time from arrival to the first token",
            time_to_first_token.clone(),
        );
        registry.register(
            "rrt_time_per_output_token_seconds",
            "Time between consecutive tokens of a request",
            time_per_output_token.clone(),
        );
        registry.register(
            "rrt_e2e_request_latency_seconds",
            "Time from arrival to the last token",
            e2e_latency.clone(),
        );
        registry.register("rrt_nodes_healthy", "Nodes answering load polls", healthy_nodes.clone());
        registry.register("rrt_nodes", "Nodes known to the registry", nodes.clone());
        Self {
            registry,
            requests,
            running,
            prompt_tokens,
            generation_tokens,
            token_exits,
            time_to_first_token,
            time_per_output_token,
            e2e_latency,
            healthy_nodes,
            nodes,
            migrations,
            queued,
            rejections,
            node_waiting_tokens,
            rows_in_flight,
            kv_usage,
        }
    }
}

impl Metrics {
    /// Counts a request refused before reaching a node.
    pub fn rejected(&self, e: &crate::error::CoordError) {
        use crate::error::CoordError as E;
        let reason = match e {
            E::InvalidArgument { .. } => "invalid",
            E::ModelNotFound { .. } => "model_not_found",
            E::Unavailable(_) | E::Node { .. } => "unavailable",
            E::Overloaded { .. } => "overloaded",
            E::DeadlineExceeded(_) => "deadline",
            E::AlreadyExists(_) => "duplicate_id",
            E::Unauthenticated => "unauthenticated",
            E::Internal(_) => "internal",
        };
        self.rejections.get_or_create(&Reason { reason: reason.into() }).inc();
    }

    pub fn outcome(&self, outcome: crate::core::Outcome) {
        self.requests
            .get_or_create(&Outcome {
                outcome: outcome.label().into(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("writing to a String");
        s
    }
}
