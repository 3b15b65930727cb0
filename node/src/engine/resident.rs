//! The model as the engine runs it: the shared block resident on a [`Backend`], and one pass
//! of that block over a batch of rows at mixed loop depths.
//!
//! Row `i` at loop depth `d(i)` runs shared layer `k` as unrolled layer `d(i) * K + k`: the
//! shared products run once over all rows, each row adds the LoRA of its own unrolled layer
//! (`Backend::linear_lora`), writes its keys/values into cache layer `d(i) * K + k` and attends
//! there. A vanilla model is the case `B = 1`, `K = L`.

pub use rrt_kernels::backend::PassRow;
use rrt_kernels::backend::{Backend, BackendError, HostRows, LoraColumns, LoraMats, MatrixData};
use rrt_kernels::{AttnShape, KvLayout, MatmulMode, RopeTable};
use rrt_model::config::ModelConfig;
use rrt_model::forward::Model;
use rrt_model::weights::Linear;

/// Modules that carry a LoRA, in `rrt_model::recursive::MODULES` order.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

struct Dense<B: Backend> {
    w: B::Mat,
    bias: Option<B::Buf>,
}

/// One shared layer and the LoRAs of every loop that runs it.
struct SharedLayer<B: Backend> {
    attn_norm: B::Buf,
    qkv: Dense<B>,
    /// The key and value rows of `qkv` (models with more than one loop): the product of the
    /// KV-only fill rows, which need no queries (40 % of `qkv`'s columns on SmolLM2).
    kv: Option<Dense<B>>,
    o: Dense<B>,
    ffn_norm: B::Buf,
    gate_up: Dense<B>,
    down: Dense<B>,
    /// The attention and MLP branch norms of families with `branch_norms` (Ouro).
    branch_norms: Option<(B::Buf, B::Buf)>,
    /// `lora[module][depth]`.
    lora: [Vec<Option<LoraMats<B::Mat>>>; 7],
}

/// The model resident on a backend.
pub struct ResidentModel<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    /// B: loops of the shared block (1 for a vanilla model).
    pub loops: usize,
    /// K: shared layers per loop.
    pub shared: usize,
    embed: B::Mat,
    norm: B::Buf,
    head: Option<B::Mat>,
    /// The learned exit gate (weights, bias) of models that have one (Ouro, checkpoints trained
    /// with `--exit-gate`).
    gate: Option<(B::Buf, f32)>,
    layers: Vec<SharedLayer<B>>,
    rope: RopeTable,
    /// Resident weight bytes (capacity planning).
    pub weight_bytes: usize,
}

fn dense<B: Backend>(be: &B, l: Linear, bytes: &mut usize) -> Result<Dense<B>, BackendError> {
    let w = be.matrix(l.out_dim, l.in_dim, l.w)?;
    *bytes += be.matrix_bytes(&w);
    Ok(Dense {
        w,
        bias: l.bias.map(|b| be.buffer(b)).transpose()?,
    })
}

/// One LoRA matrix in the backend's [`Backend::lora_format`] where its rows are whole blocks,
/// f32 otherwise.
fn lora_matrix<B: Backend>(be: &B, out_dim: usize, in_dim: usize, w: Vec<f32>) -> Result<B::Mat, BackendError> {
    let data = match be.lora_format() {
        Some(f) if in_dim.is_multiple_of(32) => MatrixData::Quant(f, rrt_model::quant::quantize(f, &w)),
        _ => MatrixData::F32(w),
    };
    be.matrix(out_dim, in_dim, data)
}

