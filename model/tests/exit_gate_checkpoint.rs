//! A learned exit gate in an rrt checkpoint (`exit_gate: true`, tensors `exit_gate.weight`
//! `[1, hidden]` and `exit_gate.bias` `[1]`, written by `rrt-train train --exit-gate`): it
//! saves and loads into `Weights::exit_gate` exactly, the forward pass's gate logits are the
//! saved model's, `rrt calibrate --criterion gate`'s sampling accepts the model, `quantize`
//! carries the gate through unchanged (f32) in every format, checkpoints without it load and are
//! written as before, and a missing, misshapen, non-finite or block-stored gate is refused
//! naming the tensor. (PyTorch's gate logits against these: `tests/tests/train.rs`.)

mod common;

use common::{load, tokenizer};

use rand::{Rng, SeedableRng};
use rrt_model::ModelError;
use rrt_model::checkpoint::{self, Provenance, WeightFormat, read_config, save};
use rrt_model::exit::{Criterion, collect_samples};
use rrt_model::forward::{Model, sequence_rows};
use rrt_model::weights::ExitGate;
use std::path::{Path, PathBuf};

/// The common tiny model (width 64, tied head) with a random exit gate when `gate`.
fn tiny(seed: u64, gate: bool) -> Model {
    let mut m = common::tiny(64, true, seed);
    if gate {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x9a7e);
        m.weights.exit_gate = Some(ExitGate {
            w: (0..64).map(|_| rng.random_range(-0.2..0.2)).collect(),
            b: -0.75,
        });
    }
    m
}

fn prov() -> Provenance {
    Provenance {
        source: "tiny".into(),
        source_sha256: "00".into(),
        tool: "test".into(),
        extra: serde_json::Value::Null,
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrt-gate-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(checkpoint::CONFIG_FILE)).unwrap()).unwrap()
}

const IDS: [u32; 12] = [1, 504, 3458, 28, 253, 2032, 9, 42, 17, 40000, 7, 2];

/// The gate logits of every loop's output for `IDS` (`loops x tokens`).
fn gate_logits(m: &Model) -> Vec<Vec<f32>> {
    let (mut pool, seq) = rrt_model::kv::single_sequence(m.kv_layout(16), IDS.len()).unwrap();
    let select: Vec<usize> = (0..IDS.len()).collect();
    m.forward_loops(&sequence_rows(&IDS, &seq.blocks), &mut pool)
        .unwrap()
        .iter()
        .map(|h| m.gate_logits(h, &select).expect("the model has a gate"))
        .collect()
}

