//! The in-memory weights of a Llama-family decoder, and loading them from GGUF or
//! safetensors through one [`TensorSource`] interface.
//!
//! Matrices are row-major in the `out x in` layout of `nn.Linear`, held either as `f32` or, for
//! GGUF tensors in Q4_1 / Q8_0, as the file's own blocks, dequantized exactly inside the matrix
//! product (same values, 6.4x / 3.8x fewer bytes to read per step; BENCHMARKS.md has the
//! measurements behind this choice). The q/k/v projections are fused into one matrix (rows
//! `q | k | v`) and gate/up into another (rows `gate | up`), so a layer runs three products
//! fewer per step. Every tensor is checked for shape and for NaN/Inf when loaded.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use rayon::prelude::*;
use rrt_kernels::qdot::Packed;
use rrt_kernels::qmatmul::{QFormat, dequantize_rows};
use rrt_kernels::{CpuProducts, MatmulMode};
use std::borrow::Cow;
use std::path::Path;
use std::sync::OnceLock;

/// The stored matrix of a linear map (f32, or GGML blocks dequantized on the fly).
pub use rrt_kernels::MatrixData as Weight;

/// A linear map `in_dim -> out_dim`: `y = x W^T + b`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    /// The matrix; not to be changed after the first int8 product, which packs it.
    pub w: Weight,
    pub bias: Option<Vec<f32>>,
    /// The int8 kernels' layout of quantized blocks, made on the first int8 product.
    packed: OnceLock<Packed>,
}

impl Linear {
    pub fn new(out_dim: usize, in_dim: usize, w: Weight, bias: Option<Vec<f32>>) -> Self {
        Self {
            out_dim,
            in_dim,
            w,
            bias,
            packed: OnceLock::new(),
        }
    }

    /// A linear map with f32 weights.
    pub fn f32(out_dim: usize, in_dim: usize, w: Vec<f32>, bias: Option<Vec<f32>>) -> Self {
        debug_assert_eq!(w.len(), out_dim * in_dim);
        Self::new(out_dim, in_dim, Weight::F32(w), bias)
    }

    /// The weight matrix as f32 (borrowed when stored as f32).
    pub fn w_f32(&self) -> Cow<'_, [f32]> {
        match &self.w {
            Weight::F32(v) => Cow::Borrowed(v),
            Weight::Quant(f, b) => {
                let mut out = vec![0f32; self.out_dim * self.in_dim];
                dequantize_rows(*f, b, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Row `r` of the weight matrix into `out` (`in_dim` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.in_dim;
        match &self.w {
            Weight::F32(v) => out.copy_from_slice(&v[r * k..(r + 1) * k]),
            Weight::Quant(f, b) => {
                let rb = f.row_bytes(k);
                dequantize_rows(*f, &b[r * rb..(r + 1) * rb], out);
            }
        }
    }

    /// `y (+)= x W^T` for `n` rows, without the bias.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], n: usize, mode: MatmulMode) {
        match &self.w {
            Weight::F32(v) => rrt_kernels::matmul_nt(x, v, y, n, self.in_dim, self.out_dim, mode),
            Weight::Quant(f, b) => match rrt_kernels::cpu_products() {
                CpuProducts::Int8 => self
                    .packed
                    .get_or_init(|| Packed::new(*f, b, self.out_dim, self.in_dim))
                    .matmul(x, y, n, mode),
                CpuProducts::Exact => rrt_kernels::qmatmul::matmul_q(x, *f, b, y, n, self.in_dim, self.out_dim, mode),
            },
        }
    }

    /// Bytes held by the weight matrix.
    pub fn weight_bytes(&self) -> usize {
        match &self.w {
            Weight::F32(v) => v.len() * 4,
            Weight::Quant(_, b) => b.len(),
        }
    }

    /// Stacks linear maps with the same input width into one (rows of `parts` in order).
    /// Biases are kept if any part has one (zeros for parts without). Parts stored in the same
    /// block format stay in it; mixed parts become f32.
    pub fn stack(parts: Vec<Linear>) -> Linear {
        let in_dim = parts[0].in_dim;
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let same_quant = match &parts[0].w {
            Weight::Quant(f, _) => parts
                .iter()
                .all(|p| matches!(&p.w, Weight::Quant(g, _) if g == f))
                .then_some(*f),
            Weight::F32(_) => None,
        };
        let w = match same_quant {
            Some(f) => Weight::Quant(
                f,
                parts
                    .iter()
                    .flat_map(|p| match &p.w {
                        Weight::Quant(_, b) => b.iter().copied(),
                        Weight::F32(_) => unreachable!("checked: all parts are quantized"),
                    })
                    .collect(),
            ),
            None => {
                let mut w = Vec::with_capacity(out_dim * in_dim);
                for p in &parts {
                    w.extend_from_slice(&p.w_f32());
                }
                Weight::F32(w)
            }
        };
        let mut bias = any_bias.then(|| Vec::with_capacity(out_dim));
        for p in parts {
            debug_assert_eq!(p.in_dim, in_dim);
            if let Some(b) = bias.as_mut() {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.out_dim)),
                }
            }
        }
        Linear::new(out_dim, in_dim, w, bias)
    }

    /// The weight rows `rows` as a new linear map (used to split fused projections).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Linear {
        let w = match &self.w {
            Weight::F32(v) => Weight::F32(v[rows.start * self.in_dim..rows.end * self.in_dim].to_vec()),
            Weight::Quant(f, b) => {
                let rb = f.row_bytes(self.in_dim);
                Weight::Quant(*f, b[rows.start * rb..rows.end * rb].to_vec())
            }
        };
        Linear::new(rows.len(), self.in_dim, w, self.bias.as_ref().map(|b| b[rows].to_vec()))
    }
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Fused `q | k | v` projection, `qkv_dim x hidden`.
    pub qkv: Linear,
    pub o: Linear,
    pub ffn_norm: Vec<f32>,
    /// Fused `gate | up` projection, `2 * intermediate x hidden`.
    pub gate_up: Linear,
    pub down: Linear,
    /// The norms of the attention and MLP branches before their residual adds, in families
    /// with [`ModelConfig::branch_norms`] (Ouro's `input_layernorm_2` and
    /// `post_attention_layernorm_2`); `None` elsewhere.
    pub branch_norms: Option<BranchNorms>,
}

