//! `rrt calibrate`: per-loop early-exit thresholds of a recursive checkpoint.

use super::ModelArg;
use anyhow::{Context, Result, bail};
use rrt_model::exit::{
    Criterion, calibrate, calibrate_for_loops, collect_samples_with, self_generated, trace_loops_with,
};
use rrt_model::exit_fit::{FitOptions, fit_gate};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CriterionArg {
    MaxProb,
    Margin,
    Saturation,
    /// The model's learned exit gate (Ouro, or a checkpoint trained with `--exit-gate`).
    Gate,
}

/// Defaults of `--self-generated-prompt` and `--self-generated-tokens`.
pub const SELF_GENERATED_PROMPT: usize = 32;
pub const SELF_GENERATED_TOKENS: usize = 160;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Calibration text.
    #[arg(long)]
    pub text: PathBuf,
    /// Target rate at which exited tokens agree with the full-depth prediction.
    #[arg(long, default_value_t = 0.95)]
    pub agreement: f64,
    /// Also report (never write) the calibration for these targets, from the same samples
    /// (with --json: one line per target, --agreement first).
    #[arg(long, value_delimiter = ',')]
    pub also_agreement: Vec<f64>,
    /// Calibrate to a compute budget instead of --agreement: the highest agreement target
    /// whose expected mean loops per token on the calibration tokens stay within this many
    /// (at least 1). Speed follows mean loops (BENCHMARKS.md, "The exit frontier").
    #[arg(long)]
    pub mean_loops: Option<f64>,
    /// Exit criterion (default: max-prob; gate with --fit-gate).
    #[arg(long, value_enum)]
    pub criterion: Option<CriterionArg>,
    /// Fit the exit gate to the calibration text before calibrating it: a logistic regression
    /// of "this loop's top-1 already equals the last loop's" on the loop's state (one dot
    /// product per token, as the engine evaluates it), written into the checkpoint in place of
    /// any gate it had. Works on checkpoints trained without a gate; implies --criterion gate.
    #[arg(long)]
    pub fit_gate: bool,
    /// Ridge penalty of --fit-gate on the standardised gate weights.
    #[arg(long, default_value_t = FitOptions::default().l2, requires = "fit_gate")]
    pub gate_l2: f64,
    /// Tokens of the text to use.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Also calibrate on the checkpoint's own greedy continuations (served decode runs on
    /// them, and they are easier than real text): this many prompts cut from the text at
    /// evenly spaced offsets, each continued by the checkpoint at full depth; prompts and
    /// continuations are appended to the --tokens of real text. 0: real text only.
    #[arg(long, default_value_t = 0)]
    pub self_generated: usize,
    /// Tokens of each --self-generated prompt.
    #[arg(long, default_value_t = SELF_GENERATED_PROMPT)]
    pub self_generated_prompt: usize,
    /// Most tokens of each --self-generated continuation (it stops at an end-of-generation
    /// token, as a served request does).
    #[arg(long, default_value_t = SELF_GENERATED_TOKENS)]
    pub self_generated_tokens: usize,
    /// Print the result without writing it into the checkpoint.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print nothing but the progress bar (callers that report themselves).
    #[arg(skip)]
    pub quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    for &t in std::iter::once(&a.agreement).chain(&a.also_agreement) {
        if !(t > 0.0 && t <= 1.0) {
            bail!("--agreement must be in (0, 1], got {t}");
        }
    }
    if let Some(l) = a.mean_loops
        && !(l.is_finite() && l >= 1.0)
    {
        bail!("--mean-loops must be a number of loops, at least 1, got {l}");
    }
    let dir = a.model.path()?;
    let mut cfg = rrt_model::checkpoint::read_config(&dir)
        .with_context(|| format!("{} is not a recursive checkpoint", dir.display()))?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let lm = a.model.load()?;
    let criterion = match (a.criterion, a.fit_gate) {
        (None, false) | (Some(CriterionArg::MaxProb), false) => Criterion::MaxProb,
        (Some(CriterionArg::Margin), false) => Criterion::Margin,
        (Some(CriterionArg::Saturation), false) => Criterion::Saturation,
        (None | Some(CriterionArg::Gate), _) => Criterion::Gate,
        (Some(c), true) => bail!("--fit-gate fits the gate criterion, not --criterion {c:?}"),
    };
    let mut ids = lm.tokenizer.encode(&text, false, false)?;
    ids.truncate(a.tokens);
    // The checkpoint's own continuations, appended to the real text.
    let own_tokens = if a.self_generated > 0 {
        let spin = indicatif::ProgressBar::new_spinner().with_message(format!(
            "decoding {} continuations of up to {} tokens",
            a.self_generated, a.self_generated_tokens
        ));
        spin.enable_steady_tick(std::time::Duration::from_millis(200));
        let own = self_generated(
            &lm,
            &ids,
            a.self_generated,
            a.self_generated_prompt,
            a.self_generated_tokens,
        )?;
        spin.finish_and_clear();
        if !a.quiet {
            eprintln!(
                "appended {} self-generated tokens ({} prompts of {} tokens and their continuations) to {} tokens of text",
                own.len(),
                a.self_generated,
                a.self_generated_prompt,
                ids.len()
            );
        }
        ids.extend_from_slice(&own);
        own.len()
    } else {
        0
    };
    let ids = &ids[..];
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} calibrating exits: window {pos}/{len} of 256 tokens [{elapsed_precise} < {eta}] {wide_bar}",
        )
        .expect("valid template"),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (samples, fitted) = if a.fit_gate {
        let trace = trace_loops_with(&lm, ids, 256, progress)?;
        bar.finish_and_clear();
        let fit = fit_gate(
            &trace,
            FitOptions {
                l2: a.gate_l2,
                ..FitOptions::default()
            },
        )?;
        if !a.quiet {
            eprintln!(
                "fitted the exit gate on {} loop states ({:.1} % agreeing): cross-entropy {:.4}, accuracy {:.4}, {} Newton steps",
                fit.samples,
                100.0 * fit.agree_rate,
                fit.cross_entropy,
                fit.accuracy,
                fit.iterations
            );
        }
        (trace.gate_samples(&fit.gate), Some(fit))
    } else {
        let s = collect_samples_with(&lm, ids, 256, criterion, progress)?;
        bar.finish_and_clear();
        (s, None)
    };
    let (target, c) = match a.mean_loops {
        Some(l) => {
            let (t, c) = calibrate_for_loops(&samples, l)
                .with_context(|| format!("no calibration keeps within {l} mean loops on these tokens"))?;
            if !a.quiet && !a.json {
                eprintln!("within {l} mean loops: target agreement {t}");
            }
            (t, c)
        }
        None => (a.agreement, calibrate(&samples, a.agreement)),
    };
    for (i, &t) in std::iter::once(&target).chain(&a.also_agreement).enumerate() {
        let ci = if i == 0 { c.clone() } else { calibrate(&samples, t) };
        if a.quiet {
            continue;
        } else if a.json {
            println!("{}", serde_json::to_string(&ci)?);
        } else {
            print_table(&ci, criterion, t);
        }
    }
    if !a.dry_run {
        if let Some(fit) = &fitted {
            drop(lm);
            cfg = rrt_model::checkpoint::write_exit_gate(&dir, &fit.gate)?;
        }
        cfg.exit = rrt_model::checkpoint::ExitConfig {
            criterion: Some(criterion),
            thresholds: c.thresholds.clone(),
            target_agreement: Some(target),
            calibration: serde_json::json!({
                "text": a.text.display().to_string(),
                "tokens": c.tokens,
                "expected_exit_fraction": c.exit_fraction,
                "expected_mean_loops": c.mean_loops,
                "mean_loops_budget": a.mean_loops,
                "fitted_gate": fitted,
                "self_generated": (a.self_generated > 0).then(|| serde_json::json!({
                    "prompts": a.self_generated,
                    "prompt_tokens": a.self_generated_prompt,
                    "max_tokens": a.self_generated_tokens,
                    "tokens": own_tokens,
                })),
            }),
        };
        rrt_model::checkpoint::write_config(&dir, &cfg)?;
        eprintln!(
            "wrote the thresholds into {}",
            dir.join(rrt_model::checkpoint::CONFIG_FILE).display()
        );
    }
    Ok(())
}

fn print_table(c: &rrt_model::exit::Calibrated, criterion: Criterion, target: f64) {
    println!(
        "criterion {}, target agreement {}, {} tokens",
        criterion.name(),
        target,
        c.tokens
    );
    println!("{:>5} {:>12} {:>14}", "loop", "threshold", "exit fraction");
    for (b, f) in c.exit_fraction.iter().enumerate() {
        let t = match c.thresholds.get(b) {
            Some(Some(t)) => format!("{t:.4}"),
            Some(None) => "never".to_string(),
            None => "(last)".to_string(),
        };
        println!("{:>5} {:>12} {:>14.4}", b + 1, t, f);
    }
    println!(
        "mean loops per token {:.3} of {}; agreement with full depth {:.4}",
        c.mean_loops,
        c.exit_fraction.len(),
        c.agreement
    );
}
