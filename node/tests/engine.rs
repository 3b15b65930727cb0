//! The engine against the reference forward pass on the real model (SmolLM2-135M-Instruct):
//! with exits off, greedy output of 32 concurrent requests equals each request run alone and
//! equals `rrt_model::generate` (the reference forward pass), token for token, for the vanilla
//! model and for a relaxed recursive conversion, with depth-wise and sequence-wise batching.

mod common;

use common::*;
use rrt_model::LoadedModel;
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, RecursiveSpec, convert};
use rrt_model::sampling::SamplingParams;
use rrt_node::{Batching, EngineConfig, Event, FinishReason, GenParams, KvFill, Request};

/// 32 prompts of 5..70 tokens cut from tinyshakespeare.
fn prompts(lm: &LoadedModel, n: usize) -> Vec<Vec<u32>> {
    let text = shakespeare();
    let ids = lm.tokenizer.encode(&text[..200_000], false, false).unwrap();
    (0..n)
        .map(|i| {
            let start = 997 * i % (ids.len() - 100);
            let len = 5 + (i * 37) % 66;
            ids[start..start + len].to_vec()
        })
        .collect()
}

fn greedy(max_tokens: usize) -> GenParams {
    GenParams {
        max_tokens,
        sampling: SamplingParams::default(),
        ..Default::default()
    }
}

/// The recursive conversion of SmolLM2 (B loops, average init, plain SVD of `rank`), in memory.
fn converted(loops: usize, rank: usize) -> LoadedModel {
    let mut lm = rrt_model::load(&model_path()).unwrap();
    let spec = RecursiveSpec {
        loops,
        init: Init::Average,
        ranks: [rank; 7],
    };
    let m = &lm.model;
    let (layers, rec) = convert(&m.weights, &m.config, &spec, None, |_| {}).unwrap();
    let mut w = m.weights.clone();
    w.layers = layers;
    lm.model = Model::recursive(m.config.clone(), w, rec).unwrap();
    lm
}

fn copy_model(lm: &LoadedModel) -> Model {
    match &lm.model.recursion {
        Some(r) => Model::recursive(lm.model.config.clone(), lm.model.weights.clone(), r.clone()).unwrap(),
        None => Model::new(lm.model.config.clone(), lm.model.weights.clone()),
    }
}

/// Runs `prompts` concurrently, then each alone, then through `rrt_model::generate`, and
/// asserts identical token ids and finish reasons.
fn check_all_agree(lm: &LoadedModel, prompts: &[Vec<u32>], max_tokens: usize, batching: Batching) {
    let tok = std::sync::Arc::new(lm.tokenizer.clone());
    let cfg = EngineConfig {
        batching,
        max_step_rows: 96,
        ..Default::default()
    };
    let mut eng = engine(copy_model(lm), tok.clone(), cfg.clone());
    let ids: Vec<_> = prompts
        .iter()
        .map(|p| {
            eng.submit(Request {
                prompt: p.clone(),
                params: greedy(max_tokens),
            })
            .unwrap()
        })
        .collect();
    let together = collect(&eng.run_to_completion().unwrap());
    eng.check_invariants().unwrap();
    assert_eq!(eng.kv_blocks().0, eng.kv_blocks().1, "all blocks free at the end");
    assert!(eng.stats().passes > 0);
    for (i, p) in prompts.iter().enumerate() {
        let (got, done) = &together[&ids[i]];
        let id = eng
            .submit(Request {
                prompt: p.clone(),
                params: greedy(max_tokens),
            })
            .unwrap();
        let alone = collect(&eng.run_to_completion().unwrap());
        assert_eq!(got, &alone[&id].0, "prompt {i}: concurrent != alone");
        let reference =
            rrt_model::generate::generate(lm, p, max_tokens, SamplingParams::default(), |_| Ok(())).unwrap();
        assert_eq!(got, &reference.ids, "prompt {i}: engine != rrt_model::generate");
        let want = match reference.finish_reason {
            rrt_model::generate::FinishReason::Eos => FinishReason::Eos,
            rrt_model::generate::FinishReason::Length => FinishReason::Length,
        };
        match done {
            Some(Event::Done {
                finish_reason, usage, ..
            }) => {
                assert_eq!(*finish_reason, want, "prompt {i}");
                assert_eq!(usage.completion_tokens, got.len());
                assert_eq!(usage.prompt_tokens, p.len());
                assert_eq!(
                    usage.loops,
                    got.len() * lm.model.loops() + usize::from(want == FinishReason::Eos) * lm.model.loops()
                );
            }
            other => panic!("prompt {i}: {other:?}"),
        }
    }
}

