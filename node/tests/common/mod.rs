//! Shared helpers of the engine tests: the real model, a tiny random model for property tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rrt_kernels::{CpuBackend, RopeScaling};
use rrt_model::config::{Family, ModelConfig};
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, RecursiveSpec, convert};
use rrt_model::tokenizer::Tokenizer;
use rrt_model::weights::{Layer, Linear, Weights};
use rrt_node::{Engine, EngineConfig, Event, RequestId, ResidentModel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_path() -> PathBuf {
    rrt_model::default_model_path().expect("run scripts/fetch-model.sh first")
}

/// SmolLM2's tokenizer (shared by the tiny models).
pub fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(rrt_model::loader::load_tokenizer(&model_path()).expect("tokenizer loads"))
}

pub fn shakespeare() -> String {
    std::fs::read_to_string(
        root()
            .join("..")
            .join("shared")
            .join("data")
            .join("tinyshakespeare.txt"),
    )
    .expect("../shared/data/tinyshakespeare.txt")
}

/// A random Llama-style model with SmolLM2's vocabulary: `layers` layers of width 32, looped
/// `loops` times with rank-`rank` LoRAs when `loops > 1`.
pub fn tiny_model(layers: usize, loops: usize, rank: usize, seed: u64) -> Model {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (h, inter, nh, nkv, hd, vocab) = (32usize, 64usize, 4usize, 2usize, 8usize, 49152usize);
    let cfg = ModelConfig {
        family: Family::Llama,
        hidden: h,
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
        tie_embeddings: true,
        looped: None,
    };
    let mut mat = |o: usize, i: usize, scale: f32| -> Linear {
        let w = (0..o * i).map(|_| rng.random_range(-scale..scale)).collect();
        Linear::f32(o, i, w, None)
    };
    let embed = mat(vocab, h, 1.0);
    let mut ls = Vec::new();
    for _ in 0..layers {
        ls.push(Layer {
            attn_norm: vec![1.0; h],
            qkv: mat(nh * hd + 2 * nkv * hd, h, 0.3),
            o: mat(h, nh * hd, 0.3),
            ffn_norm: vec![1.0; h],
            gate_up: mat(2 * inter, h, 0.3),
            down: mat(h, inter, 0.3),
            branch_norms: None,
        });
    }
    let weights = Weights {
        embed,
        layers: ls,
        norm: vec![1.0; h],
        lm_head: None,
        exit_gate: None,
    };
    if loops <= 1 {
        return Model::new(cfg, weights);
    }
    let spec = RecursiveSpec {
        loops,
        init: Init::Average,
        ranks: [rank; 7],
    };
    let (shared, rec) = convert(&weights, &cfg, &spec, None, |_| {}).expect("tiny conversion");
    let weights = Weights {
        layers: shared,
        ..weights
    };
    Model::recursive(cfg, weights, rec).expect("tiny recursive model")
}

pub fn engine(model: Model, tok: Arc<Tokenizer>, cfg: EngineConfig) -> Engine<CpuBackend> {
    Engine::new(ResidentModel::new(CpuBackend, model), tok, cfg).expect("engine")
}

/// Output token ids and the final event of every request, from a list of events.
pub fn collect(events: &[(RequestId, Event)]) -> HashMap<RequestId, (Vec<u32>, Option<Event>)> {
    let mut out: HashMap<RequestId, (Vec<u32>, Option<Event>)> = HashMap::new();
    for (id, e) in events {
        let entry = out.entry(*id).or_default();
        match e {
            Event::Token(t) => entry.0.push(t.id),
            done => {
                assert!(entry.1.is_none(), "request {id} finished twice");
                entry.1 = Some(done.clone());
            }
        }
    }
    out
}

/// The gRPC service's view of a model (ChatML template, no exit rule).
#[allow(dead_code)]
pub fn served(model: &Model, tok: Arc<Tokenizer>) -> rrt_node::grpc::ServedModel {
    let p = rrt_model::chat::Prompter::new(tok, None).unwrap();
    rrt_node::grpc::ServedModel::new("tiny", "recursive", model, p, None)
}
