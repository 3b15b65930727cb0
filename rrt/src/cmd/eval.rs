//! `rrt eval`: perplexity over non-overlapping windows.

use super::ModelArg;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Number of windows (default: as many as the text holds).
    #[arg(long)]
    pub windows: Option<usize>,
    /// Print {"ppl", "scored_tokens", ..., "loops": [{"loop", "ppl", "agreement"}]} as JSON
    /// ("loops" only for recursive checkpoints).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let lm = a.model.load()?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} windows {pos}/{len} [{elapsed_precise} < {eta}] {wide_bar}")
            .expect("valid template"),
    );
    let t = std::time::Instant::now();
    let r = rrt_model::eval::perplexity(&lm, &text, a.window, a.windows, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "perplexity {:.4} over {} scored tokens ({} windows of {}), {:.1} s",
            r.ppl,
            r.scored_tokens,
            r.windows,
            r.window,
            t.elapsed().as_secs_f64()
        );
        if !r.loops.is_empty() {
            println!("{:>5} {:>14} {:>22}", "loop", "perplexity", "top-1 agreement w/ last");
            for l in &r.loops {
                println!("{:>5} {:>14.4} {:>22.4}", l.r#loop, l.ppl, l.agreement);
            }
        }
    }
    Ok(())
}
