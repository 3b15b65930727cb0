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
    /// length, stop, eos, cancelled, error, rejected.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLoop {
    pub exit_loop: u32,
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
        }
    }
}

impl Metrics {
    pub fn outcome(&self, outcome: &str) {
        self.requests
            .get_or_create(&Outcome {
                outcome: outcome.into(),
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