/// Scales of the branch norms of one layer (see [`Layer::branch_norms`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BranchNorms {
    pub attn: Vec<f32>,
    pub ffn: Vec<f32>,
}

/// A learned exit gate (Ouro's `model.early_exit_gate`, or an rrt checkpoint's `exit_gate.*`):
/// `lambda = sigmoid(w . h + b)` on a loop's output `h` (after the final norm where every loop
/// ends with it, Ouro; before it otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct ExitGate {
    pub w: Vec<f32>,
    pub b: f32,
}

impl ExitGate {
    /// `w . h + b` of one state `h` (dot product in f64).
    pub fn logit(&self, h: &[f32]) -> f32 {
        (rrt_kernels::backend::dot_f64(h, &self.w) + self.b as f64) as f32
    }
}

/// All weights of a decoder.
#[derive(Clone, Debug)]
pub struct Weights {
    /// The token embeddings as a `vocab x hidden` matrix (row t is token t's embedding).
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the head is tied to `embed`.
    pub lm_head: Option<Linear>,
    /// The learned exit gate: a family with [`ModelConfig::has_exit_gate`], or an rrt
    /// checkpoint with `exit_gate: true`. Its presence is what "the model has a gate" means to
    /// the forward pass and the engine.
    pub exit_gate: Option<ExitGate>,
}

impl Weights {
    /// The LM head (`vocab x hidden`).
    pub fn head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Total number of parameters held.
    pub fn n_params(&self) -> usize {
        let lin = |l: &Linear| l.out_dim * l.in_dim + l.bias.as_ref().map_or(0, Vec::len);
        lin(&self.embed)
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, lin)
            + self
                .layers
                .iter()
                .map(|l| {
                    l.attn_norm.len()
                        + l.ffn_norm.len()
                        + l.branch_norms.as_ref().map_or(0, |b| b.attn.len() + b.ffn.len())
                        + lin(&l.qkv)
                        + lin(&l.o)
                        + lin(&l.gate_up)
                        + lin(&l.down)
                })
                .sum::<usize>()
            + self.exit_gate.as_ref().map_or(0, |g| g.w.len() + 1)
    }
}

/// Somewhere tensors can be read from, addressed by their Hugging Face names
/// (`model.layers.3.self_attn.q_proj.weight`). Implementations translate names to their own
/// file's names and report errors in those names.
pub trait TensorSource {
    /// Whether the tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Loads a tensor as f32 after checking that its row-major shape is `shape`.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The tensor's raw blocks, if it is stored in a block format that matrix products can use
    /// directly (Q4_1, Q8_0). Call after [`Self::load`], which validates shape and values.
    fn load_blocks(&self, _name: &str) -> Result<Option<(QFormat, Vec<u8>)>> {
        Ok(None)
    }
}

