//! The spans `rrt capacity` reads back declare every attribute it reads
//! (`rrt_telemetry::span_fields`): a field renamed in a span macro but not in the constants
//! (or the other way round) fails here instead of silently emptying the planner's input.

mod common;

use common::*;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::{EngineConfig, GenParams, Request};
use rrt_telemetry::span_fields::step;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// Records the declared field names of every new span, by span name.
#[derive(Clone, Default)]
struct Fields(Arc<Mutex<HashMap<String, Vec<String>>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Fields {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _id: &tracing::span::Id, _ctx: Context<'_, S>) {
        let m = attrs.metadata();
        let names = m.fields().iter().map(|f| f.name().to_string()).collect();
        self.0.lock().unwrap().insert(m.name().to_string(), names);
    }
}

#[test]
fn engine_step_spans_declare_every_field_the_planner_reads() {
    let fields = Fields::default();
    // The engine's spans are created on its own thread: the subscriber must be the process's
    // (this test binary holds this one test).
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(fields.clone())).unwrap();
    let engine = engine(tiny_model(2, 2, 4, 1), tokenizer(), EngineConfig::default());
    let (handle, thread) = EngineHandle::spawn(engine, 8);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = handle
            .submit(Request {
                prompt: vec![1, 2, 3],
                params: GenParams {
                    max_tokens: 2,
                    ..Default::default()
                },
            })
            .await
            .unwrap();
        while s.next().await.is_some() {}
        handle.shutdown(false).await.unwrap();
    });
    drop(handle);
    thread.join().unwrap().unwrap();
    let got = fields.0.lock().unwrap();
    let declared = got
        .get(step::NAME)
        .unwrap_or_else(|| panic!("no `{}` span was created", step::NAME));
    for f in step::ALL {
        assert!(
            declared.iter().any(|d| d == f),
            "`{}` does not declare `{f}`: {declared:?}",
            step::NAME
        );
    }
}
