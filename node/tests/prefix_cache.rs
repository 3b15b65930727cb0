//! The prefix cache: a request whose prompt starts with a cached prefix starts from those
//! keys/values and returns the tokens it returns without the cache; the cache keeps to its
//! budget.

mod common;

use common::*;
use rrt_model::sampling::SamplingParams;
use rrt_node::{EngineConfig, Event, GenParams, Request, RequestId};
use std::collections::HashMap;

fn greedy(max_tokens: usize) -> GenParams {
    GenParams {
        max_tokens,
        sampling: SamplingParams::default(),
        ..Default::default()
    }
}

fn run(eng: &mut rrt_node::Engine<rrt_kernels::CpuBackend>, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            eng.submit(Request {
                prompt: p.clone(),
                params: greedy(12),
            })
            .unwrap()
        })
        .collect();
    let mut events: Vec<(RequestId, Event)> = Vec::new();
    while eng.has_work() {
        events.extend(eng.step().unwrap());
    }
    let out: HashMap<RequestId, (Vec<u32>, Option<Event>)> = collect(&events);
    ids.iter().map(|id| out[id].0.clone()).collect()
}

/// A shared 37-token "system prompt" and different questions.
fn prompts() -> (Vec<u32>, Vec<Vec<u32>>) {
    let system: Vec<u32> = (0..37).map(|i| 100 + i * 13).collect();
    let qs = [
        vec![7u32, 8, 9, 10, 11],
        vec![20, 21, 22],
        vec![7, 8, 9, 10, 11],
        vec![5000; 9],
    ];
    let ps = qs.iter().map(|q| [system.clone(), q.clone()].concat()).collect();
    (system, ps)
}

#[test]
fn cached_prefix_gives_the_same_tokens_as_computing_it() {
    for (loops, rank) in [(1, 0), (2, 2)] {
        let cfg = |cache: usize| EngineConfig {
            block_size: 4,
            kv_bytes: 8 << 20,
            prefix_cache_bytes: cache,
            ..Default::default()
        };
        let (_, ps) = prompts();
        // Without the cache, each prompt alone.
        let mut plain = engine(tiny_model(4, loops, rank, 5), tokenizer(), cfg(0));
        let want: Vec<Vec<u32>> = ps
            .iter()
            .map(|p| run(&mut plain, std::slice::from_ref(p))[0].clone())
            .collect();
        assert_eq!(plain.stats().prefix_hits, 0);
        // With it: the first request fills it, the later ones start from it.
        let mut cached = engine(tiny_model(4, loops, rank, 5), tokenizer(), cfg(64 << 20));
        let first = run(&mut cached, &ps[..1]);
        assert_eq!(first[0], want[0], "loops {loops}: the request that fills the cache");
        let usage = cached.prefix_cache_usage().expect("cache on");
        // 42 tokens: the 10 whole blocks before its last position.
        assert_eq!(usage.blocks, 10);
        let rest = run(&mut cached, &ps[1..]);
        for (i, got) in rest.iter().enumerate() {
            assert_eq!(got, &want[i + 1], "loops {loops}: request {} from the cache", i + 1);
        }
        let st = cached.stats();
        // Prompts 1 and 3 share the 9 whole blocks of the system prompt (36 tokens); prompt
        // 2 repeats prompt 0, whose 10 blocks (40 tokens) are cached.
        assert_eq!(st.prefix_hits, 3, "loops {loops}");
        assert_eq!(st.prefix_hit_tokens, 36 + 40 + 36, "loops {loops}");
        // Cached positions were not prefilled again.
        let plain_prefill = plain.stats().prefill_tokens;
        assert_eq!(st.prefill_tokens + 36 + 40 + 36, plain_prefill, "loops {loops}");
    }
}

#[test]
fn cache_keeps_to_its_budget_and_off_means_off() {
    let (_, ps) = prompts();
    let model = tiny_model(4, 2, 2, 6);
    // One block: 4 positions x 4 unrolled layers x (k, v) x 16 floats x 4 bytes = 2048 bytes.
    let block = 4 * 4 * 2 * 16 * 4;
    let mut eng = engine(
        model,
        tokenizer(),
        EngineConfig {
            block_size: 4,
            kv_bytes: 8 << 20,
            prefix_cache_bytes: 3 * block,
            ..Default::default()
        },
    );
    run(&mut eng, &ps);
    let u = eng.prefix_cache_usage().unwrap();
    assert_eq!(u.blocks, 3);
    assert!(u.bytes <= u.budget);
    let off = engine(tiny_model(4, 2, 2, 6), tokenizer(), EngineConfig::default());
    assert!(off.prefix_cache_usage().is_none());
}
