//! Streaming detokenization and chat templates on the default model's tokenizer.

mod common;

use rrt_model::chat::{ChatTemplate, Message};
use rrt_model::tokenizer::StreamDecoder;

fn tok() -> rrt_model::tokenizer::Tokenizer {
    rrt_model::loader::load_tokenizer(&rrt_model::default_model_path().unwrap()).unwrap()
}

#[test]
fn streaming_never_splits_a_character_and_reassembles_the_text() {
    let tok = tok();
    for text in [
        "😀🚀👍🏽 and 🇫🇷",
        "日本語のテキスト",
        "naïve café — “quotes”",
        "plain ascii text",
        "a\u{301}\u{200b}b",
    ] {
        let ids = tok.encode(text, false, false).unwrap();
        // Emoji and CJK take several byte-level tokens each: a token alone is not valid UTF-8.
        let mut dec = StreamDecoder::new(&[]);
        let mut out = String::new();
        let mut deltas = 0;
        for &id in &ids {
            if let Some(d) = dec.step(&tok, id).unwrap() {
                assert!(
                    !d.contains('\u{FFFD}'),
                    "{text:?}: replacement character in delta {d:?}"
                );
                out.push_str(&d);
                deltas += 1;
            }
        }
        if let Some(d) = dec.flush(&tok).unwrap() {
            out.push_str(&d);
        }
        assert_eq!(out, text);
        assert!(deltas >= 1);
    }
    // A single emoji spans several tokens, and nothing is emitted until it is complete.
    let ids = tok.encode("😀", false, false).unwrap();
    assert!(ids.len() > 1);
    let mut dec = StreamDecoder::new(&[]);
    for &id in &ids[..ids.len() - 1] {
        assert_eq!(dec.step(&tok, id).unwrap(), None);
    }
    assert_eq!(dec.step(&tok, *ids.last().unwrap()).unwrap().as_deref(), Some("😀"));
}

#[test]
fn streaming_after_a_prompt_keeps_leading_spaces() {
    let tok = tok();
    let prompt = tok.encode("Hello", false, false).unwrap();
    let ids = tok.encode(" world, again", false, false).unwrap();
    let mut dec = StreamDecoder::new(&prompt);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&dec.step(&tok, id).unwrap().unwrap_or_default());
    }
    out.push_str(&dec.flush(&tok).unwrap().unwrap_or_default());
    assert_eq!(out, " world, again");
}

#[test]
fn default_template_renders_like_transformers() {
    // Expected strings rendered by Python's jinja2 with Hugging Face's settings (trim_blocks,
    // lstrip_blocks) from the same template.
    let lm_tpl = rrt_model::gguf::GgufFile::open(&rrt_model::default_model_path().unwrap())
        .unwrap()
        .opt_str("tokenizer.chat_template")
        .unwrap()
        .unwrap()
        .to_string();
    let t = ChatTemplate::new(&lm_tpl).unwrap();
    let s = t.render(&[Message::new("user", "Hi")], true, None, None).unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let s = t
        .render(
            &[Message::new("system", "Be brief."), Message::new("user", "Hi")],
            false,
            None,
            None,
        )
        .unwrap();
    assert_eq!(
        s,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    assert!(t.render(&[], true, None, None).is_err());
}
