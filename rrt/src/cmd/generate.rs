//! `rrt generate`: one completion, streamed to stdout or printed as JSON.

use super::ModelArg;
use anyhow::{Result, bail};
use rrt_model::chat::Message;
use rrt_model::generate::generate;
use rrt_model::sampling::SamplingParams;
use rrt_model::tokenizer::StreamDecoder;
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Raw prompt text (special-token text in it is treated as plain text).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message; the model's chat template is applied.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens below min_p times the top probability (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already seen by this (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Subtract this from the logits of tokens already generated (OpenAI semantics, 0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Subtract this times the count of each token already generated (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Random seed (default: from the OS).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object {prompt_ids, ids, text, finish_reason} instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct JsonOut<'a> {
    prompt_ids: &'a [u32],
    ids: &'a [u32],
    text: &'a str,
    finish_reason: rrt_model::generate::FinishReason,
}

pub fn run(a: Args) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
    };
    sampling.validate()?;
    let lm = a.model.load()?;
    let prompt_ids = match (&a.prompt, &a.chat) {
        (Some(p), None) => lm.tokenizer.encode(p, true, false)?,
        (None, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s.clone()));
            }
            msgs.push(Message::new("user", c.clone()));
            let text = lm.chat_prompt(&msgs)?;
            lm.tokenizer.encode(&text, false, true)?
        }
        _ => bail!("give exactly one of --prompt and --chat"),
    };
    let mut stdout = std::io::stdout().lock();
    let mut dec = StreamDecoder::new(&prompt_ids);
    let tok = &lm.tokenizer;
    let stream = !a.json;
    let g = generate(&lm, &prompt_ids, a.max_tokens, sampling, |id| {
        if stream && let Some(t) = dec.step(tok, id)? {
            // A closed stdout (e.g. `| head`) is not an error of the generation.
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
        Ok(())
    })?;
    if stream {
        if let Some(t) = dec.flush(tok)? {
            let _ = stdout.write_all(t.as_bytes());
        }
        let _ = stdout.write_all(b"\n");
    } else {
        let text = tok.decode(&g.ids, true)?;
        let out = JsonOut {
            prompt_ids: &g.prompt_ids,
            ids: &g.ids,
            text: &text,
            finish_reason: g.finish_reason,
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    }
    Ok(())
}
