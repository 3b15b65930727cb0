//! Capacity planning: how many nodes for a traffic and latency target, from a node's own
//! traces.
//!
//! 1. **Fit** ([`fit`]). From JSON-lines span files (`telemetry.file` / `--trace-file` of
//!    `rrt node`, `rrt coordinator`, `rrt serve`): every `engine.step` span gives the pass's
//!    rows, attended context, LM-head rows, fill rows and time; least squares gives the
//!    step-cost model [`CostModel`] (terms that come out negative are dropped and the rest
//!    refitted), plus the node's time between passes while busy (the engine loop's own
//!    overhead) added to the intercept. The request mix comes from the `request` (coordinator)
//!    or `node.request` spans (prompt and output lengths, resampled as measured) and the
//!    exit-loop distribution from the steps' exits. The node's scheduling settings come from
//!    its `node.start` span.
//! 2. **Simulate.** A discrete-event simulation drives real [`rrt_node::Engine`]s on the
//!    compute-free [`rrt_node::sim::SimBackend`] (the engine's own admission, depth-wise
//!    batching, KV blocks and preemption; requests with forced tokens and exit loops drawn from
//!    the mix), each pass taking the fitted time; Poisson arrivals are routed across nodes by
//!    the coordinator's own routing function.
//! 3. **Plan** ([`Planner`]). The throughput curve of one node (TTFT and TPOT percentiles
//!    against the offered rate), the highest rate one node sustains within the latency
//!    [`Limits`], and the nodes needed for a target rate (checked by simulating that many
//!    nodes behind the router). Validation instead replays each load point of an
//!    `rrt bench load --json` report ([`crate::load::Report`]) and compares predicted with
//!    measured.
//!
//! The simulated engines run the real scheduling code, so a plan reflects the node's batching
//! and KV limits rather than a queueing formula; only the pass times are modelled.

