//! Fitting an exit gate to a checkpoint after training (`rrt calibrate --fit-gate`).
//!
//! The uptraining objective (Ouro's, `rrt-train --exit-gate`) teaches the gate to trade loss
//! against depth; a short or undertrained run leaves a gate that waits, because every loop
//! looks about as poor as the next (the first SmolLM2 run's gate exited at 2.0 of 3 loops at
//! agreement 0.9 where the LM head's max-prob exits at 1.3). What the server needs from the
//! gate is narrower: a score, from one dot product on the loop's state, that ranks tokens by
//! whether the loop's top-1 already equals the full-depth top-1. That is a logistic
//! regression, `P(agree | h) = sigmoid(w . h + b)`, fitted here on the states of every loop
//! before the last of a calibration text (Ouro's second training stage fits its gate to a
//! label too; ours is the agreement the thresholds are then calibrated on).
//!
//! The fit: features standardised per dimension, ridge penalty `l2 * |w|^2` (the bias is
//! not penalised) on the mean binary cross-entropy, Newton steps with step halving until the
//! step is below `1e-9` (the problem is strictly convex, so the optimum is unique and the fit
//! deterministic), then the weights mapped back to the raw state so the gate stays
//! `sigmoid(w . h + b)` on what the engine reads: the same tensors, the same engine code.

use crate::error::{ModelError, Result};
use crate::exit::{LoopSamples, gate_exit_probability, gate_hazard};
use crate::weights::ExitGate;
use faer::Mat;
use faer::linalg::solvers::Solve;
use serde::Serialize;

/// Every loop's state before the last, and whether its top-1 already equals the last loop's.
#[derive(Clone, Debug, Default)]
pub struct LoopTrace {
    pub hidden: usize,
    /// Per loop `b < B - 1`: every token's state after loop `b` (`tokens x hidden`).
    pub states: Vec<Vec<f32>>,
    /// Per loop `b < B - 1`: whether the token's top-1 at loop `b` equals the last loop's.
    pub agrees: Vec<Vec<bool>>,
}

impl LoopTrace {
    pub fn tokens(&self) -> usize {
        self.agrees.first().map_or(0, Vec::len)
    }

    /// Every (state, agrees) sample, loop by loop.
    fn rows(&self) -> Vec<(&[f32], bool)> {
        self.states
            .iter()
            .zip(&self.agrees)
            .flat_map(|(s, ag)| s.chunks_exact(self.hidden).zip(ag.iter().copied()))
            .collect()
    }

    /// Gate-criterion samples under `gate`: per loop, the token's cumulative exit probability
    /// and its agreement, exactly what [`crate::exit::collect_samples`] gives for a model
    /// carrying `gate` (for [`crate::exit::calibrate`]).
    pub fn gate_samples(&self, gate: &ExitGate) -> LoopSamples {
        let h = self.hidden;
        let mut hazard = vec![0f64; self.tokens()];
        self.states
            .iter()
            .zip(&self.agrees)
            .map(|(s, ag)| {
                s.chunks_exact(h)
                    .zip(ag)
                    .zip(hazard.iter_mut())
                    .map(|((row, &a), hz)| {
                        *hz += gate_hazard(gate.logit(row));
                        (gate_exit_probability(*hz) as f32, a)
                    })
                    .collect()
            })
            .collect()
    }
}

/// How the gate is fitted.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FitOptions {
    /// Ridge penalty on the standardised weights (per unit of mean cross-entropy).
    pub l2: f64,
    /// Newton iterations at most.
    pub max_iterations: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            l2: 1e-2,
            max_iterations: 50,
        }
    }
}

/// A fitted gate and how the fit went.
#[derive(Clone, Debug, Serialize)]
pub struct GateFit {
    #[serde(skip)]
    pub gate: ExitGate,
    /// Samples: tokens times the loops before the last.
    pub samples: usize,
    /// Fraction of samples whose loop agrees with the last loop.
    pub agree_rate: f64,
    /// Mean cross-entropy of the fitted gate on its samples (the constant predictor's is the
    /// entropy of `agree_rate`).
    pub cross_entropy: f64,
    /// Fraction of samples the gate classifies right at probability 0.5.
    pub accuracy: f64,
    pub iterations: usize,
    pub options: FitOptions,
}

