//! `rrt plot-frontier`: the speed/quality frontier of an early-exit checkpoint
//! (`scripts/exit-frontier.sh` writes its `frontier.jsonl`): a Markdown table on stdout and
//! an SVG of (d)/(a), agreement and perplexity against mean loops.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The `frontier.jsonl` of `scripts/exit-frontier.sh`.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the SVG (default: next to the input, `frontier.svg`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The (d)/(a) target drawn as a dashed line.
    #[arg(long, default_value_t = 1.5)]
    pub target: f64,
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let points = rrt_bench::frontier::parse(&text).with_context(|| format!("reading {}", a.input.display()))?;
    anyhow::ensure!(!points.is_empty(), "{} holds no points", a.input.display());
    print!("{}", rrt_bench::frontier::table(&points));
    let svg = rrt_bench::frontier::svg(&points, a.target)?;
    let out = a.out.unwrap_or_else(|| a.input.with_file_name("frontier.svg"));
    std::fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
    say!("wrote {}", out.display());
    Ok(())
}
