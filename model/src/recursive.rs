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
    /// Not converted: a natively looped model (Ouro) trained with its layers shared.
    Native,
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
        Init::Lower | Init::Native => vec![k],
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

/// Input second moments `E[x x^T]` of every original layer's linear maps, measured by running
/// the original model on calibration text (for `--svd activation`).
pub struct Calibration {
    /// Tokens the moments average over.
    pub tokens: usize,
    /// Per layer: RMS-normalised (unscaled) input of the attention norm, `hidden x hidden`.
    attn_in: Vec<Vec<f64>>,
    /// Per layer: input of the o projection, `q_dim x q_dim`.
    attn_out: Vec<Vec<f64>>,
    /// Per layer: RMS-normalised input of the FFN norm, `hidden x hidden`.
    ffn_in: Vec<Vec<f64>>,
    /// Per layer: input of the down projection, `intermediate x intermediate`.
    act: Vec<Vec<f64>>,
}

/// Adds `x^T x` of the rows of `x` (`n x d`) to `acc` (`d x d`, f64).
fn add_gram(acc: &mut [f64], x: &[f32], d: usize) {
    let n = x.len() / d;
    let mut g = vec![0f32; d * d];
    // x^T x as (d x n)(n x d): transpose x once, then one product.
    let mut xt = vec![0f32; d * n];
    for i in 0..n {
        for j in 0..d {
            xt[j * n + i] = x[i * d + j];
        }
    }
    rrt_kernels::matmul_nt(&xt, &xt, &mut g, d, n, d, rrt_kernels::MatmulMode::Overwrite);
    acc.iter_mut().zip(&g).for_each(|(a, v)| *a += *v as f64);
}

fn rms_normalise(x: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(d) {
        let s = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
        row.iter_mut().for_each(|v| *v *= s);
    }
    out
}

impl Calibration {
    /// Runs the (vanilla) model over `tokens` in independent windows of `window` tokens.
    pub fn collect(
        model: &crate::forward::Model,
        tokens: &[u32],
        window: usize,
        progress: impl Fn(usize, usize),
    ) -> Result<Self> {
        let c = &model.config;
        let l = c.n_layers;
        let (h, q, i) = (c.hidden, c.q_dim(), c.intermediate);
        let mut cal = Calibration {
            tokens: 0,
            attn_in: vec![vec![0.0; h * h]; l],
            attn_out: vec![vec![0.0; q * q]; l],
            ffn_in: vec![vec![0.0; h * h]; l],
            act: vec![vec![0.0; i * i]; l],
        };
        let wins: Vec<&[u32]> = tokens.chunks(window).filter(|w| w.len() >= 2).collect();
        if wins.is_empty() {
            return Err(ModelError::InvalidArgument {
                field: "calibration",
                msg: "the calibration text has fewer than 2 tokens".into(),
            });
        }
        for (wi, w) in wins.iter().enumerate() {
            let (mut pool, seq) = crate::kv::single_sequence(model.kv_layout(crate::kv::DEFAULT_BLOCK_SIZE), w.len())?;
            let rows = crate::forward::sequence_rows(w, &seq.blocks);
            let eps = c.rms_eps;
            let mut tap = |li: usize, t: crate::forward::Tap, x: &[f32]| match t {
                crate::forward::Tap::PreAttnNorm => add_gram(&mut cal.attn_in[li], &rms_normalise(x, h, eps), h),
                crate::forward::Tap::AttnOut => add_gram(&mut cal.attn_out[li], x, q),
                crate::forward::Tap::PreFfnNorm => add_gram(&mut cal.ffn_in[li], &rms_normalise(x, h, eps), h),
                crate::forward::Tap::Act => add_gram(&mut cal.act[li], x, i),
            };
            model.forward_capture(&rows, &mut pool, &mut tap)?;
            cal.tokens += w.len();
            progress(wi + 1, wins.len());
        }
        let inv = 1.0 / cal.tokens as f64;
        for m in cal
            .attn_in
            .iter_mut()
            .chain(cal.attn_out.iter_mut())
            .chain(cal.ffn_in.iter_mut())
            .chain(cal.act.iter_mut())
        {
            m.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(cal)
    }
}

/// `S = C^(1/2)` and a regularised `S^(-1)` of a second-moment matrix (`d x d`).
fn sqrt_and_inverse(c: &[f64], d: usize) -> Result<(Mat<f64>, Mat<f64>)> {
    let m = Mat::<f64>::from_fn(d, d, |i, j| c[i * d + j]);
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| ModelError::InvalidArgument {
            field: "calibration",
            msg: format!("eigendecomposition failed: {e:?}"),
        })?;
    let (u, s) = (evd.U(), evd.S().column_vector());
    let max = (0..d).map(|i| s[i]).fold(0f64, f64::max);
    // Directions the calibration text never excites still get a small weight, so that their
    // part of the residual is not ignored entirely and S stays invertible.
    let floor = (max * 1e-6).max(1e-12);
    let root: Vec<f64> = (0..d).map(|i| s[i].max(floor).sqrt()).collect();
    // S = U diag(root) U^T and S^-1 = U diag(1/root) U^T, as two matrix products.
    let us = Mat::<f64>::from_fn(d, d, |i, t| u[(i, t)] * root[t]);
    let ui = Mat::<f64>::from_fn(d, d, |i, t| u[(i, t)] / root[t]);
    let sq = &us * u.transpose();
    let inv = &ui * u.transpose();
    Ok((sq, inv))
}

