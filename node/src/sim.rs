//! The engine without compute, for capacity planning: [`SimBackend`] implements every kernel
//! as a no-op, so [`Engine`] runs its real scheduling (admission, chunked prefill, depth-wise
//! batching, KV blocks, preemption, exits, fills) while a [`CostModel`] fitted from a real
//! node's step spans says how long each pass would have taken. `rrt capacity` drives such
//! engines through simulated time; there is no second copy of the scheduling policy.
//!
//! A simulated request forces its tokens and its exit loops (`GenParams::forced`,
//! `ExitControl::schedule`, drawn from the measured mix), so exits happen where the real
//! model's did on average without computing logits.

use crate::engine::{Engine, EngineConfig, EngineError, PassInfo, ResidentModel};
use rrt_kernels::backend::{HostRows, KvSlot, LoraColumns, RowGroup};
use rrt_kernels::matmul::MatmulMode;
use rrt_kernels::rope::RopeTable;
use rrt_kernels::{AttnRow, AttnShape, Backend, BackendError, KvLayout, MatrixData, RopeScaling};
use rrt_model::config::{Family, ModelConfig};
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, Recursion};
use rrt_model::weights::{Layer, Linear, Weights};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Token ids of the simulated vocabulary (ids below this; the simulated requests use them).
pub const SIM_VOCAB: usize = 64;

/// A backend that computes nothing: buffers are lengths, matrices their shapes.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimBackend;

impl Backend for SimBackend {
    type Buf = usize;
    type Mat = (usize, usize);
    type Kv = ();
    type Rows = HostRows;

    fn prepare_rows(&self, sets: Vec<HostRows>) -> Result<Vec<HostRows>, BackendError> {
        Ok(sets)
    }

