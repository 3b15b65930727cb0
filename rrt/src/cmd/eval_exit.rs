//! `rrt eval-exit`: what early exit costs in quality when served by the engine, and how the two
//! ways of filling an exited token's missing keys/values compare.
//!
//! Each window of the text is split into a prompt and a continuation; the engine scores the
//! continuation by teacher forcing (every window in flight at once). The full-depth run is the
//! reference; each exit run reports the perplexity of the continuation at the loops where
//! tokens exited, the top-1 agreement of those predictions with the full-depth ones and the
//! mean loops per token, under `propagate` and `recompute` KV fill.

use super::ModelArg;
use anyhow::{Context, Result, bail};
use rrt_kernels::CpuBackend;
use rrt_node::{Engine, EngineConfig, Event, ExitRule, GenParams, KvFill, Request, ResidentModel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// A relaxed recursive checkpoint.
    #[command(flatten)]
    pub model: ModelArg,
    /// Text to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window (prompt + scored continuation).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Prompt tokens at the start of each window (not scored).
    #[arg(long, default_value_t = 32)]
    pub prompt: usize,
    /// Number of windows.
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    /// Exit rule: `oracle` (first loop whose argmax equals the last loop's, measured on the
    /// text), `calibrated` (the checkpoint's thresholds) or a max-prob threshold for all loops.
    #[arg(long, default_value = "oracle")]
    pub exit: String,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
    /// In the exit runs, let the prompt's tokens exit too (`node.prompt_exits`; gate
    /// criterion, propagate fill): the continuation is then scored after a prompt prefilled
    /// at the loops its gate asks for.
    #[arg(long)]
    pub prompt_exits: bool,
}

#[derive(serde::Serialize)]
struct Line {
    run: String,
    ppl: f64,
    agreement: f64,
    mean_loops: f64,
    tokens: usize,
}

struct Scored {
    logprobs: Vec<f32>,
    top1: Vec<u32>,
    loops: Vec<usize>,
}

pub fn run(a: Args) -> Result<()> {
    if a.prompt == 0 || a.prompt >= a.window {
        bail!("--prompt must be in 1..{} (the window), got {}", a.window, a.prompt);
    }
    let path = a.model.path()?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let host = a.model.load()?;
    if host.model.loops() < 2 {
        bail!("{} is not a recursive checkpoint with at least 2 loops", path.display());
    }
    let ids = host.tokenizer.encode(&text, false, false)?;
    let wins: Vec<&[u32]> = ids.chunks_exact(a.window).take(a.windows).collect();
    if wins.is_empty() {
        bail!("the text has fewer than {} tokens", a.window);
    }
    // Oracle schedules from the host forward pass over each window.
    let m = &host.model;
    let oracle = wins
        .iter()
        .map(|w| rrt_model::exit::oracle_loops(m, w, a.prompt - 1..w.len() - 1))
        .collect::<rrt_model::Result<Vec<Vec<u8>>>>()?;
    let rule = match a.exit.as_str() {
        "oracle" => None,
        "calibrated" => Some(
            ExitRule::from_checkpoint(&path)?
                .with_context(|| format!("{} has no calibrated thresholds", path.display()))?,
        ),
        t => {
            let t: f32 = t
                .parse()
                .with_context(|| format!("--exit must be oracle, calibrated or a number, got {t}"))?;
            Some(ExitRule {
                criterion: rrt_model::exit::Criterion::MaxProb,
                thresholds: vec![Some(t); host.model.loops() - 1],
            })
        }
    };
    let score = |fill: KvFill, exits: bool| -> Result<Scored> {
        let lm = rrt_model::load(&path)?;
        let cfg = EngineConfig {
            kv_fill: fill,
            exit: if exits { rule.clone() } else { None },
            max_step_rows: 512,
            prompt_exits: exits && a.prompt_exits,
            ..Default::default()
        };
        let mut eng: Engine<CpuBackend> =
            Engine::new(ResidentModel::new(CpuBackend, lm.model)?, Arc::new(lm.tokenizer), cfg)?;
        let mut order = HashMap::new();
        for (i, w) in wins.iter().enumerate() {
            let mut params = GenParams {
                max_tokens: w.len() - a.prompt,
                ignore_eos: true,
                top_logprobs: 1,
                forced: Some(w[a.prompt..].to_vec()),
                ..Default::default()
            };
            if exits && rule.is_none() {
                params.exit.schedule = Some(oracle[i].clone());
            }
            let id = eng.submit(Request {
                prompt: w[..a.prompt].to_vec(),
                params,
            })?;
            order.insert(id, i);
        }
        let mut per: Vec<Scored> = (0..wins.len())
            .map(|_| Scored {
                logprobs: Vec::new(),
                top1: Vec::new(),
                loops: Vec::new(),
            })
            .collect();
        for (id, e) in eng.run_to_completion()? {
            if let Event::Token(t) = e {
                let s = &mut per[order[&id]];
                s.logprobs.push(t.logprob);
                s.top1.push(t.top_logprobs[0].0);
                s.loops.push(t.loops);
            }
        }
        Ok(Scored {
            logprobs: per.iter().flat_map(|s| s.logprobs.iter().copied()).collect(),
            top1: per.iter().flat_map(|s| s.top1.iter().copied()).collect(),
            loops: per.iter().flat_map(|s| s.loops.iter().copied()).collect(),
        })
    };
    let full = score(KvFill::Propagate, false)?;
    let summarize = |name: &str, s: &Scored| Line {
        run: name.to_string(),
        ppl: (-s.logprobs.iter().map(|&x| x as f64).sum::<f64>() / s.logprobs.len() as f64).exp(),
        agreement: s.top1.iter().zip(&full.top1).filter(|(a, b)| a == b).count() as f64 / s.top1.len() as f64,
        mean_loops: s.loops.iter().sum::<usize>() as f64 / s.loops.len() as f64,
        tokens: s.logprobs.len(),
    };
    let mut lines = vec![summarize("full depth", &full)];
    for (name, fill) in [("propagate", KvFill::Propagate), ("recompute", KvFill::Recompute)] {
        let s = score(fill, true)?;
        lines.push(summarize(&format!("exit {} + {name}", a.exit), &s));
    }
    if a.json {
        for l in &lines {
            println!("{}", serde_json::to_string(l)?);
        }
    } else {
        println!("| run | perplexity | top-1 agreement with full depth | mean loops | scored tokens |");
        println!("|---|---:|---:|---:|---:|");
        for l in &lines {
            println!(
                "| {} | {:.3} | {:.4} | {:.3} | {} |",
                l.run, l.ppl, l.agreement, l.mean_loops, l.tokens
            );
        }
    }
    Ok(())
}