use crate::load::{Dist, Stats};
use crate::plot;
use crate::{BenchError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rrt_coordinator::routing::{NodeView, route_with};
use rrt_model::tokenizer::Tokenizer;
use rrt_node::sim::{self, CostModel, SimBackend};
use rrt_node::{Engine, EngineConfig, Event, GenParams, Request, RequestId};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| BenchError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The served models named in the traces' `engine.step` spans, sorted.
pub fn models_in(paths: &[PathBuf]) -> Result<Vec<String>> {
    use rrt_telemetry::span_fields::step as st;
    let mut out = std::collections::BTreeSet::new();
    for p in paths {
        let text = read(p)?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["name"].as_str() == Some(st::NAME)
                && let Some(m) = v["attributes"][st::MODEL].as_str()
                && !m.is_empty()
            {
                out.insert(m.to_string());
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Whether a span belongs to the model being planned: every span when no model is chosen,
/// else those naming it (spans without a model name belong to unnamed nodes: excluded).
fn of_model(v: &Value, key: &str, model: Option<&str>) -> bool {
    match model {
        None => true,
        Some(m) => v["attributes"][key].as_str() == Some(m),
    }
}

/// What the traces say about the node and its traffic.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Fitted {
    pub cost: CostModel,
    /// Seconds between passes while busy (included in `cost.intercept`).
    pub overhead_s: f64,
    /// Fit quality: R², mean absolute relative error, steps used.
    pub r2: f64,
    pub mean_abs_rel_err: f64,
    pub steps: usize,
    pub loops: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_step_rows: usize,
    pub max_running: usize,
    /// Measured request lengths (resampled) and exit-loop shares (index = loops - 1).
    pub prompt_lengths: Vec<u32>,
    pub output_lengths: Vec<u32>,
    pub exit_shares: Vec<f64>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get("attributes")?.get(key)?.as_f64()
}

fn list(v: &Value, key: &str) -> Vec<usize> {
    v.get("attributes")
        .and_then(|a| a.get(key))
        .and_then(|s| s.as_str())
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Least squares `y ~ X b` by the normal equations (small, well-scaled systems).
fn lstsq(x: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let k = x.first()?.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (row, &t) in x.iter().zip(y) {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += row[i] * row[j];
            }
            a[i][k] += row[i] * t;
        }
    }
    // Gauss-Jordan with partial pivoting.
    for c in 0..k {
        let p = (c..k).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, p);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, q) in row[c..].iter_mut().zip(&pivot[c..]) {
                    *x -= f * q;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

/// What to fit, and the node settings to use instead of the traced ones.
#[derive(Clone, Debug, Default)]
pub struct FitOptions {
    /// Only the spans of this served model (None: every span).
    pub model: Option<String>,
    /// Node scheduling settings; each one given replaces the `node.start` span's (and the
    /// node's default when the traces have no such span).
    pub kv_blocks: Option<usize>,
    pub max_step_rows: Option<usize>,
    pub max_running: Option<usize>,
}

/// Reads the span files and fits the node's costs and the traffic mix.
pub fn fit(paths: &[PathBuf], a: &FitOptions) -> Result<Fitted> {
    let mut steps: Vec<(f64, f64, [f64; 4], f64)> = Vec::new(); // start, end, features, seconds
    let mut exits: Vec<u64> = Vec::new();
    let (mut prompts, mut outputs) = (Vec::new(), Vec::new());
    let (mut node_prompts, mut node_outputs) = (Vec::new(), Vec::new());
    let mut start: Option<Value> = None;
    for p in paths {
        let text = read(p)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|source| BenchError::Json {
                what: format!("{}:{}: not a JSON span", p.display(), i + 1),
                source,
            })?;
            use rrt_telemetry::span_fields::{node_request as nr, node_start as ns, request as rq, step as st};
            let name = v["name"].as_str().unwrap_or_default();
            let model = a.model.as_deref();
            let keep = match name {
                n if n == st::NAME => of_model(&v, st::MODEL, model),
                n if n == rq::NAME => of_model(&v, rq::MODEL, model),
                n if n == nr::NAME => of_model(&v, nr::MODEL, model),
                n if n == ns::NAME => of_model(&v, ns::MODEL, model),
                _ => false,
            };
            if !keep {
                continue;
            }
            if name == st::NAME {
                let depth = list(&v, st::ROWS_PER_DEPTH);
                let (Some(ms), Some(ctx)) = (num(&v, st::STEP_MS), num(&v, st::CTX)) else {
                    continue;
                };
                let rows: usize = depth.iter().sum();
                if rows == 0 {
                    continue;
                }
                let f = CostModel::features(
                    rows as f64,
                    ctx,
                    num(&v, st::HEAD_ROWS).unwrap_or(0.0),
                    num(&v, st::FILL_ROWS).unwrap_or(0.0),
                );
                let (s, e) = (
                    v["start_ns"].as_f64().unwrap_or(0.0) / 1e9,
                    v["end_ns"].as_f64().unwrap_or(0.0) / 1e9,
                );
                steps.push((s, e, f, ms / 1e3));
                for (l, n) in list(&v, st::EXITS_PER_LOOP).into_iter().enumerate() {
                    if exits.len() <= l {
                        exits.resize(l + 1, 0);
                    }
                    exits[l] += n as u64;
                }
            } else if name == rq::NAME {
                if let (Some(pt), Some(t)) = (num(&v, rq::PROMPT_TOKENS), num(&v, rq::TOKENS))
                    && t >= 1.0
                {
                    prompts.push(pt as u32);
                    outputs.push(t as u32);
                }
            } else if name == nr::NAME {
                if let (Some(pt), Some(t)) = (num(&v, nr::PROMPT_TOKENS), num(&v, nr::TOKENS))
                    && t >= 1.0
                    && num(&v, nr::GENERATED).unwrap_or(0.0) == 0.0
                {
                    node_prompts.push(pt as u32);
                    node_outputs.push(t as u32);
                }
            } else if name == ns::NAME {
                start = Some(v);
            }
        }
    }
    if steps.len() < 10 {
        return Err(BenchError::NotEnoughSteps { found: steps.len() });
    }
    if prompts.is_empty() {
        (prompts, outputs) = (node_prompts, node_outputs);
    }
    // Fit, dropping features that never vary (e.g. no fill rows without exits) and then
    // negative terms.
    let mut active = [true; 4];
    for (j, on) in active.iter_mut().enumerate() {
        let first = steps[0].2[j];
        *on = steps.iter().any(|s| (s.2[j] - first).abs() > 1e-9);
    }
    let coef = loop {
        let x: Vec<Vec<f64>> = steps
            .iter()
            .map(|s| {
                std::iter::once(1.0)
                    .chain(s.2.iter().zip(&active).filter(|(_, a)| **a).map(|(f, _)| *f))
                    .collect()
            })
            .collect();
        let y: Vec<f64> = steps.iter().map(|s| s.3).collect();
        let Some(b) = lstsq(&x, &y) else {
            return Err(BenchError::Underdetermined);
        };
        let mut full = [0.0; 5];
        full[0] = b[0].max(0.0);
        let mut j = 1;
        let mut negative = None;
        for (i, on) in active.iter().enumerate() {
            if *on {
                full[i + 1] = b[j];
                if b[j] < 0.0 && negative.is_none() {
                    negative = Some(i);
                }
                j += 1;
            }
        }
        match negative {
            Some(i) => active[i] = false,
            None => break full,
        }
    };
    let mut cost = CostModel {
        intercept: coef[0],
        per_row: coef[1],
        per_ctx: coef[2],
        per_head_row: coef[3],
        per_fill_row: coef[4],
    };
    let predict = |f: &[f64; 4]| {
        cost.intercept + cost.per_row * f[0] + cost.per_ctx * f[1] + cost.per_head_row * f[2] + cost.per_fill_row * f[3]
    };
    let mean_y = steps.iter().map(|s| s.3).sum::<f64>() / steps.len() as f64;
    let (mut ss_res, mut ss_tot, mut rel) = (0.0, 0.0, 0.0);
    for s in &steps {
        let e = s.3 - predict(&s.2);
        ss_res += e * e;
        ss_tot += (s.3 - mean_y).powi(2);
        rel += (e / s.3).abs();
    }
    // Time between consecutive passes while the engine is busy (the next pass starts within a
    // millisecond or two: the loop's own work), added to each pass.
    steps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: Vec<f64> = steps
        .windows(2)
        .map(|w| w[1].0 - w[0].1)
        .filter(|g| (0.0..0.002).contains(g))
        .collect();
    let overhead_s = if gaps.is_empty() {
        0.0
    } else {
        gaps.iter().sum::<f64>() / gaps.len() as f64
    };
    // The span covers the pass; the step's bookkeeping outside it is the gap's share.
    cost.intercept += overhead_s;
    let at = |k: &str| start.as_ref().and_then(|v| num(v, k)).map(|x| x as usize);
    let loops = at(rrt_telemetry::span_fields::node_start::LOOPS).unwrap_or_else(|| exits.len().max(1));
    let total_exits: u64 = exits.iter().sum();
    let mut exit_shares: Vec<f64> = exits.iter().map(|&n| n as f64 / total_exits.max(1) as f64).collect();
    exit_shares.resize(loops, 0.0);
    if total_exits == 0 {
        exit_shares[loops - 1] = 1.0;
    }
    Ok(Fitted {
        cost,
        overhead_s,
        r2: if ss_tot > 0.0 { 1.0 - ss_res / ss_tot } else { 1.0 },
        mean_abs_rel_err: rel / steps.len() as f64,
        steps: steps.len(),
        loops,
        kv_blocks: a
            .kv_blocks
            .or(at(rrt_telemetry::span_fields::node_start::KV_BLOCKS))
            .unwrap_or(1456),
        block_size: at(rrt_telemetry::span_fields::node_start::BLOCK_SIZE).unwrap_or(16),
        max_step_rows: a
            .max_step_rows
            .or(at(rrt_telemetry::span_fields::node_start::MAX_STEP_ROWS))
            .unwrap_or(256),
        max_running: a
            .max_running
            .or(at(rrt_telemetry::span_fields::node_start::MAX_RUNNING))
            .unwrap_or(64),
        prompt_lengths: prompts,
        output_lengths: outputs,
        exit_shares,
    })
}

/// Exit loops for `n` tokens drawn i.i.d. from `shares` (index = loops - 1; what is left of
/// the unit goes to the last loop).
pub fn draw_exits(rng: &mut ChaCha8Rng, shares: &[f64], n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut u: f64 = rng.random();
            for (l, &s) in shares.iter().enumerate() {
                if u < s {
                    return l as u8 + 1;
                }
                u -= s;
            }
            shares.len().max(1) as u8
        })
        .collect()
}