/// Fails with [`ModelError::NonFinite`] at the first NaN or infinity.
pub fn check_finite(path: &Path, tensor: &str, data: &[f32]) -> Result<()> {
    // Chunks, not single values, per rayon item: the per-item bookkeeping of `position_first`
    // cost more than the test (about 10 % of a short engine benchmark's profile, at load).
    const CHUNK: usize = 1 << 14;
    let bad = data
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().any(|v| !v.is_finite()))
        .and_then(|ci| {
            let c0 = ci * CHUNK;
            data[c0..(c0 + CHUNK).min(data.len())]
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| c0 + i)
        });
    match bad {
        None => Ok(()),
        Some(index) => Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            index,
            value: data[index],
        }),
    }
}

/// Loads all weights of `cfg` from `src` (the stored layers: [`ModelConfig::stored_layers`]).
pub fn load_weights(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Weights> {
    let h = cfg.hidden;
    let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let wname = format!("{name}.weight");
        let values = src.load(&wname, &[out, inp])?;
        let w = match src.load_blocks(&wname)? {
            Some((f, blocks)) => Weight::Quant(f, blocks),
            None => Weight::F32(values),
        };
        let bias = if bias {
            Some(src.load(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(out, inp, w, bias))
    };
    let layers = (0..cfg.stored_layers())
        .map(|i| -> Result<Layer> {
            let p = format!("model.layers.{i}");
            let q = lin(&format!("{p}.self_attn.q_proj"), cfg.q_dim(), h, cfg.qkv_bias)?;
            let k = lin(&format!("{p}.self_attn.k_proj"), cfg.kv_dim(), h, cfg.qkv_bias)?;
            let v = lin(&format!("{p}.self_attn.v_proj"), cfg.kv_dim(), h, cfg.qkv_bias)?;
            let gate = lin(&format!("{p}.mlp.gate_proj"), cfg.intermediate, h, false)?;
            let up = lin(&format!("{p}.mlp.up_proj"), cfg.intermediate, h, false)?;
            Ok(Layer {
                attn_norm: src.load(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: Linear::stack(vec![q, k, v]),
                o: lin(&format!("{p}.self_attn.o_proj"), h, cfg.q_dim(), false)?,
                ffn_norm: src.load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: Linear::stack(vec![gate, up]),
                down: lin(&format!("{p}.mlp.down_proj"), h, cfg.intermediate, false)?,
                branch_norms: if cfg.branch_norms() {
                    Some(BranchNorms {
                        attn: src.load(&format!("{p}.input_layernorm_2.weight"), &[h])?,
                        ffn: src.load(&format!("{p}.post_attention_layernorm_2.weight"), &[h])?,
                    })
                } else {
                    None
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = lin("model.embed_tokens", cfg.vocab, h, false)?;
    let lm_head = if cfg.tie_embeddings {
        None
    } else {
        Some(lin("lm_head", cfg.vocab, h, false)?)
    };
    let exit_gate = if cfg.has_exit_gate() {
        let w = src.load("model.early_exit_gate.weight", &[1, h])?;
        let b = src.load("model.early_exit_gate.bias", &[1])?;
        Some(ExitGate { w, b: b[0] })
    } else {
        None
    };
    Ok(Weights {
        embed,
        layers,
        norm: src.load("model.norm.weight", &[h])?,
        lm_head,
        exit_gate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finite_names_the_first_non_finite_value() {
        let path = Path::new("w.safetensors");
        let mut data = vec![0.5f32; 3 * (1 << 14) + 7];
        assert!(check_finite(path, "t", &data).is_ok());
        assert!(check_finite(path, "t", &[]).is_ok());
        // The first bad value wins, in whichever chunk it lies; the last value is checked.
        for (at, v) in [
            (0, f32::NAN),
            (1 << 14, f32::INFINITY),
            (data.len() - 1, f32::NEG_INFINITY),
        ] {
            let mut d = data.clone();
            d[at] = v;
            d[data.len() - 1] = if at == data.len() - 1 { v } else { f32::NAN };
            match check_finite(path, "t", &d) {
                Err(ModelError::NonFinite { index, tensor, .. }) => {
                    assert_eq!((index, tensor.as_str()), (at, "t"));
                }
                other => panic!("bad value at {at}: {other:?}"),
            }
        }
        data[40_000] = f32::NAN;
        data[20_000] = f32::INFINITY;
        assert!(matches!(
            check_finite(path, "t", &data),
            Err(ModelError::NonFinite { index: 20_000, .. })
        ));
    }
}
