//! The in-memory weights of a Llama-family decoder, and loading them from GGUF or
//! safetensors through one [`TensorSource`] interface.
//!
//! Weights are held as `f32`, row-major, in the `out x in` layout of `nn.Linear` (BENCHMARKS.md
//! records the measurements behind choosing f32). The q/k/v projections are fused into one
//! matrix (rows `q | k | v`) and gate/up into another (rows `gate | up`), so a layer runs three
//! products fewer per step. Every tensor is checked for shape and for NaN/Inf when loaded.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use rayon::prelude::*;
use std::path::Path;

/// A linear map `in_dim -> out_dim`: `y = x W^T + b`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    /// `out_dim x in_dim`, row-major.
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Stacks linear maps with the same input width into one (rows of `parts` in order).
    /// Biases are kept if any part has one (zeros for parts without).
    pub fn stack(parts: Vec<Linear>) -> Linear {
        let in_dim = parts[0].in_dim;
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let mut w = Vec::with_capacity(out_dim * in_dim);
        let mut bias = any_bias.then(|| Vec::with_capacity(out_dim));
        for p in parts {
            debug_assert_eq!(p.in_dim, in_dim);
            w.extend_from_slice(&p.w);
            if let Some(b) = bias.as_mut() {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.out_dim)),
                }
            }
        }
        Linear {
            out_dim,
            in_dim,
            w,
            bias,
        }
    }

    /// The weight rows `rows` as a new linear map (used to split fused projections).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Linear {
        Linear {
            out_dim: rows.len(),
            in_dim: self.in_dim,
            w: self.w[rows.start * self.in_dim..rows.end * self.in_dim].to_vec(),
            bias: self.bias.as_ref().map(|b| b[rows].to_vec()),
        }
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
}

/// All weights of a decoder.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `vocab x hidden`.
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the head is tied to `embed`.
    pub lm_head: Option<Linear>,
}

impl Weights {
    /// The LM head matrix (`vocab x hidden`).
    pub fn head(&self) -> &[f32] {
        self.lm_head.as_ref().map(|l| l.w.as_slice()).unwrap_or(&self.embed)
    }

    /// Total number of parameters held.
    pub fn n_params(&self) -> usize {
        let lin = |l: &Linear| l.w.len() + l.bias.as_ref().map_or(0, Vec::len);
        self.embed.len()
            + self.norm.len()
            + self.lm_head.as_ref().map_or(0, lin)
            + self
                .layers
                .iter()
                .map(|l| {
                    l.attn_norm.len() + l.ffn_norm.len() + lin(&l.qkv) + lin(&l.o) + lin(&l.gate_up) + lin(&l.down)
                })
                .sum::<usize>()
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
}

/// Fails with [`ModelError::NonFinite`] at the first NaN or infinity.
pub fn check_finite(path: &Path, tensor: &str, data: &[f32]) -> Result<()> {
    let bad = data.par_iter().position_first(|v| !v.is_finite());
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

/// Loads all weights of `cfg` from `src`.
pub fn load_weights(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Weights> {
    let h = cfg.hidden;
    let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let w = src.load(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(src.load(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            out_dim: out,
            in_dim: inp,
            w,
            bias,
        })
    };
    let layers = (0..cfg.n_layers)
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
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = src.load("model.embed_tokens.weight", &[cfg.vocab, h])?;
    let lm_head = if cfg.tie_embeddings {
        None
    } else {
        Some(lin("lm_head", cfg.vocab, h, false)?)
    };
    Ok(Weights {
        embed,
        layers,
        norm: src.load("model.norm.weight", &[h])?,
        lm_head,
    })
}
