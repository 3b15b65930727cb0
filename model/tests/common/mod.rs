//! Shared helpers of the model crate's integration tests.
#![allow(dead_code)]

use rrt_model::LoadedModel;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("fixtures").join(rel)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The default model (SmolLM2-135M-Instruct Q4_1), loaded once per test binary. Fails with the
/// fix when the model cache is empty: these tests must not pass silently without the model.
pub fn smollm2() -> &'static LoadedModel {
    static LM: OnceLock<LoadedModel> = OnceLock::new();
    LM.get_or_init(|| {
        let path = rrt_model::default_model_path().expect("run scripts/fetch-model.sh first");
        rrt_model::load(&path).expect("default model loads")
    })
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn shakespeare() -> String {
    let p = root()
        .join("..")
        .join("shared")
        .join("data")
        .join("tinyshakespeare.txt");
    let p = if p.exists() { p } else { fixture("tinyshakespeare.txt") };
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
