//! The uptraining tool (`train/`, PyTorch) against `rrt`: the checkpoint is the contract.
//!
//! - PyTorch's per-loop logits of a checkpoint equal `rrt`'s (the converted SmolLM2 at B = 3,
//!   the original as a B = 1 checkpoint, a tiny random untied model written by PyTorch, and a
//!   checkpoint PyTorch has just trained), and `rrt` loads and evaluates the trained one;
//! - the learned exit gate (`--exit-gate`): the tiny model's random gate and the trained
//!   checkpoint's gate load into rrt, their per-loop gate logits equal PyTorch's (within 1e-3),
//!   and the engine, given the gate as its exit criterion, exits each generated token where the
//!   gate's cumulative exit probability reaches the threshold;
//! - `rrt distill-data` writes a corpus whose held-out split training never reads;
//! - the Python test suite (`train/tests`, tiny random models on the CPU) passes.
//!
//! Needs `.venv-train` from `scripts/setup-train-python.sh` (or `RRT_TRAIN_PYTHON`) and the
//! default model from `scripts/fetch-model.sh`.

mod common;

use common::{root, rrt_bin};
use rrt_kernels::CpuBackend;
use rrt_model::exit::{Criterion, gate_exit_probability, gate_exits, gate_hazard};
use rrt_node::{Engine, EngineConfig, Event, ExitControl, ExitRule, GenParams, KvFill, Request, ResidentModel};
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

fn rrt(args: &[&str]) -> String {
    run(Command::new(rrt_bin()).args(args).current_dir(root()))
}