#[test]
fn vanilla_concurrent_equals_alone_equals_reference() {
    let lm = rrt_model::load(&model_path()).unwrap();
    let ps = prompts(&lm, 32);
    check_all_agree(&lm, &ps, 12, Batching::DepthWise);
}

#[test]
fn recursive_depthwise_and_sequencewise_equal_reference() {
    let lm = converted(2, 16);
    let ps = prompts(&lm, 32);
    check_all_agree(&lm, &ps, 8, Batching::DepthWise);
    check_all_agree(&lm, &ps[..8], 8, Batching::SequenceWise);
}

/// Early exit on the real recursive model: a token decoded after loop 1 is that loop's argmax,
/// and both KV fill policies run; the exit loop is reported per token.
#[test]
fn scheduled_exits_decode_the_exit_loop() {
    let lm = converted(3, 16);
    let tok = std::sync::Arc::new(lm.tokenizer.clone());
    let p = prompts(&lm, 1).remove(0);
    let schedule = vec![1u8, 3, 2, 1, 1, 3, 2, 2];
    for fill in [KvFill::Propagate, KvFill::Recompute] {
        let mut eng = engine(
            copy_model(&lm),
            tok.clone(),
            EngineConfig {
                kv_fill: fill,
                ..Default::default()
            },
        );
        let mut params = greedy(8);
        params.ignore_eos = true;
        params.exit.schedule = Some(schedule.clone());
        let id = eng
            .submit(Request {
                prompt: p.clone(),
                params,
            })
            .unwrap();
        let events = eng.run_to_completion().unwrap();
        let loops: Vec<usize> = events
            .iter()
            .filter_map(|(i, e)| match e {
                Event::Token(t) if *i == id => Some(t.loops),
                _ => None,
            })
            .collect();
        assert_eq!(
            loops,
            schedule.iter().map(|&l| l as usize).collect::<Vec<_>>(),
            "{fill:?}"
        );
        let stats = eng.stats();
        assert_eq!(stats.exits, vec![3, 3, 2]);
        if fill == KvFill::Propagate {
            // Loops skipped by each token but the last (a finished request needs no fill).
            assert_eq!(stats.fill_rows, 2 + 1 + 2 + 2 + 1);
        }
        // The first token exits after loop 1: it is loop 1's greedy prediction of the prompt.
        let (rows, _) = {
            let (mut pool, seq) = rrt_model::kv::single_sequence(lm.model.kv_layout(16), p.len()).unwrap();
            let rows = rrt_model::forward::sequence_rows(&p, &seq.blocks);
            (lm.model.forward_loops(&rows, &mut pool).unwrap(), ())
        };
        let h = lm.model.config.hidden;
        let last = &rows[0][(p.len() - 1) * h..p.len() * h];
        let want = rrt_model::sampling::argmax(&lm.model.logits(last, &[0]));
        let first = events.iter().find_map(|(_, e)| match e {
            Event::Token(t) => Some(t.id),
            _ => None,
        });
        assert_eq!(first, Some(want), "{fill:?}");
    }
}

