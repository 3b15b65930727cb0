//! The JSON-lines span file: one object per span, for offline analysis (`rrt capacity`).
//!
//! `{"name", "trace_id", "span_id", "parent_span_id", "start_ns", "end_ns", "service",
//! "attributes": {..}, "links": [{"trace_id", "span_id"}]}` (ids in hex, times in Unix
//! nanoseconds, attribute values as JSON numbers, strings or booleans).

use opentelemetry::Value;
use opentelemetry_sdk::trace::SpanData;
use serde_json::{Map, json};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct JsonLines {
    out: std::io::BufWriter<std::fs::File>,
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn value(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => json!(b),
        Value::I64(i) => json!(i),
        Value::F64(f) => json!(f),
        Value::String(s) => json!(s.as_str()),
        other => json!(other.to_string()),
    }
}

impl JsonLines {
    /// Appends to `path` (created if missing).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            out: std::io::BufWriter::new(f),
        })
    }

    pub fn write(&mut self, spans: &[SpanData]) -> std::io::Result<()> {
        for s in spans {
            let attributes: Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|kv| (kv.key.as_str().to_string(), value(&kv.value)))
                .collect();
            let links: Vec<serde_json::Value> = s
                .links
                .iter()
                .map(|l| {
                    json!({
                        "trace_id": l.span_context.trace_id().to_string(),
                        "span_id": l.span_context.span_id().to_string(),
                    })
                })
                .collect();
            let line = json!({
                "name": s.name.as_ref(),
                "trace_id": s.span_context.trace_id().to_string(),
                "span_id": s.span_context.span_id().to_string(),
                "parent_span_id": s.parent_span_id.to_string(),
                "start_ns": ns(s.start_time),
                "end_ns": ns(s.end_time),
                "attributes": attributes,
                "links": links,
            });
            serde_json::to_writer(&mut self.out, &line)?;
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }
}
