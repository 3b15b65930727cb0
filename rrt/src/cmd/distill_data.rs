//! `rrt distill-data`: the uptraining corpus, built with no download at train time.
//!
//! Two sources, both tokenized here so the trainer (`train/`, PyTorch) needs no tokenizer:
//! - text the **original model writes itself**, sampled through the serving engine
//!   (continuous batching) from varied prompts: chat requests through the model's chat
//!   template, plain story / essay / code openings, and passages of the text file to continue;
//! - the text file itself (default: the public-domain tinyshakespeare), cut in documents.
//!
//! The held-out split is fixed here, so training never sees it: the last `--heldout` fraction
//! of the text (contiguous, so no passage straddles the split), and the generated samples of
//! every `1 / heldout`-th group of four (one of each prompt kind per group), whose
//! text-continuation prompts come from the held-out part of the text.
//!
//! Output: `train.jsonl` and `heldout.jsonl` (one document per line: `{"source", "ids"}`),
//! and `manifest.json` (model and text sha256, settings, token counts per split and source).

use super::ModelArg;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rrt_kernels::CpuBackend;
use rrt_model::chat::Message;
use rrt_model::sampling::SamplingParams;
use rrt_node::{Engine, EngineConfig, Event, GenParams, Request, ResidentModel};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// The original (teacher) model whose text is sampled.
    #[command(flatten)]
    pub model: ModelArg,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Text file mixed in as documents (and the source of continuation prompts).
    #[arg(long, default_value = "../shared/data/tinyshakespeare.txt")]
    pub text: PathBuf,
    /// Generated samples.
    #[arg(long, default_value_t = 512)]
    pub samples: usize,
    /// Most new tokens per generated sample.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Samples generated at once (the engine batches them).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Held-out fraction of the text and of the generated samples, in (0, 0.5].
    #[arg(long, default_value_t = 0.1)]
    pub heldout: f64,
    /// Tokens per text document.
    #[arg(long, default_value_t = 512)]
    pub doc_tokens: usize,
}

const TASKS: &[&str] = &[
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three interesting facts about {}.",
    "Write a poem about {}.",
    "What are the advantages and disadvantages of {}?",
    "Describe {} in detail.",
    "Write a dialogue between two friends talking about {}.",
    "Summarize what you know about {}.",
    "Write a letter to a friend about {}.",
    "How would you teach someone about {}?",
    "Write a news report about {}.",
    "List five questions people often ask about {}, with short answers.",
];

const TOPICS: &[&str] = &[
    "the ocean",
    "a lost cat",
    "volcanoes",
    "friendship",
    "the moon",
    "computers",
    "rainy days",
    "a small village",
    "learning to cook",
    "the Roman Empire",
    "photosynthesis",
    "a dragon who is afraid of fire",
    "prime numbers",
    "music",
    "winter",
    "robots",
    "gardening",
    "saving money",
    "honey bees",
    "a long train journey",
    "the human heart",
    "climate change",
    "chess",
    "a lighthouse keeper",
    "the internet",
    "healthy sleep",
    "ancient Egypt",
    "electricity",
    "a birthday party",
    "mountains",
    "learning a new language",
    "the solar system",
];

const OPENINGS: &[&str] = &[
    "Once upon a time,",
    "The history of",
    "In the year 2150,",
    "Dear diary, today",
    "The recipe is simple:",
    "Chapter 1\n\n",
    "def fibonacci(n):",
    "The best way to learn",
    "Scientists have discovered",
    "It was a dark and stormy night.",
    "Here is a list of",
    "The old man looked at the sea and",
    "In mathematics, a function is",
    "Welcome to our town! Today",
    "import numpy as np\n",
    "The meeting started at nine, and",
];

#[derive(serde::Serialize)]
struct Doc<'a> {
    source: &'a str,
    ids: &'a [u32],
}

struct Prompt {
    source: &'static str,
    ids: Vec<u32>,
}

