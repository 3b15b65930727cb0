//! Perplexity over non-overlapping windows of a tokenized text.
//!
//! Windows of `W` tokens are cut from the start of the text; each runs from an empty cache and
//! is scored from its second token (the first has no context). A BOS token is prepended to each
//! window only when the model's metadata asks for one; it is never scored.

use crate::error::{ModelError, Result};
use crate::forward::{sequence_rows, token_logprobs};
use crate::kv::{DEFAULT_BLOCK_SIZE, single_sequence};
use crate::loader::LoadedModel;

/// Perplexity result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub scored_tokens: usize,
    pub windows: usize,
    pub window: usize,
    /// For recursive models: decoding after each loop (the last equals `ppl`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loops: Vec<LoopReport>,
}

/// Quality of the prediction decoded after one loop.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LoopReport {
    /// 1-based loop number.
    pub r#loop: usize,
    pub ppl: f64,
    /// Fraction of scored tokens whose top-1 prediction equals the last loop's.
    pub agreement: f64,
}

/// Per-loop log-probabilities of the targets and argmax predictions of one window.
pub struct WindowLoops {
    /// `logprobs[b][j]`: loop b's log-probability of window token j + 1.
    pub logprobs: Vec<Vec<f64>>,
    /// `argmax[b][j]`: loop b's top-1 prediction for window token j + 1.
    pub argmax: Vec<Vec<u32>>,
}

/// Like [`window_logprobs`], for every loop of a recursive model.
pub fn window_loops(lm: &LoadedModel, win: &[u32]) -> Result<WindowLoops> {
    let model = &lm.model;
    let (input, select) = window_input(lm, win);
    let (mut pool, seq) = single_sequence(model.kv_layout(DEFAULT_BLOCK_SIZE), input.len())?;
    let rows = sequence_rows(&input, &seq.blocks);
    let vocab = model.config.vocab;
    let mut out = WindowLoops {
        logprobs: Vec::new(),
        argmax: Vec::new(),
    };
    for hidden in model.forward_loops(&rows, &mut pool)? {
        let logits = model.logits(&hidden, &select);
        out.logprobs.push(token_logprobs(&logits, vocab, &win[1..]));
        out.argmax
            .push(logits.chunks_exact(vocab).map(crate::sampling::argmax).collect());
    }
    Ok(out)
}

/// Cuts `tokens` into at most `max_windows` full windows of `window` tokens.
pub fn windows(tokens: &[u32], window: usize, max_windows: Option<usize>) -> Vec<&[u32]> {
    tokens
        .chunks_exact(window)
        .take(max_windows.unwrap_or(usize::MAX))
        .collect()
}

/// Summed log-probabilities of tokens `1..` of one window, given tokens before them in it.
pub fn window_logprobs(lm: &LoadedModel, win: &[u32]) -> Result<Vec<f64>> {
    let (input, select) = window_input(lm, win);
    let logits = lm.model.sequence_logits(&input, &select)?;
    Ok(token_logprobs(&logits, lm.model.config.vocab, &win[1..]))
}

/// The tokens a window runs (BOS first when the model asks for it) and the rows whose logits
/// score it: row `offset + j` predicts window token `j + 1`.
fn window_input(lm: &LoadedModel, win: &[u32]) -> (Vec<u32>, Vec<usize>) {
    let bos = if lm.tokenizer.add_bos { lm.tokenizer.bos } else { None };
    let input: Vec<u32> = bos.into_iter().chain(win.iter().copied()).collect();
    let offset = input.len() - win.len();
    (input, (offset..offset + win.len() - 1).collect())
}

/// Perplexity of `text` as defined in the module docs.
pub fn perplexity(
    lm: &LoadedModel,
    text: &str,
    window: usize,
    max_windows: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport> {
    if window < 2 {
        return Err(ModelError::InvalidArgument {
            field: "window",
            msg: format!("must be at least 2, got {window}"),
        });
    }
    if window > lm.model.config.max_positions {
        return Err(ModelError::InvalidArgument {
            field: "window",
            msg: format!("{window} exceeds the context length {}", lm.model.config.max_positions),
        });
    }
    let tokens = lm.tokenizer.encode(text, false, false)?;
    let wins = windows(&tokens, window, max_windows);
    if wins.is_empty() {
        return Err(ModelError::InvalidArgument {
            field: "text",
            msg: format!(
                "the text has {} tokens, fewer than one window of {window}",
                tokens.len()
            ),
        });
    }
    let n_loops = lm.model.loops();
    let mut sums = vec![0f64; n_loops];
    let mut agree = vec![0usize; n_loops];
    let mut count = 0usize;
    for (i, w) in wins.iter().enumerate() {
        if n_loops == 1 {
            let lp = window_logprobs(lm, w)?;
            sums[0] -= lp.iter().sum::<f64>();
            count += lp.len();
        } else {
            let wl = window_loops(lm, w)?;
            let last = &wl.argmax[n_loops - 1];
            for b in 0..n_loops {
                sums[b] -= wl.logprobs[b].iter().sum::<f64>();
                agree[b] += wl.argmax[b].iter().zip(last).filter(|(x, y)| x == y).count();
            }
            count += last.len();
        }
        progress(i + 1, wins.len());
    }
    let nll = sums[n_loops - 1] / count as f64;
    let loops = if n_loops == 1 {
        Vec::new()
    } else {
        (0..n_loops)
            .map(|b| LoopReport {
                r#loop: b + 1,
                ppl: (sums[b] / count as f64).exp(),
                agreement: agree[b] as f64 / count as f64,
            })
            .collect()
    };
    Ok(PerplexityReport {
        ppl: nll.exp(),
        nll,
        scored_tokens: count,
        windows: wins.len(),
        window,
        loops,
    })
}