/// A KV-only fill row (an exited token's state propagated to a deeper loop) writes, at the
/// loop's first layer, exactly the keys and values a full row at the same depth, position and
/// hidden state writes there: the fill product (the key/value rows of the fused q|k|v matrix
/// and the K and V LoRAs of that loop) is the full product's key/value columns.
#[test]
fn fill_rows_write_the_keys_and_values_of_a_full_row() {
    use rrt_kernels::backend::Backend;
    use rrt_node::engine::{PassRow, ResidentModel};
    let lm = converted(3, 16);
    let be = rrt_kernels::CpuBackend;
    let rm = ResidentModel::new(be, copy_model(&lm)).unwrap();
    let layout = rm.kv_layout(16);
    let mut kv = rm.backend.kv_pool(layout, 4).unwrap();
    let h = rm.config.hidden;
    // A hidden state with the spread of a real one: an embedding row.
    let mut state = rm.backend.zeros(h).unwrap();
    rm.embed(&[1234], &mut state).unwrap();
    let (full_blocks, fill_blocks) = ([0u32], [1u32]);
    for depth in [1usize, 2] {
        let pos = 5 + depth;
        let rows = [PassRow {
            pos,
            depth,
            blocks: &full_blocks,
        }];
        let fills = [PassRow {
            pos,
            depth,
            blocks: &fill_blocks,
        }];
        let mut x = state.clone();
        rm.pass(&mut kv, &layout, &mut x, &rows, Some(&state), &fills).unwrap();
        let full = rm.backend.kv_export(&kv, &layout, &full_blocks, pos + 1).unwrap();
        let fill = rm.backend.kv_export(&kv, &layout, &fill_blocks, pos + 1).unwrap();
        // Position-major export: [position][layer][key, value].
        let per_layer = 2 * layout.kv_dim();
        let at = |v: &[f32], layer: usize| {
            let o = (pos * layout.n_layers + layer) * per_layer;
            v[o..o + per_layer].to_vec()
        };
        let first = depth * rm.shared;
        let (a, b) = (at(&full, first), at(&fill, first));
        assert!(a.iter().any(|v| *v != 0.0), "depth {depth}: nothing written");
        assert_eq!(a, b, "depth {depth}: fill row keys/values differ from the full row's");
        // Deeper layers of the loop see the full row's updated state, the fill row's is fixed.
        assert_ne!(at(&full, first + 1), at(&fill, first + 1), "depth {depth}");
    }
}

/// The B = 3 checkpoint of these tests with a fixed gate whose logits on real states
/// straddle 0, so that tokens exit after every loop (thresholds 0.6, 0.45), and a 48-token
/// prompt of real text.
struct GateSetup {
    lm: LoadedModel,
    tok: std::sync::Arc<rrt_model::tokenizer::Tokenizer>,
    gate: rrt_model::weights::ExitGate,
    prompt: Vec<u32>,
}

impl GateSetup {
    fn new() -> Self {
        let lm = converted(3, 16);
        let tok = std::sync::Arc::new(lm.tokenizer.clone());
        let ids = lm.tokenizer.encode(&shakespeare()[..20_000], false, false).unwrap();
        let h = lm.model.config.hidden;
        let gate = rrt_model::weights::ExitGate {
            w: (0..h).map(|i| 0.02 * ((i * 7919 % 97) as f32 / 48.0 - 1.0)).collect(),
            b: 0.0,
        };
        GateSetup {
            prompt: ids[500..548].to_vec(),
            lm,
            tok,
            gate,
        }
    }

    /// An engine over a copy of the model with the gate, `cfg` with the gate's exit rule.
    fn engine(&self, cfg: EngineConfig) -> rrt_node::Engine<rrt_kernels::CpuBackend> {
        let mut m = copy_model(&self.lm);
        m.weights.exit_gate = Some(self.gate.clone());
        let rule = rrt_node::ExitRule {
            criterion: rrt_model::exit::Criterion::Gate,
            thresholds: vec![Some(0.6), Some(0.45)],
        };
        engine(
            m,
            self.tok.clone(),
            EngineConfig {
                exit: Some(rule),
                ..cfg
            },
        )
    }
}