pub fn run(a: Args) -> Result<()> {
    if !(a.heldout > 0.0 && a.heldout <= 0.5) {
        bail!("--heldout must be in (0, 0.5], got {}", a.heldout);
    }
    if a.samples > 0 && (a.max_tokens == 0 || a.concurrency == 0) {
        bail!("--max-tokens and --concurrency must be at least 1");
    }
    if a.doc_tokens < 16 {
        bail!("--doc-tokens must be at least 16");
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        ..Default::default()
    };
    sampling.validate()?;
    let model_path = a.model.path()?;
    let lm = a.model.load()?;
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let tok = Arc::new(lm.tokenizer.clone());
    let text_ids = tok.encode(&text, false, false)?;
    let split = ((text_ids.len() as f64) * (1.0 - a.heldout)) as usize;
    if split < 64 || text_ids.len() - split < 64 {
        bail!(
            "{} has {} tokens: too short for a held-out split",
            a.text.display(),
            text_ids.len()
        );
    }
    let (text_train, text_held) = text_ids.split_at(split);
    let every = (1.0 / a.heldout).round() as usize;

    // Prompts: half chat, a quarter openings, a quarter continuations of text passages.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let mut prompts = Vec::with_capacity(a.samples);
    for i in 0..a.samples {
        let held = is_heldout(i, every);
        let p = match i % 4 {
            0 | 1 => {
                let task = TASKS[rng.random_range(0..TASKS.len())];
                let topic = TOPICS[rng.random_range(0..TOPICS.len())];
                let msgs = [Message::new("user", task.replace("{}", topic))];
                let text = lm.chat_prompt(&msgs)?;
                Prompt {
                    source: "generated-chat",
                    ids: tok.encode(&text, false, true)?,
                }
            }
            2 => Prompt {
                source: "generated-opening",
                ids: tok.encode(OPENINGS[rng.random_range(0..OPENINGS.len())], true, false)?,
            },
            _ => {
                let src = if held { text_held } else { text_train };
                let len = rng.random_range(16..48usize).min(src.len() - 1);
                let start = rng.random_range(0..src.len() - len);
                Prompt {
                    source: "generated-continuation",
                    ids: src[start..start + len].to_vec(),
                }
            }
        };
        prompts.push(p);
    }

    let outputs = generate_all(&a, lm, tok.clone(), &prompts, sampling)?;

    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut files = [
        std::io::BufWriter::new(std::fs::File::create(a.out.join("train.jsonl"))?),
        std::io::BufWriter::new(std::fs::File::create(a.out.join("heldout.jsonl"))?),
    ];
    // counts[split][source] = (documents, tokens)
    let mut counts: [HashMap<&str, (usize, usize)>; 2] = Default::default();
    let mut put = |split: usize, source: &'static str, ids: &[u32]| -> Result<()> {
        serde_json::to_writer(&mut files[split], &Doc { source, ids })?;
        files[split].write_all(b"\n")?;
        let c = counts[split].entry(source).or_default();
        c.0 += 1;
        c.1 += ids.len();
        Ok(())
    };
    for (i, (p, out)) in prompts.iter().zip(&outputs).enumerate() {
        let mut ids = p.ids.clone();
        ids.extend_from_slice(out);
        put(usize::from(is_heldout(i, every)), p.source, &ids)?;
    }
    for (split, part) in [(0, text_train), (1, text_held)] {
        for chunk in part.chunks(a.doc_tokens) {
            if chunk.len() >= 16 {
                put(split, "text", chunk)?;
            }
        }
    }
    for f in &mut files {
        f.flush()?;
    }
    let summary = |m: &HashMap<&str, (usize, usize)>| {
        let mut v: Vec<_> = m.iter().collect();
        v.sort();
        let by: serde_json::Map<String, serde_json::Value> = v
            .into_iter()
            .map(|(k, (d, t))| (k.to_string(), serde_json::json!({"documents": d, "tokens": t})))
            .collect();
        let tokens: usize = m.values().map(|c| c.1).sum();
        serde_json::json!({"tokens": tokens, "by_source": by})
    };
    let eos = tok.facts().eog.first().copied();
    let manifest = serde_json::json!({
        "format": "rrt-distill-data",
        "version": 1,
        "tool": format!("rrt {} distill-data", env!("CARGO_PKG_VERSION")),
        "model": model_path.display().to_string(),
        "model_sha256": rrt_model::checkpoint::sha256_of(&model_path)?,
        "text": a.text.display().to_string(),
        "text_sha256": rrt_model::checkpoint::sha256_of(&a.text)?,
        "vocab": tok.vocab_size(),
        "separator": eos,
        "settings": {
            "samples": a.samples, "max_tokens": a.max_tokens, "temperature": a.temperature,
            "top_p": a.top_p, "seed": a.seed, "heldout": a.heldout, "doc_tokens": a.doc_tokens,
        },
        "train": summary(&counts[0]),
        "heldout": summary(&counts[1]),
    });
    std::fs::write(a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    say!(
        "wrote {}: train {} tokens, held-out {} tokens ({} generated samples)",
        a.out.display(),
        manifest["train"]["tokens"],
        manifest["heldout"]["tokens"],
        a.samples
    );
    Ok(())
}

/// Sample `i` is held out when its group of four (chat, chat, opening, continuation) is.
fn is_heldout(i: usize, every: usize) -> bool {
    (i / 4).is_multiple_of(every)
}

/// Samples every prompt's continuation through one engine, `concurrency` at a time.
fn generate_all(
    a: &Args,
    lm: rrt_model::LoadedModel,
    tok: Arc<rrt_model::tokenizer::Tokenizer>,
    prompts: &[Prompt],
    sampling: SamplingParams,
) -> Result<Vec<Vec<u32>>> {
    let mut outputs = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() {
        return Ok(outputs);
    }
    let ctx = lm.model.config.max_positions;
    let cfg = EngineConfig {
        max_running: a.concurrency.max(1),
        ..Default::default()
    };
    let mut eng: Engine<CpuBackend> = Engine::new(ResidentModel::new(CpuBackend, lm.model)?, tok, cfg)?;
    let bar = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template("generating [{bar:30}] {pos}/{len} samples {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> "),
    );
    let mut live: HashMap<u64, usize> = HashMap::new();
    let (mut next, mut done, mut tokens) = (0usize, 0usize, 0usize);
    let t0 = std::time::Instant::now();
    while done < prompts.len() {
        while live.len() < a.concurrency && next < prompts.len() {
            let p = &prompts[next];
            let params = GenParams {
                sampling: SamplingParams {
                    seed: Some(a.seed.wrapping_mul(1_000_003).wrapping_add(next as u64)),
                    ..sampling.clone()
                },
                max_tokens: a.max_tokens.min(ctx.saturating_sub(p.ids.len())).max(1),
                ..Default::default()
            };
            let id = eng.submit(Request {
                prompt: p.ids.clone(),
                params,
            })?;
            live.insert(id, next);
            next += 1;
        }
        for (id, e) in eng.step()? {
            let i = live[&id];
            match e {
                Event::Token(t) => {
                    outputs[i].push(t.id);
                    tokens += 1;
                }
                Event::Done { .. } => {
                    live.remove(&id);
                    done += 1;
                    bar.inc(1);
                    bar.set_message(format!("{:.0} tok/s", tokens as f64 / t0.elapsed().as_secs_f64()));
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(outputs)
}
