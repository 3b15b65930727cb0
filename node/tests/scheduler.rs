//! Scheduler properties on tiny random models: blocks and rows are never leaked or lost under
//! random arrivals, exits (prompt exits included), cancellations and preemptions; cancellation
//! frees everything at once; a request's seeded output does not depend on its batch; every
//! rejection names its field.

mod common;

use common::*;
use proptest::prelude::*;
use rrt_model::exit::Criterion;
use rrt_model::sampling::SamplingParams;
use rrt_node::{Batching, EngineConfig, EngineError, Event, ExitRule, FinishReason, GenParams, KvFill, Request};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

fn tok() -> Arc<rrt_model::tokenizer::Tokenizer> {
    static T: OnceLock<Arc<rrt_model::tokenizer::Tokenizer>> = OnceLock::new();
    T.get_or_init(tokenizer).clone()
}

#[derive(Clone, Debug)]
enum Op {
    Submit {
        len: usize,
        max_tokens: usize,
        sched: Vec<u8>,
        seed: u64,
    },
    Cancel(usize),
    Step(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            1usize..36,
            1usize..12,
            proptest::collection::vec(1u8..4, 0..12),
            any::<u64>()
        )
            .prop_map(|(len, max_tokens, sched, seed)| Op::Submit {
                len,
                max_tokens,
                sched,
                seed
            }),
        (0usize..16).prop_map(Op::Cancel),
        (1usize..4).prop_map(Op::Step),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn blocks_and_rows_are_never_leaked_or_lost(
        ops in proptest::collection::vec(op(), 1..40),
        loops in 1usize..4,
        step_rows in 4usize..48,
        seqwise in any::<bool>(),
        recompute in any::<bool>(),
        rule in 0usize..4,
        cache in any::<bool>(),
        prompt_exits in any::<bool>(),
    ) {
        let layers = if loops == 3 { 3 } else { 4 };
        let mut model = tiny_model(layers, loops, 2, 7);
        if rule == 3 {
            // A fixed exit gate: its logits on the tiny model's states straddle 0.
            model.weights.exit_gate = Some(rrt_model::weights::ExitGate {
                w: (0..model.config.hidden).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.2).collect(),
                b: 0.0,
            });
        }
        let exit = match (rule, loops > 1) {
            (1, true) => Some(ExitRule { criterion: Criterion::Saturation, thresholds: vec![Some(0.3); loops - 1] }),
            (2, true) => Some(ExitRule { criterion: Criterion::MaxProb, thresholds: vec![Some(1e-4); loops - 1] }),
            (3, true) => Some(ExitRule { criterion: Criterion::Gate, thresholds: vec![Some(0.5); loops - 1] }),
            _ => None,
        };
        let cfg = EngineConfig {
            block_size: 4,
            // 12 blocks of 4 positions: 48 positions for everyone, so preemption is common.
            kv_bytes: 12 * layers * 2 * 4 * 16 * 4,
            max_step_rows: step_rows,
            max_running: 6,
            batching: if seqwise { Batching::SequenceWise } else { Batching::DepthWise },
            kv_fill: if recompute { KvFill::Recompute } else { KvFill::Propagate },
            exit,
            // Prompts of one seed share their first tokens: some start from the cache.
            prefix_cache_bytes: if cache { 1 << 20 } else { 0 },
            // Prompt rows take the gate's test too under the gate rule (with propagate fill;
            // elsewhere the setting is inert).
            prompt_exits: prompt_exits || rule == 3,
        };
        let mut eng = engine(model, tok(), cfg);
        prop_assert_eq!(eng.kv_blocks().0, 12);
        let mut submitted = Vec::new();
        let mut cancelled = Vec::new();
        let mut events = Vec::new();
        for o in ops {
            match o {
                Op::Submit { len, max_tokens, sched, seed } => {
                    let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7919 + seed as u32) % 49152).collect();
                    let mut params = GenParams { max_tokens, ignore_eos: true, ..Default::default() };
                    params.sampling = SamplingParams { temperature: 0.8, seed: Some(seed), ..Default::default() };
                    if !sched.is_empty() {
                        params.exit.schedule = Some(sched);
                    }
                    submitted.push((eng.submit(Request { prompt, params }).unwrap(), max_tokens));
                }
                Op::Cancel(i) => {
                    if let Some(&(id, _)) = submitted.get(i)
                        && eng.cancel(id)
                    {
                        cancelled.push(id);
                    }
                }
                Op::Step(n) => {
                    for _ in 0..n {
                        events.extend(eng.step().unwrap());
                        eng.check_invariants().map_err(TestCaseError::fail)?;
                    }
                }
            }
            eng.check_invariants().map_err(TestCaseError::fail)?;
        }
        events.extend(eng.run_to_completion().unwrap());
        eng.check_invariants().map_err(TestCaseError::fail)?;
        prop_assert_eq!(eng.kv_blocks().1, 12, "every block is free at the end");
        let got = collect(&events);
        for (id, max_tokens) in &submitted {
            let (toks, done) = got.get(id).cloned().unwrap_or_default();
            match done {
                Some(Event::Done { finish_reason, usage, .. }) => {
                    prop_assert!(toks.len() <= *max_tokens);
                    prop_assert_eq!(usage.completion_tokens, toks.len());
                    if cancelled.contains(id) {
                        prop_assert_eq!(finish_reason, FinishReason::Cancelled);
                    } else {
                        prop_assert_eq!(finish_reason, FinishReason::Length, "request {} lost", id);
                        prop_assert_eq!(toks.len(), *max_tokens);
                    }
                }
                other => prop_assert!(false, "request {} has no final event: {:?}", id, other),
            }
        }
    }
}