/// Fits an exit gate to `trace` (see the module doc).
pub fn fit_gate(trace: &LoopTrace, opt: FitOptions) -> Result<GateFit> {
    let h = trace.hidden;
    let invalid = |msg: String| ModelError::InvalidArgument { field: "fit-gate", msg };
    if !(opt.l2 >= 0.0 && opt.l2.is_finite()) {
        return Err(invalid(format!(
            "the ridge penalty must be finite and >= 0, got {}",
            opt.l2
        )));
    }
    let rows = trace.rows();
    let n = rows.len();
    let agreeing = rows.iter().filter(|r| r.1).count();
    if n == 0 || agreeing == 0 || agreeing == n {
        return Err(invalid(format!(
            "fitting a gate needs tokens whose early loops both agree and disagree with the last loop; \
             the text gave {agreeing} agreeing of {n} (use a longer calibration text)"
        )));
    }
    if let Some((i, _)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.0.iter().any(|v| !v.is_finite()))
    {
        return Err(invalid(format!("loop state {i} has a non-finite value")));
    }
    let (mean, scale) = standardisation(&rows, h);
    // Z: standardised features plus a constant column for the bias (last).
    let d = h + 1;
    let z = Mat::<f64>::from_fn(n, d, |i, j| {
        if j == h {
            1.0
        } else {
            (rows[i].0[j] as f64 - mean[j]) / scale[j]
        }
    });
    let y: Vec<f64> = rows.iter().map(|r| f64::from(u8::from(r.1))).collect();
    let mut w = vec![0f64; d];
    // The penalised objective at `w`, and the logits it was computed from.
    let objective = |w: &[f64]| -> (f64, Mat<f64>) {
        let logits = &z * Mat::<f64>::from_fn(d, 1, |j, _| w[j]);
        let ce: f64 = (0..n).map(|i| bce(logits[(i, 0)], y[i])).sum::<f64>() / n as f64;
        (ce + opt.l2 * w[..h].iter().map(|v| v * v).sum::<f64>(), logits)
    };
    let (mut f, mut logits) = objective(&w);
    let mut iterations = 0;
    while iterations < opt.max_iterations {
        iterations += 1;
        let p: Vec<f64> = (0..n).map(|i| sigmoid(logits[(i, 0)])).collect();
        // Gradient and Hessian of the mean cross-entropy plus the ridge term.
        let resid = Mat::<f64>::from_fn(n, 1, |i, _| (p[i] - y[i]) / n as f64);
        let mut grad = z.transpose() * &resid;
        let zs = Mat::<f64>::from_fn(n, d, |i, j| z[(i, j)] * (p[i] * (1.0 - p[i]) / n as f64).sqrt());
        let mut hess = zs.transpose() * &zs;
        for j in 0..h {
            grad[(j, 0)] += 2.0 * opt.l2 * w[j];
            hess[(j, j)] += 2.0 * opt.l2;
        }
        // A floor on the diagonal keeps the unpenalised problem (l2 = 0) solvable where the
        // text leaves a direction flat.
        for j in 0..d {
            hess[(j, j)] += 1e-10;
        }
        let llt = hess
            .llt(faer::Side::Lower)
            .map_err(|e| invalid(format!("the Newton system is not positive definite: {e:?}")))?;
        let mut step = grad.clone();
        llt.solve_in_place(&mut step);
        // Step halving: Newton's step can overshoot where the classes nearly separate.
        let mut t = 1.0;
        let next = loop {
            let cand: Vec<f64> = (0..d).map(|j| w[j] - t * step[(j, 0)]).collect();
            let (fc, lc) = objective(&cand);
            if fc <= f || t < 1e-6 {
                break (cand, fc, lc);
            }
            t *= 0.5;
        };
        let moved = (0..d).map(|j| (t * step[(j, 0)]).abs()).fold(0f64, f64::max);
        (w, f, logits) = next;
        if moved < 1e-9 {
            break;
        }
    }
    // Back to the raw state: w_raw = w / scale, b_raw = b - sum w mean / scale.
    let gw: Vec<f32> = (0..h).map(|j| (w[j] / scale[j]) as f32).collect();
    let gb = w[h] - (0..h).map(|j| w[j] * mean[j] / scale[j]).sum::<f64>();
    let gate = ExitGate { w: gw, b: gb as f32 };
    // Report on the gate as stored (f32), the one the engine will evaluate.
    let (mut ce, mut right) = (0f64, 0usize);
    for (row, a) in &rows {
        let g = gate.logit(row) as f64;
        let yi = f64::from(u8::from(*a));
        ce += bce(g, yi);
        right += usize::from((g > 0.0) == *a);
    }
    Ok(GateFit {
        gate,
        samples: n,
        agree_rate: agreeing as f64 / n as f64,
        cross_entropy: ce / n as f64,
        accuracy: right as f64 / n as f64,
        iterations,
        options: opt,
    })
}

