//! Relaxed recursive conversion of the default model: full rank reproduces the original logits,
//! and invalid specifications are refused with a clear message.

mod common;

use common::smollm2;
use rrt_model::ModelError;
use rrt_model::forward::{Model, Row};
use rrt_model::kv::{KvPool, SeqKv};
use rrt_model::recursive::{Init, RecursiveSpec, convert};
use rrt_model::weights::Weights;

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut pool = KvPool::new(model.kv_layout(16), ids.len().div_ceil(16));
    let mut seq = SeqKv::default();
    pool.reserve(&mut seq, ids.len()).unwrap();
    let rows: Vec<Row<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| Row {
            token: t,
            pos: i,
            blocks: &seq.blocks,
        })
        .collect();
    let select: Vec<usize> = (0..ids.len()).collect();
    model.forward(&rows, &mut pool, &select).unwrap()
}

fn converted(spec: &RecursiveSpec) -> Result<Model, ModelError> {
    let lm = smollm2();
    let w = &lm.model.weights;
    let (layers, rec) = convert(w, &lm.model.config, spec, |_| {})?;
    let weights = Weights {
        embed: w.embed.clone(),
        layers,
        norm: w.norm.clone(),
        lm_head: w.lm_head.clone(),
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
