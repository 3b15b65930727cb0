//! What a request asks the engine for, and what the engine streams back.

use crate::engine::EngineError;
use rrt_model::sampling::SamplingParams;
use serde::Serialize;

/// Most top logprobs a request may ask for per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-request early-exit controls (on top of the checkpoint's calibrated thresholds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExitControl {
    /// Run every loop for every token (no early exit).
    pub full_depth: bool,
    /// One threshold for every loop before the last, replacing the calibrated ones (in the
    /// units of the checkpoint's criterion).
    pub threshold: Option<f32>,
    /// Never run more than this many loops per token (the token is decoded after loop
    /// `max_loops`, whatever its score).
    pub max_loops: Option<usize>,
    /// Let the prompt's tokens take the gate's exit test too (`Some(true)`), or run them at
    /// full depth (`Some(false)`); `None`: the engine's `EngineConfig::prompt_exits`.
    pub prompt_exits: Option<bool>,
    /// Loops to run for output token `i` (`schedule[i]`, clamped to `1..=B`); tokens past the
    /// end run full depth. This is how the benchmark replays an oracle exit pattern (the first
    /// loop whose argmax equals the final one, measured beforehand).
    pub schedule: Option<Vec<u8>>,
}

/// Generation parameters of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// Most tokens to generate (>= 1).
    pub max_tokens: usize,
    /// Token ids that end generation (not emitted).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation when the output text contains them, even across token
    /// boundaries; the text from the match on is not emitted.
    pub stop: Vec<String>,
    /// Keep generating after the model's end-of-generation tokens.
    pub ignore_eos: bool,
    /// Return this many most likely alternatives (with logprobs) per token (0..=20).
    pub top_logprobs: usize,
    pub exit: ExitControl,
    /// Teacher forcing: output token `i` is `forced[i]` instead of a sampled one (its logprob
    /// is still reported). Scores a given continuation, e.g. to measure perplexity through the
    /// engine with early exit; sampling resumes after the last forced token.
    pub forced: Option<Vec<u32>>,
    /// The last `resumed` prompt tokens are output already produced (and streamed) by another
    /// node: penalties count them as output, the random stream skips their draws, and stop
    /// strings / held-back text continue across them, so the request goes on exactly as if
    /// it had never moved. `max_tokens` counts only new tokens.
    pub resumed: usize,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 16,
            stop_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            exit: ExitControl::default(),
            forced: None,
            resumed: 0,
        }
    }
}

/// A generation request: prompt token ids and parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenParams,
}

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop string or stop token id matched.
    Stop,
    /// The model produced an end-of-generation token.
    Eos,
    /// The client cancelled.
    Cancelled,
    /// Taken off this node with its state ([`super::Engine::begin_export`]) to continue on
    /// another one.
    Moved,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Moved => "moved",
        }
    }
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Loops run over all output tokens (divide by `completion_tokens` for the mean depth).
    pub loops: usize,
    /// Times the request was preempted (its KV freed and recomputed) under memory pressure.
    pub preemptions: usize,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty while a multi-byte character or a
    /// possible stop string is held back).
    pub text: String,
    /// Log-probability of the token under the model's distribution at its exit loop.
    pub logprob: f32,
    /// The most likely tokens at that loop and their logprobs (`top_logprobs` of them).
    pub top_logprobs: Vec<(u32, f32)>,
    /// Loops the token ran before it was decoded (1..=B).
    pub loops: usize,
}

/// What the engine streams for a request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Event {
    Token(TokenEvent),
    Done {
        finish_reason: FinishReason,
        /// Text held back until the end (after the last token event), if any.
        text: String,
        usage: Usage,
    },
}

fn bad(field: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest { field, msg: msg.into() }
}

impl Request {
    /// Rejects meaningless values with a message naming the field.
    pub fn validate(&self, vocab: usize, loops: usize, max_positions: usize) -> Result<(), EngineError> {
        let p = &self.params;
        p.sampling.validate().map_err(|e| match e {
            rrt_model::ModelError::InvalidArgument { field, msg } => bad(field, msg),
            other => bad("sampling", other.to_string()),
        })?;
        if self.prompt.is_empty() {
            return Err(bad("prompt", "the prompt has no tokens"));
        }
        if let Some(t) = self.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(
                "prompt",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        if p.max_tokens == 0 {
            return Err(bad("max_tokens", "must be at least 1"));
        }
        if self.prompt.len() + p.max_tokens > max_positions {
            return Err(bad(
                "max_tokens",
                format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the context length {max_positions}",
                    self.prompt.len(),
                    p.max_tokens
                ),
            ));
        }
        if let Some(t) = p.stop_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(
                "stop_token_ids",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        if let Some(t) = p.forced.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(bad(
                "forced",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        if p.stop.iter().any(|s| s.is_empty()) {
            return Err(bad("stop", "stop strings must not be empty"));
        }
        if p.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(bad(
                "top_logprobs",
                format!("must be at most {MAX_TOP_LOGPROBS}, got {}", p.top_logprobs),
            ));
        }
        if let Some(t) = p.exit.threshold
            && !t.is_finite()
        {
            return Err(bad("exit_threshold", format!("must be a finite number, got {t}")));
        }
        if let Some(m) = p.exit.max_loops
            && (m == 0 || m > loops)
        {
            return Err(bad(
                "max_loops",
                format!("must be in 1..={loops} (the model's loops), got {m}"),
            ));
        }
        Ok(())
    }
}
