//! `rrt quantize`: rewrite a recursive checkpoint with its matrices in another format (f32,
//! q8_0, q4_1), keeping its config (exit calibration included), tokenizer and chat template.

use super::convert::QuantArg;
use anyhow::{Context, Result, bail};
use rrt_model::checkpoint::{CONFIG_FILE, WeightFormat, read_config};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The recursive checkpoint directory to rewrite (made by `rrt convert`).
    #[arg(long)]
    pub model: PathBuf,
    /// Output checkpoint directory (created if missing; not the input).
    #[arg(long)]
    pub out: PathBuf,
    /// Format of the shared-layer matrices and embeddings: q4_1 (embeddings q8_0), q8_0, or
    /// f32 (back to f32, e.g. for the trainer). Matrices already in the format are copied.
    #[arg(long, value_enum)]
    pub quant: QuantArg,
}

fn mb(path: &Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1e6)
}

pub fn run(a: Args) -> Result<()> {
    if !a.model.is_dir() || !a.model.join(CONFIG_FILE).is_file() {
        bail!(
            "{} is not an rrt recursive checkpoint (no {CONFIG_FILE}): `rrt quantize` rewrites checkpoints made by `rrt convert`; convert a GGUF file or Hugging Face directory with `rrt convert --quant ...`",
            a.model.display()
        );
    }
    let from = read_config(&a.model)?.weights;
    let to = WeightFormat::from(a.quant);
    let t = std::time::Instant::now();
    rrt_model::checkpoint::quantize(
        &a.model,
        &a.out,
        to,
        &format!("rrt {} quantize", env!("CARGO_PKG_VERSION")),
    )
    .with_context(|| format!("rewriting {} as {to}", a.model.display()))?;
    eprintln!(
        "wrote {} ({to}: model.safetensors {:.1} MB; {} was {from}: {:.1} MB) in {:.1} s",
        a.out.display(),
        mb(&a.out.join("model.safetensors")),
        a.model.display(),
        mb(&a.model.join("model.safetensors")),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
