//! `rrt random-model`: a random-weight model shaped like a published one, as the Hugging Face
//! directory the real one ships as (tests, and benchmarks where the real weights cannot be
//! fetched). The tokenizer and chat template come from `--tokenizer-from` (default: the cached
//! SmolLM2, whose tokenizer Ouro uses).

use super::ModelArg;
use anyhow::{Context, Result, bail};
use rrt_model::synthetic::{OURO_1_4B, OURO_2_6B, OURO_TINY, StoreType, ouro_shape, write_ouro};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The published model to imitate: ouro-1.4b, ouro-2.6b or ouro-tiny (the same structure
    /// at a test's size).
    #[arg(long)]
    pub like: String,
    /// The directory to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The model whose tokenizer and chat template to copy (its weights are not read: an rrt
    /// checkpoint's `rrt_checkpoint.json` + `tokenizer.json` suffice).
    #[command(flatten)]
    pub tokenizer_from: ModelArg,
    /// Tensor type: bf16 (the real checkpoints' type) or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// The config's `early_exit_threshold` (1.0: every step, Ouro's default).
    #[arg(long, default_value_t = 1.0)]
    pub exit_threshold: f32,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let Some(shape) = ouro_shape(&a.like) else {
        bail!(
            "--like {}: unknown shape (known: {}, {}, {})",
            a.like,
            OURO_1_4B.name,
            OURO_2_6B.name,
            OURO_TINY.name
        );
    };
    let store = match a.dtype.as_str() {
        "bf16" => StoreType::Bf16,
        "f32" => StoreType::F32,
        other => bail!("--dtype {other}: expected bf16 or f32"),
    };
    if !(a.exit_threshold > 0.0 && a.exit_threshold <= 1.0) {
        bail!("--exit-threshold {}: must be in (0, 1]", a.exit_threshold);
    }
    let from = a.tokenizer_from.path()?;
    let (tokenizer, template) = rrt_model::loader::load_tokenizer_and_template(&from)
        .with_context(|| format!("reading the tokenizer of {}", from.display()))?;
    let t = std::time::Instant::now();
    write_ouro(
        &a.out,
        &shape,
        &tokenizer,
        template.as_ref().map(|c| c.source.as_str()),
        a.seed,
        store,
        a.exit_threshold,
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    say!(
        "wrote {} ({} random, {:.2}B parameters, {} steps) in {:.1} s",
        a.out.display(),
        shape.name,
        shape.params() as f64 / 1e9,
        shape.steps,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
