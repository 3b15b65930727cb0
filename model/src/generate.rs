//! Autoregressive generation on one model: single sequences (`rrt generate`) and a simple
//! static batch of sequences decoded in lock-step (the forward benchmark, batching tests).
//! The continuous-batching engine of the node builds on the same forward pass.

use crate::error::{ModelError, Result};
use crate::forward::{Model, Row};
use crate::kv::{DEFAULT_BLOCK_SIZE, KvPool, SeqKv};
use crate::loader::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};

/// Prompt tokens per forward call during prefill.
pub const PREFILL_CHUNK: usize = 512;

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// An end-of-generation token was produced (it is not part of the output).
    Eos,
}

/// What one sequence produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Validates the request sizes against the model.
fn check_request(model: &Model, prompt: &[u32], max_tokens: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidArgument {
            field: "prompt",
            msg: "the prompt has no tokens".into(),
        });
    }
    let total = prompt.len() + max_tokens;
    if total > model.config.max_positions {
        return Err(ModelError::InvalidArgument {
            field: "max_tokens",
            msg: format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the context length {}",
                prompt.len(),
                model.config.max_positions
            ),
        });
    }
    Ok(())
}

/// Runs the prompt through the model in chunks; returns the logits of its last token.
pub fn prefill(model: &Model, pool: &mut KvPool, seq: &mut SeqKv, prompt: &[u32]) -> Result<Vec<f32>> {
    let mut last = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        let start = seq.len;
        pool.reserve(seq, start + chunk.len())?;
        let rows: Vec<Row<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, &t)| Row {
                token: t,
                pos: start + i,
                blocks: &seq.blocks,
            })
            .collect();
        let select = [rows.len() - 1];
        last = model.forward(&rows, pool, &select)?;
        seq.len += chunk.len();
    }
    Ok(last)
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` with each new id as
/// soon as it is chosen (before the next forward pass).
pub fn generate(
    lm: &LoadedModel,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let model = &lm.model;
    check_request(model, prompt, max_tokens)?;
    let mut sampler = Sampler::new(sampling)?;
    sampler.observe_prompt(prompt);
    let layout = model.kv_layout(DEFAULT_BLOCK_SIZE);
    let mut pool = KvPool::new(layout, (prompt.len() + max_tokens).div_ceil(DEFAULT_BLOCK_SIZE).max(1));
    let mut seq = SeqKv::default();
    let mut ids = Vec::new();
    if max_tokens == 0 {
        return Ok(Generation {
            prompt_ids: prompt.to_vec(),
            ids,
            finish_reason: FinishReason::Length,
        });
    }
    let mut logits = prefill(model, &mut pool, &mut seq, prompt)?;
    loop {
        let next = sampler.sample(&logits);
        if lm.tokenizer.is_eog(next) {
            return Ok(Generation {
                prompt_ids: prompt.to_vec(),
                ids,
                finish_reason: FinishReason::Eos,
            });
        }
        ids.push(next);
        sampler.accept(next);
        on_token(next)?;
        if ids.len() >= max_tokens {
            return Ok(Generation {
                prompt_ids: prompt.to_vec(),
                ids,
                finish_reason: FinishReason::Length,
            });
        }
        let len = seq.len;
        pool.reserve(&mut seq, len + 1)?;
        let row = [Row {
            token: next,
            pos: seq.len,
            blocks: &seq.blocks,
        }];
        logits = model.forward(&row, &mut pool, &[0])?;
        seq.len += 1;
    }
}

/// Decodes several sequences in lock-step: each prompt is prefilled on its own, then every
/// step runs one row per unfinished sequence through one batched forward pass. With greedy
/// sampling each output equals [`generate`] of that prompt alone.
pub fn generate_batch(
    lm: &LoadedModel,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    sampling: &SamplingParams,
    stop_at_eog: bool,
) -> Result<Vec<Generation>> {
    let model = &lm.model;
    for p in prompts {
        check_request(model, p, max_tokens)?;
    }
    let layout = model.kv_layout(DEFAULT_BLOCK_SIZE);
    let blocks: usize = prompts
        .iter()
        .map(|p| (p.len() + max_tokens).div_ceil(DEFAULT_BLOCK_SIZE))
        .sum();
    let mut pool = KvPool::new(layout, blocks.max(1));
    let mut seqs = vec![SeqKv::default(); prompts.len()];
    let mut samplers = prompts
        .iter()
        .enumerate()
        .map(|(i, _)| {
            Sampler::new(SamplingParams {
                seed: sampling.seed.map(|s| s.wrapping_add(i as u64)),
                ..sampling.clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outs: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_ids: p.clone(),
            ids: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    if max_tokens == 0 {
        return Ok(outs);
    }
    let mut next: Vec<Option<u32>> = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let logits = prefill(model, &mut pool, &mut seqs[i], p)?;
        next.push(Some(samplers[i].sample(&logits)));
    }
    loop {
        // Record the chosen tokens, retire finished sequences.
        for i in 0..prompts.len() {
            if let Some(t) = next[i] {
                if stop_at_eog && lm.tokenizer.is_eog(t) {
                    outs[i].finish_reason = FinishReason::Eos;
                    next[i] = None;
                } else {
                    outs[i].ids.push(t);
                    if outs[i].ids.len() >= max_tokens {
                        next[i] = None;
                    }
                }
            }
        }
        let active: Vec<usize> = (0..prompts.len()).filter(|&i| next[i].is_some()).collect();
        if active.is_empty() {
            return Ok(outs);
        }
        for &i in &active {
            let len = seqs[i].len;
            pool.reserve(&mut seqs[i], len + 1)?;
        }
        let rows: Vec<Row<'_>> = active
            .iter()
            .map(|&i| Row {
                token: next[i].unwrap(),
                pos: seqs[i].len,
                blocks: &seqs[i].blocks,
            })
            .collect();
        let select: Vec<usize> = (0..rows.len()).collect();
        let logits = model.forward(&rows, &mut pool, &select)?;
        for (j, &i) in active.iter().enumerate() {
            seqs[i].len += 1;
            next[i] = Some(samplers[i].sample(&logits[j * model.config.vocab..(j + 1) * model.config.vocab]));
        }
    }
}
