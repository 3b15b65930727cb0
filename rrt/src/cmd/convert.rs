//! `rrt convert`: a pretrained model to a relaxed recursive checkpoint.

use super::ModelArg;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rrt_model::checkpoint::{Provenance, WeightFormat, save, sha256_of};
use rrt_model::forward::Model;
use rrt_model::recursive::{Init, MODULES, RecursiveSpec, convert};
use rrt_model::weights::Weights;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum InitArg {
    Stepwise,
    Average,
    Lower,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SvdArg {
    Plain,
    Activation,
}

/// How a checkpoint stores its matrices (`weights` in `rrt_checkpoint.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// Every tensor f32: exact, and what the trainer (`train/`) reads.
    #[value(name = "f32")]
    F32,
    /// Shared-layer matrices and embeddings as GGML Q8_0 blocks (3.8x smaller than f32).
    #[value(name = "q8_0")]
    Q8_0,
    /// Shared-layer matrices as Q4_1 blocks, embeddings as Q8_0 (the source GGUF's scheme).
    #[value(name = "q4_1")]
    Q4_1,
}

impl From<QuantArg> for WeightFormat {
    fn from(q: QuantArg) -> Self {
        match q {
            QuantArg::F32 => WeightFormat::F32,
            QuantArg::Q8_0 => WeightFormat::Q8_0,
            QuantArg::Q4_1 => WeightFormat::Q4_1,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// B: how many times the shared block runs (the model's layer count must divide by it).
    #[arg(long)]
    pub loops: usize,
    /// How the shared layers are initialised.
    #[arg(long, value_enum, default_value = "average")]
    pub init: InitArg,
    /// LoRA rank for every module (0 = plain recursive model).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Per-module ranks overriding --lora-rank, e.g. `q=64,k=32,v=32,o=64,gate=128,up=128,down=128`.
    #[arg(long)]
    pub lora_ranks: Option<String>,
    /// SVD of the residual: plain, or activation-aware (weighted by the square root of the
    /// input second moments measured on --calibration text).
    #[arg(long, value_enum, default_value = "plain")]
    pub svd: SvdArg,
    /// Calibration text for --svd activation (its first --calibration-tokens tokens are used).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Tokens of calibration text, run in windows of 256.
    #[arg(long, default_value_t = 4096)]
    pub calibration_tokens: usize,
    /// Lower ranks above a module's min(in, out) to it instead of refusing them.
    #[arg(long)]
    pub clamp_ranks: bool,
    /// How the checkpoint stores the shared layers and embeddings (norms and LoRAs stay f32).
    /// The default stays f32: conversion is exact and its output is what `rrt eval`,
    /// `rrt calibrate` and the trainer were measured on; quantizing is a separate, lossy
    /// choice (QUALITY.md, "Quantized shared block"), also available afterwards through
    /// `rrt quantize`.
    #[arg(long, value_enum, default_value = "f32")]
    pub quant: QuantArg,
}

fn parse_ranks(base: usize, spec: Option<&str>) -> Result<[usize; 7]> {
    let mut ranks = [base; 7];
    if let Some(s) = spec {
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("--lora-ranks: `{part}` is not module=rank"))?;
            let m = MODULES
                .iter()
                .position(|m| *m == k.trim())
                .with_context(|| format!("--lora-ranks: unknown module `{k}` (modules: {})", MODULES.join(", ")))?;
            ranks[m] = v
                .trim()
                .parse()
                .with_context(|| format!("--lora-ranks: `{v}` is not a rank"))?;
        }
    }
    Ok(ranks)
}

pub fn run(a: Args) -> Result<()> {
    let calib_text = match (a.svd, &a.calibration) {
        (SvdArg::Activation, None) => bail!("--svd activation needs --calibration FILE"),
        (SvdArg::Activation, Some(p)) => {
            if a.calibration_tokens < 2 {
                bail!("--calibration-tokens must be at least 2");
            }
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        (SvdArg::Plain, _) => None,
    };
    let mut ranks = parse_ranks(a.lora_rank, a.lora_ranks.as_deref())?;
    let init = match a.init {
        InitArg::Stepwise => Init::Stepwise,
        InitArg::Average => Init::Average,
        InitArg::Lower => Init::Lower,
    };
    let src = a.model.path()?;
    let lm = a.model.load()?;
    if lm.model.recursion.is_some() {
        bail!("{} is already a recursive checkpoint", src.display());
    }
    if a.clamp_ranks {
        let c = &lm.model.config;
        let dims = [
            (c.q_dim(), c.hidden),
            (c.kv_dim(), c.hidden),
            (c.kv_dim(), c.hidden),
            (c.hidden, c.q_dim()),
            (c.intermediate, c.hidden),
            (c.intermediate, c.hidden),
            (c.hidden, c.intermediate),
        ];
        for (r, (o, i)) in ranks.iter_mut().zip(dims) {
            *r = (*r).min(o.min(i));
        }
    }
    let spec = RecursiveSpec {
        loops: a.loops,
        init,
        ranks,
    };
    let calibration = match &calib_text {
        None => None,
        Some(text) => {
            let ids = lm.tokenizer.encode(text, false, false)?;
            let ids = &ids[..ids.len().min(a.calibration_tokens)];
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{spinner} calibrating: window {pos}/{len} {wide_bar}")
                    .expect("valid template"),
            );
            let cal = rrt_model::recursive::Calibration::collect(&lm.model, ids, 256, |d, t| {
                bar.set_length(t as u64);
                bar.set_position(d as u64);
            })?;
            bar.finish_and_clear();
            Some(cal)
        }
    };
    let n = lm.model.config.n_layers as u64;
    let bar = ProgressBar::new(n).with_style(
        ProgressStyle::with_template(
            "{spinner} converting: unrolled layer {pos}/{len} [{elapsed_precise} < {eta}] {wide_bar}",
        )
        .expect("valid template"),
    );
    let t = std::time::Instant::now();
    let (layers, rec) = convert(&lm.model.weights, &lm.model.config, &spec, calibration.as_ref(), |_| {
        bar.inc(1)
    })?;
    bar.finish_and_clear();
    let w = &lm.model.weights;
    let weights = Weights {
        embed: w.embed.clone(),
        layers,
        norm: w.norm.clone(),
        lm_head: w.lm_head.clone(),
        exit_gate: None,
    };
    let model = Model::recursive(lm.model.config.clone(), weights, rec)?;
    let provenance = Provenance {
        source: src.display().to_string(),
        source_sha256: sha256_of(&src)?,
        tool: format!("rrt {} convert", env!("CARGO_PKG_VERSION")),
        extra: match (&calibration, &a.calibration) {
            (Some(c), Some(p)) => serde_json::json!({
                "svd": "activation",
                "calibration": p.display().to_string(),
                "calibration_sha256": sha256_of(p)?,
                "calibration_tokens": c.tokens,
            }),
            _ => serde_json::json!({"svd": "plain"}),
        },
    };
    save(
        &a.out,
        &model,
        &lm.tokenizer,
        lm.chat_template.as_ref(),
        provenance,
        a.quant.into(),
    )?;
    eprintln!(
        "wrote {} (L = {}, K = {}, B = {}, ranks {:?}, {} weights) in {:.1} s",
        a.out.display(),
        model.config.n_layers,
        model.weights.layers.len(),
        a.loops,
        ranks,
        WeightFormat::from(a.quant),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
