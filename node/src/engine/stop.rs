//! The text side of a stream: incremental detokenization and stop strings matched across
//! token boundaries (the matched text and everything after it is never emitted).

use rrt_model::tokenizer::{StreamDecoder, Tokenizer};

/// Turns output token ids into text deltas, holding back what may still become a stop string.
pub struct TextStream {
    decoder: StreamDecoder,
    stops: Vec<String>,
    /// Decoded text not yet emitted (a possible start of a stop string).
    held: String,
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `stops` (the
/// part that must be held back), on a char boundary.
fn held_suffix(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        let max = (s.len() - 1).min(text.len());
        for len in (best + 1..=max).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && s.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

impl TextStream {
    /// `context`: the prompt's last tokens (so the first token decodes as a continuation).
    pub fn new(context: &[u32], stops: Vec<String>) -> Self {
        Self {
            decoder: StreamDecoder::new(context),
            stops,
            held: String::new(),
        }
    }

    /// Adds a token; returns the text that is now final and whether a stop string matched.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> rrt_model::Result<(String, bool)> {
        if let Some(d) = self.decoder.step(tok, id)? {
            self.held.push_str(&d);
        }
        Ok(self.release())
    }

    fn release(&mut self) -> (String, bool) {
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = held_suffix(&self.held, &self.stops);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The text still held at the end of generation (no stop string matched).
    pub fn finish(&mut self, tok: &Tokenizer) -> rrt_model::Result<String> {
        if let Some(d) = self.decoder.flush(tok)? {
            self.held.push_str(&d);
        }
        let (mut out, stopped) = self.release();
        if !stopped {
            out.push_str(&self.held);
        }
        self.held.clear();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["STOP".to_string(), "\n\n".to_string()];
        assert_eq!(held_suffix("abc ST", &stops), 2);
        assert_eq!(held_suffix("abc STO", &stops), 3);
        assert_eq!(held_suffix("abc\n", &stops), 1);
        assert_eq!(held_suffix("abc", &stops), 0);
        assert_eq!(held_suffix("é", &["éx".to_string()]), 2);
    }
}
