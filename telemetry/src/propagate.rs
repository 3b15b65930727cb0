//! W3C trace context across processes: a span's context into gRPC metadata (coordinator ->
//! node), and the caller's context out of gRPC metadata or HTTP headers (client ->
//! coordinator, coordinator -> node). Without an installed exporter nothing is injected.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace-context headers of an incoming request, kept as plain strings so that the
/// coordinator's core stays free of HTTP and gRPC types.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// From HTTP headers.
    pub fn from_http(h: &http::HeaderMap) -> Self {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }

    /// From gRPC metadata.
    pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Self {
        let get = |k: &str| m.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }

    /// Makes `span` a child of the caller's span (when the headers carry one).
    pub fn set_parent_of(&self, span: &tracing::Span) {
        if self.traceparent.is_none() {
            return;
        }
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(self));
        let _ = span.set_parent(cx);
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut k = Vec::new();
        if self.traceparent.is_some() {
            k.push("traceparent");
        }
        if self.tracestate.is_some() {
            k.push("tracestate");
        }
        k
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Puts `span`'s context into outgoing gRPC metadata.
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}