#[test]
fn cancellation_frees_blocks_and_rows_at_once() {
    let mut eng = engine(
        tiny_model(4, 2, 2, 3),
        tok(),
        EngineConfig {
            max_step_rows: 16,
            ..Default::default()
        },
    );
    let ids: Vec<_> = (0..5)
        .map(|i| {
            eng.submit(Request {
                prompt: vec![10 + i; 20],
                params: GenParams {
                    max_tokens: 50,
                    ignore_eos: true,
                    ..Default::default()
                },
            })
            .unwrap()
        })
        .collect();
    for _ in 0..4 {
        eng.step().unwrap();
    }
    let (total, free) = eng.kv_blocks();
    assert!(free < total, "requests hold blocks");
    for id in &ids {
        assert!(eng.cancel(*id));
    }
    assert!(!eng.cancel(ids[0]), "a finished id is unknown");
    assert_eq!(eng.kv_blocks(), (total, total), "cancel frees every block immediately");
    eng.check_invariants().unwrap();
    assert_eq!(eng.active(), 0);
    let events = eng.step().unwrap();
    let done: Vec<_> = events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                Event::Done {
                    finish_reason: FinishReason::Cancelled,
                    ..
                }
            )
        })
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(done, ids);
    assert!(!eng.has_work());
}

