//! Early-exit criteria and their calibration (CALM-style): per-loop thresholds chosen on text so
//! that the tokens that would exit early agree with the full-depth prediction at a target rate.
//!
//! A token exits after the first loop `b < B - 1` whose score reaches that loop's threshold;
//! thresholds are calibrated loop by loop over the tokens still running, each as low as the
//! agreement target allows (more exits), or `None` (never exit there) when no threshold does.

use crate::error::{ModelError, Result};
use crate::exit_fit::LoopTrace;
use crate::forward::sequence_rows;
use crate::kv::{DEFAULT_BLOCK_SIZE, single_sequence};
use crate::loader::LoadedModel;
use rrt_kernels::backend::cosine;
use serde::{Deserialize, Serialize};

/// How confident a loop's prediction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Largest softmax probability of the loop's logits (needs the LM head).
    MaxProb,
    /// Difference of the two largest probabilities (needs the LM head).
    Margin,
    /// Cosine similarity of this loop's hidden state with the previous loop's (the embedding
    /// for the first loop); CALM's state saturation, no LM head needed.
    Saturation,
    /// A learned exit gate (Ouro, or a checkpoint trained with `--exit-gate`): the cumulative
    /// probability of having exited by this loop, `1 - prod_{j <= t} (1 - sigmoid(g_j))`, from
    /// one dot product per loop, no LM head. A threshold of 1 never exits before the last loop.
    Gate,
}

impl Criterion {
    pub fn name(self) -> &'static str {
        match self {
            Criterion::MaxProb => "max-prob",
            Criterion::Margin => "margin",
            Criterion::Saturation => "saturation",
            Criterion::Gate => "gate",
        }
    }
}

/// Calibration tokens from the checkpoint itself: `prompts` prompts of `prompt_len` tokens at
/// evenly spaced offsets of `text` (token ids), each followed by the greedy continuation the
/// model decodes from it at full depth (up to `tokens` tokens, ending at an end-of-generation
/// token as a served request does), prompt and continuation one after another.
///
/// Served decode runs on the model's own continuations, which are easier (often repetitive)
/// than real text: a gate fitted or calibrated on real text alone exits later in serving than
/// on its calibration (BENCHMARKS.md, "A gate fitted after training"). Appending these to the
/// real text makes the calibration see both.
pub fn self_generated(
    lm: &LoadedModel,
    text: &[u32],
    prompts: usize,
    prompt_len: usize,
    tokens: usize,
) -> Result<Vec<u32>> {
    if prompts == 0 || tokens == 0 {
        return Ok(Vec::new());
    }
    if prompt_len == 0 || text.len() < prompt_len {
        return Err(ModelError::InvalidArgument {
            field: "self-generated",
            msg: format!(
                "prompts of {prompt_len} tokens need a text of at least that many tokens (it has {})",
                text.len()
            ),
        });
    }
    // Offsets 0, step, 2 step, ... with the last prompt ending at the text's end.
    let span = text.len() - prompt_len;
    let starts: Vec<usize> = (0..prompts)
        .map(|i| if prompts == 1 { 0 } else { i * span / (prompts - 1) })
        .collect();
    let ps: Vec<Vec<u32>> = starts.iter().map(|&o| text[o..o + prompt_len].to_vec()).collect();
    let greedy = crate::sampling::SamplingParams::default();
    let gens = crate::generate::generate_batch(lm, &ps, tokens, &greedy, true)?;
    Ok(gens
        .into_iter()
        .flat_map(|g| g.prompt_ids.into_iter().chain(g.ids))
        .collect())
}

/// `-ln(1 - sigmoid(g))`: what one loop adds to a token's accumulated exit hazard, exact where
/// `sigmoid(g)` rounds to 1 (the survival `prod (1 - lambda)` is `exp(-hazard)`).
pub fn gate_hazard(g: f32) -> f64 {
    let g = g as f64;
    if g > 0.0 {
        g + (-g).exp().ln_1p()
    } else {
        g.exp().ln_1p()
    }
}

/// The cumulative exit probability after loops whose hazards sum to `hazard`.
pub fn gate_exit_probability(hazard: f64) -> f64 {
    -(-hazard).exp_m1()
}

/// Whether a token whose accumulated hazard is `hazard` exits at `threshold` (on the
/// cumulative exit probability; 1 or more never exits, whatever the rounding of the gate).
pub fn gate_exits(hazard: f64, threshold: f32) -> bool {
    threshold < 1.0 && (threshold <= 0.0 || hazard >= -(1.0 - threshold as f64).ln())
}

/// Max softmax probability and top-1 minus top-2 probability of one row of logits (the
/// reduction a GPU backend computes on the device: [`rrt_kernels::HeadTop`]).
pub fn prob_scores(logits: &[f32]) -> (f32, f32) {
    let t = rrt_kernels::HeadTop::from_logits(logits);
    (t.max_prob(), t.margin())
}

