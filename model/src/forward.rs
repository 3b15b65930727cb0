//! The CPU forward pass of a Llama-family decoder over a batch of rows.
//!
//! A row is one token of one sequence at one position. Rows of different sequences (and a
//! whole prompt chunk of one sequence) run together: every matrix product covers all rows at
//! once, attention reads each row's own sequence from the paged KV cache. A chunk's rows see
//! each other causally because all keys/values of a layer are written before attention runs.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv::KvPool;
use crate::recursive::{Lora, Recursion};
use crate::weights::{Linear, Weights};
use rayon::prelude::*;
use rrt_kernels::attention::{AttnRow, AttnShape};
use rrt_kernels::{KvLayout, MatmulMode, RopeTable, attention_paged, rmsnorm, silu_mul};

/// `x += rmsnorm(t) * w` row by row (a residual branch normed before it is added).
fn add_normed(x: &mut [f32], t: &[f32], w: &[f32], eps: f32) {
    let mut normed = vec![0f32; t.len()];
    rmsnorm(t, w, eps, &mut normed);
    x.iter_mut().zip(&normed).for_each(|(a, b)| *a += b);
}

/// A loaded model ready to run.
pub struct Model {
    pub config: ModelConfig,
    /// For a recursive model, `weights.layers` holds the K shared layers.
    pub weights: Weights,
    /// Loops and per-unrolled-layer LoRAs of a relaxed recursive model (`None`: vanilla).
    pub recursion: Option<Recursion>,
    rope: RopeTable,
}

/// `y[:, col0 .. col0 + out] += (x A^T) B^T` for `n` rows (`y` has row stride `ld`).
fn apply_lora(lora: &Lora, x: &[f32], n: usize, y: &mut [f32], ld: usize, col0: usize) {
    let mut t = vec![0f32; n * lora.rank];
    rrt_kernels::matmul_nt(x, &lora.a, &mut t, n, lora.in_dim, lora.rank, MatmulMode::Overwrite);
    let mut d = vec![0f32; n * lora.out_dim];
    rrt_kernels::matmul_nt(&t, &lora.b, &mut d, n, lora.rank, lora.out_dim, MatmulMode::Overwrite);
    for i in 0..n {
        let row = &mut y[i * ld + col0..i * ld + col0 + lora.out_dim];
        row.iter_mut()
            .zip(&d[i * lora.out_dim..(i + 1) * lora.out_dim])
            .for_each(|(a, b)| *a += b);
    }
}

/// Activations a calibration pass can observe inside a layer (see [`Model::forward_capture`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tap {
    /// The residual stream entering the attention norm (`n x hidden`).
    PreAttnNorm,
    /// The attention output, input of the o projection (`n x q_dim`).
    AttnOut,
    /// The residual stream entering the FFN norm (`n x hidden`).
    PreFfnNorm,
    /// SwiGLU's output, input of the down projection (`n x intermediate`).
    Act,
}

/// Callback of [`Model::forward_capture`]: unrolled layer, tap, activations.
pub type TapFn<'a> = dyn FnMut(usize, Tap, &[f32]) + 'a;

/// One row of a forward batch.
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    pub token: u32,
    pub pos: usize,
    /// The block table of the row's sequence (already reserved up to `pos`).
    pub blocks: &'a [u32],
}

/// Rows for `tokens` at positions `0..` of one sequence with block table `blocks`.
pub fn sequence_rows<'a>(tokens: &[u32], blocks: &'a [u32]) -> Vec<Row<'a>> {
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &token)| Row { token, pos, blocks })
        .collect()
}

