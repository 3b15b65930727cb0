//! Shared helpers of the model crate's integration tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rrt_kernels::RopeScaling;
use rrt_model::LoadedModel;
use rrt_model::config::{Family, ModelConfig};
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, RecursiveSpec, convert};
use rrt_model::tokenizer::Tokenizer;
use rrt_model::weights::{Layer, Linear, Weights};
use std::path::Path;
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

/// SmolLM2's tokenizer (the tiny models use its vocabulary).
pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = rrt_model::default_model_path().expect("run scripts/fetch-model.sh first");
        rrt_model::loader::load_tokenizer(&path).expect("tokenizer loads")
    })
}

/// A random Llama-style model of 4 layers of width `hidden` (4 heads), looped twice with
/// rank-4 LoRAs, SmolLM2's vocabulary; `tied`: the head is the embedding.
pub fn tiny(hidden: usize, tied: bool, seed: u64) -> Model {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (inter, nh, nkv, vocab, layers) = (96usize, 4usize, 2usize, 49152usize, 4usize);
    let hd = hidden / nh;
    let cfg = ModelConfig {
        family: Family::Llama,
        hidden,
        intermediate: inter,
        n_layers: layers,
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        vocab,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_dim: hd,
        rope_scaling: RopeScaling::None,
        max_positions: 4096,
        sliding_window: None,
        qkv_bias: false,
        tie_embeddings: tied,
        looped: None,
    };
    let mut mat = |o: usize, i: usize, scale: f32| -> Linear {
        let w = (0..o * i).map(|_| rng.random_range(-scale..scale)).collect();
        Linear::f32(o, i, w, None)
    };
    let embed = mat(vocab, hidden, 1.0);
    let lm_head = (!tied).then(|| mat(vocab, hidden, 0.2));
    let ls = (0..layers)
        .map(|_| Layer {
            attn_norm: vec![1.0; hidden],
            qkv: mat(nh * hd + 2 * nkv * hd, hidden, 0.3),
            o: mat(hidden, nh * hd, 0.3),
            ffn_norm: vec![1.0; hidden],
            gate_up: mat(2 * inter, hidden, 0.3),
            down: mat(hidden, inter, 0.3),
            branch_norms: None,
        })
        .collect();
    let weights = Weights {
        embed,
        layers: ls,
        norm: vec![1.0; hidden],
        lm_head,
        exit_gate: None,
    };
    let spec = RecursiveSpec {
        loops: 2,
        init: Init::Average,
        ranks: [4; 7],
    };
    let (shared, rec) = convert(&weights, &cfg, &spec, None, |_| {}).expect("tiny conversion");
    Model::recursive(
        cfg,
        Weights {
            layers: shared,
            ..weights
        },
        rec,
    )
    .expect("tiny recursive model")
}

/// Loads a model directory, panicking with its path.
pub fn load(dir: &Path) -> LoadedModel {
    rrt_model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}
