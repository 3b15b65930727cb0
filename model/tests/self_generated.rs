//! `rrt_model::exit::self_generated` (what `rrt calibrate --self-generated` appends to the
//! calibration text): prompts cut from the text at evenly spaced offsets, each followed by
//! exactly the greedy continuation `generate` decodes from it alone, in order; bad sizes are
//! refused.

mod common;

use rrt_model::ModelError;
use rrt_model::exit::self_generated;
use rrt_model::generate::generate;
use rrt_model::sampling::SamplingParams;

#[test]
fn self_generated_tokens_are_prompts_and_their_greedy_continuations() {
    let lm = common::smollm2();
    let text = lm
        .tokenizer
        .encode(&common::shakespeare()[..3000], false, false)
        .expect("tokenizes");
    let (prompts, plen, max) = (3, 8, 12);
    let got = self_generated(lm, &text, prompts, plen, max).expect("decodes");
    let span = text.len() - plen;
    let mut at = 0;
    for o in [0, span / 2, span] {
        let p = &text[o..o + plen];
        assert_eq!(&got[at..at + plen], p, "prompt at offset {o}");
        let g = generate(lm, p, max, SamplingParams::default(), |_| Ok(())).expect("generates");
        assert!(!g.ids.is_empty() && g.ids.len() <= max);
        assert_eq!(
            &got[at + plen..at + plen + g.ids.len()],
            &g.ids[..],
            "continuation of offset {o}"
        );
        at += plen + g.ids.len();
    }
    assert_eq!(at, got.len(), "nothing but the prompts and their continuations");

    assert!(self_generated(lm, &text, 0, plen, max).expect("no prompts").is_empty());
    for (t, p) in [(&text[..5], 8), (&text[..], 0)] {
        match self_generated(lm, t, 2, p, 4) {
            Err(ModelError::InvalidArgument { field, .. }) => assert_eq!(field, "self-generated"),
            other => panic!("text of {} tokens, prompts of {p}: {other:?}", t.len()),
        }
    }
}
