//! Arbitrary bytes as a Hugging Face directory's safetensors file (first byte even) or as a
//! recursive checkpoint's `rrt_checkpoint.json` (odd): opening, listing and reading tensors,
//! parsing and validating the checkpoint config must return errors, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join(format!("rrt-fuzz-st-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if sel % 2 == 0 {
        std::fs::write(dir.join("model.safetensors"), rest).unwrap();
        if let Ok(src) = rrt_model::sources::SafetensorsSource::open_dir(&dir) {
            let _ = src.names().count();
        }
        // A whole directory around it: config.json from the same bytes' tail when it parses.
        let _ = rrt_model::load(&dir);
    } else {
        std::fs::write(dir.join(rrt_model::checkpoint::CONFIG_FILE), rest).unwrap();
        let _ = rrt_model::checkpoint::read_config(&dir);
        let _ = rrt_model::load(&dir);
    }
});