/// Rank-`r` LoRA of the residual `res` (`out x in`) by truncated SVD.
///
/// Plain (`weight = None`): SVD of `R`, `B = U_r Sigma_r`, `A = V_r^T`.
/// Activation-aware (`weight = Some((S, S^-1))` with `S^2` the input second moment): SVD of
/// `R S`, `B = U_r Sigma_r`, `A = V_r^T S^-1`, which minimises `E || (R - B A) x ||^2`.
fn svd_lora(res: &[f64], out: usize, inp: usize, r: usize, weight: Option<(&Mat<f64>, &Mat<f64>)>) -> Result<Lora> {
    let mut m = Mat::<f64>::from_fn(out, inp, |i, j| res[i * inp + j]);
    if let Some((s, _)) = weight {
        m = &m * s;
    }
    let svd = m.thin_svd().map_err(|e| ModelError::InvalidArgument {
        field: "lora-rank",
        msg: format!("SVD did not converge: {e:?}"),
    })?;
    let (u, sv, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut vt = v.subcols(0, r).transpose().to_owned();
    if let Some((_, s_inv)) = weight {
        vt = &vt * s_inv;
    }
    let b = (0..out * r).map(|x| (u[(x / r, x % r)] * sv[x % r]) as f32).collect();
    let a = (0..r * inp).map(|x| vt[(x / inp, x % inp)] as f32).collect();
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
///
/// With `calibration`, LoRAs come from the activation-aware SVD (method.md section 2): the
/// residual is weighted by the square root of its input's second moment before truncation.
pub fn convert(
    w: &Weights,
    cfg: &crate::config::ModelConfig,
    spec: &RecursiveSpec,
    calibration: Option<&Calibration>,
    progress: impl Fn(usize) + Sync,
) -> Result<(Vec<Layer>, Recursion)> {
    let l_total = cfg.n_layers;
    let b = spec.loops;
    if b == 0 || !l_total.is_multiple_of(b) {
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
            // Square roots of the input second moments, per input kind: the inputs of q/k/v
            // and gate/up are the shared-norm-scaled normalised states (diag(s) C diag(s)).
            let mut roots: [Option<(Mat<f64>, Mat<f64>)>; 4] = Default::default();
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
                out[m] = Some(match calibration {
                    None => svd_lora(&res, o, i, r, None)?,
                    Some(cal) => {
                        let kind = match m {
                            0..=2 => 0,
                            3 => 1,
                            4 | 5 => 2,
                            _ => 3,
                        };
                        if roots[kind].is_none() {
                            let scaled = |c: &[f64], s: &[f32]| -> Vec<f64> {
                                let d = s.len();
                                (0..d * d).map(|t| c[t] * s[t / d] as f64 * s[t % d] as f64).collect()
                            };
                            let (c, d) = match kind {
                                0 => (scaled(&cal.attn_in[l], &shared_norms[k].0), cfg.hidden),
                                1 => (cal.attn_out[l].clone(), cfg.q_dim()),
                                2 => (scaled(&cal.ffn_in[l], &shared_norms[k].1), cfg.hidden),
                                _ => (cal.act[l].clone(), cfg.intermediate),
                            };
                            roots[kind] = Some(sqrt_and_inverse(&c, d)?);
                        }
                        let (sq, inv) = roots[kind].as_ref().expect("computed above");
                        svd_lora(&res, o, i, r, Some((sq, inv)))?
                    }
                });
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
                branch_norms: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `|| (R - B A) S ||_F` for a LoRA.
    fn weighted_error(res: &[f64], out: usize, inp: usize, l: &Lora, s: &Mat<f64>) -> f64 {
        let mut d = Mat::<f64>::from_fn(out, inp, |i, j| res[i * inp + j]);
        for i in 0..out {
            for j in 0..inp {
                let ba: f64 = (0..l.rank)
                    .map(|t| l.b[i * l.rank + t] as f64 * l.a[t * inp + j] as f64)
                    .sum();
                d[(i, j)] -= ba;
            }
        }
        let ds = &d * s;
        (0..out)
            .flat_map(|i| (0..inp).map(move |j| (i, j)))
            .map(|(i, j)| ds[(i, j)].powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn activation_aware_svd_beats_plain_under_the_input_distribution_and_is_exact_at_full_rank() {
        let (out, inp) = (24, 16);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let res: Vec<f64> = (0..out * inp).map(|_| rnd()).collect();
        // Anisotropic inputs: a few directions carry most of the energy.
        let g: Vec<f64> = (0..inp * inp).map(|_| rnd()).collect();
        let c: Vec<f64> = (0..inp * inp)
            .map(|t| {
                let (i, j) = (t / inp, t % inp);
                (0..inp)
                    .map(|k| g[i * inp + k] * g[j * inp + k] * if k < 3 { 100.0 } else { 0.01 })
                    .sum()
            })
            .collect();
        let (sq, inv) = sqrt_and_inverse(&c, inp).unwrap();
        for r in [2, 4, 8] {
            let plain = svd_lora(&res, out, inp, r, None).unwrap();
            let aware = svd_lora(&res, out, inp, r, Some((&sq, &inv))).unwrap();
            let (ep, ea) = (
                weighted_error(&res, out, inp, &plain, &sq),
                weighted_error(&res, out, inp, &aware, &sq),
            );
            assert!(ea < 0.8 * ep, "rank {r}: activation-aware {ea} vs plain {ep}");
        }
        let full = svd_lora(&res, out, inp, inp, Some((&sq, &inv))).unwrap();
        let id = Mat::<f64>::from_fn(inp, inp, |i, j| if i == j { 1.0 } else { 0.0 });
        assert!(weighted_error(&res, out, inp, &full, &id) < 1e-4);
    }
}