fn train_tool(args: &[&str]) -> String {
    run(Command::new(python())
        .args(["-m", "rrt_train"])
        .args(args)
        .env("PYTHONPATH", root().join("train"))
        .current_dir(root()))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrt-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `f` of every loop's output (`tokens.len()` rows of hidden states) for `tokens`, by rrt.
fn per_loop<T>(m: &rrt_model::forward::Model, tokens: &[u32], f: impl Fn(&[f32], &[usize]) -> T) -> Vec<T> {
    let (mut pool, seq) = rrt_model::kv::single_sequence(m.kv_layout(16), tokens.len()).unwrap();
    let rows = rrt_model::forward::sequence_rows(tokens, &seq.blocks);
    let select: Vec<usize> = (0..tokens.len()).collect();
    m.forward_loops(&rows, &mut pool)
        .unwrap()
        .iter()
        .map(|h| f(h, &select))
        .collect()
}

/// Per-loop logits of `tokens` by rrt (`loops x tokens x vocab`).
fn rrt_logits(dir: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let lm = rrt_model::load(dir).unwrap();
    per_loop(&lm.model, tokens, |h, select| lm.model.logits(h, select))
}

/// Runs `rrt_train WHAT --model DIR --tokens ... --out OUT` (`logits` or `gates`).
fn torch_dump(what: &str, dir: &Path, tokens: &[u32], out: &Path) {
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    train_tool(&[
        what,
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
}

/// Compares PyTorch's logits of `dir` with rrt's; returns the largest relative difference.
fn compare(dir: &Path, tokens: &[u32], loops: usize) -> f64 {
    let out = dir.with_extension("logits");
    torch_dump("logits", dir, tokens, &out);
    let bytes = std::fs::read(&out).unwrap();
    let torch: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let ours = rrt_logits(dir, tokens);
    assert_eq!(ours.len(), loops, "{}: loops", dir.display());
    let per_loop = torch.len() / loops;
    assert_eq!(per_loop, ours[0].len(), "{}: logits per loop", dir.display());
    let vocab = per_loop / tokens.len();
    let mut worst = 0f64;
    for (b, r) in ours.iter().enumerate() {
        let t = &torch[b * per_loop..(b + 1) * per_loop];
        for (i, (tr, rr)) in t.chunks_exact(vocab).zip(r.chunks_exact(vocab)).enumerate() {
            let scale = rr.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            let diff = tr.iter().zip(rr).fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
            worst = worst.max(diff / scale);
            let am = |v: &[f32]| rrt_model::sampling::argmax(v);
            let (ta, ra) = (am(tr), am(rr));
            // Equal argmax unless the top two are within the measured noise.
            if ta != ra {
                let gap = (rr[ra as usize] - rr[ta as usize]).abs() as f64;
                assert!(
                    gap < 1e-3 * scale,
                    "{}: loop {b} row {i}: argmax {ta} vs {ra}",
                    dir.display()
                );
            }
        }
    }
    assert!(
        worst < 1e-4,
        "{}: PyTorch and rrt logits differ by {worst:e} of the logit scale",
        dir.display()
    );
    let _ = std::fs::remove_file(out);
    worst
}

/// rrt's exit-gate logits of every loop's output for `tokens` (`loops x tokens`).
fn rrt_gates(m: &rrt_model::forward::Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    per_loop(m, tokens, |h, select| {
        m.gate_logits(h, select).expect("the model has an exit gate")
    })
}

/// Compares PyTorch's exit-gate logits of `dir` (`rrt_train gates`: every loop's `w . h + b`
/// on the loop output before the final norm) with rrt's; returns the largest difference.
fn compare_gates(dir: &Path, tokens: &[u32], loops: usize) -> f64 {
    let out = dir.with_extension("gates.json");
    torch_dump("gates", dir, tokens, &out);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let torch: Vec<Vec<f64>> = serde_json::from_value(v["gates"].clone()).unwrap();
    let lm = rrt_model::load(dir).unwrap();
    assert!(
        lm.model.weights.exit_gate.is_some(),
        "{}: rrt loaded no exit gate",
        dir.display()
    );
    let ours = rrt_gates(&lm.model, tokens);
    assert_eq!((ours.len(), torch.len()), (loops, loops), "{}: loops", dir.display());
    let mut worst = 0f64;
    for (b, (o, t)) in ours.iter().zip(&torch).enumerate() {
        assert_eq!(o.len(), tokens.len());
        assert_eq!(t.len(), tokens.len());
        for (i, (x, y)) in o.iter().zip(t).enumerate() {
            let d = (*x as f64 - y).abs();
            assert!(
                d < 1e-3,
                "{}: loop {b} token {i}: gate {x} (rrt) vs {y} (PyTorch)",
                dir.display()
            );
            worst = worst.max(d);
        }
    }
    // A gate that says the same for every token would prove little.
    let spread = ours[0].iter().fold(f32::MIN, |a, &x| a.max(x)) - ours[0].iter().fold(f32::MAX, |a, &x| a.min(x));
    assert!(
        spread > 0.01,
        "{}: gate logits barely vary: {:?}",
        dir.display(),
        ours[0]
    );
    let _ = std::fs::remove_file(out);
    worst
}

/// Greedy generation of `n` tokens from `prompt` through the engine with the checkpoint's gate
/// as the exit criterion at a threshold (the recompute fill keeps every loop's keys and values
/// exact): each token must run exactly the loops after which rrt's gate on the final sequence
/// first reaches the threshold (cumulative exit probability), except within 1e-4 of it.
/// Returns the tokens per loop count.
fn engine_exits_follow_the_gate(dir: &Path, prompt: &[u32], n: usize) -> Vec<usize> {
    let lm = rrt_model::load(dir).unwrap();
    let loops = lm.model.loops();
    // The threshold: the median cumulative exit probability after loop 1 over the prompt.
    let mut cdf1: Vec<f64> = rrt_gates(&lm.model, prompt)[0]
        .iter()
        .map(|&g| gate_exit_probability(gate_hazard(g)))
        .collect();
    cdf1.sort_by(f64::total_cmp);
    let threshold = (cdf1[cdf1.len() / 2] as f32).clamp(1e-3, 0.999);
    let cfg = EngineConfig {
        exit: Some(ExitRule {
            criterion: Criterion::Gate,
            thresholds: vec![Some(threshold); loops - 1],
        }),
        kv_fill: KvFill::Recompute,
        ..Default::default()
    };
    let tok = Arc::new(lm.tokenizer.clone());
    let model = rrt_model::load(dir).unwrap().model;
    let mut eng = Engine::new(ResidentModel::new(CpuBackend, model).unwrap(), tok, cfg).unwrap();
    let params = GenParams {
        max_tokens: n,
        ignore_eos: true,
        exit: ExitControl::default(),
        ..Default::default()
    };
    eng.submit(Request {
        prompt: prompt.to_vec(),
        params,
    })
    .unwrap();
    let (mut tokens, mut used) = (Vec::new(), Vec::new());
    let mut done = false;
    while !done {
        for (_, e) in eng.step().unwrap() {
            match e {
                Event::Token(t) => {
                    tokens.push(t.id);
                    used.push(t.loops);
                }
                Event::Done { .. } => done = true,
            }
        }
    }
    assert_eq!(tokens.len(), n);
    let seq: Vec<u32> = prompt.iter().chain(&tokens[..n - 1]).copied().collect();
    let gates = rrt_gates(&lm.model, &seq);
    let mut per_loop = vec![0usize; loops];
    for (j, &got) in used.iter().enumerate() {
        let p = prompt.len() - 1 + j;
        let (mut hazard, mut want, mut tie) = (0f64, loops, false);
        for (b, g) in gates.iter().enumerate().take(loops - 1) {
            hazard += gate_hazard(g[p]);
            tie |= (gate_exit_probability(hazard) - threshold as f64).abs() < 1e-4;
            if want == loops && gate_exits(hazard, threshold) {
                want = b + 1;
            }
        }
        if !tie {
            assert_eq!(got, want, "{}: token {j} at threshold {threshold}", dir.display());
        }
        per_loop[got - 1] += 1;
    }
    eprintln!(
        "{}: gate exits at threshold {threshold}: {per_loop:?} tokens after loops 1..{loops}",
        dir.file_name().unwrap().to_string_lossy()
    );
    per_loop
}

#[test]
fn pytorch_logits_equal_rrt_logits_and_a_trained_checkpoint_serves() {
    let base = tmp("roundtrip");
    std::fs::create_dir_all(&base).unwrap();
    let b3 = base.join("b3-r16");
    rrt(&[
        "convert",
        "--out",
        b3.to_str().unwrap(),
        "--loops",
        "3",
        "--lora-rank",
        "16",
    ]);
    let teacher = base.join("teacher");
    rrt(&["convert", "--out", teacher.to_str().unwrap(), "--loops", "1"]);
    let tiny = base.join("tiny");
    train_tool(&[
        "tiny",
        "--out",
        tiny.to_str().unwrap(),
        "--tokenizer-from",
        b3.to_str().unwrap(),
        "--untied",
        "--loops",
        "2",
        "--layers",
        "6",
        "--exit-gate",
    ]);
    let lm = rrt_model::load(&b3).unwrap();
    let tokens = lm
        .tokenizer
        .encode(
            "First Citizen:\nBefore we proceed any further, hear me speak.",
            true,
            false,
        )
        .unwrap();
    assert!(tokens.len() >= 12);
    let mut report = vec![];
    for (dir, loops) in [(&b3, 3), (&teacher, 1), (&tiny, 2)] {
        report.push((
            dir.file_name().unwrap().to_string_lossy().to_string(),
            compare(dir, &tokens, loops),
        ));
    }
    assert!(rrt_model::load(&b3).unwrap().model.weights.exit_gate.is_none());
    let mut gate_report = vec![("tiny".to_string(), compare_gates(&tiny, &tokens, 2))];

    // Train the converted model briefly on a corpus the original wrote, then check rrt serves
    // the result and still agrees with PyTorch on it.
    let data = base.join("data");
    let text = base.join("text.txt");
    let shakespeare = std::fs::read_to_string(root().join("../shared/data/tinyshakespeare.txt"))
        .or_else(|_| std::fs::read_to_string(root().join("data/calibration.txt")))
        .unwrap();
    std::fs::write(&text, &shakespeare[..shakespeare.len().min(40_000)]).unwrap();
    rrt(&[
        "distill-data",
        "--out",
        data.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--samples",
        "4",
        "--max-tokens",
        "16",
    ]);
    let trained = base.join("trained");
    let out = train_tool(&[
        "train",
        "--student",
        b3.to_str().unwrap(),
        "--teacher",
        teacher.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        trained.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "32",
        "--lr",
        "1e-4",
        "--warmup",
        "1",
        "--eval-windows",
        "2",
        "--no-progress",
        "--exit-gate",
        "--gate-lr",
        "1e-3",
    ]);
    assert!(out.contains("\"tokens\": 128"), "{out}");
    report.push(("trained".into(), compare(&trained, &tokens, 3)));
    gate_report.push(("trained".into(), compare_gates(&trained, &tokens, 3)));
    let exits = engine_exits_follow_the_gate(&trained, &tokens, 12);
    assert!(exits[2] < 12, "no token exited before the last loop: {exits:?}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trained.join("rrt_checkpoint.json")).unwrap()).unwrap();
    let tr = &cfg["provenance"]["extra"]["training"];
    assert_eq!(tr["tokens_seen"], 128);
    assert_eq!(tr["steps"], 2);
    assert_eq!(cfg["provenance"]["extra"]["svd"], "plain", "conversion provenance kept");
    assert_eq!(cfg["exit_gate"], true);
    assert_eq!(tr["exit_gate"]["beta"], 0.05);
    let ev = rrt(&[
        "eval",
        "--model",
        trained.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--window",
        "64",
        "--windows",
        "2",
        "--json",
    ]);
    assert!(ev.contains("\"ppl\""), "{ev}");
    eprintln!("largest relative logit difference PyTorch vs rrt: {report:?}");
    eprintln!("largest gate logit difference PyTorch vs rrt: {gate_report:?}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn distill_data_keeps_the_heldout_split_apart() {
    let base = tmp("data");
    std::fs::create_dir_all(&base).unwrap();
    let text = base.join("text.txt");
    let body: String = (0..400)
        .map(|i| format!("Line {i}: the quick brown fox number {i} jumps over the lazy dog.\n"))
        .collect();
    std::fs::write(&text, &body).unwrap();
    let out = base.join("d");
    rrt(&[
        "distill-data",
        "--out",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--samples",
        "20",
        "--max-tokens",
        "8",
        "--heldout",
        "0.1",
        "--doc-tokens",
        "128",
    ]);
    let read = |name: &str| -> Vec<(String, Vec<u32>)> {
        std::fs::read_to_string(out.join(name))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["source"].as_str().unwrap().to_string(),
                    serde_json::from_value(v["ids"].clone()).unwrap(),
                )
            })
            .collect()
    };
    let (train, held) = (read("train.jsonl"), read("heldout.jsonl"));
    let generated = |v: &[(String, Vec<u32>)]| v.iter().filter(|d| d.0.starts_with("generated")).count();
    // Every 10th group of 4 samples (one of each prompt kind) is held out: samples 0..4.
    assert_eq!(generated(&held), 4);
    assert_eq!(generated(&train), 16);
    let kinds: std::collections::BTreeSet<&str> = held.iter().map(|d| d.0.as_str()).collect();
    assert!(
        kinds.contains("generated-continuation") && kinds.contains("generated-chat"),
        "{kinds:?}"
    );
    // The text documents of both splits, joined, are the whole text's tokens in order; the
    // held-out ones are its tail.
    let lm = rrt_model::load(&rrt_model::default_model_path().unwrap()).unwrap();
    let ids = lm.tokenizer.encode(&body, false, false).unwrap();
    let text_of = |v: &[(String, Vec<u32>)]| -> Vec<u32> {
        v.iter().filter(|d| d.0 == "text").flat_map(|d| d.1.clone()).collect()
    };
    let (tt, th) = (text_of(&train), text_of(&held));
    let split = (ids.len() as f64 * 0.9) as usize;
    assert_eq!(th, ids[split..].to_vec());
    assert_eq!(tt, ids[..split].to_vec());
    // Every generated document starts with its prompt and has at most 8 new tokens; the
    // held-out lines (lines 360..400 of the text) appear in no training document.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["heldout"]["tokens"],
        held.iter().map(|d| d.1.len()).sum::<usize>()
    );
    assert_eq!(
        manifest["train"]["tokens"],
        train.iter().map(|d| d.1.len()).sum::<usize>()
    );
    let held_line = lm.tokenizer.encode("Line 390:", false, false).unwrap();
    for (_, d) in &train {
        assert!(
            !d.windows(held_line.len()).any(|w| w == held_line),
            "held-out text in training"
        );
    }
    // Bad settings are refused with the flag named.
    let bad = Command::new(rrt_bin())
        .args(["distill-data", "--out", out.to_str().unwrap(), "--heldout", "0.9"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--heldout"));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn python_test_suite_passes() {
    let out = run(Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(root().join("train")));
    eprintln!("{out}");
    assert!(out.contains(" passed"), "{out}");
}