/// Prompt exits (`EngineConfig::prompt_exits`): a prompt prefilled with its rows taking the
/// gate's exit test (each row's own hazard, deeper keys/values propagated from its exit state)
/// leaves the keys and values that feeding the same tokens one at a time as forced decoded
/// tokens leaves (their exits are the engine's decode exits, tested above): the greedy
/// continuation after it is the same, token for token, loop for loop and log-probability for
/// log-probability. Prompt rows exit after every loop. Without the fill rows written before
/// the pass's attention (`ResidentModel::pass`) the log-probabilities differ.
#[test]
fn prompt_exits_equal_feeding_the_prompt_as_forced_tokens() {
    let g = GateSetup::new();
    let p = g.prompt.clone();
    let n = 10;
    let run = |prompt: Vec<u32>, forced: Option<Vec<u32>>, max_tokens: usize, prompt_exits: bool| {
        let mut eng = g.engine(EngineConfig {
            prompt_exits,
            ..Default::default()
        });
        let mut params = greedy(max_tokens);
        params.ignore_eos = true;
        params.forced = forced;
        let id = eng.submit(Request { prompt, params }).unwrap();
        let out: Vec<(u32, usize, f32)> = eng
            .run_to_completion()
            .unwrap()
            .into_iter()
            .filter_map(|(i, e)| match e {
                Event::Token(t) if i == id => Some((t.id, t.loops, t.logprob)),
                _ => None,
            })
            .collect();
        (out, eng.stats().clone())
    };
    let (prefilled, stats) = run(p.clone(), None, n, true);
    let (fed, _) = run(p[..1].to_vec(), Some(p[1..].to_vec()), p.len() - 1 + n, false);
    assert_eq!(prefilled.len(), n);
    assert_eq!(&fed[..p.len() - 1].iter().map(|t| t.0).collect::<Vec<_>>(), &p[1..]);
    for (a, b) in fed[p.len() - 1..].iter().zip(&prefilled) {
        assert_eq!((a.0, a.1), (b.0, b.1), "continuation after the prompt");
        assert!((a.2 - b.2).abs() <= 1e-4, "logprob {} against {}", a.2, b.2);
    }
    // Rows 0 .. len - 1 of the prompt took the test: some left after loop 1, some after
    // loop 2, some ran all 3.
    let loops: Vec<usize> = fed[..p.len() - 1].iter().map(|t| t.1).collect();
    assert!((1..=3).all(|l| loops.contains(&l)), "{loops:?}");
    let fed_exits = loops.iter().filter(|&&l| l < 3).count() as u64;
    assert_eq!(stats.prompt_exits, fed_exits, "the same prompt rows exit either way");
    assert!(
        stats.prompt_exits > 0 && stats.prompt_exits < p.len() as u64 - 1,
        "{stats:?}"
    );
    // Off, the prompt runs every loop: the same first pass over the prompt, no prompt exits.
    let (_, off) = run(p.clone(), None, n, false);
    assert_eq!(off.prompt_exits, 0);
    assert!(off.fill_rows < stats.fill_rows);
}

/// A request's own `prompt_exits` switch: on in an engine where prompt exits are off, it
/// gives what the engine-wide setting gives (and off where they are on, full depth); and the
/// prefix cache never hands one policy's prompt keys/values to the other: with the cache, a
/// full-depth request after a prompt-exit one with the same prompt (and the reverse) returns
/// what it returns alone, and a request under the same policy hits the cache.
#[test]
fn prompt_exits_per_request_and_the_prefix_cache_keeps_policies_apart() {
    let g = GateSetup::new();
    let p = g.prompt.clone();
    let new_engine = |prompt_exits: bool, cache: bool| {
        g.engine(EngineConfig {
            prompt_exits,
            prefix_cache_bytes: if cache { 64 << 20 } else { 0 },
            ..Default::default()
        })
    };
    type Out = Vec<(u32, usize, f32)>;
    let run = |eng: &mut rrt_node::Engine<rrt_kernels::CpuBackend>, switch: Option<bool>| -> (Out, u64) {
        let before = eng.stats().prompt_exits;
        let mut params = greedy(8);
        params.ignore_eos = true;
        params.exit.prompt_exits = switch;
        let id = eng
            .submit(Request {
                prompt: p.clone(),
                params,
            })
            .unwrap();
        let out = eng
            .run_to_completion()
            .unwrap()
            .into_iter()
            .filter_map(|(i, e)| match e {
                Event::Token(t) if i == id => Some((t.id, t.loops, t.logprob)),
                _ => None,
            })
            .collect();
        (out, eng.stats().prompt_exits - before)
    };
    let (engine_wide, exits) = run(&mut new_engine(true, false), None);
    let (full, none) = run(&mut new_engine(false, false), None);
    assert!(exits > 0 && none == 0, "{exits} {none}");
    assert_ne!(engine_wide, full, "prompt exits change the continuation here");
    assert_eq!(
        run(&mut new_engine(false, false), Some(true)),
        (engine_wide.clone(), exits)
    );
    assert_eq!(run(&mut new_engine(true, false), Some(false)), (full.clone(), 0));

    let mut cached = new_engine(false, true);
    assert_eq!(run(&mut cached, Some(true)), (engine_wide.clone(), exits));
    assert_eq!(
        run(&mut cached, None),
        (full.clone(), 0),
        "full depth after prompt exits"
    );
    assert_eq!(cached.stats().prefix_hits, 0, "the other policy's blocks are not used");
    assert_eq!(
        run(&mut cached, Some(true)).0,
        engine_wide,
        "prompt exits again, from the cache"
    );
    assert_eq!(run(&mut cached, None).0, full, "full depth again, from the cache");
    assert_eq!(cached.stats().prefix_hits, 2);
}