#[test]
fn a_checkpoint_with_a_gate_round_trips_and_quantizes_with_it() {
    let m = tiny(21, true);
    let want = m.weights.exit_gate.clone().unwrap();
    let dir = tmpdir("f32");
    save(&dir, &m, tokenizer(), None, prov(), WeightFormat::F32).unwrap();
    assert_eq!(config_json(&dir)["exit_gate"], true);
    assert!(read_config(&dir).unwrap().exit_gate);
    let lm = load(&dir);
    assert_eq!(lm.model.weights.exit_gate.as_ref(), Some(&want), "gate loaded exactly");
    let g = gate_logits(&lm.model);
    assert_eq!(
        g,
        gate_logits(&m),
        "the loaded model's gate logits are the saved model's"
    );
    assert_eq!(g.len(), 2);
    // The logits of the gate are a function of the token's state: not all equal.
    assert!(g[0].iter().any(|&x| (x - g[0][0]).abs() > 1e-3), "{g:?}");
    // The calibration's gate sampling (`rrt calibrate --criterion gate`) accepts the model.
    let samples = collect_samples(&lm, &IDS, 12, Criterion::Gate).unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].len(), IDS.len());
    assert!(samples[0].iter().all(|(s, _)| (0.0..=1.0).contains(s)));

    // `quantize` carries the gate unchanged (f32) into every format and back.
    let mut last = dir.clone();
    for (i, fmt) in [WeightFormat::Q8_0, WeightFormat::Q4_1, WeightFormat::F32]
        .into_iter()
        .enumerate()
    {
        let out = tmpdir(&format!("q{i}"));
        let cfg = checkpoint::quantize(&last, &out, fmt, "test").unwrap();
        assert!(cfg.exit_gate && config_json(&out)["exit_gate"] == true, "{fmt}");
        let q = load(&out);
        assert_eq!(q.model.weights.exit_gate.as_ref(), Some(&want), "{fmt}");
        let data = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&data).unwrap();
        let (w, b) = (
            st.tensor(checkpoint::EXIT_GATE_WEIGHT).unwrap(),
            st.tensor(checkpoint::EXIT_GATE_BIAS).unwrap(),
        );
        assert_eq!((w.dtype(), w.shape()), (safetensors::Dtype::F32, &[1usize, 64][..]));
        assert_eq!((b.dtype(), b.shape()), (safetensors::Dtype::F32, &[1usize][..]));
        if i > 0 {
            std::fs::remove_dir_all(&last).unwrap();
        }
        last = out;
    }
    std::fs::remove_dir_all(&last).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoints_without_a_gate_load_and_save_as_before() {
    let m = tiny(22, false);
    let dir = tmpdir("nogate");
    save(&dir, &m, tokenizer(), None, prov(), WeightFormat::F32).unwrap();
    let json = config_json(&dir);
    assert!(
        json.get("exit_gate").is_none(),
        "no field written without a gate: {json}"
    );
    let data = std::fs::read(dir.join("model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&data).unwrap().names().len();
    let lm = load(&dir);
    assert!(lm.model.weights.exit_gate.is_none());
    assert!(lm.model.gate_logits(&[0.0; 64], &[0]).is_none());
    let e = collect_samples(&lm, &IDS, 12, Criterion::Gate).err().unwrap();
    assert!(e.to_string().contains("exit gate"), "{e}");
    // `exit_gate: false` is the same as no field; gate tensors without the flag are not read.
    let g = tiny(22, true);
    let gdir = tmpdir("flag-off");
    save(&gdir, &g, tokenizer(), None, prov(), WeightFormat::F32).unwrap();
    let mut cfg = read_config(&gdir).unwrap();
    cfg.exit_gate = false;
    checkpoint::write_config(&gdir, &cfg).unwrap();
    assert!(config_json(&gdir).get("exit_gate").is_none());
    assert!(load(&gdir).model.weights.exit_gate.is_none());
    let data = std::fs::read(gdir.join("model.safetensors")).unwrap();
    assert_eq!(
        safetensors::SafeTensors::deserialize(&data).unwrap().names().len(),
        names + 2
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&gdir).unwrap();
}

/// A tensor to store: type, shape, bytes.
type Stored = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites `model.safetensors` of `dir` with `name` replaced by `with`, or removed when `with`
/// is `None`.
fn replace_tensor(dir: &Path, name: &str, with: Option<Stored>) {
    let path = dir.join("model.safetensors");
    let data = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != name).collect();
    if let Some((dtype, shape, bytes)) = &with {
        views.push((
            name.to_string(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        ));
    }
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn a_bad_gate_is_refused_naming_the_tensor() {
    use safetensors::Dtype::{F32, U8};
    let m = tiny(23, true);
    let good = tmpdir("bad-src");
    save(&good, &m, tokenizer(), None, prov(), WeightFormat::F32).unwrap();
    let w = m.weights.exit_gate.as_ref().unwrap().w.clone();
    let mut nan = w.clone();
    nan[7] = f32::NAN;
    let cases: Vec<(&str, &str, Option<Stored>, &[&str])> = vec![
        ("missing-w", checkpoint::EXIT_GATE_WEIGHT, None, &["`exit_gate.weight`"]),
        ("missing-b", checkpoint::EXIT_GATE_BIAS, None, &["`exit_gate.bias`"]),
        (
            "flat-w",
            checkpoint::EXIT_GATE_WEIGHT,
            Some((F32, vec![64], f32_bytes(&w))),
            &["`exit_gate.weight`", "[64]", "[1, 64]"],
        ),
        (
            "short-w",
            checkpoint::EXIT_GATE_WEIGHT,
            Some((F32, vec![1, 32], f32_bytes(&w[..32]))),
            &["`exit_gate.weight`", "[1, 32]"],
        ),
        (
            "two-b",
            checkpoint::EXIT_GATE_BIAS,
            Some((F32, vec![2], f32_bytes(&[0.0, 1.0]))),
            &["`exit_gate.bias`", "[2]"],
        ),
        (
            "nan-w",
            checkpoint::EXIT_GATE_WEIGHT,
            Some((F32, vec![1, 64], f32_bytes(&nan))),
            &["exit_gate.weight"],
        ),
        (
            "u8-w",
            checkpoint::EXIT_GATE_WEIGHT,
            Some((U8, vec![1, 64], vec![0u8; 64])),
            &["`exit_gate.weight`", "U8", "f32"],
        ),
    ];
    for (case, name, with, needles) in cases {
        let d = tmpdir(case);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "rrt_checkpoint.json", "tokenizer.json"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        replace_tensor(&d, name, with);
        let e: ModelError = match rrt_model::load(&d) {
            Ok(_) => panic!("{case}: a bad gate loaded"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(msg.contains("model.safetensors"), "{case}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{case}: `{n}` not in: {msg}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
    // A model whose gate does not fit its hidden size is refused before anything is written.
    let mut bad = tiny(23, true);
    bad.weights.exit_gate.as_mut().unwrap().w.pop();
    let dir = tmpdir("bad-save");
    let e = save(&dir, &bad, tokenizer(), None, prov(), WeightFormat::F32).unwrap_err();
    assert!(e.to_string().contains("exit gate has 63 weights"), "{e}");
    assert!(!dir.join("model.safetensors").exists());
    std::fs::remove_dir_all(&good).unwrap();
}

/// `rrt calibrate --fit-gate`'s pieces on a checkpoint without a gate: the loop trace's
/// agreements are the calibration's, its gate samples under a gate are exactly what the
/// gate criterion collects from a model carrying that gate, and `write_exit_gate` adds (then
/// replaces) the gate in place, leaving every other tensor's bytes and the config's other
/// fields as they were, while the old file is still loaded. A gate of the wrong size or with
/// a non-finite value is refused and nothing is written.
#[test]
fn a_fitted_gate_is_written_in_place_and_scores_as_the_criterion_does() {
    let m = tiny(24, false);
    let dir = tmpdir("fit");
    save(&dir, &m, tokenizer(), None, prov(), WeightFormat::Q8_0).unwrap();
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let cfg_before = read_config(&dir).unwrap();
    let lm = load(&dir);
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 13) % 49152).collect();
    let trace = rrt_model::exit::trace_loops_with(&lm, &ids, 16, |_, _| {}).unwrap();
    assert_eq!((trace.states.len(), trace.agrees.len()), (1, 1));
    assert_eq!(trace.states[0].len(), ids.len() * 64);
    let maxprob = collect_samples(&lm, &ids, 16, Criterion::MaxProb).unwrap();
    assert_eq!(
        trace.agrees[0],
        maxprob[0].iter().map(|s| s.1).collect::<Vec<_>>(),
        "the trace's agreements are the calibration's"
    );

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let gate = ExitGate {
        w: (0..64).map(|_| rng.random_range(-0.3..0.3)).collect(),
        b: 0.4,
    };
    // Written while `lm` still maps the old file.
    let cfg = checkpoint::write_exit_gate(&dir, &gate).unwrap();
    assert!(cfg.exit_gate && config_json(&dir)["exit_gate"] == true);
    assert_eq!(cfg.exit, cfg_before.exit);
    assert_eq!(cfg.weights, cfg_before.weights);
    let after = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (old, new) = (
        safetensors::SafeTensors::deserialize(&before).unwrap(),
        safetensors::SafeTensors::deserialize(&after).unwrap(),
    );
    assert_eq!(new.names().len(), old.names().len() + 2);
    for (name, v) in old.iter() {
        let w = new.tensor(name).unwrap();
        assert_eq!(
            (w.dtype(), w.shape(), w.data()),
            (v.dtype(), v.shape(), v.data()),
            "{name}"
        );
    }
    let lm2 = load(&dir);
    assert_eq!(lm2.model.weights.exit_gate.as_ref(), Some(&gate));
    let criterion = collect_samples(&lm2, &ids, 16, Criterion::Gate).unwrap();
    assert_eq!(
        trace.gate_samples(&gate),
        criterion,
        "fit-time scores are the criterion's"
    );
    // The old mapping still reads the old model.
    assert!(lm.model.weights.exit_gate.is_none());
    assert_eq!(collect_samples(&lm, &ids, 16, Criterion::MaxProb).unwrap(), maxprob);

    // Replacing: one gate, the new one.
    let gate2 = ExitGate {
        w: vec![0.01; 64],
        b: -1.0,
    };
    checkpoint::write_exit_gate(&dir, &gate2).unwrap();
    let again = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(
        safetensors::SafeTensors::deserialize(&again).unwrap().names().len(),
        old.names().len() + 2
    );
    assert_eq!(load(&dir).model.weights.exit_gate, Some(gate2));

    for bad in [
        ExitGate {
            w: vec![0.0; 63],
            b: 0.0,
        },
        ExitGate {
            w: vec![f32::NAN; 64],
            b: 0.0,
        },
        ExitGate {
            w: vec![0.0; 64],
            b: f32::INFINITY,
        },
    ] {
        let e = checkpoint::write_exit_gate(&dir, &bad).unwrap_err().to_string();
        assert!(e.contains("64 finite weights"), "{e}");
        assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), again);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