/// One simulated request.
#[derive(Clone, Debug)]
struct SimReq {
    arrival: f64,
    prompt: usize,
    output: usize,
    exits: Vec<u8>,
    /// Counted in the statistics (a bench's warmup requests load the node but are not).
    measured: bool,
}

/// The simulated traffic: lengths from the traces (or the given distributions), exit loops
/// i.i.d. from the measured shares.
struct Mix<'a> {
    f: &'a Fitted,
    prompt: Option<Dist>,
    output: Option<Dist>,
}

impl Mix<'_> {
    fn requests(&self, rate: f64, window_s: Option<f64>, n: usize, seed: u64) -> Vec<SimReq> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut t = 0.0;
        let mut out = Vec::new();
        loop {
            t += -(1.0 - rng.random::<f64>()).ln() / rate;
            if window_s.is_some_and(|w| t > w) || (window_s.is_none() && out.len() >= n) {
                break;
            }
            let pick = |v: &[u32], rng: &mut ChaCha8Rng| v[rng.random_range(0..v.len())] as usize;
            let prompt = match (&self.prompt, self.f.prompt_lengths.is_empty()) {
                (Some(d), _) => d.sample(&mut rng) as usize,
                (None, false) => pick(&self.f.prompt_lengths, &mut rng),
                (None, true) => 64,
            };
            let output = match (&self.output, self.f.output_lengths.is_empty()) {
                (Some(d), _) => d.sample(&mut rng) as usize,
                (None, false) => pick(&self.f.output_lengths, &mut rng),
                (None, true) => 64,
            };
            let exits = self.requests_exits(&mut rng, output);
            out.push(SimReq {
                arrival: t,
                prompt: prompt.max(1),
                output: output.max(1),
                exits,
                measured: true,
            });
        }
        out
    }

    /// The requests of a bench point recorded with `--per-request`: the same send times,
    /// prompt lengths (as the server counted them) and output lengths; exit loops in the
    /// recorded proportions of each request (or drawn from the traced mix).
    fn replay(&self, records: &[Value], seed: u64) -> Vec<SimReq> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out: Vec<SimReq> = records
            .iter()
            .filter(|r| r["error"].is_null())
            .map(|r| {
                let output = r["tokens"].as_u64().unwrap_or(1).max(1) as usize;
                let mut exits: Vec<u8> = Vec::new();
                if let Some(m) = r["exit_loops"].as_object() {
                    for (l, n) in m {
                        let l: u8 = l.parse().unwrap_or(1);
                        exits.extend(std::iter::repeat_n(l, n.as_u64().unwrap_or(0) as usize));
                    }
                }
                if exits.len() != output {
                    exits = self.requests_exits(&mut rng, output);
                } else {
                    // Keep the request's proportions, not its order.
                    for i in (1..exits.len()).rev() {
                        exits.swap(i, rng.random_range(0..=i));
                    }
                }
                SimReq {
                    arrival: r["start_s"].as_f64().unwrap_or(0.0),
                    prompt: r["usage_prompt_tokens"]
                        .as_u64()
                        .or_else(|| r["prompt_tokens"].as_u64())
                        .unwrap_or(1)
                        .max(1) as usize,
                    output,
                    exits,
                    measured: r["measured"].as_bool().unwrap_or(true),
                }
            })
            .collect();
        out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        out
    }

    fn requests_exits(&self, rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
        draw_exits(rng, &self.f.exit_shares, n)
    }
}

/// What a simulated load point measured.
#[derive(Clone, Debug, Serialize)]
pub struct SimPoint {
    pub nodes: usize,
    pub offered_rps: f64,
    pub requests: usize,
    pub unfinished: usize,
    pub achieved_rps: f64,
    pub output_tok_s: f64,
    pub ttft_ms: Option<Stats>,
    pub tpot_ms: Option<Stats>,
    pub mean_loops: f64,
}

/// How simulated traffic is routed.
#[derive(Clone, Copy, Debug, Default)]
struct SimOpts {
    /// Prompts begin with this many identical tokens.
    shared_prefix: usize,
    prefix_affinity: bool,
}

struct SimNode {
    eng: Engine<SimBackend>,
    free_at: f64,
    reqs: HashMap<RequestId, usize>,
}

