//! Agreement with llama.cpp and with an independent float64 reference on the default model.
//!
//! Fixtures: `fixtures/llamacpp/*.json` (scripts/make_llamacpp_fixtures.py, llama-cpp-python
//! 0.3.36) and `fixtures/reference/*` (scripts/make_numpy_reference.py, numpy float64 on the
//! `gguf` package's dequantization).

mod common;

use common::{fixture, ids, read_json, smollm2};
use rrt_model::forward::Model;
use rrt_model::generate::generate_batch;
use rrt_model::sampling::{SamplingParams, argmax};

fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    model.sequence_logits(ids, &[ids.len() - 1]).unwrap()
}

#[test]
fn tokenization_is_identical_to_llama_cpp() {
    let lm = smollm2();
    let f = read_json("llamacpp/tokenize.json");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            lm.tokenizer.encode(text, false, false).unwrap(),
            ids(&c["ids"]),
            "plain: {text:?}"
        );
        assert_eq!(
            lm.tokenizer.encode(text, false, true).unwrap(),
            ids(&c["ids_special"]),
            "special: {text:?}"
        );
        // Round trip: decoding the plain ids gives the text back.
        assert_eq!(lm.tokenizer.decode(&ids(&c["ids"]), false).unwrap(), text);
    }
}

#[test]
fn logits_equal_float64_reference() {
    let lm = smollm2();
    let meta = read_json("reference/smollm2_reference.json");
    let bytes = std::fs::read(fixture("reference/smollm2_last_logits.f32")).unwrap();
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let vocab = lm.model.config.vocab;
    for (i, c) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&c["ids"]);
        let got = last_logits(&lm.model, &prompt);
        let want = &all[i * vocab..(i + 1) * vocab];
        let max_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("case {i}: max |logit - f64 reference| = {max_diff:.2e} (logit scale {scale:.1})");
        assert!(max_diff < 5e-4, "case {i}: max abs diff {max_diff}");
        assert_eq!(argmax(&got), argmax(want));
    }
}

struct GreedyCase {
    prompt_ids: Vec<u32>,
    /// llama.cpp on the Q4_1 file as shipped.
    want: Vec<u32>,
    /// llama.cpp on an exactly dequantized F32 copy with an f32 KV cache.
    want_f32: Vec<u32>,
}

fn greedy_cases() -> Vec<GreedyCase> {
    let lm = smollm2();
    let f = read_json("llamacpp/greedy.json");
    f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let prompt_ids = ids(&c["prompt_ids"]);
            // The prompts are tokenized identically (special tokens parsed).
            assert_eq!(
                lm.tokenizer.encode(c["prompt"].as_str().unwrap(), false, true).unwrap(),
                prompt_ids
            );
            GreedyCase {
                prompt_ids,
                want: ids(&c["ids"]),
                want_f32: ids(&c["ids_f32"]),
            }
        })
        .collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn greedy_outputs(cases: &[GreedyCase]) -> Vec<Vec<u32>> {
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let outs = generate_batch(smollm2(), &prompts, 32, &SamplingParams::default(), false).unwrap();
    outs.into_iter().map(|g| g.ids).collect()
}

/// On the same weights and the same arithmetic (llama.cpp given an F32 copy of the file, so it
/// quantizes nothing), all 10 greedy continuations are identical for all 32 tokens, and the
/// logits agree to float rounding.
#[test]
fn greedy_and_logits_identical_to_llama_cpp_on_f32_weights() {
    let lm = smollm2();
    let cases = greedy_cases();
    for (i, (c, got)) in cases.iter().zip(greedy_outputs(&cases)).enumerate() {
        assert_eq!(got, c.want_f32, "prompt {i}");
    }
    let f = read_json("llamacpp/logits.json");
    let logits = last_logits(&lm.model, &ids(&f["prompt_ids"]));
    for (id, v) in ids(&f["top_ids_f32"])
        .iter()
        .zip(f["top_logits_f32"].as_array().unwrap())
    {
        let v = v.as_f64().unwrap() as f32;
        assert!(
            (logits[*id as usize] - v).abs() < 2e-3,
            "token {id}: {} vs {v}",
            logits[*id as usize]
        );
    }
}

/// Against llama.cpp on the Q4_1 file itself (which quantizes activations to 8 bits for Q4_1
/// products and keeps an f16 KV cache), the first tokens agree and every divergence is
/// explained: it is a near-tie in the exact logits (rrt's margin over llama.cpp's token is
/// within llama.cpp's arithmetic error), and llama.cpp's own exact (F32) run leaves its Q4_1
/// run at the very same token.
#[test]
fn greedy_matches_llama_cpp_q4_1_up_to_its_activation_quantization() {
    let lm = smollm2();
    let cases = greedy_cases();
    let mut at16 = 0;
    for (i, (c, got)) in cases.iter().zip(greedy_outputs(&cases)).enumerate() {
        let k = common_prefix(&got, &c.want);
        at16 += usize::from(k >= 16);
        if k == c.want.len() {
            eprintln!("prompt {i}: identical for all {k} tokens");
            continue;
        }
        let mut prefix = c.prompt_ids.clone();
        prefix.extend_from_slice(&c.want[..k]);
        let logits = last_logits(&lm.model, &prefix);
        let ours = argmax(&logits);
        let margin = logits[ours as usize] - logits[c.want[k] as usize];
        let k32 = common_prefix(&c.want_f32, &c.want);
        eprintln!(
            "prompt {i}: identical for {k} tokens; exact margin there {margin:.3}; llama.cpp F32 vs Q4_1 split at {k32}"
        );
        assert!(
            margin < 0.35,
            "prompt {i}: divergence at token {k} is not a near-tie (margin {margin})"
        );
        assert_eq!(
            k, k32,
            "prompt {i}: llama.cpp's exact run does not diverge at the same token"
        );
    }
    eprintln!(
        "{at16} of {} prompts identical to llama.cpp Q4_1 for 16 tokens",
        cases.len()
    );
    let f = read_json("llamacpp/logits.json");
    let logits = last_logits(&lm.model, &ids(&f["prompt_ids"]));
    let err: f32 = ids(&f["top_ids"])
        .iter()
        .zip(f["top_logits"].as_array().unwrap())
        .map(|(id, v)| (logits[*id as usize] - v.as_f64().unwrap() as f32).abs())
        .fold(0f32, f32::max);
    eprintln!("max |rrt - llama.cpp Q4_1| over its top-20 logits: {err:.3}");
    assert!(err < 0.5);
}

#[test]
fn perplexity_within_two_percent_of_llama_cpp() {
    let lm = smollm2();
    let f = read_json("llamacpp/perplexity.json");
    let text = common::shakespeare();
    let toks = lm.tokenizer.encode(&text, false, false).unwrap();
    assert_eq!(toks.len() as u64, f["text_tokens"].as_u64().unwrap());
    assert_eq!(toks[..256], ids(&f["first_window_ids"])[..]);
    let window = f["window"].as_u64().unwrap() as usize;
    let n = f["windows"].as_u64().unwrap() as usize;
    let r = rrt_model::eval::perplexity(lm, &text, window, Some(n), |_, _| {}).unwrap();
    let want = f["ppl"].as_f64().unwrap();
    eprintln!(
        "perplexity: rrt {:.4}, llama.cpp {want:.4} ({} scored tokens)",
        r.ppl, r.scored_tokens
    );
    assert_eq!(r.scored_tokens as u64, f["scored_tokens"].as_u64().unwrap());
    assert!((r.ppl - want).abs() / want < 0.02, "rrt {} vs llama.cpp {want}", r.ppl);
}