/// `y = x W^T (+ b)` for all rows.
pub(crate) fn linear(l: &Linear, x: &[f32], y: &mut [f32], n: usize, mode: MatmulMode) {
    l.matmul(x, y, n, mode);
    if let Some(b) = &l.bias {
        for row in y.chunks_exact_mut(l.out_dim) {
            for (v, bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
}

/// Per-batch buffers, sized for `n` rows.
struct Buffers {
    h: Vec<f32>,
    /// A branch's output before its norm (families with branch norms).
    branch: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    attn: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Model {
    pub fn new(config: ModelConfig, weights: Weights) -> Self {
        let rope = config.rope_table();
        Self {
            config,
            weights,
            rope,
            recursion: None,
        }
    }

    /// A relaxed recursive model: `weights.layers` are the K shared layers, looped
    /// `recursion.loops` times (K x loops = `config.n_layers`).
    pub fn recursive(config: ModelConfig, weights: Weights, recursion: Recursion) -> Result<Self> {
        if weights.layers.len() * recursion.loops != config.n_layers || recursion.lora.len() != config.n_layers {
            return Err(ModelError::InvalidArgument {
                field: "loops",
                msg: format!(
                    "{} shared layers x {} loops with {} LoRA layers does not unroll to {} layers",
                    weights.layers.len(),
                    recursion.loops,
                    recursion.lora.len(),
                    config.n_layers
                ),
            });
        }
        let mut m = Self::new(config, weights);
        m.recursion = Some(recursion);
        Ok(m)
    }

    /// The LoRA of module `m` (index in `recursive::MODULES`) at unrolled layer `l`.
    fn lora(&self, l: usize, m: usize) -> Option<&Lora> {
        self.recursion.as_ref().and_then(|r| r.lora[l][m].as_ref())
    }

    /// The KV geometry of this model with `block_size` positions per block.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            n_layers: self.config.n_layers,
            block_size,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Embeddings of the rows' tokens (`n x hidden`).
    pub fn embed(&self, tokens: impl ExactSizeIterator<Item = u32>) -> Result<Vec<f32>> {
        let h = self.config.hidden;
        let mut x = vec![0f32; tokens.len() * h];
        for (i, t) in tokens.enumerate() {
            let t = t as usize;
            if t >= self.config.vocab {
                return Err(ModelError::InvalidArgument {
                    field: "token",
                    msg: format!("token id {t} is outside the vocabulary of {}", self.config.vocab),
                });
            }
            self.weights.embed.row_into(t, &mut x[i * h..(i + 1) * h]);
        }
        Ok(x)
    }

    fn buffers(&self, rows: &[Row<'_>]) -> Buffers {
        let c = &self.config;
        let n = rows.len();
        let half = self.rope.half();
        let mut cos = vec![0f32; n * half];
        let mut sin = vec![0f32; n * half];
        for (i, r) in rows.iter().enumerate() {
            self.rope.cos_sin(
                r.pos,
                &mut cos[i * half..(i + 1) * half],
                &mut sin[i * half..(i + 1) * half],
            );
        }
        Buffers {
            h: vec![0f32; n * c.hidden],
            branch: if c.branch_norms() {
                vec![0f32; n * c.hidden]
            } else {
                Vec::new()
            },
            qkv: vec![0f32; n * c.qkv_dim()],
            q: vec![0f32; n * c.q_dim()],
            attn: vec![0f32; n * c.q_dim()],
            gu: vec![0f32; n * 2 * c.intermediate],
            act: vec![0f32; n * c.intermediate],
            cos,
            sin,
        }
    }

    /// Runs unrolled layer `li` (shared layer `li mod K` with the LoRAs of `li`, writing K/V
    /// into cache layer `li`) on the hidden states `x`.
    fn layer(
        &self,
        li: usize,
        x: &mut [f32],
        rows: &[Row<'_>],
        pool: &mut KvPool,
        b: &mut Buffers,
        mut tap: Option<&mut TapFn<'_>>,
    ) {
        let c = &self.config;
        let n = rows.len();
        let w = &self.weights.layers[li % self.weights.layers.len()];
        let (qd, kd) = (c.q_dim(), c.kv_dim());
        let half = self.rope.half();

        if let Some(t) = tap.as_mut() {
            t(li, Tap::PreAttnNorm, x);
        }
        rmsnorm(x, &w.attn_norm, c.rms_eps, &mut b.h);
        linear(&w.qkv, &b.h, &mut b.qkv, n, MatmulMode::Overwrite);
        for (m, col0) in [(0, 0), (1, qd), (2, qd + kd)] {
            if let Some(lora) = self.lora(li, m) {
                apply_lora(lora, &b.h, n, &mut b.qkv, c.qkv_dim(), col0);
            }
        }
        for (i, r) in rows.iter().enumerate() {
            let row = &mut b.qkv[i * c.qkv_dim()..(i + 1) * c.qkv_dim()];
            let (cos, sin) = (&b.cos[i * half..(i + 1) * half], &b.sin[i * half..(i + 1) * half]);
            let (q, kv) = row.split_at_mut(qd);
            self.rope.apply(q, cos, sin);
            self.rope.apply(&mut kv[..kd], cos, sin);
            b.q[i * qd..(i + 1) * qd].copy_from_slice(q);
            pool.write(r.blocks, li, r.pos, &kv[..kd], &kv[kd..]);
        }
        let arows: Vec<AttnRow<'_>> = rows
            .iter()
            .map(|r| AttnRow {
                blocks: r.blocks,
                pos: r.pos,
                layer: li,
            })
            .collect();
        let shape = AttnShape {
            n_heads: c.n_heads,
            window: c.sliding_window,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let layout = *pool.layout();
        attention_paged(&b.q, &arows, pool.data(), &layout, shape, &mut b.attn);
        if let Some(t) = tap.as_mut() {
            t(li, Tap::AttnOut, &b.attn);
        }
        match &w.branch_norms {
            None => {
                linear(&w.o, &b.attn, x, n, MatmulMode::Accumulate);
                if let Some(lora) = self.lora(li, 3) {
                    apply_lora(lora, &b.attn, n, x, c.hidden, 0);
                }
            }
            Some(bn) => {
                linear(&w.o, &b.attn, &mut b.branch, n, MatmulMode::Overwrite);
                if let Some(lora) = self.lora(li, 3) {
                    apply_lora(lora, &b.attn, n, &mut b.branch, c.hidden, 0);
                }
                add_normed(x, &b.branch, &bn.attn, c.rms_eps);
            }
        }

        if let Some(t) = tap.as_mut() {
            t(li, Tap::PreFfnNorm, x);
        }
        rmsnorm(x, &w.ffn_norm, c.rms_eps, &mut b.h);
        linear(&w.gate_up, &b.h, &mut b.gu, n, MatmulMode::Overwrite);
        for (m, col0) in [(4, 0), (5, c.intermediate)] {
            if let Some(lora) = self.lora(li, m) {
                apply_lora(lora, &b.h, n, &mut b.gu, 2 * c.intermediate, col0);
            }
        }
        silu_mul(&b.gu, c.intermediate, &mut b.act);
        if let Some(t) = tap.as_mut() {
            t(li, Tap::Act, &b.act);
        }
        match &w.branch_norms {
            None => {
                linear(&w.down, &b.act, x, n, MatmulMode::Accumulate);
                if let Some(lora) = self.lora(li, 6) {
                    apply_lora(lora, &b.act, n, x, c.hidden, 0);
                }
            }
            Some(bn) => {
                linear(&w.down, &b.act, &mut b.branch, n, MatmulMode::Overwrite);
                if let Some(lora) = self.lora(li, 6) {
                    apply_lora(lora, &b.act, n, &mut b.branch, c.hidden, 0);
                }
                add_normed(x, &b.branch, &bn.ffn, c.rms_eps);
            }
        }
    }

    /// Runs all layers for `rows`, writing their keys and values into `pool`, and returns the
    /// final hidden states (`n x hidden`, before the final norm).
    pub fn forward_hidden(&self, rows: &[Row<'_>], pool: &mut KvPool) -> Result<Vec<f32>> {
        rrt_kernels::on_compute_pool(|| self.run_layers(rows, pool, None, |_| {}))
    }

    /// [`Self::forward_hidden`] that shows every layer's inputs to `tap` (calibration).
    pub fn forward_capture(&self, rows: &[Row<'_>], pool: &mut KvPool, tap: &mut TapFn<'_>) -> Result<Vec<f32>> {
        self.run_layers(rows, pool, Some(tap), |_| {})
    }

    /// Number of loops (1 for a vanilla model).
    pub fn loops(&self) -> usize {
        self.recursion.as_ref().map_or(1, |r| r.loops)
    }

    /// Like [`Self::forward_hidden`], but returns the hidden states after every loop
    /// (`loops()` entries, the last equal to `forward_hidden`'s result), so each loop's
    /// prediction can be decoded with the final norm and LM head.
    pub fn forward_loops(&self, rows: &[Row<'_>], pool: &mut KvPool) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.loops());
        rrt_kernels::on_compute_pool(|| self.run_layers(rows, pool, None, |x| out.push(x.to_vec())))?;
        Ok(out)
    }

    /// Runs one fresh sequence of `tokens` (positions 0..) and returns the logits of the rows
    /// `select` (evaluation, tests).
    pub fn sequence_logits(&self, tokens: &[u32], select: &[usize]) -> Result<Vec<f32>> {
        let (mut pool, seq) = crate::kv::single_sequence(self.kv_layout(crate::kv::DEFAULT_BLOCK_SIZE), tokens.len())?;
        self.forward(&sequence_rows(tokens, &seq.blocks), &mut pool, select)
    }

    /// The layer loop shared by the forward variants: embeds, runs every unrolled layer
    /// (showing its inputs to `tap`), calls `loop_end` with the hidden states after each loop,
    /// and returns the final hidden states.
    fn run_layers(
        &self,
        rows: &[Row<'_>],
        pool: &mut KvPool,
        mut tap: Option<&mut TapFn<'_>>,
        mut loop_end: impl FnMut(&[f32]),
    ) -> Result<Vec<f32>> {
        self.check_rows(rows, pool)?;
        let mut x = self.embed(rows.iter().map(|r| r.token))?;
        let mut b = self.buffers(rows);
        let per_loop = self.weights.layers.len();
        for li in 0..self.config.n_layers {
            self.layer(li, &mut x, rows, pool, &mut b, tap.as_deref_mut());
            if (li + 1) % per_loop == 0 {
                if self.config.loop_end_norm() {
                    // The normed state is the loop's output and the next loop's input.
                    let mut normed = vec![0f32; x.len()];
                    rmsnorm(&x, &self.weights.norm, self.config.rms_eps, &mut normed);
                    x = normed;
                }
                loop_end(&x);
            }
        }
        Ok(x)
    }

    /// The exit gate's logit (`w . h + b`) of the rows `select` of a loop's output `hidden`,
    /// or `None` for a model without a gate. `sigmoid` of it is the loop's exit probability
    /// given the token has not exited before.
    pub fn gate_logits(&self, hidden: &[f32], select: &[usize]) -> Option<Vec<f32>> {
        let g = self.weights.exit_gate.as_ref()?;
        let h = self.config.hidden;
        Some(select.iter().map(|&r| g.logit(&hidden[r * h..(r + 1) * h])).collect())
    }

    /// Final norm and LM head for the rows `select` of `hidden` (`select.len() x vocab`). A
    /// model whose loops end with the final norm ([`ModelConfig::loop_end_norm`]) has normed
    /// its state already: the head reads it as it is.
    pub fn logits(&self, hidden: &[f32], select: &[usize]) -> Vec<f32> {
        let h = self.config.hidden;
        let mut picked = vec![0f32; select.len() * h];
        for (i, &r) in select.iter().enumerate() {
            picked[i * h..(i + 1) * h].copy_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        let normed = if self.config.loop_end_norm() {
            picked
        } else {
            let mut normed = vec![0f32; picked.len()];
            rmsnorm(&picked, &self.weights.norm, self.config.rms_eps, &mut normed);
            normed
        };
        let mut out = vec![0f32; select.len() * self.config.vocab];
        self.weights
            .head()
            .matmul(&normed, &mut out, select.len(), MatmulMode::Overwrite);
        out
    }

    /// [`Self::forward_hidden`] then [`Self::logits`] of the rows `select`.
    pub fn forward(&self, rows: &[Row<'_>], pool: &mut KvPool, select: &[usize]) -> Result<Vec<f32>> {
        rrt_kernels::on_compute_pool(|| {
            let hidden = self.forward_hidden(rows, pool)?;
            Ok(self.logits(&hidden, select))
        })
    }

    fn check_rows(&self, rows: &[Row<'_>], pool: &KvPool) -> Result<()> {
        let bs = pool.layout().block_size;
        for r in rows {
            if r.pos / bs >= r.blocks.len() {
                return Err(ModelError::InvalidArgument {
                    field: "pos",
                    msg: format!(
                        "position {} has no reserved KV block ({} blocks of {bs})",
                        r.pos,
                        r.blocks.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Log-softmax probability of `target` under each row of `logits` (used by perplexity).
pub fn token_logprobs(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| (row[t as usize] - rrt_kernels::logsumexp(row)) as f64)
        .collect()
}