/// With a seed, a sampled request produces the same tokens alone and in any batch.
#[test]
fn seeded_sampling_is_batch_independent() {
    let run = |others: usize| -> Vec<u32> {
        let mut eng = engine(
            tiny_model(4, 2, 2, 5),
            tok(),
            EngineConfig {
                max_step_rows: 24,
                ..Default::default()
            },
        );
        let params = |seed| GenParams {
            max_tokens: 20,
            ignore_eos: true,
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 50,
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        for i in 0..others {
            eng.submit(Request {
                prompt: vec![100 + i as u32; 3 + i],
                params: params(i as u64),
            })
            .unwrap();
        }
        let id = eng
            .submit(Request {
                prompt: vec![5, 6, 7, 8],
                params: params(42),
            })
            .unwrap();
        for i in 0..others {
            eng.submit(Request {
                prompt: vec![300 + i as u32; 9],
                params: params(99 + i as u64),
            })
            .unwrap();
        }
        collect(&eng.run_to_completion().unwrap())[&id].0.clone()
    };
    let alone = run(0);
    assert_eq!(alone.len(), 20);
    assert_eq!(run(3), alone);
    assert_eq!(run(7), alone);
}

/// Stop token ids end the request without emitting the token; top logprobs are the
/// log-softmax of the decoding loop's logits, best first, and the greedy token is the best.
#[test]
fn stop_ids_and_logprobs() {
    let mut eng = engine(tiny_model(2, 1, 0, 9), tok(), EngineConfig::default());
    let params = GenParams {
        max_tokens: 12,
        ignore_eos: true,
        top_logprobs: 5,
        ..Default::default()
    };
    let id = eng
        .submit(Request {
            prompt: vec![1, 2, 3],
            params: params.clone(),
        })
        .unwrap();
    let events = eng.run_to_completion().unwrap();
    let toks: Vec<_> = events
        .iter()
        .filter_map(|(i, e)| match e {
            Event::Token(t) if *i == id => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(toks.len(), 12);
    for t in &toks {
        assert_eq!(t.top_logprobs.len(), 5);
        assert_eq!(t.top_logprobs[0].0, t.id, "greedy picks the most likely token");
        assert!((t.top_logprobs[0].1 - t.logprob).abs() < 1e-6);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        let z: f32 = t.top_logprobs.iter().map(|x| x.1.exp()).sum();
        assert!(t.logprob <= 0.0 && z <= 1.0 + 1e-4);
    }
    // Stop at the 4th token's id: the output is the first 3 tokens (if the id did not occur
    // earlier), finish reason stop.
    let stop = toks[3].id;
    let first = toks.iter().position(|t| t.id == stop).unwrap();
    let id2 = eng
        .submit(Request {
            prompt: vec![1, 2, 3],
            params: GenParams {
                stop_ids: vec![stop],
                ..params
            },
        })
        .unwrap();
    let got = collect(&eng.run_to_completion().unwrap());
    let (ids, done) = &got[&id2];
    assert_eq!(ids, &toks[..first].iter().map(|t| t.id).collect::<Vec<_>>());
    assert!(matches!(
        done,
        Some(Event::Done {
            finish_reason: FinishReason::Stop,
            ..
        })
    ));
}

#[test]
fn every_rejection_names_its_field() {
    let mut eng = engine(
        tiny_model(4, 2, 2, 1),
        tok(),
        EngineConfig {
            kv_bytes: 64 * 4 * 2 * 16 * 16 * 4,
            ..Default::default()
        },
    );
    let ok = || Request {
        prompt: vec![1, 2, 3],
        params: GenParams::default(),
    };
    let cases: Vec<(Request, &str)> = vec![
        (Request { prompt: vec![], ..ok() }, "prompt"),
        (
            Request {
                prompt: vec![49152],
                ..ok()
            },
            "prompt",
        ),
        (
            Request {
                params: GenParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                ..ok()
            },
            "max_tokens",
        ),
        (
            Request {
                params: GenParams {
                    max_tokens: 5000,
                    ..Default::default()
                },
                ..ok()
            },
            "max_tokens",
        ),
        (
            Request {
                params: GenParams {
                    stop_ids: vec![1 << 20],
                    ..Default::default()
                },
                ..ok()
            },
            "stop_token_ids",
        ),
        (
            Request {
                params: GenParams {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                ..ok()
            },
            "stop",
        ),
        (
            Request {
                params: GenParams {
                    top_logprobs: 21,
                    ..Default::default()
                },
                ..ok()
            },
            "top_logprobs",
        ),
    ];
    let mut cases = cases;
    let sp = |f: fn(&mut SamplingParams)| {
        let mut p = GenParams::default();
        f(&mut p.sampling);
        Request { params: p, ..ok() }
    };
    cases.push((sp(|s| s.temperature = f32::NAN), "temperature"));
    cases.push((sp(|s| s.temperature = -0.5), "temperature"));
    cases.push((sp(|s| s.top_p = 0.0), "top_p"));
    cases.push((sp(|s| s.top_p = 1.5), "top_p"));
    cases.push((sp(|s| s.top_p = f32::NAN), "top_p"));
    cases.push((sp(|s| s.min_p = -0.1), "min_p"));
    cases.push((sp(|s| s.repetition_penalty = 0.0), "repetition_penalty"));
    cases.push((sp(|s| s.repetition_penalty = f32::INFINITY), "repetition_penalty"));
    cases.push((sp(|s| s.presence_penalty = 2.5), "presence_penalty"));
    cases.push((sp(|s| s.frequency_penalty = f32::NAN), "frequency_penalty"));
    let mut e = GenParams::default();
    e.exit.max_loops = Some(3);
    cases.push((Request { params: e, ..ok() }, "max_loops"));
    let mut e = GenParams::default();
    e.exit.max_loops = Some(0);
    cases.push((Request { params: e, ..ok() }, "max_loops"));
    let mut e = GenParams::default();
    e.exit.threshold = Some(f32::NAN);
    cases.push((Request { params: e, ..ok() }, "exit_threshold"));
    for (req, field) in cases {
        match eng.submit(req) {
            Err(EngineError::InvalidRequest { field: f, msg }) => {
                assert_eq!(f, field, "{msg}");
                assert!(!msg.is_empty());
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    // Too large for the whole cache: 64 blocks of 16 positions.
    let big = Request {
        prompt: vec![1; 1000],
        params: GenParams {
            max_tokens: 100,
            ..Default::default()
        },
    };
    assert!(matches!(
        eng.submit(big),
        Err(EngineError::TooLarge {
            needed: 69,
            capacity: 64,
            ..
        })
    ));
    assert_eq!(eng.active(), 0, "nothing rejected was accepted");
}

/// Stop strings match across token boundaries and are not emitted (real tokenizer, tiny
/// model: the text is whatever the random model says; the stop string is cut from it).
#[test]
fn stop_strings_match_across_tokens() {
    let tk = tok();
    let mut eng = engine(tiny_model(2, 1, 0, 11), tk.clone(), EngineConfig::default());
    let params = GenParams {
        max_tokens: 24,
        ignore_eos: true,
        ..Default::default()
    };
    let id = eng
        .submit(Request {
            prompt: vec![400, 500, 600],
            params: params.clone(),
        })
        .unwrap();
    let events = eng.run_to_completion().unwrap();
    let mut pieces: Vec<String> = Vec::new();
    let mut tail = String::new();
    for (i, e) in &events {
        match e {
            Event::Token(t) if *i == id => pieces.push(t.text.clone()),
            Event::Done { text, .. } if *i == id => tail = text.clone(),
            _ => {}
        }
    }
    let full: String = pieces.concat() + &tail;
    let ids = collect(&events)[&id].0.clone();
    assert_eq!(full, tk.decode(&ids, true).unwrap(), "streamed text = decoded ids");
    // A stop string made of the end of token 5's text and the start of token 6's.
    let cut: usize = pieces[..5].iter().map(|p| p.len()).sum();
    let (a, b) = (&pieces[4], &pieces[5]);
    assert!(!a.is_empty() && !b.is_empty(), "pieces {pieces:?}");
    let stop = format!(
        "{}{}",
        &a[a.len() - a.chars().last().unwrap().len_utf8()..],
        &b[..b.chars().next().unwrap().len_utf8()]
    );
    let first = full.find(&stop).unwrap();
    assert!(first <= cut);
    let id2 = eng
        .submit(Request {
            prompt: vec![400, 500, 600],
            params: GenParams {
                stop: vec![stop.clone()],
                ..params
            },
        })
        .unwrap();
    let events = eng.run_to_completion().unwrap();
    let mut text = String::new();
    let mut reason = None;
    for (i, e) in &events {
        match e {
            Event::Token(t) if *i == id2 => text.push_str(&t.text),
            Event::Done {
                text: t, finish_reason, ..
            } if *i == id2 => {
                text.push_str(t);
                reason = Some(*finish_reason);
            }
            _ => {}
        }
    }
    assert_eq!(reason, Some(FinishReason::Stop));
    assert_eq!(text, full[..first], "text up to the stop string, without it");
    let _ = HashMap::<u8, u8>::new();
}

/// Under KV pressure later requests are preempted (KV freed, recomputed later) instead of
/// failing, and the recomputation gives the same greedy tokens as an uncontended run.
#[test]
fn preemption_recomputes_and_loses_nothing() {
    let run = |kv_blocks: usize| {
        let cfg = EngineConfig {
            block_size: 4,
            kv_bytes: kv_blocks * 4 * 2 * 4 * 16 * 4,
            max_step_rows: 64,
            ..Default::default()
        };
        let mut eng = engine(tiny_model(4, 2, 2, 13), tok(), cfg);
        let ids: Vec<_> = (0..3u32)
            .map(|i| {
                let params = GenParams {
                    max_tokens: 12,
                    ignore_eos: true,
                    ..Default::default()
                };
                eng.submit(Request {
                    prompt: (0..20).map(|p| 50 + p * 3 + i).collect(),
                    params,
                })
                .unwrap()
            })
            .collect();
        let mut events = Vec::new();
        while eng.has_work() {
            events.extend(eng.step().unwrap());
            eng.check_invariants().unwrap();
        }
        let got = collect(&events);
        (
            ids.iter().map(|id| got[id].clone()).collect::<Vec<_>>(),
            eng.stats().preemptions,
        )
    };
    // 3 requests x 32 positions = 24 blocks of 4; 12 blocks force preemption.
    let (roomy, p0) = run(64);
    let (tight, p1) = run(12);
    assert_eq!(p0, 0);
    assert!(p1 > 0, "the tight cache must preempt");
    for (a, b) in roomy.iter().zip(&tight) {
        assert_eq!(a.0, b.0, "same tokens after preemption");
        assert_eq!(a.0.len(), 12);
        match &b.1 {
            Some(Event::Done {
                finish_reason: FinishReason::Length,
                usage,
                ..
            }) => {
                assert_eq!(usage.completion_tokens, 12);
            }
            other => panic!("{other:?}"),
        }
    }
    let total: usize = tight
        .iter()
        .map(|(_, d)| match d {
            Some(Event::Done { usage, .. }) => usage.preemptions,
            _ => 0,
        })
        .sum();
    assert_eq!(total as u64, p1);
}

/// Per-request exit controls over the engine's rule: the rule exits everything after loop 1;
/// `full_depth`, a request threshold that never passes, and `max_loops` override it.
#[test]
fn per_request_exit_controls() {
    let rule = ExitRule {
        criterion: Criterion::MaxProb,
        thresholds: vec![Some(0.0)],
    };
    let mut eng = engine(
        tiny_model(4, 2, 2, 17),
        tok(),
        EngineConfig {
            exit: Some(rule),
            ..Default::default()
        },
    );
    let loops_of = |eng: &mut rrt_node::Engine<rrt_kernels::CpuBackend>, f: fn(&mut GenParams)| -> Vec<usize> {
        let mut p = GenParams {
            max_tokens: 6,
            ignore_eos: true,
            ..Default::default()
        };
        f(&mut p);
        let id = eng
            .submit(Request {
                prompt: vec![9, 8, 7],
                params: p,
            })
            .unwrap();
        eng.run_to_completion()
            .unwrap()
            .into_iter()
            .filter_map(|(i, e)| match e {
                Event::Token(t) if i == id => Some(t.loops),
                _ => None,
            })
            .collect()
    };
    assert_eq!(loops_of(&mut eng, |_| {}), vec![1; 6], "threshold 0 exits after loop 1");
    assert_eq!(loops_of(&mut eng, |p| p.exit.full_depth = true), vec![2; 6]);
    assert_eq!(
        loops_of(&mut eng, |p| p.exit.threshold = Some(1.5)),
        vec![2; 6],
        "p <= 1 never passes 1.5"
    );
    let st = eng.stats().clone();
    assert_eq!(st.exits, vec![6, 12]);
    // Saturation needs no LM head for the test: only decoded rows go through it.
    let rule = ExitRule {
        criterion: Criterion::Saturation,
        thresholds: vec![Some(2.0)],
    };
    let mut eng = engine(
        tiny_model(4, 2, 2, 17),
        tok(),
        EngineConfig {
            exit: Some(rule),
            ..Default::default()
        },
    );
    assert_eq!(loops_of(&mut eng, |_| {}), vec![2; 6], "cosine <= 1 never passes 2.0");
    assert_eq!(loops_of(&mut eng, |p| p.exit.max_loops = Some(1)), vec![1; 6]);
    assert_eq!(
        eng.stats().head_rows,
        12,
        "one LM-head row per token, none for the tests"
    );
}

/// Engine settings that cannot work are refused with the setting named.
#[test]
fn bad_engine_settings_name_the_field() {
    let cases: Vec<(EngineConfig, &str)> = vec![
        (
            EngineConfig {
                block_size: 0,
                ..Default::default()
            },
            "block_size",
        ),
        (
            EngineConfig {
                max_step_rows: 0,
                ..Default::default()
            },
            "max_step_rows",
        ),
        (
            EngineConfig {
                max_running: 0,
                ..Default::default()
            },
            "max_running",
        ),
        (
            EngineConfig {
                kv_bytes: 100,
                ..Default::default()
            },
            "kv_bytes",
        ),
        (
            EngineConfig {
                exit: Some(ExitRule {
                    criterion: Criterion::MaxProb,
                    thresholds: vec![Some(0.5); 3],
                }),
                ..Default::default()
            },
            "exit.thresholds",
        ),
    ];
    for (cfg, field) in cases {
        let m = rrt_node::ResidentModel::new(rrt_kernels::CpuBackend, tiny_model(4, 2, 2, 1)).unwrap();
        match rrt_node::Engine::new(m, tok(), cfg) {
            Err(EngineError::Config { field: f, msg }) => {
                assert_eq!(f, field, "{msg}");
            }
            Err(e) => panic!("{field}: {e}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
}

/// A request resumed on another engine from its prompt plus the first k tokens it produced
/// (what the coordinator sends when a node dies) continues exactly: same later tokens under
/// seeded sampling with penalties, and the streamed text pieces join into the same text, with
/// a stop string that spans the cut still found.
#[test]
fn resumed_requests_continue_exactly() {
    let tk = tok();
    let params = GenParams {
        max_tokens: 24,
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 40,
            seed: Some(7),
            repetition_penalty: 1.2,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            ..Default::default()
        },
        ..Default::default()
    };
    let prompt = vec![400u32, 500, 600, 700];
    let run = |prompt: Vec<u32>, params: GenParams| -> (Vec<u32>, Vec<String>, String, FinishReason) {
        let mut eng = engine(tiny_model(2, 1, 0, 11), tok(), EngineConfig::default());
        let id = eng.submit(Request { prompt, params }).unwrap();
        let events = eng.run_to_completion().unwrap();
        let (mut ids, mut pieces, mut tail, mut reason) = (Vec::new(), Vec::new(), String::new(), None);
        for (i, e) in &events {
            match e {
                Event::Token(t) if *i == id => {
                    ids.push(t.id);
                    pieces.push(t.text.clone());
                }
                Event::Done {
                    text, finish_reason, ..
                } if *i == id => {
                    tail = text.clone();
                    reason = Some(*finish_reason);
                }
                _ => {}
            }
        }
        (ids, pieces, tail, reason.unwrap())
    };
    let (ids, pieces, tail, _) = run(prompt.clone(), params.clone());
    assert_eq!(ids.len(), 24);
    let full = pieces.concat() + &tail;
    assert_eq!(full, tk.decode(&ids, true).unwrap());
    for k in [1, 5, 11, 23] {
        let mut p = prompt.clone();
        p.extend_from_slice(&ids[..k]);
        let (rest, rest_pieces, rest_tail, _) = run(
            p,
            GenParams {
                max_tokens: 24 - k,
                resumed: k,
                ..params.clone()
            },
        );
        assert_eq!(rest, ids[k..], "tokens after a resume at {k}");
        let joined = pieces[..k].concat() + &rest_pieces.concat() + &rest_tail;
        assert_eq!(joined, full, "text after a resume at {k}");
    }
    // A stop string spanning the cut: the resumed run stops where the whole run stops.
    let cut: usize = pieces[..6].iter().map(|p| p.len()).sum();
    let stop = {
        let last = full[..cut].chars().last().unwrap();
        let next = full[cut..].chars().next().unwrap();
        format!("{last}{next}")
    };
    let with_stop = GenParams {
        stop: vec![stop.clone()],
        ..params.clone()
    };
    let (whole_ids, whole_pieces, whole_tail, whole_reason) = run(prompt.clone(), with_stop.clone());
    let mut p = prompt.clone();
    p.extend_from_slice(&whole_ids[..6]);
    let (_, rest_pieces, rest_tail, reason) = run(
        p,
        GenParams {
            max_tokens: 18,
            resumed: 6,
            ..with_stop
        },
    );
    assert_eq!((reason, whole_reason), (FinishReason::Stop, FinishReason::Stop));
    assert_eq!(
        whole_pieces[..6].concat() + &rest_pieces.concat() + &rest_tail,
        whole_pieces.concat() + &whole_tail
    );
}

/// A sequence exported mid-generation from one engine and imported into another (with a
/// different block size and its own traffic) continues exactly as if undisturbed: seeded
/// sampling, early exits with propagated KV fill, no prefill on the importing engine, and
/// every block accounted for on both sides.
#[test]
fn exported_sequence_continues_exactly_on_another_engine() {
    let sched: Vec<u8> = vec![3, 1, 2, 3, 1, 1, 2, 3, 2, 1, 3, 3, 1, 2, 2, 1, 3, 1, 2, 3];
    let params = |sched: &[u8], max_tokens: usize, resumed: usize| {
        let mut p = GenParams {
            max_tokens,
            ignore_eos: true,
            sampling: SamplingParams {
                temperature: 0.9,
                top_k: 40,
                seed: Some(7),
                ..Default::default()
            },
            resumed,
            ..Default::default()
        };
        p.exit.schedule = Some(sched.to_vec());
        p
    };
    let prompt: Vec<u32> = (0..23).map(|i| 40 + 7 * i).collect();
    let model = || tiny_model(6, 3, 2, 21);
    let other = |eng: &mut rrt_node::Engine<rrt_kernels::CpuBackend>, base: u32| {
        eng.submit(Request {
            prompt: (0..17).map(|i| base + i).collect(),
            params: params(&sched, 20, 0),
        })
        .unwrap()
    };
    // Undisturbed.
    let mut r = engine(model(), tok(), EngineConfig::default());
    let rid = r
        .submit(Request {
            prompt: prompt.clone(),
            params: params(&sched, 20, 0),
        })
        .unwrap();
    let want = collect(&r.run_to_completion().unwrap())[&rid].0.clone();
    assert_eq!(want.len(), 20);

    // Engine A: the request next to another one, exported after 7 tokens.
    let mut a = engine(
        model(),
        tok(),
        EngineConfig {
            max_step_rows: 24,
            ..Default::default()
        },
    );
    other(&mut a, 300);
    let id = a
        .submit(Request {
            prompt: prompt.clone(),
            params: params(&sched, 20, 0),
        })
        .unwrap();
    let mut events = Vec::new();
    while collect(&events).get(&id).is_none_or(|(t, _)| t.len() < 7) {
        events.extend(a.step().unwrap());
    }
    assert!(a.begin_export(id));
    let state = loop {
        events.extend(a.step().unwrap());
        a.check_invariants().unwrap();
        if let Some((eid, s)) = a.take_exports().pop() {
            assert_eq!(eid, id);
            events.extend(a.take_events());
            break s;
        }
    };
    let (first, done) = collect(&events)[&id].clone();
    assert!(matches!(
        done,
        Some(Event::Done {
            finish_reason: FinishReason::Moved,
            ..
        })
    ));
    assert_eq!(state.tokens[..prompt.len()], prompt[..]);
    assert_eq!(state.tokens[prompt.len()..], first[..]);
    assert_eq!(state.prompt_tokens, prompt.len());
    assert_eq!(
        state.positions,
        state.tokens.len() - 1,
        "all but the last token computed"
    );
    a.run_to_completion().unwrap();
    a.check_invariants().unwrap();
    assert_eq!(a.kv_blocks().0, a.kv_blocks().1, "A frees the exported blocks");
    assert_eq!(a.stats().kv_exports, 1);

    // Engine B: block size 4, its own request already past prefill.
    let mut b = engine(
        model(),
        tok(),
        EngineConfig {
            block_size: 4,
            ..Default::default()
        },
    );
    other(&mut b, 500);
    for _ in 0..6 {
        b.step().unwrap();
    }
    let prefill_before = b.stats().prefill_tokens;
    let n = first.len();
    let (bid, used) = b
        .submit_imported(
            Request {
                prompt: state.tokens.clone(),
                params: params(&sched[n..], 20 - n, n),
            },
            &state,
        )
        .unwrap();
    assert!(used, "B has room for the keys/values");
    let mut rest = Vec::new();
    while b.has_work() {
        rest.extend(b.step().unwrap());
        b.check_invariants().unwrap();
    }
    let (second, _) = collect(&rest)[&bid].clone();
    assert_eq!([first, second].concat(), want, "moved output != undisturbed output");
    assert_eq!(b.stats().prefill_tokens, prefill_before, "B recomputed nothing");
    assert_eq!(b.stats().kv_imports, 1);
    assert_eq!(b.kv_blocks().0, b.kv_blocks().1);

    // A state for other weights' geometry, or not a prefix of the request, is refused.
    let mut bad = state.clone();
    bad.data.pop();
    assert!(matches!(
        b.submit_imported(
            Request {
                prompt: state.tokens.clone(),
                params: params(&sched, 5, 0)
            },
            &bad
        ),
        Err(EngineError::InvalidRequest { field: "kv_state", .. })
    ));
    let mut wrong = state.tokens.clone();
    wrong[0] += 1;
    assert!(matches!(
        b.submit_imported(
            Request {
                prompt: wrong,
                params: params(&sched, 5, 0)
            },
            &state
        ),
        Err(EngineError::InvalidRequest { field: "kv_state", .. })
    ));
}