    fn name(&self) -> &'static str {
        "sim"
    }
    fn matrix(&self, out_dim: usize, in_dim: usize, _data: MatrixData) -> Result<(usize, usize), BackendError> {
        Ok((out_dim, in_dim))
    }
    fn buffer(&self, values: Vec<f32>) -> Result<usize, BackendError> {
        Ok(values.len())
    }
    fn zeros(&self, len: usize) -> Result<usize, BackendError> {
        Ok(len)
    }
    fn to_host(&self, buf: &usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; *buf])
    }
    fn kv_pool(&self, _layout: KvLayout, _n_blocks: usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn matrix_bytes(&self, _m: &(usize, usize)) -> usize {
        0
    }
    fn embed(&self, _table: &(usize, usize), _tokens: &[u32], _out: &mut usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn copy_rows(
        &self,
        _src: &usize,
        _src_rows: &[u32],
        _dst: &mut usize,
        _dst_row0: usize,
        _width: usize,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn rmsnorm(&self, _x: &usize, _w: &usize, _eps: f32, _out: &mut usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn linear_lora(
        &self,
        _x: &usize,
        _n: usize,
        _w: &(usize, usize),
        _bias: Option<&usize>,
        _loras: &[LoraColumns<'_, (usize, usize)>],
        _groups: &[RowGroup],
        _y: &mut usize,
        _mode: MatmulMode,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn rope(
        &self,
        _rope: &RopeTable,
        _qkv: &mut usize,
        _ld: usize,
        _positions: &[u32],
        _q_cols: usize,
        _k_col0: usize,
        _k_cols: usize,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn kv_write(
        &self,
        _kv: &mut (),
        _layout: &KvLayout,
        _src: &usize,
        _ld: usize,
        _k_col0: usize,
        _v_col0: usize,
        _slots: &[KvSlot],
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn kv_export(
        &self,
        _kv: &(),
        layout: &KvLayout,
        _blocks: &[u32],
        positions: usize,
    ) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; positions * layout.n_layers * 2 * layout.kv_dim()])
    }
    fn kv_import(&self, _kv: &mut (), _layout: &KvLayout, _blocks: &[u32], _data: &[f32]) -> Result<(), BackendError> {
        Ok(())
    }
    fn attention(
        &self,
        _qkv: &usize,
        _ld: usize,
        _rows: &[AttnRow<'_>],
        _kv: &(),
        _layout: &KvLayout,
        _shape: AttnShape,
        _out: &mut usize,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn silu_mul(&self, _gu: &usize, _n: usize, _inter: usize, _out: &mut usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn logits(
        &self,
        _x: &usize,
        _width: usize,
        select: &[u32],
        _norm: Option<&usize>,
        _eps: f32,
        head: &(usize, usize),
    ) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; select.len() * head.0])
    }
    fn add_normed_branch(&self, _t: &usize, _w: &usize, _eps: f32, _x: &mut usize) -> Result<(), BackendError> {
        Ok(())
    }
    fn dot_rows(&self, _x: &usize, _width: usize, rows: &[u32], _w: &usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0.0; rows.len()])
    }
    fn cosine_rows(&self, _a: &usize, _b: &usize, _width: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        Ok(vec![1.0; rows.len()])
    }
}

/// Seconds one pass takes, linear in what the pass does:
/// `intercept + per_row * rows + per_ctx * ctx + per_head_row * head_rows + per_fill_row *
/// fill_rows` (rows through the shared block, attended positions summed over rows, LM-head
/// rows, KV-only fill rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub intercept: f64,
    pub per_row: f64,
    pub per_ctx: f64,
    pub per_head_row: f64,
    pub per_fill_row: f64,
}

impl CostModel {
    /// The features of a pass, in coefficient order (after the intercept).
    pub fn features(rows: f64, ctx: f64, head_rows: f64, fill_rows: f64) -> [f64; 4] {
        [rows, ctx, head_rows, fill_rows]
    }

    /// The engine actor's pacing by this model.
    pub fn pace(self) -> crate::engine_actor::Pace {
        Box::new(move |p| self.seconds(p))
    }

    pub fn seconds(&self, p: &PassInfo) -> f64 {
        let rows: usize = p.rows_per_depth.iter().sum();
        self.intercept
            + self.per_row * rows as f64
            + self.per_ctx * p.ctx as f64
            + self.per_head_row * p.head_rows as f64
            + self.per_fill_row * p.fill_rows as f64
    }
}

/// An engine on [`SimBackend`] with the scheduling settings `cfg` (its `kv_bytes` is ignored:
/// the pool has `kv_blocks` blocks) for a model of `loops` loops and a vocabulary of `vocab`
/// ids ([`SIM_VOCAB`] keeps the all-zero logits cheap when requests use small ids).
pub fn engine(
    loops: usize,
    mut cfg: EngineConfig,
    kv_blocks: usize,
    tokenizer: Arc<rrt_model::tokenizer::Tokenizer>,
    vocab: usize,
) -> Result<Engine<SimBackend>, EngineError> {
    let loops = loops.max(1);
    let (h, hd) = (4usize, 4usize);
    let config = ModelConfig {
        family: Family::Llama,
        hidden: h,
        intermediate: h,
        n_layers: loops,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: hd,
        vocab,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
        rope_dim: hd,
        rope_scaling: RopeScaling::None,
        max_positions: 1 << 20,
        sliding_window: None,
        qkv_bias: false,
        tie_embeddings: true,
        looped: None,
    };
    let lin = |o: usize, i: usize| Linear::f32(o, i, vec![0.0; o * i], None);
    let vocab = vocab.max(2);
    let layer = Layer {
        attn_norm: vec![1.0; h],
        qkv: lin(3 * hd, h),
        o: lin(h, hd),
        ffn_norm: vec![1.0; h],
        gate_up: lin(2 * h, h),
        down: lin(h, h),
        branch_norms: None,
    };
    let weights = Weights {
        embed: lin(vocab, h),
        layers: vec![layer],
        norm: vec![1.0; h],
        lm_head: None,
        exit_gate: None,
    };
    let model = if loops == 1 {
        Model::new(config, weights)
    } else {
        let rec = Recursion {
            loops,
            init: Init::Average,
            ranks: [0; 7],
            lora: (0..loops).map(|_| Default::default()).collect(),
        };
        Model::recursive(config, weights, rec)?
    };
    let resident = ResidentModel::new(SimBackend, model)?;
    cfg.kv_bytes = kv_blocks.max(1) * resident.kv_layout(cfg.block_size).block_floats() * 4;
    cfg.exit = None;
    Engine::new(resident, tokenizer, cfg)
}