impl<B: Backend> ResidentModel<B> {
    /// Moves a loaded model onto the backend (the host copy is consumed); fails when the
    /// backend cannot hold it.
    pub fn new(backend: B, model: Model) -> Result<Self, BackendError> {
        let loops = model.loops();
        let Model {
            config,
            weights,
            recursion,
            ..
        } = model;
        let shared = weights.layers.len();
        let mut bytes = 0usize;
        let mut unrolled_lora = recursion.map(|r| r.lora).unwrap_or_default();
        let mut layers = Vec::with_capacity(shared);
        let (qd, kd) = (config.q_dim(), config.kv_dim());
        for (k, layer) in weights.layers.into_iter().enumerate() {
            let kv = (loops > 1)
                .then(|| {
                    let q = &layer.qkv;
                    let kv = Linear::new(
                        2 * kd,
                        q.in_dim,
                        q.w.rows(q.in_dim, qd..qd + 2 * kd),
                        q.bias.as_ref().map(|b| b[qd..qd + 2 * kd].to_vec()),
                    );
                    dense(&backend, kv, &mut bytes)
                })
                .transpose()?;
            let mut lora: [Vec<Option<LoraMats<B::Mat>>>; 7] = Default::default();
            for d in 0..loops {
                let li = d * shared + k;
                for (m, slot) in lora.iter_mut().enumerate() {
                    let l = unrolled_lora.get_mut(li).and_then(|mods| mods[m].take());
                    let mats = match l {
                        Some(l) => {
                            let a = lora_matrix(&backend, l.rank, l.in_dim, l.a)?;
                            let b = lora_matrix(&backend, l.out_dim, l.rank, l.b)?;
                            bytes += backend.matrix_bytes(&a) + backend.matrix_bytes(&b);
                            Some(LoraMats { rank: l.rank, a, b })
                        }
                        None => None,
                    };
                    slot.push(mats);
                }
            }
            layers.push(SharedLayer {
                branch_norms: layer
                    .branch_norms
                    .map(|b| Ok::<_, BackendError>((backend.buffer(b.attn)?, backend.buffer(b.ffn)?)))
                    .transpose()?,
                attn_norm: backend.buffer(layer.attn_norm)?,
                qkv: dense(&backend, layer.qkv, &mut bytes)?,
                kv,
                o: dense(&backend, layer.o, &mut bytes)?,
                ffn_norm: backend.buffer(layer.ffn_norm)?,
                gate_up: dense(&backend, layer.gate_up, &mut bytes)?,
                down: dense(&backend, layer.down, &mut bytes)?,
                lora,
            });
        }
        let embed = backend.matrix(weights.embed.out_dim, weights.embed.in_dim, weights.embed.w)?;
        bytes += backend.matrix_bytes(&embed);
        let head = weights
            .lm_head
            .map(|h| backend.matrix(h.out_dim, h.in_dim, h.w))
            .transpose()?;
        if let Some(h) = &head {
            bytes += backend.matrix_bytes(h);
        }
        let rope = config.rope_table();
        let gate = weights
            .exit_gate
            .map(|g| backend.buffer(g.w).map(|w| (w, g.b)))
            .transpose()?;
        Ok(Self {
            gate,
            norm: backend.buffer(weights.norm)?,
            backend,
            config,
            loops,
            shared,
            embed,
            head,
            layers,
            rope,
            weight_bytes: bytes,
        })
    }

    /// The KV geometry: one layer per unrolled layer.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            n_layers: self.config.n_layers,
            block_size,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Embeddings of `tokens` into rows `0..tokens.len()` of `out`.
    pub fn embed(&self, tokens: &[u32], out: &mut B::Buf) -> Result<(), BackendError> {
        self.backend.embed(&self.embed, tokens, out)
    }

    /// The final norm the LM head applies: none where every loop already ends with it.
    fn head_norm(&self) -> Option<&B::Buf> {
        (!self.config.loop_end_norm()).then_some(&self.norm)
    }