/// Oracle exit loops (1-based) of the rows `rows` of one sequence of `tokens` (positions
/// 0..): for each, the first loop whose argmax equals the last loop's (the paper's oracle
/// exit). One forward pass over the whole sequence; the LM head runs only on `rows`.
pub fn oracle_loops(model: &crate::forward::Model, tokens: &[u32], rows: std::ops::Range<usize>) -> Result<Vec<u8>> {
    let (mut pool, kv) = single_sequence(model.kv_layout(DEFAULT_BLOCK_SIZE), tokens.len())?;
    let per_loop = model.forward_loops(&sequence_rows(tokens, &kv.blocks), &mut pool)?;
    let select: Vec<usize> = rows.collect();
    let vocab = model.config.vocab;
    let argmaxes: Vec<Vec<u32>> = per_loop
        .iter()
        .map(|x| {
            model
                .logits(x, &select)
                .chunks_exact(vocab)
                .map(crate::sampling::argmax)
                .collect()
        })
        .collect();
    let last = argmaxes.len() - 1;
    Ok((0..select.len())
        .map(|j| {
            let l = (0..=last)
                .find(|&l| argmaxes[l][j] == argmaxes[last][j])
                .unwrap_or(last);
            (l + 1) as u8
        })
        .collect())
}

/// Per token: for each loop before the last, (score, prediction agrees with the last loop).
pub type LoopSamples = Vec<Vec<(f32, bool)>>;

/// Runs the model over `tokens` in windows and collects, per loop before the last, each
/// token's score under `criterion` and whether its top-1 prediction equals the last loop's.
pub fn collect_samples(lm: &LoadedModel, tokens: &[u32], window: usize, criterion: Criterion) -> Result<LoopSamples> {
    collect_samples_with(lm, tokens, window, criterion, |_, _| {})
}

/// [`collect_samples`], calling `progress(windows done, windows)` after each window.
pub fn collect_samples_with(
    lm: &LoadedModel,
    tokens: &[u32],
    window: usize,
    criterion: Criterion,
    progress: impl FnMut(usize, usize),
) -> Result<LoopSamples> {
    Ok(run_windows(lm, tokens, window, Some(criterion), false, progress)?.0)
}

/// Runs the model over `tokens` in windows and keeps every loop's state before the last with
/// its agreement (what [`crate::exit_fit::fit_gate`] fits a gate to), calling
/// `progress(windows done, windows)` after each window.
pub fn trace_loops_with(
    lm: &LoadedModel,
    tokens: &[u32],
    window: usize,
    progress: impl FnMut(usize, usize),
) -> Result<LoopTrace> {
    Ok(run_windows(lm, tokens, window, None, true, progress)?.1)
}

/// The calibration pass: scores under `criterion` (none: no samples) and, with `keep_states`,
/// the states and agreements of every loop before the last.
fn run_windows(
    lm: &LoadedModel,
    tokens: &[u32],
    window: usize,
    criterion: Option<Criterion>,
    keep_states: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<(LoopSamples, LoopTrace)> {
    let model = &lm.model;
    let loops = model.loops();
    if loops < 2 {
        return Err(ModelError::InvalidArgument {
            field: "model",
            msg: "early exit needs a recursive model with at least 2 loops".into(),
        });
    }
    let h = model.config.hidden;
    let vocab = model.config.vocab;
    let mut samples: LoopSamples = vec![Vec::new(); if criterion.is_some() { loops - 1 } else { 0 }];
    let mut trace = LoopTrace {
        hidden: h,
        states: vec![Vec::new(); if keep_states { loops - 1 } else { 0 }],
        agrees: vec![Vec::new(); if keep_states { loops - 1 } else { 0 }],
    };
    let windows = tokens.chunks(window.max(1)).filter(|w| w.len() >= 2).count();
    for (done, win) in tokens.chunks(window.max(1)).filter(|w| w.len() >= 2).enumerate() {
        progress(done, windows);
        let (mut pool, seq) = single_sequence(model.kv_layout(DEFAULT_BLOCK_SIZE), win.len())?;
        let rows = sequence_rows(win, &seq.blocks);
        let select: Vec<usize> = (0..win.len()).collect();
        let hidden = model.forward_loops(&rows, &mut pool)?;
        let embed = model.embed(win.iter().copied())?;
        let last = model.logits(&hidden[loops - 1], &select);
        let last_top: Vec<u32> = last.chunks_exact(vocab).map(crate::sampling::argmax).collect();
        let mut hazard = vec![0f64; win.len()];
        for b in 0..loops - 1 {
            if criterion == Some(Criterion::Gate) {
                let g = model
                    .gate_logits(&hidden[b], &select)
                    .ok_or_else(|| ModelError::InvalidArgument {
                        field: "criterion",
                        msg: "the gate criterion needs a model with a learned exit gate (Ouro, a checkpoint trained with --exit-gate, or one given a gate by `rrt calibrate --fit-gate`)".into(),
                    })?;
                for (hz, g) in hazard.iter_mut().zip(g) {
                    *hz += gate_hazard(g);
                }
            }
            let logits = model.logits(&hidden[b], &select);
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let agrees = crate::sampling::argmax(row) == last_top[i];
                if keep_states {
                    trace.agrees[b].push(agrees);
                }
                let Some(criterion) = criterion else { continue };
                let score = match criterion {
                    Criterion::MaxProb => prob_scores(row).0,
                    Criterion::Margin => prob_scores(row).1,
                    Criterion::Saturation => {
                        let prev = if b == 0 {
                            &embed[i * h..(i + 1) * h]
                        } else {
                            &hidden[b - 1][i * h..(i + 1) * h]
                        };
                        cosine(&hidden[b][i * h..(i + 1) * h], prev)
                    }
                    Criterion::Gate => gate_exit_probability(hazard[i]) as f32,
                };
                samples[b].push((score, agrees));
            }
            if keep_states {
                trace.states[b].extend_from_slice(&hidden[b][..win.len() * h]);
            }
        }
    }
    progress(windows, windows);
    Ok((samples, trace))
}

