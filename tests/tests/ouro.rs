//! Ouro (ByteDance's natively looped LM) against an independent PyTorch implementation of its
//! equations (`tests/python/ouro_reference.py`, float64), on tiny random Ouro directories
//! written by `rrt random-model --like ouro-tiny`:
//!
//! - every loop step's logits and gate values of rrt's forward pass equal the reference's;
//! - the step each token exits at, at thresholds 0.5 / 0.9 / 1.0, equals the reference's;
//! - greedy generation through the engine equals the reference's: at threshold 1.0 (every
//!   step) and, with the `recompute` KV fill (exited tokens still compute their deeper
//!   steps' keys and values, as the reference does), at 0.5 and 0.9; the `propagate` fill's
//!   difference is measured and printed;
//! - bad directories (a missing config field, a missing gate or second norm, a gate of the
//!   wrong shape) are refused with the field or tensor named.
//!
//! Needs `.venv-train` (PyTorch, from `scripts/setup-train-python.sh`, or `RRT_TRAIN_PYTHON`)
//! and the default model (its tokenizer) from `scripts/fetch-model.sh`.

mod common;

use common::{root, rrt_bin};
use rrt_kernels::CpuBackend;
use rrt_model::exit::{gate_exits, gate_hazard};
use rrt_node::{Engine, EngineConfig, Event, ExitControl, ExitRule, GenParams, KvFill, Request, ResidentModel};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn python() -> PathBuf {
    let p = std::env::var_os("RRT_TRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-train/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup-train-python.sh (the README's test command does)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrt-ouro-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny random Ouro directory (f32 weights) written by `rrt random-model`.
fn tiny_ouro(name: &str, seed: u64) -> PathBuf {
    let dir = tmp(name);
    run(Command::new(rrt_bin()).current_dir(root()).args([
        "random-model",
        "--like",
        "ouro-tiny",
        "--dtype",
        "f32",
        "--seed",
        &seed.to_string(),
        "--out",
        dir.to_str().unwrap(),
    ]));
    dir
}

/// The reference's outputs for `tokens`: per-step logits (`steps x tokens x vocab`) and the
/// JSON report.
fn reference(dir: &Path, tokens: &[u32], generate: usize) -> (Vec<Vec<f32>>, Value) {
    let out = dir.join("reference");
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    run(Command::new(python()).args([
        root().join("tests/python/ouro_reference.py").to_str().unwrap(),
        dir.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
        "--generate",
        &generate.to_string(),
    ]));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    let bytes = std::fs::read(out.with_extension("logits")).unwrap();
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let steps = json["steps"].as_u64().unwrap() as usize;
    let per = all.len() / steps;
    (all.chunks(per).map(<[f32]>::to_vec).collect(), json)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A prompt of `n` ids from the tokenizer's ordinary range.
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1000 + (i * 7919 + salt * 104_729) % 40_000)
        .collect()
}

/// Greedy generation of each prompt through the engine (CPU backend, all requests in flight
/// together) at `threshold`, with `fill`: (tokens, loops per token).
fn engine_generate(
    dir: &Path,
    prompts: &[Vec<u32>],
    n: usize,
    threshold: f32,
    fill: KvFill,
) -> Vec<(Vec<u32>, Vec<usize>)> {
    let lm = rrt_model::load(dir).unwrap();
    let rule = ExitRule::for_model(&lm).unwrap();
    assert!(rule.is_some(), "an Ouro model brings its gate as the exit rule");
    let cfg = EngineConfig {
        exit: rule,
        kv_fill: fill,
        ..Default::default()
    };
    let tok = Arc::new(lm.tokenizer.clone());
    let mut eng = Engine::new(ResidentModel::new(CpuBackend, lm.model).unwrap(), tok, cfg).unwrap();
    let mut order = Vec::new();
    for p in prompts {
        let params = GenParams {
            max_tokens: n,
            ignore_eos: true,
            exit: ExitControl {
                threshold: Some(threshold),
                ..Default::default()
            },
            ..Default::default()
        };
        order.push(
            eng.submit(Request {
                prompt: p.clone(),
                params,
            })
            .unwrap(),
        );
    }
    let mut out: Vec<(Vec<u32>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); prompts.len()];
    let mut done = 0;
    while done < prompts.len() {
        for (id, e) in eng.step().unwrap() {
            let i = order.iter().position(|&o| o == id).unwrap();
            match e {
                Event::Token(t) => {
                    out[i].0.push(t.id);
                    out[i].1.push(t.loops);
                }
                Event::Done { .. } => done += 1,
            }
        }
    }
    out
}