/// Per-dimension mean and standard deviation (1 where a dimension is constant).
fn standardisation(rows: &[(&[f32], bool)], h: usize) -> (Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let mut mean = vec![0f64; h];
    for (r, _) in rows {
        for (m, v) in mean.iter_mut().zip(r.iter()) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; h];
    for (r, _) in rows {
        for ((s, v), m) in var.iter_mut().zip(r.iter()).zip(&mean) {
            let c = *v as f64 - m;
            *s += c * c;
        }
    }
    let scale = var
        .iter()
        .map(|s| {
            let sd = (s / n).sqrt();
            if sd > 1e-12 { sd } else { 1.0 }
        })
        .collect();
    (mean, scale)
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy of logit `g` against label `y` (0 or 1), stable for large `|g|`.
fn bce(g: f64, y: f64) -> f64 {
    // -y log s(g) - (1 - y) log(1 - s(g)) = softplus(g) - y g
    let softplus = if g > 0.0 {
        g + (-g).exp().ln_1p()
    } else {
        g.exp().ln_1p()
    };
    softplus - y * g
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Labels drawn from a known logistic model over correlated, shifted, scaled features:
    /// the unpenalised fit recovers the generating weights and bias (maximum likelihood is
    /// consistent; 40,000 samples put it within a few hundredths here), and the penalised one
    /// has a zero gradient of its own objective (the optimum).
    #[test]
    fn recovers_a_known_logistic_model() {
        let h = 6;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let true_w = [1.5f64, -2.0, 0.0, 0.5, 0.0, 1.0];
        let true_b = -0.3f64;
        let offsets = [3.0, -1.0, 10.0, 0.0, 5.0, 0.2];
        let scales = [0.5, 2.0, 1.0, 4.0, 0.1, 1.0];
        let n = 20_000;
        let mut trace = LoopTrace {
            hidden: h,
            states: vec![Vec::new(), Vec::new()],
            agrees: vec![Vec::new(), Vec::new()],
        };
        for i in 0..2 * n {
            let u: Vec<f64> = (0..h).map(|_| rng.random_range(-1.0..1.0) * 1.7).collect();
            // Correlate dimension 1 with 0, then shift and scale (the fit standardises).
            let x: Vec<f64> = (0..h)
                .map(|j| {
                    let v = if j == 1 { u[1] + 0.5 * u[0] } else { u[j] };
                    offsets[j] + scales[j] * v
                })
                .collect();
            let logit: f64 = true_b + (0..h).map(|j| true_w[j] * (x[j] - offsets[j]) / scales[j]).sum::<f64>();
            let label = rng.random_range(0.0..1.0) < sigmoid(logit);
            trace.states[i % 2].extend(x.iter().map(|v| *v as f32));
            trace.agrees[i % 2].push(label);
        }
        let fit = fit_gate(
            &trace,
            FitOptions {
                l2: 0.0,
                max_iterations: 50,
            },
        )
        .unwrap();
        assert!(fit.iterations < 20, "{}", fit.iterations);
        // Raw-space weights of the generating model.
        let raw_w: Vec<f64> = (0..h).map(|j| true_w[j] / scales[j]).collect();
        let raw_b = true_b - (0..h).map(|j| true_w[j] * offsets[j] / scales[j]).sum::<f64>();
        for j in 0..h {
            let err = (fit.gate.w[j] as f64 - raw_w[j]).abs() * scales[j];
            assert!(
                err < 0.08,
                "dim {j}: {} vs {} (standardised error {err})",
                fit.gate.w[j],
                raw_w[j]
            );
        }
        // The bias absorbs the offsets: compare the logit at the centre of the data.
        let centre: Vec<f32> = offsets.iter().map(|v| *v as f32).collect();
        let at_centre = fit.gate.logit(&centre) as f64;
        let truth = raw_b + (0..h).map(|j| raw_w[j] * offsets[j]).sum::<f64>();
        assert!((at_centre - truth).abs() < 0.05, "{at_centre} vs {truth}");
        // Better than the constant predictor.
        let p = fit.agree_rate;
        let constant = -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        assert!(
            fit.cross_entropy < constant - 0.1,
            "{} vs {constant}",
            fit.cross_entropy
        );

        // Penalised: the gradient of the penalised objective vanishes at the fit.
        let l2 = 0.05;
        let fit = fit_gate(&trace, FitOptions { l2, max_iterations: 50 }).unwrap();
        let rows = trace.rows();
        let (mean, scale) = standardisation(&rows, h);
        // In standardised coordinates: w_std = w_raw * scale.
        let mut grad = vec![0f64; h + 1];
        for (r, a) in &rows {
            let g = fit.gate.logit(r) as f64;
            let resid = sigmoid(g) - f64::from(u8::from(*a));
            for j in 0..h {
                grad[j] += resid * (r[j] as f64 - mean[j]) / scale[j];
            }
            grad[h] += resid;
        }
        for (j, gj) in grad.iter_mut().enumerate() {
            *gj /= rows.len() as f64;
            if j < h {
                *gj += 2.0 * l2 * fit.gate.w[j] as f64 * scale[j];
            }
        }
        // f32 storage of the weights bounds how small the gradient can be.
        assert!(grad.iter().all(|g| g.abs() < 2e-4), "{grad:?}");
        // Shrinkage: the penalised weights are smaller in standardised norm.
        let norm = |g: &ExitGate| (0..h).map(|j| (g.w[j] as f64 * scale[j]).powi(2)).sum::<f64>();
        let free = fit_gate(
            &trace,
            FitOptions {
                l2: 0.0,
                max_iterations: 50,
            },
        )
        .unwrap();
        assert!(norm(&fit.gate) < norm(&free.gate));
    }

    /// The samples a trace gives under a gate are the cumulative exit probabilities.
    #[test]
    fn gate_samples_accumulate_the_hazard() {
        let trace = LoopTrace {
            hidden: 2,
            states: vec![vec![1.0, 0.0, 0.0, 1.0], vec![0.5, 0.5, -1.0, 2.0]],
            agrees: vec![vec![true, false], vec![false, true]],
        };
        let gate = ExitGate {
            w: vec![2.0, -1.0],
            b: 0.25,
        };
        let s = trace.gate_samples(&gate);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let l = [[2.25, -0.75], [0.75, -3.75]];
        for t in 0..2 {
            let p1 = sig(l[0][t]);
            let p2 = 1.0 - (1.0 - p1) * (1.0 - sig(l[1][t]));
            assert!((s[0][t].0 as f64 - p1).abs() < 1e-6);
            assert!((s[1][t].0 as f64 - p2).abs() < 1e-6);
        }
        assert_eq!(s[0].iter().map(|x| x.1).collect::<Vec<_>>(), vec![true, false]);
        assert_eq!(s[1].iter().map(|x| x.1).collect::<Vec<_>>(), vec![false, true]);
    }

    #[test]
    fn refuses_texts_without_both_labels() {
        let trace = LoopTrace {
            hidden: 1,
            states: vec![vec![1.0, 2.0]],
            agrees: vec![vec![true, true]],
        };
        let e = fit_gate(&trace, FitOptions::default()).unwrap_err().to_string();
        assert!(e.contains("agree"), "{e}");
        let e = fit_gate(
            &trace,
            FitOptions {
                l2: -1.0,
                max_iterations: 5,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ridge"), "{e}");
    }
}
