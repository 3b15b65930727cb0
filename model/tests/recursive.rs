//! Relaxed recursive conversion of the default model: full rank reproduces the original logits,
//! and invalid specifications are refused with a clear message.

mod common;

use common::smollm2;
use rrt_model::ModelError;
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, RecursiveSpec, convert};
use rrt_model::weights::Weights;

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let select: Vec<usize> = (0..ids.len()).collect();
    model.sequence_logits(ids, &select).unwrap()
}

fn converted(spec: &RecursiveSpec) -> Result<Model, ModelError> {
    let lm = smollm2();
    let w = &lm.model.weights;
    let (layers, rec) = convert(w, &lm.model.config, spec, None, |_| {})?;
    let weights = Weights {
        embed: w.embed.clone(),
        layers,
        norm: w.norm.clone(),
        lm_head: w.lm_head.clone(),
        exit_gate: None,
    };
    Model::recursive(lm.model.config.clone(), weights, rec)
}

const FULL: [usize; 7] = [576, 192, 192, 576, 576, 576, 576];

#[test]
fn full_rank_conversion_reproduces_the_original_logits() {
    let lm = smollm2();
    let ids = lm
        .tokenizer
        .encode(
            "The capital of France is Paris, and the capital of Italy is",
            false,
            false,
        )
        .unwrap();
    let want = logits(&lm.model, &ids);
    for (loops, init) in [(2, Init::Average), (3, Init::Stepwise)] {
        let m = converted(&RecursiveSpec {
            loops,
            init,
            ranks: FULL,
        })
        .unwrap();
        assert_eq!(m.weights.layers.len(), 30 / loops);
        let got = logits(&m, &ids);
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!(
            "B = {loops} ({init:?}), full rank: max |logit difference| over {} positions = {max:.2e} (logit scale {scale:.1})",
            ids.len()
        );
        // Float rounding, relative to the logits. Stepwise init shares one layer's norm scales,
        // so the folded ratios w_l / w'_k of the other layers can be large and amplify f32
        // rounding (2.4e-3 absolute, 1e-4 relative for B = 3; 4.6e-5 for averaged B = 2).
        assert!(max / scale < 2e-4, "B = {loops}: {max}");
    }
}

#[test]
fn rank_zero_is_the_plain_recursive_model_and_differs() {
    let lm = smollm2();
    let ids = lm.tokenizer.encode("Hello there", false, false).unwrap();
    let m = converted(&RecursiveSpec {
        loops: 2,
        init: Init::Average,
        ranks: [0; 7],
    })
    .unwrap();
    assert!(
        m.recursion
            .as_ref()
            .unwrap()
            .lora
            .iter()
            .all(|l| l.iter().all(Option::is_none))
    );
    let max = logits(&m, &ids)
        .iter()
        .zip(&logits(&lm.model, &ids))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max > 1.0,
        "a 2x-tied model without LoRA should not equal the original ({max})"
    );
}

