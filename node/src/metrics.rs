//! The node's Prometheus metrics (`GET /metrics` on `node.metrics_listen`), read from the
//! engine at scrape time: queue and running requests, rows in flight per loop depth, KV
//! usage, tokens and exits per loop, prefill positions, KV moves, pass counts and times, and
//! the span exporter's counters. Names follow vLLM / TGI with the `rrt_` prefix; counters end
//! in `_total`.

use crate::grpc::NodeService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Depth {
    depth: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLoop {
    exit_loop: u32,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

/// The exposition text of the node's metrics now.
pub async fn render(service: &NodeService) -> Result<String, crate::engine_actor::ActorError> {
    let (l, st) = service.snapshot().await?;
    let mut r = Registry::default();
    gauge(
        &mut r,
        "rrt_requests_waiting",
        "Requests holding no KV yet (queued or preempted)",
        l.waiting_requests as f64,
    );
    gauge(
        &mut r,
        "rrt_requests_running",
        "Requests holding KV",
        l.running_requests as f64,
    );
    gauge(
        &mut r,
        "rrt_waiting_tokens",
        "Prompt and decode tokens waiting to enter loop 0",
        l.waiting_tokens as f64,
    );
    let rows = Family::<Depth, Gauge>::default();
    for (d, &n) in l.rows_per_depth.iter().enumerate() {
        rows.get_or_create(&Depth { depth: d as u32 }).set(n as i64);
    }
    r.register(
        "rrt_rows_in_flight",
        "Rows carried to the next pass, by loop depth",
        rows,
    );
    let total = l.total_kv_blocks.max(1) as f64;
    gauge(
        &mut r,
        "rrt_kv_cache_usage_ratio",
        "Fraction of KV blocks in use",
        1.0 - l.free_kv_blocks as f64 / total,
    );
    gauge(
        &mut r,
        "rrt_kv_blocks",
        "KV blocks in the pool",
        l.total_kv_blocks as f64,
    );
    gauge(
        &mut r,
        "rrt_draining",
        "1 while the node drains",
        if l.draining { 1.0 } else { 0.0 },
    );
    gauge(
        &mut r,
        "rrt_recent_tokens_per_second",
        "Output tokens per second over the last seconds",
        l.recent_tokens_per_second as f64,
    );
    counter(&mut r, "rrt_node_requests", "Requests accepted", l.requests_total);
    counter(
        &mut r,
        "rrt_node_cancellations",
        "Requests cancelled (Cancel or caller gone)",
        l.cancelled_total,
    );
    counter(&mut r, "rrt_generation_tokens", "Output tokens produced", st.tokens);
    counter(
        &mut r,
        "rrt_prefill_tokens",
        "Positions computed from prompts (or replays, or after preemption)",
        st.prefill_tokens,
    );
    counter(
        &mut r,
        "rrt_preemptions",
        "Sequences preempted (their KV freed, recomputed later)",
        st.preemptions,
    );
    counter(
        &mut r,
        "rrt_kv_imports",
        "Requests taken over with their keys/values",
        st.kv_imports,
    );
    counter(
        &mut r,
        "rrt_kv_exports",
        "Requests handed off with their keys/values",
        st.kv_exports,
    );
    counter(
        &mut r,
        "rrt_kv_import_fallbacks",
        "Imports recomputed for lack of room",
        st.kv_import_fallbacks,
    );
    counter(
        &mut r,
        "rrt_prefix_cache_hits",
        "Requests whose prompt started from the prefix cache",
        st.prefix_hits,
    );
    counter(
        &mut r,
        "rrt_prefix_cache_hit_tokens",
        "Prompt positions the prefix cache gave requests (not prefilled)",
        st.prefix_hit_tokens,
    );
    counter(&mut r, "rrt_engine_passes", "Passes of the shared block", st.passes);
    counter(
        &mut r,
        "rrt_engine_rows",
        "Rows through the shared block (tokens x loops)",
        st.rows,
    );
    counter(
        &mut r,
        "rrt_engine_fill_rows",
        "KV-only fill rows of early-exited tokens",
        st.fill_rows,
    );
    counter(
        &mut r,
        "rrt_engine_prompt_exits",
        "Prompt rows that left before the last loop (node.prompt_exits)",
        st.prompt_exits,
    );
    counter(&mut r, "rrt_engine_head_rows", "Rows through the LM head", st.head_rows);
    gauge(
        &mut r,
        "rrt_engine_pass_seconds_total",
        "Seconds in passes of the shared block",
        st.pass_seconds,
    );
    gauge(
        &mut r,
        "rrt_engine_head_seconds_total",
        "Seconds in the LM head",
        st.head_seconds,
    );
    let exits = Family::<ExitLoop, Counter>::default();
    for (i, &n) in st.exits.iter().enumerate() {
        exits
            .get_or_create(&ExitLoop {
                exit_loop: i as u32 + 1,
            })
            .inc_by(n);
    }
    r.register("rrt_token_exits", "Output tokens by the loop they exited after", exits);
    let t = rrt_telemetry::counters();
    counter(&mut r, "rrt_trace_spans_exported", "Spans exported", t.exported);
    counter(
        &mut r,
        "rrt_trace_spans_dropped",
        "Spans dropped because the export queue was full",
        t.dropped,
    );
    counter(
        &mut r,
        "rrt_trace_spans_failed",
        "Spans lost in failed exports",
        t.failed,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    Ok(out)
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: NodeService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let service = service.clone();
                async move {
                    match render(&service).await {
                        Ok(text) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                            .into_response(),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
                    }
                }
            }),
        )
        .route("/health", axum::routing::get(|| async { "ok" }));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