#[test]
fn ouro_matches_the_pytorch_reference() {
    let dir = tiny_ouro("ref", 7);
    let lm = rrt_model::load(&dir).unwrap();
    let m = &lm.model;
    assert_eq!((m.loops(), m.config.n_layers, m.weights.layers.len()), (4, 8, 2));
    let tokens = prompt(12, 1);
    let (ref_logits, rep) = reference(&dir, &tokens, 10);
    let steps = rep["steps"].as_u64().unwrap() as usize;
    assert_eq!(steps, 4);

    // Per-step logits and gate values of rrt's forward pass.
    let (mut pool, seq) = rrt_model::kv::single_sequence(m.kv_layout(16), tokens.len()).unwrap();
    let rows = rrt_model::forward::sequence_rows(&tokens, &seq.blocks);
    let select: Vec<usize> = (0..tokens.len()).collect();
    let hidden = m.forward_loops(&rows, &mut pool).unwrap();
    assert_eq!(hidden.len(), steps);
    let mut worst = 0f64;
    let mut gate_err = 0f64;
    let mut hazard = vec![0f64; tokens.len()];
    let mut exits: Vec<Vec<usize>> = vec![vec![steps; tokens.len()]; 3];
    let thresholds = [0.5f32, 0.9, 1.0];
    for (t, h) in hidden.iter().enumerate() {
        let got = m.logits(h, &select);
        let want = &ref_logits[t];
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((*g as f64 - *w as f64).abs() / scale);
        }
        let gates = m.gate_logits(h, &select).unwrap();
        for (i, g) in gates.iter().enumerate() {
            let w = rep["gates"][t][i].as_f64().unwrap();
            gate_err = gate_err.max((*g as f64 - w).abs());
            if t + 1 < steps {
                hazard[i] += gate_hazard(*g);
                for (k, &thr) in thresholds.iter().enumerate() {
                    if exits[k][i] == steps && gate_exits(hazard[i], thr) {
                        exits[k][i] = t + 1;
                    }
                }
            }
        }
    }
    eprintln!("per-step logits: worst difference {worst:.2e} of the logit scale; gates {gate_err:.2e}");
    assert!(worst < 1e-4, "per-step logits differ from the reference by {worst:e}");
    assert!(gate_err < 1e-4, "gate logits differ from the reference by {gate_err:e}");

    // The step each token exits at, except where the cumulative probability sits within 1e-6
    // of the threshold (a rounding tie between f32 and f64).
    let mut spread = [0usize; 4];
    for (k, thr) in thresholds.iter().enumerate() {
        let want = ids(&rep["exit_steps"][format!("{thr:?}")]);
        for i in 0..tokens.len() {
            let tie = (0..steps - 1).any(|t| (rep["cdf"][t][i].as_f64().unwrap() - *thr as f64).abs() < 1e-6);
            if !tie {
                assert_eq!(
                    exits[k][i], want[i] as usize,
                    "threshold {thr}: token {i} exits at a different step"
                );
            }
            if k == 0 {
                spread[exits[k][i] - 1] += 1;
            }
        }
    }
    eprintln!("exit steps at 0.5: {spread:?} tokens after steps 1..4");
    assert!(
        spread.iter().filter(|&&c| c > 0).count() >= 2,
        "the random gate exits tokens at one step only: {spread:?}"
    );

    // Greedy generation through the engine.
    let n = 10;
    for (thr, fill) in [
        (1.0f32, KvFill::Propagate),
        (0.5, KvFill::Recompute),
        (0.9, KvFill::Recompute),
    ] {
        let got = engine_generate(&dir, std::slice::from_ref(&tokens), n, thr, fill);
        let want = ids(&rep["generate"][format!("{thr:?}")]);
        assert_eq!(
            got[0].0, want,
            "threshold {thr}, {fill:?}: engine tokens differ from the reference"
        );
        if thr == 1.0 {
            assert!(
                got[0].1.iter().all(|&l| l == steps),
                "threshold 1 runs every step: {:?}",
                got[0].1
            );
        } else {
            assert!(
                got[0].1.iter().any(|&l| l < steps),
                "threshold {thr} exits nothing: {:?}",
                got[0].1
            );
        }
    }
    // The propagate fill (exited tokens' deeper keys/values from their exit state) is an
    // approximation: measured, not asserted.
    let prop = engine_generate(&dir, std::slice::from_ref(&tokens), n, 0.5, KvFill::Propagate);
    let want = ids(&rep["generate"]["0.5"]);
    let same = prop[0].0.iter().zip(&want).take_while(|(a, b)| a == b).count();
    eprintln!("propagate fill at 0.5: {same}/{n} tokens equal to the reference before the first difference");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Several requests in flight together (depth-wise batches mixing steps and exits) give each
