//! Relaxed Recursive Transformers: conversion of a vanilla decoder into K shared layers looped
//! B times with one LoRA per unrolled layer and linear map (method.md sections 1-2), and the
//! per-unrolled-layer LoRA data the forward pass applies.
//!
//! Unrolled layer `l` (0-based) runs shared layer `k = l mod K` in loop `b = l div K`.
//!
//! Norm scales are shared like the matrices, and stay exact: the RMSNorm scale of unrolled
//! layer `l` multiplies the input columns of the maps that follow it, so before taking the
//! residuals the per-layer ratio `w_l / w'_k` (original scale over shared scale) is folded into
//! those columns (q, k, v after the attention norm; gate, up after the FFN norm). A full-rank
//! LoRA therefore reproduces the original model to float rounding, norms included.

use crate::error::{ModelError, Result};
use crate::weights::{Layer, Linear, Weights};
use faer::Mat;
use rayon::prelude::*;

/// The seven linear maps of a layer, in checkpoint order.
pub const MODULES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// How the shared layers are initialised from the L original layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Layers at evenly spaced indices, first and last included.
    Stepwise,
    /// Mean over the B layers tied to each shared layer.
    Average,
    /// The first K layers.
    Lower,
}

/// A low-rank correction `y += B (A x)`: `a` is `rank x in`, `b` is `out x rank`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// What `convert` builds.
#[derive(Clone, Debug, PartialEq)]
pub struct RecursiveSpec {
    pub loops: usize,
    pub init: Init,
    /// Rank per module, in [`MODULES`] order; 0 = no LoRA for that module.
    pub ranks: [usize; 7],
}

/// The recursion of a model: loop count and one optional LoRA per unrolled layer and module.
#[derive(Clone, Debug)]
pub struct Recursion {
    pub loops: usize,
    pub init: Init,
    pub ranks: [usize; 7],
    /// `lora[l][m]`: unrolled layer `l`, module `MODULES[m]`.
    pub lora: Vec<[Option<Lora>; 7]>,
}

/// The separate matrices of one original layer (f32, `out x in`), with norms folded as
/// described in the module docs.
struct Parts {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    mats: [Vec<f32>; 7],
    dims: [(usize, usize); 7],
}

fn split_layer(l: &Layer, q_dim: usize, kv_dim: usize, inter: usize) -> Parts {
    let qkv = l.qkv.w_f32();
    let gu = l.gate_up.w_f32();
    let h = l.qkv.in_dim;
    let rows = |w: &[f32], r0: usize, r1: usize| w[r0 * h..r1 * h].to_vec();
    Parts {
        attn_norm: l.attn_norm.clone(),
        ffn_norm: l.ffn_norm.clone(),
        mats: [
            rows(&qkv, 0, q_dim),
            rows(&qkv, q_dim, q_dim + kv_dim),
            rows(&qkv, q_dim + kv_dim, q_dim + 2 * kv_dim),
            l.o.w_f32().into_owned(),
            rows(&gu, 0, inter),
            rows(&gu, inter, 2 * inter),
            l.down.w_f32().into_owned(),
        ],
        dims: [
            (q_dim, h),
            (kv_dim, h),
            (kv_dim, h),
            (h, q_dim),
            (inter, h),
            (inter, h),
            (h, inter),
        ],
    }
}

/// Which original layers feed shared layer `k`, with their weights in the shared init.
fn init_sources(init: Init, k: usize, n_shared: usize, loops: usize) -> Vec<usize> {
    match init {
        Init::Stepwise => {
            let l = n_shared * loops;
            let idx = if n_shared == 1 {
                0
            } else {
                ((k * (l - 1)) as f64 / (n_shared - 1) as f64).round() as usize
            };
            vec![idx]
        }
        Init::Average => (0..loops).map(|b| b * n_shared + k).collect(),
        Init::Lower => vec![k],
    }
}

fn mean(vs: &[&[f32]]) -> Vec<f32> {
    let n = vs.len() as f64;
    (0..vs[0].len())
        .map(|i| (vs.iter().map(|v| v[i] as f64).sum::<f64>() / n) as f32)
        .collect()
}

/// Multiplies column `j` of an `out x in` matrix by `s[j]`.
fn scale_columns(w: &mut [f32], in_dim: usize, s: &[f64]) {
    for row in w.chunks_exact_mut(in_dim) {
        for (v, f) in row.iter_mut().zip(s) {
            *v = (*v as f64 * f) as f32;
        }
    }
}

/// Rank-`r` truncated SVD of `r_mat` (`out x in`, f64): `B = U_r S_r`, `A = V_r^T`.
fn truncated_svd(res: &[f64], out: usize, inp: usize, r: usize) -> Result<Lora> {
    let m = Mat::<f64>::from_fn(out, inp, |i, j| res[i * inp + j]);
    let svd = m.thin_svd().map_err(|e| ModelError::InvalidArgument {
        field: "lora-rank",
        msg: format!("SVD did not converge: {e:?}"),
    })?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut a = vec![0f32; r * inp];
    let mut b = vec![0f32; out * r];
    for t in 0..r {
        let st = s[t];
        for i in 0..out {
            b[i * r + t] = (u[(i, t)] * st) as f32;
        }
        for j in 0..inp {
            a[t * inp + j] = v[(j, t)] as f32;
        }
    }
    Ok(Lora {
        rank: r,
        in_dim: inp,
        out_dim: out,
        a,
        b,
    })
}