/// Simulates `reqs` on `nodes` nodes. With `window = (start, end)`, throughput counts the
/// tokens and completions inside it (as `rrt bench load` does); otherwise over the whole run.
fn simulate(
    f: &Fitted,
    reqs: &[SimReq],
    nodes: usize,
    window: Option<(f64, f64)>,
    tok: &Arc<rrt_model::tokenizer::Tokenizer>,
    opts: &SimOpts,
) -> Result<SimPoint> {
    let route_opts = (opts.shared_prefix, opts.prefix_affinity);
    let cfg = EngineConfig {
        block_size: f.block_size,
        max_step_rows: f.max_step_rows,
        max_running: f.max_running,
        ..Default::default()
    };
    let mut ns: Vec<SimNode> = (0..nodes)
        .map(|_| {
            Ok(SimNode {
                eng: sim::engine(f.loops, cfg.clone(), f.kv_blocks, tok.clone(), sim::SIM_VOCAB)?,
                free_at: 0.0,
                reqs: HashMap::new(),
            })
        })
        .collect::<Result<_>>()?;
    let n = reqs.len();
    let (mut first, mut last, mut count) = (vec![f64::NAN; n], vec![f64::NAN; n], vec![0usize; n]);
    let mut loops_sum = 0usize;
    let (mut next, mut now) = (0usize, 0.0f64);
    let (window_start, window_end) = window.unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
    let in_window = |t: f64| t >= window_start && t <= window_end;
    let mut tokens_in_window = 0usize;
    let mut done_in_window = 0usize;
    let mut stalled = vec![false; nodes];
    loop {
        let t_arr = reqs.get(next).map_or(f64::INFINITY, |r| r.arrival);
        let busy = (0..nodes)
            .filter(|&i| ns[i].eng.has_work() && !stalled[i])
            .min_by(|&a, &b| ns[a].free_at.total_cmp(&ns[b].free_at));
        let t_node = busy.map_or(f64::INFINITY, |i| ns[i].free_at.max(now));
        if t_arr.is_infinite() && t_node.is_infinite() {
            break;
        }
        if t_arr <= t_node {
            now = t_arr;
            let r = &reqs[next];
            let views: Vec<NodeView> = ns
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let l = s.eng.load_report();
                    NodeView {
                        id: format!("sim-{i}"),
                        healthy: true,
                        draining: false,
                        loops: f.loops,
                        rows_per_depth: l.rows_per_depth,
                        waiting_tokens: l.waiting_tokens,
                        free_kv_blocks: l.free_blocks,
                        total_kv_blocks: l.total_blocks,
                        kv_block_size: l.block_size,
                        pending: 0,
                        ..Default::default()
                    }
                })
                .collect();
            // Distinct prompts (like the bench's random text windows) after the shared prefix
            // of `--shared-prefix` tokens, if any: what the router's prefix affinity sees.
            let prompt: Vec<u32> = (0..r.prompt)
                .map(|j| {
                    if j < route_opts.0 {
                        return 5;
                    }
                    let h = (next as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (j as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                    (h >> 33) as u32 % (sim::SIM_VOCAB as u32 - 8) + 4
                })
                .collect();
            let i = route_with(&views, &prompt, r.output, route_opts.1)
                .and_then(|v| v.id.strip_prefix("sim-")?.parse::<usize>().ok())
                .unwrap_or(next % nodes);
            let params = GenParams {
                max_tokens: r.output,
                ignore_eos: true,
                forced: Some(vec![7; r.output]),
                exit: rrt_node::ExitControl {
                    schedule: Some(r.exits.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let id = ns[i].eng.submit(Request { prompt, params })?;
            ns[i].reqs.insert(id, next);
            ns[i].free_at = ns[i].free_at.max(now);
            stalled[i] = false;
            next += 1;
            continue;
        }
        let i = busy.expect("a busy node");
        now = t_node;
        let events = ns[i].eng.step()?;
        let dt = ns[i].eng.take_last_pass().map(|p| f.cost.seconds(&p));
        let t = now + dt.unwrap_or(0.0);
        ns[i].free_at = t;
        if dt.is_none() && events.is_empty() {
            // Nothing can run until something changes (an arrival or another node's step).
            stalled[i] = true;
        }
        for (id, e) in events {
            let Some(&r) = ns[i].reqs.get(&id) else { continue };
            match e {
                Event::Token(tk) => {
                    if count[r] == 0 {
                        first[r] = t;
                    }
                    last[r] = t;
                    count[r] += 1;
                    loops_sum += tk.loops;
                    if in_window(t) {
                        tokens_in_window += 1;
                    }
                }
                Event::Done { .. } => {
                    ns[i].reqs.remove(&id);
                    if in_window(t) {
                        done_in_window += 1;
                    }
                }
            }
        }
    }
    let end = last.iter().copied().filter(|x| x.is_finite()).fold(0.0, f64::max);
    let span = window.map_or(end, |(s, e)| e - s).max(1e-9);
    let unfinished = (0..n).filter(|&r| count[r] < reqs[r].output).count();
    let total_tokens: usize = count.iter().sum();
    let measured: Vec<usize> = (0..n).filter(|&r| reqs[r].measured).collect();
    Ok(SimPoint {
        nodes,
        offered_rps: if n > 0 {
            n as f64 / reqs[n - 1].arrival.max(1e-9)
        } else {
            0.0
        },
        requests: n,
        unfinished,
        achieved_rps: if window.is_some() {
            done_in_window as f64
        } else {
            n as f64
        } / span,
        output_tok_s: if window.is_some() {
            tokens_in_window
        } else {
            total_tokens
        } as f64
            / span,
        ttft_ms: Stats::of(measured.iter().map(|&r| (first[r] - reqs[r].arrival) * 1e3)),
        tpot_ms: Stats::of(
            measured
                .iter()
                .filter(|&&r| count[r] > 1)
                .map(|&r| (last[r] - first[r]) / (count[r] - 1) as f64 * 1e3),
        ),
        mean_loops: loops_sum as f64 / total_tokens.max(1) as f64,
    })
}

/// From load points `(rate, ttft p99, tpot p99, tokens/s)` in rate order: the rate where the
/// first limit is crossed, linearly interpolated between the last point within both limits
/// and the next one, with the throughput there. None when the first point is already over,
/// or no point is.
fn max_within(points: &[(f64, f64, f64, f64)], ttft: f64, tpot: f64) -> Option<(f64, f64)> {
    let ok = |p: &(f64, f64, f64, f64)| p.1 <= ttft && p.2 <= tpot;
    let i = points.iter().position(|p| !ok(p))?;
    if i == 0 {
        return None;
    }
    let (lo, hi) = (points[i - 1], points[i]);
    // Fraction of the way to `hi` where each statistic reaches its limit.
    let cross = |a: f64, b: f64, limit: f64| {
        if b > limit && b > a {
            ((limit - a) / (b - a)).clamp(0.0, 1.0)
        } else {
            1.0
        }
    };
    let f = cross(lo.1, hi.1, ttft).min(cross(lo.2, hi.2, tpot));
    Some((lo.0 + f * (hi.0 - lo.0), lo.3 + f * (hi.3 - lo.3)))
}

/// Latency limits a plan must meet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// p99 time to first token, in ms.
    pub ttft_p99_ms: f64,
    /// p99 time per output token, in ms.
    pub tpot_p99_ms: f64,
}

impl Limits {
    /// Whether a simulated point meets the limits (with every request finished; a point
    /// without TPOT samples, one-token outputs, meets the TPOT limit).
    pub fn within(&self, p: &SimPoint) -> bool {
        p.unfinished == 0
            && p.ttft_ms.as_ref().is_some_and(|s| s.p99 <= self.ttft_p99_ms)
            && p.tpot_ms.as_ref().is_none_or(|s| s.p99 <= self.tpot_p99_ms)
    }
}

/// The simulated traffic and its routing.
#[derive(Clone, Copy, Debug)]
pub struct SimSettings {
    /// Prompt / output lengths instead of the traced mix (None: resampled from the traces).
    pub prompt_tokens: Option<Dist>,
    pub output_tokens: Option<Dist>,
    /// Simulated requests per load point of the curve and of the bisections.
    pub requests: usize,
    pub seed: u64,
    /// Prompts begin with this many identical tokens (one system prompt for all traffic).
    pub shared_prefix: usize,
    /// Route with prefix affinity (`coordinator.prefix_affinity`).
    pub prefix_affinity: bool,
}

/// The simulations of a plan for one kind of node ([`Fitted`]): one node's curve, the highest
/// rate it sustains within [`Limits`], the nodes needed for a rate, and the replay of a bench
/// report's load points.
pub struct Planner<'a> {
    fitted: &'a Fitted,
    tokenizer: Arc<Tokenizer>,
    settings: SimSettings,
}

/// The outcome of the node-count search.
#[derive(Clone, Debug)]
pub struct NodePlan {
    /// The smallest cluster found within the limits, as simulated at the target rate.
    pub plan: Option<SimPoint>,
    /// The largest cluster the search tries (4 times the linear estimate).
    pub max_nodes: usize,
}

impl<'a> Planner<'a> {
    /// Simulated engines use `tokenizer` (token ids only matter to prefix routing and stop
    /// handling; any tokenizer of a served model will do).
    pub fn new(fitted: &'a Fitted, tokenizer: Arc<Tokenizer>, settings: SimSettings) -> Self {
        Self {
            fitted,
            tokenizer,
            settings,
        }
    }

    fn mix(&self) -> Mix<'a> {
        Mix {
            f: self.fitted,
            prompt: self.settings.prompt_tokens,
            output: self.settings.output_tokens,
        }
    }

    fn simulate(&self, reqs: &[SimReq], nodes: usize, window: Option<(f64, f64)>) -> Result<SimPoint> {
        let opts = SimOpts {
            shared_prefix: self.settings.shared_prefix,
            prefix_affinity: self.settings.prefix_affinity,
        };
        simulate(self.fitted, reqs, nodes, window, &self.tokenizer, &opts)
    }

    /// One node flooded with 400 requests at once: its `achieved_rps` is the rate it
    /// saturates at (its time per request at full batches).
    pub fn saturation(&self) -> Result<SimPoint> {
        self.simulate(&self.mix().requests(1e6, None, 400, self.settings.seed), 1, None)
    }

    /// One node at each offered rate; `each` sees every point as soon as it is simulated.
    pub fn curve(&self, rates: &[f64], mut each: impl FnMut(f64, &SimPoint)) -> Result<Vec<SimPoint>> {
        let s = &self.settings;
        rates
            .iter()
            .enumerate()
            .map(|(i, &r)| {
                let p = self.simulate(&self.mix().requests(r, None, s.requests, s.seed + i as u64), 1, None)?;
                each(r, &p);
                Ok(p)
            })
            .collect()
    }

    /// The highest rate one node sustains within the limits: bisection between the highest
    /// `rates` point of `curve` within them and the next rate (or 1.5 times it). None when no
    /// point of the curve is within the limits.
    pub fn max_rate(&self, rates: &[f64], curve: &[SimPoint], limits: &Limits) -> Result<Option<f64>> {
        let s = &self.settings;
        let ok: Vec<f64> = rates
            .iter()
            .zip(curve)
            .filter(|(_, p)| limits.within(p))
            .map(|(r, _)| *r)
            .collect();
        let Some(&lo0) = ok.last() else {
            return Ok(None);
        };
        let (mut lo, mut hi) = (lo0, rates.iter().copied().find(|&r| r > lo0).unwrap_or(lo0 * 1.5));
        for k in 0..6 {
            let mid = (lo + hi) / 2.0;
            let p = self.simulate(&self.mix().requests(mid, None, s.requests, s.seed + 100 + k), 1, None)?;
            if limits.within(&p) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(lo))
    }

    /// The fewest nodes behind the router that carry `rate` within the limits, given one
    /// node's highest rate `per_node`: from the linear estimate, up (10 % steps, at most 4x) or
    /// down (pooling lets a cluster do better than N single nodes), then bisection. `each`
    /// sees every cluster size tried, its simulated point and whether it is within the limits.
    pub fn nodes_for(
        &self,
        rate: f64,
        per_node: f64,
        limits: &Limits,
        mut each: impl FnMut(usize, &SimPoint, bool),
    ) -> Result<NodePlan> {
        let s = &self.settings;
        let n0 = (rate / per_node).ceil().max(1.0) as usize;
        let mut plan: Option<SimPoint> = None;
        let mut check = |n: usize| -> Result<bool> {
            let p = self.simulate(
                &self.mix().requests(rate, None, s.requests.max(200 * n), s.seed + 7),
                n,
                None,
            )?;
            let good = limits.within(&p);
            each(n, &p, good);
            if good && plan.as_ref().is_none_or(|q| q.nodes > n) {
                plan = Some(p);
            }
            Ok(good)
        };
        let (mut lo, mut hi) = (0usize, None);
        if check(n0)? {
            hi = Some(n0);
            let mut m = n0;
            while m > 1 {
                m = ((m as f64) * 0.9) as usize;
                if check(m.max(1))? {
                    hi = Some(m.max(1));
                } else {
                    lo = m;
                    break;
                }
            }
        } else {
            lo = n0;
            let mut m = n0;
            while m < 4 * n0 {
                m += (m / 10).max(1);
                if check(m)? {
                    hi = Some(m);
                    break;
                }
                lo = m;
            }
        }
        if let Some(mut h) = hi {
            while h - lo > 1 {
                let mid = (lo + h) / 2;
                if check(mid)? {
                    h = mid;
                } else {
                    lo = mid;
                }
            }
        }
        Ok(NodePlan {
            plan,
            max_nodes: 4 * n0,
        })
    }

    /// One load point of a bench report (`point`, one of [`bench_points`]) simulated on
    /// `nodes` nodes: the point's own requests when it recorded them (`--per-request`: same
    /// send times and lengths) with throughput counted over its measurement window, else
    /// Poisson arrivals at its rate for its window. Returns the offered rate and the simulated
    /// point.
    pub fn validate_point(&self, bench: &Value, point: &Value, nodes: usize) -> Result<(f64, SimPoint)> {
        let p = point;
        let rate = p["load"]["rate"]
            .as_f64()
            .or_else(|| p["load"]["Rate"].as_f64())
            .or_else(|| p["sent_rps"].as_f64())
            .ok_or_else(|| {
                BenchError::BenchReport("a load point without a rate (validation needs open-loop points)".into())
            })?;
        let window = p["window_s"].as_f64().unwrap_or(30.0);
        let warmup = bench["warmup_s"].as_f64().unwrap_or(0.0);
        let mix = self.mix();
        let (reqs, win) = match p["requests"].as_array() {
            Some(records) if !records.is_empty() => {
                (mix.replay(records, self.settings.seed), (warmup, warmup + window))
            }
            _ => (mix.requests(rate, Some(window), 0, self.settings.seed), (0.0, window)),
        };
        Ok((rate, self.simulate(&reqs, nodes, Some(win))?))
    }
}

