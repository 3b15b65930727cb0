//! Arbitrary bytes as a GGUF file: parsing the header and tensor table, then loading it as a
//! model (config, tokenizer, weights), must return an error or a model, never panic or
//! allocate without bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("rrt-fuzz-gguf-{}.gguf", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if rrt_model::gguf::GgufFile::open(&path).is_ok() {
        let _ = rrt_model::load(&path);
    }
});
