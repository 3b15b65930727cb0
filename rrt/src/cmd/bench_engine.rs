//! `rrt bench engine`: throughput and time per output token of the node engine on the same
//! requests under these settings:
//!
//! - (a) the vanilla model, continuous sequence-wise batching;
//! - (b) the recursive checkpoint, sequence-wise batching (all loops before new work);
//! - (c) the checkpoint with continuous depth-wise batching;
//! - (d) (c) with early exit at the checkpoint's calibrated thresholds;
//! - (e) (c) with oracle exit: each token leaves at the first loop whose argmax equals the
//!   final one (measured beforehand on (c)'s outputs, replayed as a per-request schedule);
//! - (m) (c) with a replayed exit mix: each token leaves after loop `b` with the probability
//!   `--exit-mix` gives loop `b` (seeded draws, the same for every run): the gate exits of a
//!   natively looped model (Ouro) at a known exit pattern, with random weights.
//!
//! Requests are closed-loop at each concurrency: `c` in flight, a new one submitted as soon as
//! one finishes. Prompts are cut from tinyshakespeare; greedy, `ignore_eos`, so every setting
//! generates the same number of tokens.

use super::ModelArg;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rrt_kernels::CpuBackend;
use rrt_model::LoadedModel;
use rrt_node::{Batching, Engine, EngineConfig, Event, ExitRule, GenParams, KvFill, Request, ResidentModel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct EngineArgs {
    /// The vanilla model (setting a).
    #[command(flatten)]
    pub model: ModelArg,
    /// The relaxed recursive checkpoint (settings b-e; d needs calibrated thresholds).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Settings to run, from a, b, c, d, e, m.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    pub settings: Vec<String>,
    /// Concurrency levels (requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level (default: max(8, 2 x concurrency)).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Prompt lengths in tokens, cycled over the requests.
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub prompt_tokens: Vec<usize>,
    /// Output lengths in tokens, cycled over the requests (coprime with the prompt mix).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub max_tokens: Vec<usize>,
    /// Rows per pass (the per-step token budget).
    #[arg(long, default_value_t = 256)]
    pub max_step_rows: usize,
    /// How exited tokens get their deeper keys/values.
    #[arg(long, value_enum, default_value = "propagate")]
    pub kv_fill: FillArg,
    /// Prompt tokens take the gate's exit test too (`node.prompt_exits`; gate criterion).
    #[arg(long)]
    pub prompt_exits: bool,
    /// Text the prompts are cut from (default: ../shared/data/tinyshakespeare.txt).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// The vanilla model at the checkpoint's weight precision (a `rrt convert --loops 1
    /// --lora-rank 0` directory: f32 weights), run as setting "a32" next to (a).
    #[arg(long)]
    pub baseline_f32: Option<PathBuf>,
    /// Runs per setting and concurrency; the fastest is reported (the host is noisy).
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `cpu`, `cuda` or `cuda:N`: the engine's backend (CUDA needs a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: rrt_node::Device,
    /// Run every setting's requests on the CPU backend too and compare the greedy tokens (with
    /// a GPU `--device`; with `cpu` it checks the engine's determinism). A request may diverge only where the CPU model's two candidate
    /// logits are a near tie (gap under `--tie-tolerance` logit standard deviations); any
    /// other divergence fails the command.
    #[arg(long)]
    pub compare_cpu: bool,
    /// Setting (m)'s exit pattern: the fraction of tokens leaving after each loop, e.g.
    /// `0.4,0.3,0.2,0.1` (one per loop; normalised).
    #[arg(long, value_delimiter = ',')]
    pub exit_mix: Vec<f64>,
    /// Weight precision on a GPU `--device` (`bf16` or `f16`; f32 accumulation either way).
    #[arg(long, default_value = "bf16")]
    pub gpu_weights: String,
    /// Largest logit gap, in standard deviations of the row's logits, accepted as a near tie.
    #[arg(long, default_value_t = 0.02)]
    pub tie_tolerance: f64,
}

/// The device's tokens against the CPU backend's, for one setting and concurrency.
#[derive(serde::Serialize, Clone, Debug)]
struct Comparison {
    setting: String,
    concurrency: usize,
    requests: usize,
    identical: usize,
    /// Tokens equal before each request's first divergence, over all tokens.
    matched_tokens: usize,
    tokens: usize,
    /// Per diverging request: (request, position, logit gap / logit std at the CPU model).
    divergences: Vec<(usize, usize, f64)>,
    /// Divergences that are not near ties.
    failures: usize,
}

/// Compares `dev` with `cpu` outputs; a divergence is explained by the CPU model's logits at
/// that position (teacher-forced on the CPU tokens): the gap between the CPU's token and the
/// device's, in standard deviations of the logits.
fn compare_outputs(
    lm: &LoadedModel,
    setting: &str,
    c: usize,
    reqs: &[(Vec<u32>, usize)],
    dev: &[Vec<u32>],
    cpu: &[Vec<u32>],
    tol: f64,
) -> Result<Comparison> {
    let mut r = Comparison {
        setting: setting.to_string(),
        concurrency: c,
        requests: reqs.len(),
        identical: 0,
        matched_tokens: 0,
        tokens: 0,
        divergences: Vec::new(),
        failures: 0,
    };
    let vocab = lm.model.config.vocab;
    for (i, ((prompt, _), (d, h))) in reqs.iter().zip(dev.iter().zip(cpu)).enumerate() {
        r.tokens += h.len();
        let j = d.iter().zip(h).take_while(|(a, b)| a == b).count();
        r.matched_tokens += j;
        if j == h.len() && d.len() == h.len() {
            r.identical += 1;
            continue;
        }
        if j >= d.len().min(h.len()) {
            // One output is a prefix of the other: a length difference, never a tie.
            r.divergences.push((i, j, f64::INFINITY));
            r.failures += 1;
            continue;
        }
        let mut seq = prompt.clone();
        seq.extend_from_slice(&h[..j]);
        let logits = lm.model.sequence_logits(&seq, &[seq.len() - 1])?;
        let row = &logits[..vocab];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / vocab as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / vocab as f64;
        let gap = (row[h[j] as usize] as f64 - row[d[j] as usize] as f64) / var.sqrt().max(1e-30);
        // A NaN gap (no logit spread) is not a near tie either.
        let near_tie = gap.abs() <= tol;
        if !near_tie {
            r.failures += 1;
        }
        r.divergences.push((i, j, gap));
    }
    Ok(r)
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FillArg {
    Propagate,
    Recompute,
}

#[derive(serde::Serialize, Clone)]
struct Line {
    setting: String,
    concurrency: usize,
    requests: usize,
    output_tokens: usize,
    wall_s: f64,
    tok_s: f64,
    /// Mean over requests of (finish - first token) / (tokens - 1), ms.
    tpot_ms: f64,
    /// Mean time to first token, ms.
    ttft_ms: f64,
    mean_loops: f64,
    /// LM-head rows per output token (decoding + softmax exit tests).
    head_rows_per_token: f64,
    passes: u64,
    preemptions: u64,
    /// ms per row of one loop of the shared block / of the LM head (so the cost of a softmax
    /// exit test in loops is their ratio).
    loop_row_ms: f64,
    head_row_ms: f64,
    /// Share of engine compute time spent in the LM head.
    head_share: f64,
}

fn default_text() -> PathBuf {
    let here = PathBuf::from("../shared/data/tinyshakespeare.txt");
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt")
}

/// The benchmark's requests: prompt ids and output lengths.
fn requests(
    tok: &rrt_model::tokenizer::Tokenizer,
    text: &str,
    n: usize,
    prompts: &[usize],
    outs: &[usize],
) -> Result<Vec<(Vec<u32>, usize)>> {
    let ids = tok.encode(&text[..text.len().min(400_000)], false, false)?;
    let longest = prompts.iter().copied().max().unwrap_or(1);
    if ids.len() < longest + n {
        bail!("the text is too short for {n} prompts of {longest} tokens");
    }
    Ok((0..n)
        .map(|i| {
            let len = prompts[i % prompts.len()];
            let start = (i * 7919) % (ids.len() - len);
            (ids[start..start + len].to_vec(), outs[i % outs.len()])
        })
        .collect())
}

fn load_model(path: &std::path::Path) -> Result<LoadedModel> {
    rrt_model::load(path).with_context(|| format!("loading {}", path.display()))
}

/// Runs `reqs` through a fresh engine at concurrency `c`; returns the measurement and every
/// request's output ids.
/// [`run_setting`] on the backend of `device` (`f16`: f16 weights on a GPU, else bf16).
#[allow(clippy::too_many_arguments)]
fn run_on(
    device: rrt_node::Device,
    f16: bool,
    name: &str,
    lm: LoadedModel,
    cfg: EngineConfig,
    reqs: &[(Vec<u32>, usize)],
    schedules: Option<&[Vec<u8>]>,
    c: usize,
) -> Result<(Line, Vec<Vec<u32>>)> {
    match device {
        rrt_node::Device::Cpu => run_setting(CpuBackend, name, lm, cfg, reqs, schedules, c),
        rrt_node::Device::Cuda(n) => {
            #[cfg(feature = "cuda")]
            {
                let wt = if f16 {
                    rrt_kernels::cuda::WeightType::F16
                } else {
                    rrt_kernels::cuda::WeightType::Bf16
                };
                let b = rrt_kernels::cuda::CudaBackend::with_weight_type(n, wt)
                    .map_err(|e| anyhow::anyhow!("cuda:{n}: {e}"))?;
                run_setting(b, name, lm, cfg, reqs, schedules, c)
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = f16;
                bail!(
                    "--device cuda:{n}: this rrt was built without CUDA support (cargo build --release --features cuda)"
                )
            }
        }
    }
}

fn run_setting<B: rrt_kernels::Backend>(
    backend: B,
    name: &str,
    lm: LoadedModel,
    cfg: EngineConfig,
    reqs: &[(Vec<u32>, usize)],
    schedules: Option<&[Vec<u8>]>,
    c: usize,
) -> Result<(Line, Vec<Vec<u32>>)> {
    let tok = Arc::new(lm.tokenizer.clone());
    let mut eng: Engine<B> = Engine::new(ResidentModel::new(backend, lm.model)?, tok, cfg)?;
    let bar = ProgressBar::new(reqs.len() as u64).with_style(
        ProgressStyle::with_template("{prefix:>12} c={msg} [{bar:30}] {pos}/{len} requests")?.progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar.set_message(c.to_string());
    let mut next = 0usize;
    let mut ids: HashMap<u64, usize> = HashMap::new();
    let mut first: HashMap<usize, Instant> = HashMap::new();
    let mut submitted: HashMap<usize, Instant> = HashMap::new();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    let mut tpot = Vec::new();
    let mut ttft = Vec::new();
    let mut loops = 0usize;
    let t0 = Instant::now();
    let mut done = 0usize;
    while done < reqs.len() {
        while ids.len() < c && next < reqs.len() {
            let (prompt, max_tokens) = &reqs[next];
            let mut params = GenParams {
                max_tokens: *max_tokens,
                ignore_eos: true,
                ..Default::default()
            };
            params.exit.schedule = schedules.map(|s| s[next].clone());
            let id = eng.submit(Request {
                prompt: prompt.clone(),
                params,
            })?;
            ids.insert(id, next);
            submitted.insert(next, Instant::now());
            next += 1;
        }
        for (id, e) in eng.step()? {
            let i = ids[&id];
            match e {
                Event::Token(t) => {
                    first.entry(i).or_insert_with(Instant::now);
                    outputs[i].push(t.id);
                }
                Event::Done { usage, .. } => {
                    let now = Instant::now();
                    let f = first[&i];
                    ttft.push((f - submitted[&i]).as_secs_f64());
                    if usage.completion_tokens > 1 {
                        tpot.push((now - f).as_secs_f64() / (usage.completion_tokens - 1) as f64);
                    }
                    loops += usage.loops;
                    ids.remove(&id);
                    done += 1;
                    bar.inc(1);
                }
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let toks: usize = outputs.iter().map(Vec::len).sum();
    let st = eng.stats();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok((
        Line {
            setting: name.to_string(),
            concurrency: c,
            requests: reqs.len(),
            output_tokens: toks,
            wall_s: wall,
            tok_s: toks as f64 / wall,
            tpot_ms: 1e3 * mean(&tpot),
            ttft_ms: 1e3 * mean(&ttft),
            mean_loops: loops as f64 / toks.max(1) as f64,
            head_rows_per_token: st.head_rows as f64 / st.tokens.max(1) as f64,
            passes: st.passes,
            preemptions: st.preemptions,
            loop_row_ms: 1e3 * st.per_row_costs().0,
            head_row_ms: 1e3 * st.per_row_costs().1,
            head_share: st.head_seconds / (st.head_seconds + st.pass_seconds).max(1e-9),
        },
        outputs,
    ))
}

/// Per request, the loops each output token runs, drawn from `mix` (fractions per loop).
fn mix_schedules(reqs: &[(Vec<u32>, usize)], mix: &[f64], seed: u64) -> Vec<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let total: f64 = mix.iter().sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    reqs.iter()
        .map(|(_, n)| {
            (0..*n)
                .map(|_| {
                    let mut u = rng.random_range(0.0..total);
                    let mut l = mix.len();
                    for (i, f) in mix.iter().enumerate() {
                        if u < *f {
                            l = i + 1;
                            break;
                        }
                        u -= f;
                    }
                    l as u8
                })
                .collect()
        })
        .collect()
}

/// Oracle exit loops of each output token: the first loop whose argmax equals the last
/// loop's, on the full-depth outputs (teacher-forced through the host forward pass).
fn oracle_schedules(lm: &LoadedModel, reqs: &[(Vec<u32>, usize)], outputs: &[Vec<u32>]) -> Result<Vec<Vec<u8>>> {
    let m = &lm.model;
    let bar = ProgressBar::new(reqs.len() as u64);
    bar.set_message("oracle exits");
    let mut out = Vec::with_capacity(reqs.len());
    for ((prompt, _), outs) in reqs.iter().zip(outputs) {
        let mut seq = prompt.clone();
        seq.extend_from_slice(&outs[..outs.len().saturating_sub(1)]);
        out.push(rrt_model::exit::oracle_loops(m, &seq, prompt.len() - 1..seq.len())?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

pub fn run(a: EngineArgs) -> Result<()> {
    let want = |s: &str| a.settings.iter().any(|x| x == s);
    let needs_ckpt = ["b", "c", "d", "e", "m"].iter().any(|s| want(s));
    if want("m")
        && (a.exit_mix.is_empty()
            || a.exit_mix.iter().any(|f| f.is_nan() || *f < 0.0)
            || a.exit_mix.iter().sum::<f64>() <= 0.0)
    {
        bail!("setting m needs --exit-mix with one non-negative fraction per loop, e.g. 0.4,0.3,0.2,0.1");
    }
    if needs_ckpt && a.checkpoint.is_none() {
        bail!("settings b-e need --checkpoint DIR (a relaxed recursive checkpoint from `rrt convert`)");
    }
    let vanilla_path = a.model.path()?;
    let text_path = a.text.clone().unwrap_or_else(default_text);
    let text = std::fs::read_to_string(&text_path).with_context(|| format!("reading {}", text_path.display()))?;
    // Only the tokenizer cuts the prompts (the checkpoint's when there is one: no weights read).
    let tok_path = a.checkpoint.clone().unwrap_or_else(|| vanilla_path.clone());
    let probe = rrt_model::loader::load_tokenizer(&tok_path)
        .with_context(|| format!("reading the tokenizer of {}", tok_path.display()))?;
    let exit_rule = match &a.checkpoint {
        Some(d) if want("d") => {
            let r = ExitRule::from_checkpoint(d)?;
            if r.is_none() {
                bail!(
                    "{} has no calibrated exit thresholds (run `rrt calibrate --model {0}` first) or drop setting d",
                    d.display()
                );
            }
            r
        }
        _ => None,
    };
    let fill = match a.kv_fill {
        FillArg::Propagate => KvFill::Propagate,
        FillArg::Recompute => KvFill::Recompute,
    };
    let base = EngineConfig {
        max_step_rows: a.max_step_rows,
        max_running: a.concurrency.iter().copied().max().unwrap_or(1).max(1),
        kv_fill: fill,
        prompt_exits: a.prompt_exits,
        ..Default::default()
    };
    let f16 = match a.gpu_weights.as_str() {
        "bf16" => false,
        "f16" => true,
        other => bail!("--gpu-weights {other}: expected bf16 or f16"),
    };
    let mut lines: Vec<Line> = Vec::new();
    let mut comparisons: Vec<Comparison> = Vec::new();
    for &c in &a.concurrency {
        let n = a.requests.unwrap_or((2 * c).max(8));
        let reqs = requests(&probe, &text, n, &a.prompt_tokens, &a.max_tokens)?;
        let mut c_outputs: Option<Vec<Vec<u32>>> = None;
        for s in ["a", "a32", "b", "c", "d", "e", "m"] {
            if s == "a32" && a.baseline_f32.is_none() {
                continue;
            }
            if s != "a32" && !want(s) && !(s == "c" && want("e")) {
                continue;
            }
            let (path, cfg) = match s {
                "a" => (&vanilla_path, base.clone()),
                "a32" => (a.baseline_f32.as_ref().unwrap(), base.clone()),
                "b" => (
                    a.checkpoint.as_ref().unwrap(),
                    EngineConfig {
                        batching: Batching::SequenceWise,
                        ..base.clone()
                    },
                ),
                "d" => (
                    a.checkpoint.as_ref().unwrap(),
                    EngineConfig {
                        exit: exit_rule.clone(),
                        ..base.clone()
                    },
                ),
                _ => (a.checkpoint.as_ref().unwrap(), base.clone()),
            };
            let schedules = if s == "e" {
                let host = load_model(path)?;
                let c_out = c_outputs.as_ref().expect("c runs before e");
                Some(oracle_schedules(&host, &reqs, c_out)?)
            } else if s == "m" {
                Some(mix_schedules(&reqs, &a.exit_mix, 20_261_204))
            } else {
                None
            };
            let mut best: Option<(Line, Vec<Vec<u32>>)> = None;
            for _ in 0..a.reps.max(1) {
                let lm = load_model(path)?;
                let r = run_on(a.device, f16, s, lm, cfg.clone(), &reqs, schedules.as_deref(), c)?;
                if best.as_ref().is_none_or(|b| r.0.tok_s > b.0.tok_s) {
                    best = Some(r);
                }
            }
            let (line, outs) = best.expect("at least one run");
            if a.compare_cpu && want(s) {
                let (_, cpu_outs) = run_on(
                    rrt_node::Device::Cpu,
                    false,
                    s,
                    load_model(path)?,
                    cfg.clone(),
                    &reqs,
                    schedules.as_deref(),
                    c,
                )?;
                let host = load_model(path)?;
                let cmp = compare_outputs(&host, s, c, &reqs, &outs, &cpu_outs, a.tie_tolerance)?;
                eprintln!(
                    "{} c={} vs cpu: {}/{} requests identical, {}/{} tokens before divergence, {} failure(s)",
                    s, c, cmp.identical, cmp.requests, cmp.matched_tokens, cmp.tokens, cmp.failures
                );
                comparisons.push(cmp);
            }
            if s == "c" {
                c_outputs = Some(outs);
            }
            if want(s) || s == "a32" {
                if a.json {
                    println!("{}", serde_json::to_string(&line)?);
                } else {
                    eprintln!(
                        "{} c={} {:.1} tok/s, {:.1} ms/token, mean loops {:.2}",
                        s, c, line.tok_s, line.tpot_ms, line.mean_loops
                    );
                }
                lines.push(line);
            }
        }
    }
    if !a.json {
        print_table(&lines);
    }
    if !comparisons.is_empty() {
        if a.json {
            for cmp in &comparisons {
                println!("{}", serde_json::to_string(cmp)?);
            }
        } else {
            print_comparisons(&comparisons, a.tie_tolerance);
        }
        let bad: usize = comparisons.iter().map(|c| c.failures).sum();
        if bad > 0 {
            bail!("{bad} request(s) diverge from the CPU backend where the CPU model has no near tie");
        }
    }
    Ok(())
}

fn print_comparisons(cmps: &[Comparison], tol: f64) {
    println!(
        "\n| setting | concurrency | requests identical | tokens before divergence | divergences (request@position: gap/std) | beyond tie tolerance {tol} |"
    );
    println!("|---|---:|---:|---:|---|---:|");
    for c in cmps {
        let divs: Vec<String> = c
            .divergences
            .iter()
            .take(6)
            .map(|(r, p, g)| format!("{r}@{p}: {g:.4}"))
            .collect();
        println!(
            "| ({}) | {} | {}/{} | {}/{} | {}{} | {} |",
            c.setting,
            c.concurrency,
            c.identical,
            c.requests,
            c.matched_tokens,
            c.tokens,
            divs.join(", "),
            if c.divergences.len() > 6 { ", ..." } else { "" },
            c.failures
        );
    }
}

fn print_table(lines: &[Line]) {
    println!(
        "| setting | concurrency | requests | out tokens | tok/s | TPOT ms | TTFT ms | mean loops | head rows/token | LM head share | head row / loop row | vs (a) | vs (a32) | vs (b) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for l in lines {
        let vs = |name: &str| {
            lines
                .iter()
                .find(|b| b.setting == name && b.concurrency == l.concurrency)
                .map(|b| format!("{:.2}x", l.tok_s / b.tok_s))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "| ({}) | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0}% | {:.1} | {} | {} | {} |",
            l.setting,
            l.concurrency,
            l.requests,
            l.output_tokens,
            l.tok_s,
            l.tpot_ms,
            l.ttft_ms,
            l.mean_loops,
            l.head_rows_per_token,
            100.0 * l.head_share,
            l.head_row_ms / l.loop_row_ms.max(1e-12),
            vs("a"),
            vs("a32"),
            vs("b")
        );
    }
}
