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
    Engine::new(ResidentModel::new(CpuBackend, model).unwrap(), tok, cfg).expect("engine")
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

/// The CPU backend whose next pass fails once `armed` is set, as a failed GPU allocation
/// fails it: the engine thread then ends with the error.
#[allow(dead_code)]
pub struct Faulty {
    pub cpu: CpuBackend,
    pub armed: Arc<std::sync::atomic::AtomicBool>,
}

mod faulty {
    use super::Faulty;
    use rrt_kernels::attention::{AttnRow, AttnShape, KvLayout};
    use rrt_kernels::backend::{HostRows, KvSlot, LoraColumns, RowGroup};
    use rrt_kernels::matmul::MatmulMode;
    use rrt_kernels::{Backend, BackendError, CpuMatrix, MatrixData, RopeTable};
    use std::sync::atomic::Ordering;

    impl Backend for Faulty {
        type Buf = Vec<f32>;
        type Mat = CpuMatrix;
        type Kv = rrt_kernels::CpuKv;
        type Rows = HostRows;
        fn prepare_rows(&self, sets: Vec<HostRows>) -> Result<Vec<HostRows>, BackendError> {
            if self.armed.load(Ordering::Relaxed) {
                return Err(BackendError::Alloc {
                    what: "8589934592 floats".into(),
                    detail: "a simulated device failure".into(),
                });
            }
            Ok(sets)
        }
        fn name(&self) -> &'static str {
            "faulty-cpu"
        }
        fn matrix(&self, o: usize, i: usize, d: MatrixData) -> Result<CpuMatrix, BackendError> {
            self.cpu.matrix(o, i, d)
        }
        fn buffer(&self, v: Vec<f32>) -> Result<Vec<f32>, BackendError> {
            Ok(v)
        }
        fn zeros(&self, n: usize) -> Result<Vec<f32>, BackendError> {
            self.cpu.zeros(n)
        }
        fn to_host(&self, b: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
            Ok(b.clone())
        }
        fn kv_pool(&self, l: KvLayout, n: usize) -> Result<rrt_kernels::CpuKv, BackendError> {
            self.cpu.kv_pool(l, n)
        }
        fn kv_value_bytes(&self) -> usize {
            self.cpu.kv_value_bytes()
        }
        fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
            self.cpu.matrix_bytes(m)
        }
        fn embed(&self, t: &CpuMatrix, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), BackendError> {
            self.cpu.embed(t, tokens, out)
        }
        fn copy_rows(
            &self,
            s: &Vec<f32>,
            r: &[u32],
            d: &mut Vec<f32>,
            r0: usize,
            w: usize,
        ) -> Result<(), BackendError> {
            self.cpu.copy_rows(s, r, d, r0, w)
        }
        fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<(), BackendError> {
            self.cpu.rmsnorm(x, w, eps, out)
        }
        #[allow(clippy::too_many_arguments)]
        fn linear_lora(
            &self,
            x: &Vec<f32>,
            n: usize,
            w: &CpuMatrix,
            bias: Option<&Vec<f32>>,
            loras: &[LoraColumns<'_, CpuMatrix>],
            groups: &[RowGroup],
            y: &mut Vec<f32>,
            mode: MatmulMode,
        ) -> Result<(), BackendError> {
            self.cpu.linear_lora(x, n, w, bias, loras, groups, y, mode)
        }
        fn rope(
            &self,
            r: &RopeTable,
            qkv: &mut Vec<f32>,
            ld: usize,
            p: &[u32],
            q: usize,
            k0: usize,
            k: usize,
        ) -> Result<(), BackendError> {
            self.cpu.rope(r, qkv, ld, p, q, k0, k)
        }
        fn kv_write(
            &self,
            kv: &mut rrt_kernels::CpuKv,
            l: &KvLayout,
            s: &Vec<f32>,
            ld: usize,
            k0: usize,
            v0: usize,
            slots: &[KvSlot],
        ) -> Result<(), BackendError> {
            self.cpu.kv_write(kv, l, s, ld, k0, v0, slots)
        }
        fn kv_export(
            &self,
            kv: &rrt_kernels::CpuKv,
            l: &KvLayout,
            b: &[u32],
            p: usize,
        ) -> Result<Vec<f32>, BackendError> {
            self.cpu.kv_export(kv, l, b, p)
        }
        fn kv_import(
            &self,
            kv: &mut rrt_kernels::CpuKv,
            l: &KvLayout,
            b: &[u32],
            d: &[f32],
        ) -> Result<(), BackendError> {
            self.cpu.kv_import(kv, l, b, d)
        }
        fn attention(
            &self,
            qkv: &Vec<f32>,
            ld: usize,
            rows: &[AttnRow<'_>],
            kv: &rrt_kernels::CpuKv,
            l: &KvLayout,
            s: AttnShape,
            out: &mut Vec<f32>,
        ) -> Result<(), BackendError> {
            self.cpu.attention(qkv, ld, rows, kv, l, s, out)
        }
        fn silu_mul(&self, gu: &Vec<f32>, n: usize, inter: usize, out: &mut Vec<f32>) -> Result<(), BackendError> {
            self.cpu.silu_mul(gu, n, inter, out)
        }
        fn logits(
            &self,
            x: &Vec<f32>,
            w: usize,
            sel: &[u32],
            norm: Option<&Vec<f32>>,
            eps: f32,
            head: &CpuMatrix,
        ) -> Result<Vec<f32>, BackendError> {
            self.cpu.logits(x, w, sel, norm, eps, head)
        }
        fn add_normed_branch(
            &self,
            t: &Vec<f32>,
            w: &Vec<f32>,
            eps: f32,
            x: &mut Vec<f32>,
        ) -> Result<(), BackendError> {
            self.cpu.add_normed_branch(t, w, eps, x)
        }
        fn dot_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], w: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
            self.cpu.dot_rows(x, width, rows, w)
        }
        fn cosine_rows(&self, a: &Vec<f32>, b: &Vec<f32>, w: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError> {
            self.cpu.cosine_rows(a, b, w, rows)
        }
    }
}
