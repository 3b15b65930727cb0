//! The integer product path (`CpuProducts::Int8`: activations quantized to 8 bits per block,
//! integer dot products with the Q4_1 / Q8_0 weight blocks) on the default model, against the
//! exact path (the oracle) and llama.cpp on the same Q4_1 file (which also quantizes
//! activations to 8 bits). The product mode is process-wide, so this is one test in its own
//! test binary, its parts run one after the other.

mod common;

use common::{ids, read_json, smollm2};
use rrt_kernels::{CpuProducts, set_cpu_products};
use rrt_model::generate::generate_batch;
use rrt_model::sampling::SamplingParams;

fn int8() {
    set_cpu_products(CpuProducts::Int8);
}

#[test]
fn int8_products_on_the_default_model() {
    logits_close_to_exact_path_and_to_llama_cpp_q4_1();
    perplexity_within_one_percent_of_llama_cpp();
    greedy_agrees_with_exact_path_up_to_near_ties();
}

/// The stated tolerance: the int8 path's logits within 1.0 of the exact path's over the whole
/// vocabulary (logit scale about 20), and llama.cpp's Q4_1 top-20 logits (an int8 path too, with
/// f16 activation scales) within 0.75 at most and 0.3 on average. Measured: int8 vs exact 0.68;
/// vs llama.cpp 0.55 at most, 0.21 on average (the exact path: 0.26 and 0.11).
fn logits_close_to_exact_path_and_to_llama_cpp_q4_1() {
    let lm = smollm2();
    let f = read_json("llamacpp/logits.json");
    let prompt = ids(&f["prompt_ids"]);
    set_cpu_products(CpuProducts::Exact);
    let exact = lm.model.sequence_logits(&prompt, &[prompt.len() - 1]).unwrap();
    int8();
    let got = lm.model.sequence_logits(&prompt, &[prompt.len() - 1]).unwrap();
    let vs_exact = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let top = ids(&f["top_ids"]);
    let diffs: Vec<f32> = top
        .iter()
        .zip(f["top_logits"].as_array().unwrap())
        .map(|(id, v)| (got[*id as usize] - v.as_f64().unwrap() as f32).abs())
        .collect();
    let vs_llama = diffs.iter().copied().fold(0f32, f32::max);
    let mean_vs_llama = diffs.iter().sum::<f32>() / diffs.len() as f32;
    eprintln!(
        "max |int8 - exact| {vs_exact:.3}; |int8 - llama.cpp Q4_1| over its top-{}: max {vs_llama:.3}, mean {mean_vs_llama:.3}",
        diffs.len()
    );
    assert!(vs_exact < 1.0, "int8 vs exact: {vs_exact}");
    assert!(vs_llama < 0.75, "int8 vs llama.cpp: {vs_llama}");
    assert!(mean_vs_llama < 0.3, "int8 vs llama.cpp on average: {mean_vs_llama}");
    // Not the exact path by accident.
    assert!(vs_exact > 0.0);
}

/// Perplexity on the fixture's windows stays within 1 % of llama.cpp's on the Q4_1 file.
fn perplexity_within_one_percent_of_llama_cpp() {
    int8();
    let lm = smollm2();
    let f = read_json("llamacpp/perplexity.json");
    let text = common::shakespeare();
    let window = f["window"].as_u64().unwrap() as usize;
    let n = f["windows"].as_u64().unwrap() as usize;
    let r = rrt_model::eval::perplexity(lm, &text, window, Some(n), |_, _| {}).unwrap();
    let want = f["ppl"].as_f64().unwrap();
    eprintln!("perplexity: rrt int8 {:.4}, llama.cpp Q4_1 {want:.4}", r.ppl);
    assert!((r.ppl - want).abs() / want < 0.01, "rrt {} vs llama.cpp {want}", r.ppl);
}

/// Greedy continuations against the exact path's: where they part, it is at a near-tie of
/// the exact logits (the exact path's margin over the int8 path's token is below 0.5), as
/// between llama.cpp's own F32 and Q4_1 runs.
fn greedy_agrees_with_exact_path_up_to_near_ties() {
    let lm = smollm2();
    let f = read_json("llamacpp/greedy.json");
    let cases = f["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let greedy = || generate_batch(lm, &prompts, 32, &SamplingParams::default(), false).unwrap();
    int8();
    let got = greedy();
    set_cpu_products(CpuProducts::Exact);
    let exact = greedy();
    let (mut at16, mut llama16) = (0, 0);
    for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
        let k = g.ids.iter().zip(&e.ids).take_while(|(a, b)| a == b).count();
        at16 += usize::from(k >= 16);
        let want = ids(&cases[i]["ids"]);
        llama16 += usize::from(g.ids.iter().zip(&want).take_while(|(a, b)| a == b).count() >= 16);
        if k == e.ids.len() {
            continue;
        }
        let mut prefix = prompts[i].clone();
        prefix.extend_from_slice(&e.ids[..k]);
        let logits = lm.model.sequence_logits(&prefix, &[prefix.len() - 1]).unwrap();
        let margin = logits[e.ids[k] as usize] - logits[g.ids[k] as usize];
        eprintln!("prompt {i}: int8 = exact for {k} tokens; exact margin there {margin:.3}");
        assert!(
            margin < 0.5,
            "prompt {i}: divergence at token {k} is not a near-tie (margin {margin})"
        );
    }
    eprintln!(
        "{at16} of {} prompts identical to the exact path for 16 tokens, {llama16} to llama.cpp Q4_1",
        cases.len()
    );
    assert!(
        at16 >= 3,
        "only {at16} of {} prompts agree with the exact path for 16 tokens",
        cases.len()
    );
}
