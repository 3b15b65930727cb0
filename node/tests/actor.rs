//! The engine actor: concurrent submissions through the handle give the same tokens as the
//! engine driven directly; dropping a stream cancels its request and frees its blocks; a
//! draining shutdown finishes what is in flight.

mod common;

use common::*;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::{EngineConfig, Event, FinishReason, GenParams, Request};

fn req(i: u32) -> Request {
    Request {
        prompt: (0..5 + i).map(|p| 100 + 13 * p + i).collect(),
        params: GenParams {
            max_tokens: 10,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_matches_direct_engine_and_cancels_on_drop() {
    let tok = tokenizer();
    // Direct reference.
    let mut direct = engine(tiny_model(4, 2, 2, 21), tok.clone(), EngineConfig::default());
    let ids: Vec<_> = (0..4).map(|i| direct.submit(req(i)).unwrap()).collect();
    let want = collect(&direct.run_to_completion().unwrap());

    let (handle, join) = EngineHandle::spawn(engine(tiny_model(4, 2, 2, 21), tok, EngineConfig::default()), 16);
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = h.submit(req(i)).await.unwrap();
            let mut toks = Vec::new();
            let mut fin = None;
            while let Some(e) = s.next().await {
                match e {
                    Event::Token(t) => toks.push(t.id),
                    Event::Done { finish_reason, .. } => fin = Some(finish_reason),
                }
            }
            (toks, fin)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (toks, fin) = t.await.unwrap();
        assert_eq!(toks, want[&ids[i]].0, "request {i}");
        assert_eq!(fin, Some(FinishReason::Length));
    }
    // A client that goes away: its request is cancelled and its blocks freed.
    let mut long = req(9);
    long.params.max_tokens = 4000;
    let mut s = handle.submit(long).await.unwrap();
    assert!(matches!(s.next().await, Some(Event::Token(_))));
    let before = handle.load().await.unwrap();
    assert_eq!(before.running_requests, 1);
    drop(s);
    let mut freed = false;
    for _ in 0..200 {
        let l = handle.load().await.unwrap();
        if l.running_requests == 0 && l.waiting_requests == 0 && l.free_blocks == l.total_blocks {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(freed, "dropping the stream cancels the request");
    // Draining shutdown: an in-flight request still completes.
    let mut s = handle.submit(req(3)).await.unwrap();
    let h = handle.clone();
    let stop = tokio::spawn(async move { h.shutdown(true).await });
    let mut n = 0;
    let mut fin = None;
    while let Some(e) = s.next().await {
        match e {
            Event::Token(_) => n += 1,
            Event::Done { finish_reason, .. } => fin = Some(finish_reason),
        }
    }
    assert_eq!((n, fin), (10, Some(FinishReason::Length)));
    stop.await.unwrap().unwrap();
    assert!(handle.submit(req(1)).await.is_err(), "no work after shutdown");
    join.join().unwrap().unwrap();
}