/// request the tokens it gets alone.
#[test]
fn ouro_engine_batches_equal_single_requests() {
    let dir = tiny_ouro("batch", 11);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(3 + 4 * i, i as u32 + 2)).collect();
    for (thr, fill) in [
        (1.0f32, KvFill::Propagate),
        (0.6, KvFill::Recompute),
        (0.6, KvFill::Propagate),
    ] {
        let together = engine_generate(&dir, &prompts, 8, thr, fill);
        for (i, p) in prompts.iter().enumerate() {
            let alone = engine_generate(&dir, std::slice::from_ref(p), 8, thr, fill);
            assert_eq!(
                together[i], alone[0],
                "threshold {thr}, {fill:?}: request {i} differs in a batch"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rewrites `dir/model.safetensors` through `edit` (name, shape, f32 data).
fn edit_tensors(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn load_err(dir: &Path) -> String {
    match rrt_model::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_ouro_directories_are_refused_with_the_field_or_tensor_named() {
    let base = tiny_ouro("bad", 3);
    let fresh = |name: &str| -> PathBuf {
        let d = tmp(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&base).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    // A config without the loop count.
    let d = fresh("no-steps");
    let cfg_path = d.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("total_ut_steps");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("total_ut_steps"), "{e}");
    // A threshold outside (0, 1].
    cfg["total_ut_steps"] = 4.into();
    cfg["early_exit_threshold"] = 1.5.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(e.contains("early_exit_threshold"), "{e}");
    // Missing tensors: the gate's bias, a second norm.
    for name in [
        "model.early_exit_gate.bias",
        "model.layers.1.input_layernorm_2.weight",
        "model.layers.0.post_attention_layernorm_2.weight",
    ] {
        let d = fresh("missing");
        edit_tensors(&d, |t| t.retain(|(n, _, _)| n != name));
        let e = load_err(&d);
        assert!(e.contains(name), "missing {name}: {e}");
    }
    // A gate of the wrong shape.
    let d = fresh("shape");
    edit_tensors(&d, |t| {
        for (n, s, data) in t.iter_mut() {
            if n == "model.early_exit_gate.weight" {
                *s = vec![2, s[1] / 2];
                let _ = data;
            }
        }
    });
    let e = load_err(&d);
    assert!(e.contains("model.early_exit_gate.weight"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}