#[test]
fn invalid_specs_are_refused() {
    let e = converted(&RecursiveSpec {
        loops: 4,
        init: Init::Average,
        ranks: [0; 7],
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("divisible"), "{e}");
    let e = converted(&RecursiveSpec {
        loops: 0,
        init: Init::Average,
        ranks: [0; 7],
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("loops"), "{e}");
    let mut ranks = [8; 7];
    ranks[1] = 193;
    let e = converted(&RecursiveSpec {
        loops: 2,
        init: Init::Lower,
        ranks,
    })
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("rank 193") && e.to_string().contains("`k`"),
        "{e}"
    );
}

mod checkpoint_format {
    use super::*;
    use rrt_model::checkpoint::{Provenance, WeightFormat, read_config, save, write_config};
    use std::path::PathBuf;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rrt-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }

    /// Save then load gives the same model (identical logits), tokenizer and template; bad
    /// checkpoints are refused naming the problem.
    #[test]
    fn round_trip_and_refusals() {
        let lm = smollm2();
        let spec = RecursiveSpec {
            loops: 3,
            init: Init::Lower,
            ranks: [8, 4, 4, 8, 8, 8, 0],
        };
        let m = converted(&spec).unwrap();
        let dir = tmpdir("ok");
        let prov = Provenance {
            source: "test".into(),
            source_sha256: "00".into(),
            tool: "test".into(),
            extra: serde_json::Value::Null,
        };
        save(
            &dir,
            &m,
            &lm.tokenizer,
            lm.chat_template.as_ref(),
            prov,
            WeightFormat::F32,
        )
        .unwrap();
        let back = rrt_model::load(&dir).unwrap();
        assert_eq!(back.kind, rrt_model::loader::SourceKind::Recursive);
        let ids = lm.tokenizer.encode("To be, or not to be", false, false).unwrap();
        let (a, b) = (logits(&m, &ids), logits(&back.model, &ids));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(
            back.tokenizer.encode("<|im_start|>hi", false, true).unwrap(),
            lm.tokenizer.encode("<|im_start|>hi", false, true).unwrap()
        );
        let msgs = [rrt_model::chat::Message::new("user", "Hi")];
        assert_eq!(back.chat_prompt(&msgs).unwrap(), lm.chat_prompt(&msgs).unwrap());
        let rec = back.model.recursion.as_ref().unwrap();
        assert_eq!(
            (rec.loops, rec.ranks, back.model.weights.layers.len()),
            (3, spec.ranks, 10)
        );
        // Per-loop evaluation: one report per loop, the last is the model's own perplexity and
        // agrees with itself; earlier loops are decoded from their own hidden states.
        let text = common::shakespeare();
        let r = rrt_model::eval::perplexity(&back, &text, 64, Some(2), |_, _| {}).unwrap();
        assert_eq!(r.loops.len(), 3);
        assert_eq!(r.loops[2].agreement, 1.0);
        assert!((r.loops[2].ppl - r.ppl).abs() < 1e-9 * r.ppl);
        assert!(r.loops[0].ppl != r.loops[2].ppl && r.loops.iter().all(|l| l.ppl.is_finite() && l.agreement <= 1.0));
        // Exit calibration plumbing: one sample per token and loop before the last, scores in
        // range; a target of 0 lets every token exit after loop 1; thresholds round-trip
        // through the checkpoint config.
        let toks = lm.tokenizer.encode(&text, false, false).unwrap();
        for crit in [
            rrt_model::exit::Criterion::MaxProb,
            rrt_model::exit::Criterion::Saturation,
        ] {
            let s = rrt_model::exit::collect_samples(&back, &toks[..100], 64, crit).unwrap();
            assert_eq!(s.len(), 2);
            assert!(
                s.iter()
                    .all(|l| l.len() == 100 && l.iter().all(|(v, _)| (-1.0..=1.0).contains(v)))
            );
            let c = rrt_model::exit::calibrate(&s, 0.0);
            assert_eq!(c.mean_loops, 1.0);
            assert_eq!(c.thresholds.len(), 2);
        }
        let mut cfg = read_config(&dir).unwrap();
        cfg.exit.thresholds = vec![Some(0.5), None];
        cfg.exit.criterion = Some(rrt_model::exit::Criterion::Margin);
        write_config(&dir, &cfg).unwrap();
        assert_eq!(read_config(&dir).unwrap().exit, cfg.exit);
        // `rrt tokenize` path: the tokenizer alone loads from the checkpoint.
        assert!(rrt_model::loader::load_tokenizer(&dir).is_ok());

        // Wrong version.
        let bad = tmpdir("version");
        copy_dir(&dir, &bad);
        let mut cfg = read_config(&bad).unwrap();
        cfg.version = 99;
        write_config(&bad, &cfg).unwrap();
        let e = rrt_model::load(&bad).err().unwrap();
        assert!(e.to_string().contains("version 99"), "{e}");
        // Inconsistent recursion.
        cfg.version = 1;
        cfg.recursion.loops = 2;
        write_config(&bad, &cfg).unwrap();
        assert!(rrt_model::load(&bad).err().unwrap().to_string().contains("loops"));
        // A rank the tensors do not have: the first LoRA tensor's shape is wrong.
        cfg.recursion.loops = 3;
        cfg.recursion.ranks.insert("q".into(), 16);
        write_config(&bad, &cfg).unwrap();
        let e = rrt_model::load(&bad).err().unwrap();
        assert!(
            matches!(e, ModelError::Shape { .. }) && e.to_string().contains("lora.0.q.a"),
            "{e}"
        );
        // A partial checkpoint: LoRAs declared for `down` that were never written.
        cfg.recursion.ranks.insert("q".into(), 8);
        cfg.recursion.ranks.insert("down".into(), 8);
        write_config(&bad, &cfg).unwrap();
        let e = rrt_model::load(&bad).err().unwrap();
        assert!(
            matches!(e, ModelError::MissingTensor { .. }) && e.to_string().contains("lora.0.down.a"),
            "{e}"
        );
        // Weights file missing entirely.
        cfg.recursion.ranks.insert("down".into(), 0);
        write_config(&bad, &cfg).unwrap();
        std::fs::remove_file(bad.join("model.safetensors")).unwrap();
        assert!(rrt_model::load(&bad).err().unwrap().to_string().contains("safetensors"));
        std::fs::remove_dir_all(&bad).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