/// Converts a vanilla model's weights into a relaxed recursive one. `progress` is called after
/// each unrolled layer's LoRAs are computed.
pub fn convert(
    w: &Weights,
    cfg: &crate::config::ModelConfig,
    spec: &RecursiveSpec,
    progress: impl Fn(usize) + Sync,
) -> Result<(Vec<Layer>, Recursion)> {
    let l_total = cfg.n_layers;
    let b = spec.loops;
    if b == 0 || l_total % b != 0 {
        return Err(ModelError::InvalidArgument {
            field: "loops",
            msg: format!("{l_total} layers cannot be split into {b} loops of equal size (L must be divisible by B)"),
        });
    }
    if cfg.qkv_bias {
        return Err(ModelError::InvalidArgument {
            field: "model",
            msg: "conversion of models with q/k/v biases is not supported yet".into(),
        });
    }
    let k_shared = l_total / b;
    let parts: Vec<Parts> = w
        .layers
        .iter()
        .map(|l| split_layer(l, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate))
        .collect();
    for (m, &r) in spec.ranks.iter().enumerate() {
        let (o, i) = parts[0].dims[m];
        if r > o.min(i) {
            return Err(ModelError::InvalidArgument {
                field: "lora-rank",
                msg: format!(
                    "rank {r} for `{}` exceeds min(in, out) = {} ({o} x {i})",
                    MODULES[m],
                    o.min(i)
                ),
            });
        }
    }
    // Shared norm scales by the init method, then the folded matrices of every original layer.
    let shared_norms: Vec<(Vec<f32>, Vec<f32>)> = (0..k_shared)
        .map(|k| {
            let src = init_sources(spec.init, k, k_shared, b);
            let an: Vec<&[f32]> = src.iter().map(|&s| parts[s].attn_norm.as_slice()).collect();
            let fnn: Vec<&[f32]> = src.iter().map(|&s| parts[s].ffn_norm.as_slice()).collect();
            (mean(&an), mean(&fnn))
        })
        .collect();
    let folded: Vec<[Vec<f32>; 7]> = (0..l_total)
        .map(|l| {
            let (sa, sf) = &shared_norms[l % k_shared];
            let ratio = |orig: &[f32], shared: &[f32]| -> Vec<f64> {
                orig.iter()
                    .zip(shared)
                    .map(|(o, s)| if s.abs() > 1e-12 { *o as f64 / *s as f64 } else { 0.0 })
                    .collect()
            };
            let ra = ratio(&parts[l].attn_norm, sa);
            let rf = ratio(&parts[l].ffn_norm, sf);
            let mut mats = parts[l].mats.clone();
            for m in [0, 1, 2] {
                scale_columns(&mut mats[m], cfg.hidden, &ra);
            }
            for m in [4, 5] {
                scale_columns(&mut mats[m], cfg.hidden, &rf);
            }
            mats
        })
        .collect();
    let shared_mats: Vec<[Vec<f32>; 7]> = (0..k_shared)
        .map(|k| {
            let src = init_sources(spec.init, k, k_shared, b);
            std::array::from_fn(|m| mean(&src.iter().map(|&s| folded[s][m].as_slice()).collect::<Vec<_>>()))
        })
        .collect();
    let lora: Vec<[Option<Lora>; 7]> = (0..l_total)
        .into_par_iter()
        .map(|l| -> Result<[Option<Lora>; 7]> {
            let k = l % k_shared;
            let mut out: [Option<Lora>; 7] = Default::default();
            for m in 0..7 {
                let r = spec.ranks[m];
                if r == 0 {
                    continue;
                }
                let (o, i) = parts[l].dims[m];
                let res: Vec<f64> = folded[l][m]
                    .iter()
                    .zip(&shared_mats[k][m])
                    .map(|(a, b)| *a as f64 - *b as f64)
                    .collect();
                out[m] = Some(truncated_svd(&res, o, i, r)?);
            }
            progress(l);
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    let layers = (0..k_shared)
        .map(|k| {
            let [q, kk, v, o, g, u, d] = shared_mats[k].clone();
            let (qd, kd, h, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.hidden, cfg.intermediate);
            Layer {
                attn_norm: shared_norms[k].0.clone(),
                qkv: Linear::stack(vec![
                    Linear::f32(qd, h, q, None),
                    Linear::f32(kd, h, kk, None),
                    Linear::f32(kd, h, v, None),
                ]),
                o: Linear::f32(h, qd, o, None),
                ffn_norm: shared_norms[k].1.clone(),
                gate_up: Linear::stack(vec![Linear::f32(inter, h, g, None), Linear::f32(inter, h, u, None)]),
                down: Linear::f32(h, inter, d, None),
            }
        })
        .collect();
    Ok((
        layers,
        Recursion {
            loops: b,
            init: spec.init,
            ranks: spec.ranks,
            lora,
        },
    ))
}