/// Calibrated thresholds and what they are expected to do on the calibration text.
#[derive(Clone, Debug, Serialize)]
pub struct Calibrated {
    /// One per loop before the last; `None` = never exit after that loop.
    pub thresholds: Vec<Option<f32>>,
    /// Fraction of tokens exiting after each loop (the last entry: running to full depth).
    pub exit_fraction: Vec<f64>,
    pub mean_loops: f64,
    /// Agreement with the full-depth prediction over all tokens, exited or not.
    pub agreement: f64,
    pub tokens: usize,
}

/// Chooses thresholds loop by loop (see the module docs).
pub fn calibrate(samples: &LoopSamples, target: f64) -> Calibrated {
    let n = samples.first().map_or(0, Vec::len);
    let loops = samples.len() + 1;
    let mut running: Vec<bool> = vec![true; n];
    let mut thresholds = Vec::with_capacity(samples.len());
    let mut exits = vec![0usize; loops];
    let mut agreeing = 0usize;
    for (b, s) in samples.iter().enumerate() {
        let mut cand: Vec<(f32, bool, usize)> = s
            .iter()
            .enumerate()
            .filter(|(i, _)| running[*i])
            .map(|(i, &(sc, ag))| (sc, ag, i))
            .collect();
        cand.sort_by(|x, y| y.0.total_cmp(&x.0));
        // Walk scores from high to low; the threshold is the lowest score at which the
        // tokens at or above it still agree at the target rate (ties stay together).
        let (mut ok, mut best) = (0usize, None::<usize>);
        let mut k = 0;
        while k < cand.len() {
            let mut e = k;
            while e < cand.len() && cand[e].0 == cand[k].0 {
                ok += usize::from(cand[e].1);
                e += 1;
            }
            if ok as f64 >= target * e as f64 {
                best = Some(e);
            }
            k = e;
        }
        match best {
            Some(e) => {
                thresholds.push(Some(cand[e - 1].0));
                for &(_, ag, i) in &cand[..e] {
                    running[i] = false;
                    agreeing += usize::from(ag);
                }
                exits[b] = e;
            }
            None => thresholds.push(None),
        }
    }
    let full = running.iter().filter(|r| **r).count();
    exits[loops - 1] = full;
    agreeing += full;
    let exit_fraction: Vec<f64> = exits.iter().map(|&e| e as f64 / n.max(1) as f64).collect();
    let mean_loops = exit_fraction.iter().enumerate().map(|(b, f)| (b + 1) as f64 * f).sum();
    Calibrated {
        thresholds,
        exit_fraction,
        mean_loops,
        agreement: agreeing as f64 / n.max(1) as f64,
        tokens: n,
    }
}

