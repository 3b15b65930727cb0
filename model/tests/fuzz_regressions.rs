//! Inputs the fuzz targets (`fuzz/`, run with `cargo +nightly fuzz run TARGET`) once failed on,
//! kept as regression tests: forged GGUF element counts must be refused without reserving
//! gigabytes; tokenizer round trips drop exactly the bytes the vocabulary cannot represent.

use std::path::PathBuf;

fn inputs(kind: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/fuzz")
        .join(kind);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn forged_gguf_counts_are_refused() {
    for p in inputs("gguf") {
        // Found as out-of-memory: a tensor count / array length of billions reserved at once.
        let e = rrt_model::gguf::GgufFile::open(&p).err();
        assert!(e.is_some(), "{} parsed", p.display());
        assert!(rrt_model::load(&p).is_err());
    }
}

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

#[test]
fn tokenizer_round_trip_drops_only_unrepresentable_bytes() {
    let tok = rrt_model::loader::load_tokenizer(&rrt_model::default_model_path().unwrap()).unwrap();
    let missing: Vec<u8> = (0..=255u8)
        .filter(|&b| tok.token_to_id(&byte_char(b).to_string()).is_none())
        .collect();
    // What SmolLM2's vocabulary lacks: 21 bytes, 11 of which never occur in UTF-8 (c0, c1,
    // f5..ff); the others are 7 rare control bytes and the lead bytes of planes 4-11 (f1, f2).
    assert_eq!(
        missing,
        [
            0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc,
            0xfd, 0xfe, 0xff
        ],
        "{missing:x?}"
    );
    for p in inputs("tokenizer") {
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        let kept: Vec<u8> = text.bytes().filter(|b| !missing.contains(b)).collect();
        let ids = tok.encode(&text, false, false).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            String::from_utf8_lossy(&kept),
            "{}",
            p.display()
        );
    }
}
