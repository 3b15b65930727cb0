//! Tokenizer round trip on the default model's tokenizer: any UTF-8 text encodes (special
//! tokens not parsed) and decodes back to itself, except for the bytes the byte-level
//! vocabulary has no token for (SmolLM2 lacks a few, e.g. 0x1D and 0xF2; like Hugging Face
//! `tokenizers` with no unknown token, they are dropped). The property: decode(encode(text))
//! equals the text's bytes without exactly those bytes, read as (lossy) UTF-8.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

struct Fixture {
    tok: rrt_model::tokenizer::Tokenizer,
    missing: [bool; 256],
}

static FIX: OnceLock<Fixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let f = FIX.get_or_init(|| {
        let path = rrt_model::default_model_path().expect("the default model (scripts/fetch-model.sh)");
        let g = rrt_model::gguf::GgufFile::open(&path).unwrap();
        let tok = rrt_model::tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let mut missing = [false; 256];
        for b in 0..=255u8 {
            missing[b as usize] = tok.token_to_id(&byte_char(b).to_string()).is_none();
        }
        Fixture { tok, missing }
    });
    let kept: Vec<u8> = text.bytes().filter(|&b| !f.missing[b as usize]).collect();
    let expected = String::from_utf8_lossy(&kept);
    let ids = f.tok.encode(text, false, false).unwrap();
    let back = f.tok.decode(&ids, false).unwrap();
    assert_eq!(back, expected, "ids {ids:?}");
});
