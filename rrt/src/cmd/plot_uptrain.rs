//! `rrt plot-uptrain`: the SVG of an uptraining run (its `log.jsonl`): every loop's KL from
//! the teacher per training batch and every loop's held-out perplexity, against tokens seen.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The run directory of `python -m rrt_train train` (holds log.jsonl).
    #[arg(long)]
    pub run: PathBuf,
    /// Where to write the SVG (default: RUN/uptrain.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let log_path = a.run.join("log.jsonl");
    let log = std::fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    let svg = rrt_bench::uptrain::uptrain_svg(&log).with_context(|| format!("plotting {}", log_path.display()))?;
    let out = a.out.unwrap_or_else(|| a.run.join("uptrain.svg"));
    std::fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
    say!("wrote {}", out.display());
    Ok(())
}