/// The calibration whose expected mean loops stay within `max_mean_loops`, at the highest
/// agreement target that allows it: every target on a 0.001 grid of (0, 1] is calibrated
/// (mean loops need not fall monotonically with the target, loop by loop choices interact),
/// and of those within the budget the one agreeing most with full depth is kept (fewer loops
/// on a tie). Returns the target and its calibration; `None` when no target is within the
/// budget (below one loop, or no samples).
pub fn calibrate_for_loops(samples: &LoopSamples, max_mean_loops: f64) -> Option<(f64, Calibrated)> {
    let mut best: Option<(f64, Calibrated)> = None;
    for step in 1..=1000 {
        let target = step as f64 / 1000.0;
        let c = calibrate(samples, target);
        if c.tokens == 0 || c.mean_loops > max_mean_loops + 1e-12 {
            continue;
        }
        let better = match &best {
            None => true,
            Some((_, b)) => (c.agreement, -c.mean_loops) > (b.agreement, -b.mean_loops),
        };
        if better {
            best = Some((target, c));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_meet_the_target_and_maximise_exits() {
        // Loop 1: high scores agree, low ones do not. Loop 2: everything agrees.
        let l1 = vec![
            (0.9, true),
            (0.8, true),
            (0.7, false),
            (0.6, true),
            (0.2, false),
            (0.1, false),
        ];
        let l2 = vec![(0.5, true); 6];
        let c = calibrate(&vec![l1.clone(), l2.clone()], 0.75);
        // Top 4 have 3/4 agreeing = 0.75 >= target; top 5 would be 3/5.
        assert_eq!(c.thresholds[0], Some(0.6));
        // The 2 remaining tokens all exit at loop 2.
        assert_eq!(c.thresholds[1], Some(0.5));
        assert_eq!(c.exit_fraction, vec![4.0 / 6.0, 2.0 / 6.0, 0.0]);
        assert!((c.mean_loops - (4.0 + 2.0 * 2.0) / 6.0).abs() < 1e-12);
        assert!((c.agreement - 5.0 / 6.0).abs() < 1e-12);
        // A target nothing reaches: no early exit.
        let c = calibrate(&vec![vec![(0.9, false), (0.1, false)]], 0.5);
        assert_eq!(c.thresholds, vec![None]);
        assert_eq!(c.mean_loops, 2.0);
        assert_eq!(c.agreement, 1.0);
    }

    #[test]
    fn probability_scores() {
        let (p, m) = prob_scores(&[0.0, (3f32).ln(), f32::NEG_INFINITY]);
        assert!((p - 0.75).abs() < 1e-6 && (m - 0.5).abs() < 1e-6);
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;

    /// The hazard form equals the product form where both are exact, and stays exact where
    /// the sigmoid rounds to 1 in f32.
    #[test]
    fn gate_hazard_is_the_log_survival() {
        let gs = [-3.0f32, 0.5, 2.0];
        let mut surv = 1f64;
        let mut hz = 0f64;
        for g in gs {
            let lambda = 1.0 / (1.0 + (-(g as f64)).exp());
            surv *= 1.0 - lambda;
            hz += gate_hazard(g);
            assert!((gate_exit_probability(hz) - (1.0 - surv)).abs() < 1e-12);
        }
        // sigmoid(40) is 1.0 in f32 (and f64): the product says "exited for sure", the hazard
        // keeps the difference, and a threshold of 1 still never exits.
        assert_eq!(1.0f32 / (1.0 + (-40f32).exp()), 1.0);
        let h = gate_hazard(40.0);
        assert!((h - 40.0).abs() < 1e-9, "{h}");
        assert!(!gate_exits(h, 1.0));
        assert!(gate_exits(h, 0.999_999));
        assert!(!gate_exits(gate_hazard(-2.0), 0.5));
        assert!(gate_exits(gate_hazard(0.1), 0.5));
        assert!(gate_exits(0.0, 0.0));
    }

    #[test]
    fn a_loop_budget_picks_the_most_agreeing_calibration_within_it() {
        // Two loops before the last, 8 tokens: scores rank agreeing tokens first.
        let s0: Vec<(f32, bool)> = vec![
            (0.9, true),
            (0.8, true),
            (0.7, false),
            (0.6, true),
            (0.5, false),
            (0.4, false),
            (0.3, true),
            (0.2, false),
        ];
        let s1: Vec<(f32, bool)> = s0.iter().map(|&(sc, _)| (sc, true)).collect();
        let samples = vec![s0, s1];
        let full = calibrate(&samples, 1.0);
        let (t, c) = calibrate_for_loops(&samples, 3.0).unwrap();
        assert_eq!(c.agreement, 1.0, "no budget pressure: full agreement ({t})");
        assert!(c.mean_loops <= full.mean_loops);
        for budget in [1.0, 1.3, 1.5, 1.75, 2.0] {
            let (t, c) = calibrate_for_loops(&samples, budget).unwrap();
            assert!(c.mean_loops <= budget + 1e-12, "{budget}: {c:?}");
            // No target on the grid does better within the budget.
            for step in 1..=1000 {
                let o = calibrate(&samples, step as f64 / 1000.0);
                if o.mean_loops <= budget + 1e-12 {
                    assert!(o.agreement <= c.agreement, "{budget}: target {t} against {step}");
                }
            }
        }
        assert!(calibrate_for_loops(&samples, 0.9).is_none());
        assert!(calibrate_for_loops(&vec![Vec::new(), Vec::new()], 2.0).is_none());
    }
}