/// The offered rates of the default per-node curve: 12 rates from a tenth of the saturation
/// rate to 1.2 times it.
pub fn default_rates(saturation_rps: f64) -> Vec<f64> {
    (1..=12).map(|i| saturation_rps * i as f64 / 10.0).collect()
}

/// Reads an `rrt bench load --json` report.
pub fn read_bench(path: &Path) -> Result<Value> {
    serde_json::from_str(&read(path)?).map_err(|source| BenchError::Json {
        what: format!("{}: not `rrt bench load --json` output", path.display()),
        source,
    })
}

/// The load points of a bench report (or of a bare array of points).
pub fn bench_points(bench: &Value) -> Result<&[Value]> {
    bench["points"]
        .as_array()
        .or_else(|| bench.as_array())
        .map(Vec::as_slice)
        .ok_or_else(|| BenchError::BenchReport("no load points in the bench JSON".into()))
}

/// The fitted node of an `rrt capacity --json` report.
pub fn read_fitted(path: &Path) -> Result<Fitted> {
    let json = |source| BenchError::Json {
        what: format!("{}: not an `rrt capacity --json` report", path.display()),
        source,
    };
    let report: Value = serde_json::from_str(&read(path)?).map_err(json)?;
    serde_json::from_value(report["fitted"].clone()).map_err(json)
}

