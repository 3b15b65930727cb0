//! Telemetry of the cluster as processes: a request's trace, received by an OTLP endpoint this
//! test runs, holds the coordinator's `request` span (a child of the caller's span, whose W3C
//! context came in gRPC metadata or an HTTP header), the node's `node.request` span (a child of
//! it, the context carried in the node call's metadata) with its `admission`, `prefill` and
//! `decode` children, and `engine.step` spans linked (follows-from) to `node.request`. The
//! coordinator's and the node's `/metrics` expose every metric and their counts move with
//! traffic.

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use rrt_proto::v1 as api;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Any> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn int(s: &Span, key: &str) -> i64 {
    match attr(s, key) {
        Some(Any::IntValue(i)) => *i,
        other => panic!("span {} attribute {key}: {other:?}", s.name),
    }
}

/// The value of the first sample of `name` in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

const TRACE_GRPC: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACE_HTTP: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_follow_a_request() {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (_node, nl) = spawn(&[
        "node",
        "--listen",
        "127.0.0.1:0",
        "--kv-mib",
        "64",
        "--metrics-listen",
        "127.0.0.1:0",
        "--otlp-endpoint",
        &otlp,
    ]);
    let node = word_after(&nl, " listening on ").to_string();
    let node_metrics = word_after(&nl, "metrics on ").to_string();
    let (_coord, cl) = spawn(&[
        "coordinator",
        "--nodes",
        &node,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--otlp-endpoint",
        &otlp,
    ]);
    let grpc = format!("http://{}", word_after(&cl, "gRPC on "));
    let http = word_after(&cl, "OpenAI HTTP on ").to_string();

    let scrape = |url: String| async move { reqwest::get(url).await.unwrap().text().await.unwrap() };
    let coord_before = scrape(format!("{http}/metrics")).await;
    let node_before = scrape(node_metrics.clone()).await;

    // gRPC with the caller's trace context in metadata.
    let mut client = api::generation_client::GenerationClient::connect(grpc).await.unwrap();
    let mut req = tonic::Request::new(api::GenerateRequest {
        input: Some(api::generate_request::Input::Prompt("The quick brown fox".into())),
        max_new_tokens: Some(8),
        ignore_eos: true,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", format!("00-{TRACE_GRPC}-{CALLER}-01").parse().unwrap());
    let out = client.generate(req).await.unwrap().into_inner();
    assert_eq!(out.token_ids.len(), 8);
    // HTTP with the context in a header.
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .header("traceparent", format!("00-{TRACE_HTTP}-{CALLER}-01"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The spans arrive within the exporter's batching interval.
    let t = Instant::now();
    let spans = loop {
        let spans = sink.0.lock().unwrap().clone();
        let of = |trace: &str, name: &str| spans.iter().any(|s| hex(&s.trace_id) == trace && s.name == name);
        let steps_linked = spans
            .iter()
            .any(|s| s.name == "engine.step" && s.links.iter().any(|l| hex(&l.trace_id) == TRACE_GRPC));
        if of(TRACE_GRPC, "request") && of(TRACE_GRPC, "decode") && of(TRACE_HTTP, "node.request") && steps_linked {
            break spans;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "spans missing after 20 s: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let one = |trace: &str, name: &str| -> &Span {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace && s.name == name)
            .collect();
        assert_eq!(found.len(), 1, "{name} spans of trace {trace}: {found:#?}");
        found[0]
    };
    for trace in [TRACE_GRPC, TRACE_HTTP] {
        let request = one(trace, "request");
        assert_eq!(hex(&request.parent_span_id), CALLER, "the caller's span is the parent");
        assert_eq!(int(request, "tokens"), 8);
        assert!(int(request, "prompt_tokens") > 0);
        assert!(matches!(attr(request, "finish_reason"), Some(Any::StringValue(s)) if s == "length"));
        assert!(matches!(attr(request, "node"), Some(Any::StringValue(s)) if s.contains(&node)));
        assert!(matches!(attr(request, "mean_loops"), Some(Any::DoubleValue(l)) if *l >= 1.0));
        let node_req = one(trace, "node.request");
        assert_eq!(
            node_req.parent_span_id, request.span_id,
            "node.request is a child of request"
        );
        assert_eq!(int(node_req, "tokens"), 8);
        for phase in ["admission", "prefill", "decode"] {
            assert_eq!(one(trace, phase).parent_span_id, node_req.span_id, "{phase}");
        }
        let steps: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == "engine.step" && s.links.iter().any(|l| l.span_id == node_req.span_id))
            .collect();
        // At least one step per generated token (the B = 1 model decodes each in one pass).
        assert!(steps.len() >= 8, "{} steps linked to {trace}", steps.len());
        for s in &steps {
            assert!(int(s, "rows") >= 1);
            assert!(int(s, "ctx") >= 1);
            assert!(matches!(attr(s, "step_ms"), Some(Any::DoubleValue(ms)) if *ms > 0.0));
        }
        let produced: i64 = steps.iter().map(|s| int(s, "tokens")).sum();
        assert!(produced >= 8, "steps produced {produced} tokens");
    }

    // Metrics: every name present, counts moved by the two requests.
    let coord_after = scrape(format!("{http}/metrics")).await;
    for name in [
        "rrt_requests_total",
        "rrt_requests_running",
        "rrt_requests_waiting",
        "rrt_prompt_tokens_total",
        "rrt_generation_tokens_total",
        "rrt_token_exits_total",
        "rrt_time_to_first_token_seconds_bucket",
        "rrt_time_per_output_token_seconds_bucket",
        "rrt_e2e_request_latency_seconds_bucket",
        "rrt_migrations_total",
        "rrt_nodes_healthy",
        "rrt_rows_in_flight",
        "rrt_kv_cache_usage_ratio",
        "rrt_nodes_waiting_tokens",
        "rrt_trace_spans_exported_total",
        "rrt_trace_spans_dropped_total",
    ] {
        assert!(
            coord_after.lines().any(|l| l.starts_with(name)),
            "coordinator /metrics lacks {name}:\n{coord_after}"
        );
    }
    let moved = |before: &str, after: &str, name: &str| {
        sample(after, name)
            - before
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.parse::<f64>().unwrap())
                .unwrap_or(0.0)
    };
    assert_eq!(moved(&coord_before, &coord_after, "rrt_generation_tokens_total"), 16.0);
    assert_eq!(
        moved(&coord_before, &coord_after, "rrt_time_to_first_token_seconds_count"),
        2.0
    );
    assert!(
        coord_after.contains("rrt_requests_total{outcome=\"length\"} 2"),
        "{coord_after}"
    );
    // A rejected request counts by reason.
    let bad = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .json(&json!({"prompt": "", "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let coord_bad = scrape(format!("{http}/metrics")).await;
    assert_eq!(
        sample(&coord_bad, "rrt_rejections_total{reason=\"invalid\"}"),
        1.0,
        "{coord_bad}"
    );

    let node_after = scrape(node_metrics).await;
    for name in [
        "rrt_requests_waiting",
        "rrt_requests_running",
        "rrt_waiting_tokens",
        "rrt_rows_in_flight",
        "rrt_kv_cache_usage_ratio",
        "rrt_node_requests_total",
        "rrt_node_cancellations_total",
        "rrt_generation_tokens_total",
        "rrt_prefill_tokens_total",
        "rrt_preemptions_total",
        "rrt_kv_imports_total",
        "rrt_kv_exports_total",
        "rrt_engine_passes_total",
        "rrt_engine_rows_total",
        "rrt_token_exits_total",
        "rrt_trace_spans_exported_total",
        "rrt_trace_spans_dropped_total",
    ] {
        assert!(
            node_after.lines().any(|l| l.starts_with(name)),
            "node /metrics lacks {name}:\n{node_after}"
        );
    }
    assert_eq!(moved(&node_before, &node_after, "rrt_generation_tokens_total"), 16.0);
    assert_eq!(moved(&node_before, &node_after, "rrt_node_requests_total"), 2.0);
    assert!(sample(&node_after, "rrt_engine_passes_total") >= 16.0);
    assert_eq!(sample(&node_after, "rrt_trace_spans_dropped_total"), 0.0);
}