    /// Final norm + LM head of the rows `select` of `x` (host logits, `select.len() x vocab`).
    pub fn logits(&self, x: &B::Buf, select: &[u32]) -> Result<Vec<f32>, BackendError> {
        if select.is_empty() {
            return Ok(Vec::new());
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        self.backend.logits(
            x,
            self.config.hidden,
            select,
            self.head_norm(),
            self.config.rms_eps,
            head,
        )
    }

    /// [`Self::logits`] reduced on the backend to each row's [`rrt_kernels::HeadTop`].
    pub fn head_top(&self, x: &B::Buf, select: &[u32]) -> Result<Vec<rrt_kernels::HeadTop>, BackendError> {
        if select.is_empty() {
            return Ok(Vec::new());
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        self.backend.head_top(
            x,
            self.config.hidden,
            select,
            self.head_norm(),
            self.config.rms_eps,
            head,
        )
    }

    /// Whether the model has a learned exit gate.
    pub fn has_gate(&self) -> bool {
        self.gate.is_some()
    }

    /// The exit gate's logit (`w . h + b`) of the rows `select` of a loop's output `x`: one
    /// dot product per row, no LM head. Empty without a gate.
    pub fn gate_logits(&self, x: &B::Buf, select: &[u32]) -> Result<Vec<f32>, BackendError> {
        Ok(match (&self.gate, select.is_empty()) {
            (Some((w, b)), false) => self
                .backend
                .dot_rows(x, self.config.hidden, select, w)?
                .into_iter()
                .map(|v| v + b)
                .collect(),
            _ => Vec::new(),
        })
    }

    fn lora_cols<'a>(&'a self, l: &'a SharedLayer<B>, mods: &[(usize, usize)]) -> Vec<LoraColumns<'a, B::Mat>> {
        mods.iter()
            .map(|&(m, col0)| LoraColumns {
                col0,
                per_adapter: &l.lora[m],
            })
            .collect()
    }

    /// One pass of the shared block over `rows` (hidden states `x`, `rows.len() x hidden`,
    /// updated in place), writing each row's keys/values at its unrolled layers.
    ///
    /// `fills` (with their hidden states `fill_x`) are KV-only rows: the exit hidden state of a
    /// token that left early, replicated once per deeper loop; for each shared layer they get
    /// the keys/values of unrolled layer `depth * K + k` computed from that state (CALM's state
    /// propagation) and run nothing else.
    pub fn pass(
        &self,
        kv: &mut B::Kv,
        layout: &KvLayout,
        x: &mut B::Buf,
        rows: &[PassRow<'_>],
        fill_x: Option<&B::Buf>,
        fills: &[PassRow<'_>],
    ) -> Result<(), BackendError> {
        let be = &self.backend;
        let c = &self.config;
        let (h, qd, kd, qkvd, inter) = (c.hidden, c.q_dim(), c.kv_dim(), c.qkv_dim(), c.intermediate);
        let n = rows.len();
        let shape = AttnShape {
            n_heads: c.n_heads,
            window: c.sliding_window,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        // The rows' metadata, prepared once for every layer of the pass (one upload on a GPU).
        let bs = layout.block_size;
        let mut sets = be
            .prepare_rows(vec![
                HostRows::new(rows, self.shared, bs),
                HostRows::new(fills, self.shared, bs),
            ])?
            .into_iter();
        let (Some(prows), Some(pfills)) = (sets.next(), sets.next()) else {
            unreachable!("prepare_rows returns one prepared set per set")
        };
        let mut hb = be.zeros(n * h)?;
        let mut qkv = be.zeros(n * qkvd)?;
        let mut attn = be.zeros(n * qd)?;
        let mut gu = be.zeros(n * 2 * inter)?;
        let mut act = be.zeros(n * inter)?;
        let (mut fh, mut fkv) = (be.zeros(fills.len() * h)?, be.zeros(fills.len() * 2 * kd)?);
        for (k, l) in self.layers.iter().enumerate() {
            // Fill rows first: a later row of this pass may read what they write at this
            // layer (a prompt row behind an exited one, `EngineConfig::prompt_exits`).
            if let (Some(fx), false, Some(kvw)) = (fill_x, fills.is_empty(), &l.kv) {
                // Keys and values only: the key/value rows of the fused product and their LoRAs.
                be.rmsnorm(fx, &l.attn_norm, c.rms_eps, &mut fh)?;
                be.linear_lora_rows(
                    &fh,
                    &pfills,
                    &kvw.w,
                    kvw.bias.as_ref(),
                    &self.lora_cols(l, &[(K, 0), (V, kd)]),
                    &mut fkv,
                    MatmulMode::Overwrite,
                )?;
                be.rope_rows(&self.rope, &mut fkv, 2 * kd, &pfills, 0, 0, kd)?;
                be.kv_write_rows(kv, layout, &fkv, 2 * kd, 0, kd, &pfills, k)?;
            }
            if n > 0 {
                let qkv_loras = self.lora_cols(l, &[(Q, 0), (K, qd), (V, qd + kd)]);
                be.rmsnorm(x, &l.attn_norm, c.rms_eps, &mut hb)?;
                be.linear_lora_rows(
                    &hb,
                    &prows,
                    &l.qkv.w,
                    l.qkv.bias.as_ref(),
                    &qkv_loras,
                    &mut qkv,
                    MatmulMode::Overwrite,
                )?;
                be.rope_rows(&self.rope, &mut qkv, qkvd, &prows, qd, qd, kd)?;
                be.kv_write_rows(kv, layout, &qkv, qkvd, qd, qd + kd, &prows, k)?;
                be.attention_rows(&qkv, qkvd, &prows, k, kv, layout, shape, &mut attn)?;
                let o_loras = self.lora_cols(l, &[(O, 0)]);
                match &l.branch_norms {
                    None => be.linear_lora_rows(
                        &attn,
                        &prows,
                        &l.o.w,
                        l.o.bias.as_ref(),
                        &o_loras,
                        x,
                        MatmulMode::Accumulate,
                    )?,
                    Some((attn_bn, _)) => {
                        be.linear_lora_rows(
                            &attn,
                            &prows,
                            &l.o.w,
                            l.o.bias.as_ref(),
                            &o_loras,
                            &mut hb,
                            MatmulMode::Overwrite,
                        )?;
                        be.add_normed_branch(&hb, attn_bn, c.rms_eps, x)?;
                    }
                }
                be.rmsnorm(x, &l.ffn_norm, c.rms_eps, &mut hb)?;
                let gu_loras = self.lora_cols(l, &[(GATE, 0), (UP, inter)]);
                be.linear_lora_rows(
                    &hb,
                    &prows,
                    &l.gate_up.w,
                    l.gate_up.bias.as_ref(),
                    &gu_loras,
                    &mut gu,
                    MatmulMode::Overwrite,
                )?;
                be.silu_mul(&gu, n, inter, &mut act)?;
                let down_loras = self.lora_cols(l, &[(DOWN, 0)]);
                match &l.branch_norms {
                    None => be.linear_lora_rows(
                        &act,
                        &prows,
                        &l.down.w,
                        l.down.bias.as_ref(),
                        &down_loras,
                        x,
                        MatmulMode::Accumulate,
                    )?,
                    Some((_, ffn_bn)) => {
                        be.linear_lora_rows(
                            &act,
                            &prows,
                            &l.down.w,
                            l.down.bias.as_ref(),
                            &down_loras,
                            &mut hb,
                            MatmulMode::Overwrite,
                        )?;
                        be.add_normed_branch(&hb, ffn_bn, c.rms_eps, x)?;
                    }
                }
            }
        }
        if n > 0 && c.loop_end_norm() {
            // Every row just finished a loop: the normed state is the loop's output (the LM
            // head and the exit gate read it as it is) and the next loop's input.
            be.rmsnorm(x, &self.norm, c.rms_eps, &mut hb)?;
            std::mem::swap(x, &mut hb);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_rows_group_depths_in_maximal_runs() {
        let table = [0u32, 1];
        let rows: Vec<PassRow<'_>> = [0, 0, 1, 1, 1, 0, 2]
            .iter()
            .enumerate()
            .map(|(i, &d)| PassRow {
                pos: i,
                depth: d,
                blocks: &table,
            })
            .collect();
        let h = HostRows::new(&rows, 30, 16);
        assert_eq!(
            h.groups.iter().map(|g| (g.start, g.len, g.adapter)).collect::<Vec<_>>(),
            vec![(0, 2, 0), (2, 3, 1), (5, 1, 0), (6, 1, 2)]
        );
        // One table stored once for the seven rows; unrolled layer depth * K + k.
        assert_eq!(h.tables, vec![0, 1]);
        assert_eq!(h.layer(6, 4), 64);
    }
}