/// The highest offered rate within the limits, measured and predicted: each `(requests/s,
/// output tokens/s)`, None where the limits are not met, or never exceeded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateWithinLimits {
    pub measured: Option<(f64, f64)>,
    pub predicted: Option<(f64, f64)>,
}

/// From validated load points (measured, simulated), in rate order: the highest offered rate
/// within the limits, interpolated between load points, and the output throughput there.
pub fn rate_within_limits(validation: &[(Value, SimPoint)], limits: &Limits) -> RateWithinLimits {
    let measured: Vec<(f64, f64, f64, f64)> = validation
        .iter()
        .map(|(m, _)| {
            let r = m["load"]["rate"].as_f64().unwrap_or(0.0);
            let p99 = |k: &str| m[k]["p99"].as_f64().unwrap_or(f64::INFINITY);
            (
                r,
                p99("ttft_ms"),
                p99("tpot_ms"),
                m["output_tok_s"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let predicted: Vec<(f64, f64, f64, f64)> = validation
        .iter()
        .map(|(m, s)| {
            let p99 = |x: &Option<Stats>| x.as_ref().map_or(f64::INFINITY, |s| s.p99);
            (
                m["load"]["rate"].as_f64().unwrap_or(0.0),
                p99(&s.ttft_ms),
                p99(&s.tpot_ms),
                s.output_tok_s,
            )
        })
        .collect();
    RateWithinLimits {
        measured: max_within(&measured, limits.ttft_p99_ms, limits.tpot_p99_ms),
        predicted: max_within(&predicted, limits.ttft_p99_ms, limits.tpot_p99_ms),
    }
}

/// The `rrt capacity --json` report (`rrt bench sim-cluster --fitted` reads `fitted` back).
#[derive(Serialize)]
pub struct Report<'a> {
    pub fitted: &'a Fitted,
    /// One node's curve.
    pub curve: Vec<SimPoint>,
    pub max_rate_per_node: Option<f64>,
    /// The smallest cluster within the limits at the target rate.
    pub plan: Option<SimPoint>,
    /// Bench load points (as read) with their simulations.
    pub validation: Vec<(Value, SimPoint)>,
}

/// The SVG document of one node's curve (p99 TTFT and TPOT with the limits, and the
/// throughput) against the offered rate, up to `x_max`.
pub fn curve_svg(fitted: &Fitted, curve: &[SimPoint], x_max: f64, limits: &Limits) -> Result<String> {
    let pts = |g: fn(&SimPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        curve.iter().filter_map(|p| Some((p.offered_rps, g(p)?))).collect()
    };
    let chart = plot::LineChart {
        title: format!("One node (simulated from {} traced steps)", fitted.steps),
        x_label: "offered requests/s".into(),
        y_label: "ms".into(),
        log_y: true,
        series: vec![
            plot::Series {
                name: "TTFT p99".into(),
                points: pts(|p| p.ttft_ms.as_ref().map(|s| s.p99)),
                color: 0,
                ..Default::default()
            },
            plot::Series {
                name: "TPOT p99".into(),
                points: pts(|p| p.tpot_ms.as_ref().map(|s| s.p99)),
                color: 1,
                ..Default::default()
            },
            plot::Series {
                name: "TTFT limit".into(),
                points: vec![(0.0, limits.ttft_p99_ms), (x_max, limits.ttft_p99_ms)],
                dashed: true,
                color: 0,
            },
            plot::Series {
                name: "TPOT limit".into(),
                points: vec![(0.0, limits.tpot_p99_ms), (x_max, limits.tpot_p99_ms)],
                dashed: true,
                color: 1,
            },
        ],
    };
    let tput = plot::LineChart {
        title: "Throughput".into(),
        x_label: "offered requests/s".into(),
        y_label: "output tokens/s".into(),
        log_y: false,
        series: vec![plot::Series {
            name: "simulated".into(),
            points: pts(|p| Some(p.output_tok_s)),
            color: 2,
            ..Default::default()
        }],
    };
    Ok(plot::document(
        &[plot::Chart::Line(chart), plot::Chart::Line(tput)],
        560.0,
        380.0,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: CostModel = CostModel {
        intercept: 0.004,
        per_row: 0.0007,
        per_ctx: 0.000002,
        per_head_row: 0.0003,
        per_fill_row: 0.0002,
    };

    /// Spans of passes timed exactly by `COST`, 0.5 ms apart, with request spans and the
    /// node's settings.
    fn synthetic_trace() -> String {
        let mut out = String::new();
        let mut t = 1_000_000_000u64;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for i in 0..200 {
            let (d0, d1) = (rng.random_range(1..60usize), rng.random_range(0..30usize));
            let rows = d0 + d1;
            let ctx = rows * rng.random_range(5..200usize);
            let head = rng.random_range(0..rows.min(8) + 1);
            let fill = rng.random_range(0..4usize);
            let s = COST.intercept
                + COST.per_row * rows as f64
                + COST.per_ctx * ctx as f64
                + COST.per_head_row * head as f64
                + COST.per_fill_row * fill as f64;
            let end = t + (s * 1e9) as u64;
            out += &serde_json::json!({
                "name": "engine.step", "start_ns": t, "end_ns": end,
                "attributes": {"rows": rows, "rows_per_depth": format!("{d0},{d1}"), "ctx": ctx,
                    "head_rows": head, "fill_rows": fill, "tokens": head,
                    "exits_per_loop": if i % 4 == 0 { "1,0" } else { "0,1" }, "step_ms": s * 1e3},
            })
            .to_string();
            out.push('\n');
            t = end + 500_000;
        }
        for i in 0..10 {
            out += &serde_json::json!({"name": "request", "attributes": {"prompt_tokens": 20 + i, "tokens": 10}})
                .to_string();
            out.push('\n');
        }
        out += &serde_json::json!({"name": "node.start", "attributes": {"loops": 2, "kv_blocks": 500,
            "block_size": 16, "max_step_rows": 128, "max_running": 32}})
        .to_string();
        out + "\n"
    }

    #[test]
    fn the_rate_within_limits_is_interpolated() {
        let pts = [
            (1.0, 100.0, 10.0, 5.0),
            (2.0, 500.0, 30.0, 9.0),
            (3.0, 900.0, 50.0, 12.0),
        ];
        // TTFT reaches 700 halfway from 2 to 3; TPOT 45 three quarters of the way.
        assert_eq!(max_within(&pts, 700.0, 45.0), Some((2.5, 10.5)));
        assert_eq!(max_within(&pts, 700.0, 35.0), Some((2.25, 9.75)));
        assert_eq!(max_within(&pts, 50.0, 45.0), None);
        assert_eq!(max_within(&pts, 5000.0, 500.0), None);
    }

    #[test]
    fn fit_recovers_the_cost_model_and_the_mix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spans.jsonl");
        std::fs::write(&p, synthetic_trace()).unwrap();
        let f = fit(&[p], &FitOptions::default()).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 + 1e-3 * b.abs();
        // The intercept also carries the 0.5 ms between passes.
        assert!(close(f.cost.intercept, COST.intercept + 0.0005), "{:?}", f.cost);
        assert!(close(f.cost.per_row, COST.per_row), "{:?}", f.cost);
        assert!(close(f.cost.per_ctx, COST.per_ctx), "{:?}", f.cost);
        assert!(close(f.cost.per_head_row, COST.per_head_row), "{:?}", f.cost);
        assert!(close(f.cost.per_fill_row, COST.per_fill_row), "{:?}", f.cost);
        assert!(f.r2 > 0.999_999 && f.steps == 200);
        assert!((f.overhead_s - 0.0005).abs() < 1e-6);
        assert_eq!(
            (f.loops, f.kv_blocks, f.max_step_rows, f.max_running),
            (2, 500, 128, 32)
        );
        assert_eq!(f.exit_shares, vec![0.25, 0.75]);
        assert_eq!(f.prompt_lengths, (20..30).collect::<Vec<u32>>());
    }

    #[test]
    fn fit_says_what_is_wrong_with_the_traces() {
        let dir = tempfile::tempdir().unwrap();
        let few = dir.path().join("few.jsonl");
        let trace = synthetic_trace();
        std::fs::write(&few, trace.lines().take(5).collect::<Vec<_>>().join("\n")).unwrap();
        let e = fit(std::slice::from_ref(&few), &FitOptions::default()).unwrap_err();
        assert!(matches!(e, BenchError::NotEnoughSteps { found: 5 }), "{e}");
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, format!("{}\n{{not json\n", trace.lines().next().unwrap())).unwrap();
        let e = fit(std::slice::from_ref(&bad), &FitOptions::default()).unwrap_err();
        assert_eq!(e.to_string(), format!("{}:2: not a JSON span", bad.display()));
        let missing = dir.path().join("missing.jsonl");
        let e = fit(std::slice::from_ref(&missing), &FitOptions::default()).unwrap_err();
        assert!(matches!(&e, BenchError::Read { path, .. } if *path == missing), "{e}");
        // Only the chosen model's spans count; the synthetic ones name none.
        let all = dir.path().join("all.jsonl");
        std::fs::write(&all, &trace).unwrap();
        let only = FitOptions {
            model: Some("other".into()),
            ..Default::default()
        };
        assert!(matches!(
            fit(std::slice::from_ref(&all), &only),
            Err(BenchError::NotEnoughSteps { found: 0 })
        ));
        assert!(models_in(&[all]).unwrap().is_empty());
    }

    #[test]
    fn reports_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spans.jsonl");
        std::fs::write(&p, synthetic_trace()).unwrap();
        let f = fit(&[p], &FitOptions::default()).unwrap();
        let report = Report {
            fitted: &f,
            curve: Vec::new(),
            max_rate_per_node: None,
            plan: None,
            validation: Vec::new(),
        };
        let path = dir.path().join("capacity.json");
        std::fs::write(&path, serde_json::to_string(&report).unwrap()).unwrap();
        let back = read_fitted(&path).unwrap();
        assert_eq!(
            (back.cost.per_row, back.exit_shares),
            (f.cost.per_row, f.exit_shares.clone())
        );
        let e = read_fitted(&dir.path().join("spans.jsonl")).unwrap_err();
        assert!(e.to_string().ends_with("not an `rrt capacity --json` report"), "{e}");
        let bench = serde_json::json!({"points": [{"load": {"rate": 1.0}}]});
        assert_eq!(bench_points(&bench).unwrap().len(), 1);
        assert!(matches!(
            bench_points(&serde_json::json!({})),
            Err(BenchError::BenchReport(_))
        ));
    }

    /// One request alone: its first token takes one prefill pass, every other token one
    /// decode pass, timed exactly by the cost model (B = 1, no exits: nothing else runs).
    #[test]
    fn a_lone_request_takes_the_modelled_pass_times() {
        let cost = CostModel {
            intercept: 0.01,
            per_row: 0.001,
            per_ctx: 0.0001,
            per_head_row: 0.002,
            per_fill_row: 0.0,
        };
        let f = Fitted {
            cost,
            overhead_s: 0.0,
            r2: 1.0,
            mean_abs_rel_err: 0.0,
            steps: 0,
            loops: 1,
            kv_blocks: 100,
            block_size: 16,
            max_step_rows: 256,
            max_running: 8,
            prompt_lengths: vec![],
            output_lengths: vec![],
            exit_shares: vec![1.0],
        };
        let tok = Arc::new(
            rrt_model::loader::load_tokenizer(&rrt_model::default_model_path().expect("fetched model")).unwrap(),
        );
        let req = SimReq {
            arrival: 1.0,
            prompt: 20,
            output: 5,
            exits: vec![1; 5],
            measured: true,
        };
        let opts = SimOpts::default();
        let p = simulate(&f, &[req], 1, None, &tok, &opts).unwrap();
        // Prefill: 20 rows attending to 1..=20 positions, one head row.
        let prefill = 0.01 + 0.001 * 20.0 + 0.0001 * 210.0 + 0.002;
        // Decode at position 20 + i: one row attending to 21 + i positions.
        let decode = |i: f64| 0.01 + 0.001 + 0.0001 * (21.0 + i) + 0.002;
        let ttft = p.ttft_ms.unwrap();
        assert!((ttft.p50 - prefill * 1e3).abs() < 1e-6, "{ttft:?} vs {prefill}");
        let tpot = p.tpot_ms.unwrap();
        let want = (0..4).map(|i| decode(i as f64)).sum::<f64>() / 4.0;
        assert!((tpot.p50 - want * 1e3).abs() < 1e-6, "{tpot:?} vs {want}");
        assert_eq!((p.requests, p.unfinished), (1, 0));
        assert_eq!(p.mean_loops, 1.0);
    }

    /// Two nodes behind the router at a rate one node cannot carry: the router spreads the
    /// load and the pair keeps up where one node falls behind.
    #[test]
    fn the_router_spreads_load_over_simulated_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spans.jsonl");
        std::fs::write(&p, synthetic_trace()).unwrap();
        let f = fit(&[p], &FitOptions::default()).unwrap();
        let tok = Arc::new(
            rrt_model::loader::load_tokenizer(&rrt_model::default_model_path().expect("fetched model")).unwrap(),
        );
        let mix = Mix {
            f: &f,
            prompt: Some(Dist::Fixed(30)),
            output: Some(Dist::Fixed(20)),
        };
        let opts = SimOpts::default();
        let one = simulate(&f, &mix.requests(1e6, None, 200, 1), 1, None, &tok, &opts).unwrap();
        let rate = one.achieved_rps * 1.5;
        let reqs = mix.requests(rate, None, 300, 2);
        let single = simulate(&f, &reqs, 1, None, &tok, &opts).unwrap();
        let pair = simulate(&f, &reqs, 2, None, &tok, &opts).unwrap();
        let (s, d) = (single.ttft_ms.unwrap(), pair.ttft_ms.unwrap());
        assert!(
            d.p99 * 3.0 < s.p99,
            "two nodes: TTFT p99 {} ms, one node {} ms",
            d.p99,
            s.p99
        );
        assert!(pair.achieved_rps > single.achieved_rps * 1.2);
        assert_eq!(pair.unfinished, 0);
    }
}
