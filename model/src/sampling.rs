//! Token sampling: repetition / presence / frequency penalties, greedy, temperature, top-k,
//! top-p, min-p, with a per-request seed.
//!
//! Order: penalties on the logits (repetition as in Hugging Face / CTRL over prompt and output
//! tokens: positive logits divided, negative multiplied; presence and frequency as in OpenAI
//! over output tokens: `logit -= presence * [count > 0] + frequency * count`), then temperature
//! scaling, top-k, top-p (nucleus), min-p; then one draw from the renormalised distribution.
//! Temperature 0 is greedy (ties go to the lowest id). The random stream belongs to the
//! request, so the same seed gives the same tokens whatever else shares the batch.

use crate::error::{ModelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling parameters of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k.
    pub top_k: usize,
    /// 1 = no nucleus filtering.
    pub top_p: f32,
    /// 0 = no min-p filtering.
    pub min_p: f32,
    /// Seed for the request's random stream; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// 1 = off; > 1 discourages any token already in the prompt or output.
    pub repetition_penalty: f32,
    /// 0 = off; subtracted once from the logit of every token already in the output.
    pub presence_penalty: f32,
    /// 0 = off; subtracted from a token's logit once per time it is in the output.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: String| Err(ModelError::InvalidArgument { field, msg });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be a finite number > 0, got {}", self.repetition_penalty),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    /// Whether any of the repetition / presence / frequency penalties is on.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Index of the largest value; the lowest index among equal maxima; NaN never wins (0 when
/// nothing is above -inf). Taken once per greedy token over the whole vocabulary: the maximum
/// on 16 independent lanes (compare and select, which vectorises), then its first position.
pub fn argmax(x: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let max = acc
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    x.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// A sampler with its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch for (logit, id) candidates, reused across steps.
    cand: Vec<(f32, u32)>,
    /// Tokens of the prompt (for the repetition penalty).
    in_prompt: std::collections::HashSet<u32>,
    /// Output tokens and their counts.
    in_output: std::collections::HashMap<u32, u32>,
    /// Scratch for penalised logits.
    penalised: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self {
            params,
            rng,
            cand: Vec::new(),
            in_prompt: Default::default(),
            in_output: Default::default(),
            penalised: Vec::new(),
        })
    }

    /// Records the prompt's tokens (the repetition penalty covers them).
    pub fn observe_prompt(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            self.in_prompt.extend(prompt.iter().copied());
        }
    }

    /// Records a token added to the output (penalties of later steps count it).
    pub fn accept(&mut self, token: u32) {
        if self.params.has_penalties() {
            *self.in_output.entry(token).or_insert(0) += 1;
        }
    }

    /// Replays output tokens produced elsewhere (a request moved from another node): counts
    /// them for the penalties and consumes the random draws their sampling took (one per
    /// token unless decoding is greedy), so the stream continues exactly where it was.
    pub fn resume(&mut self, output: &[u32]) {
        let stochastic = !(self.params.temperature == 0.0 || self.params.top_k == 1);
        for &t in output {
            self.accept(t);
            if stochastic {
                let _ = self.rng.random::<f32>();
            }
        }
    }

    /// Applies the penalties to `logits` in place.
    pub fn penalise(&self, logits: &mut [f32]) {
        let p = &self.params;
        let rep = p.repetition_penalty;
        if rep != 1.0 {
            let out_only = self.in_output.keys().filter(|t| !self.in_prompt.contains(t));
            for &t in self.in_prompt.iter().chain(out_only) {
                if let Some(v) = logits.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / rep } else { *v * rep };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.in_output {
                if let Some(v) = logits.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Whether this sampler always picks the argmax of the raw logits (greedy, no penalties):
    /// then the argmax alone decides, and no random draw is taken.
    pub fn is_plain_argmax(&self) -> bool {
        (self.params.temperature == 0.0 || self.params.top_k == 1) && !self.params.has_penalties()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits (penalties applied to a copy).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.params.has_penalties() {
            return self.sample_raw(logits);
        }
        let mut buf = std::mem::take(&mut self.penalised);
        buf.clear();
        buf.extend_from_slice(logits);
        self.penalise(&mut buf);
        let t = self.sample_raw(&buf);
        self.penalised = buf;
        t
    }

    fn sample_raw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan())
                .map(|(i, &v)| (v / p.temperature, i as u32)),
        );
        if cand.is_empty() {
            return 0;
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit_desc);
        // Softmax over the candidates (in place: .0 becomes the probability).
        let max = cand[0].0;
        let mut sum = 0f64;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0 as f64;
        }
        for c in cand.iter_mut() {
            c.0 = (c.0 as f64 / sum) as f32;
        }
        if p.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = cand[0].0 * p.min_p;
            let keep = cand.iter().position(|c| c.0 < floor).unwrap_or(cand.len()).max(1);
            cand.truncate(keep);
        }
        let total: f32 = cand.iter().map(|c| c.0).sum();
        let mut u = self.rng.random::<f32>() * total;
        for c in cand.iter() {
            if u < c.0 {
                return c.1;
            }
            u -= c.0;
        }
        cand[cand.len() - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass definition (first strict improvement wins).
    fn argmax_reference(x: &[f32]) -> u32 {
        let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in x.iter().enumerate() {
            if v > bv {
                (best, bv) = (i, v);
            }
        }
        best as u32
    }

    #[test]
    fn argmax_matches_its_definition_with_ties_nan_and_infinities() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for len in [0usize, 1, 15, 16, 17, 100, 49152] {
            for case in 0..6 {
                // Few distinct values, so maxima tie.
                let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(0..8) as f32).collect();
                for v in x.iter_mut() {
                    match (case, rng.random_range(0..10)) {
                        (1, 0) => *v = f32::NAN,
                        (2, _) => *v = f32::NEG_INFINITY,
                        (3, 0) => *v = f32::INFINITY,
                        (4, _) => *v = f32::NAN,
                        (5, 0..=4) => *v = f32::NEG_INFINITY,
                        _ => {}
                    }
                }
                assert_eq!(argmax(&x), argmax_reference(&x), "len {len} case {case}");
            }
        }
    }

    #[test]
    fn greedy_takes_lowest_index_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 5.0, 1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_filters_hold() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 0.9,
            min_p: 0.0,
            seed: Some(42),
            ..Default::default()
        };
        let mut a = Sampler::new(params.clone()).unwrap();
        let mut b = Sampler::new(params).unwrap();
        let mut top5: Vec<usize> = (0..50).collect();
        top5.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        top5.truncate(5);
        for _ in 0..200 {
            let t = a.sample(&logits);
            assert_eq!(t, b.sample(&logits));
            assert!(top5.contains(&(t as usize)), "token {t} outside top-5");
        }
    }

    #[test]
    fn min_p_and_top_p_restrict_to_the_head() {
        let logits = [10.0f32, 9.0, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: Some(1),
            ..Default::default()
        })
        .unwrap();
        for _ in 0..100 {
            assert!(
                s.sample(&logits) < 1,
                "min_p 0.5 keeps only tokens with p >= 0.5 p_max: only token 0"
            );
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: Some(1),
            ..Default::default()
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases: [(SamplingParams, &str); 4] = [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..Default::default()
                },
                "min_p",
            ),
        ];
        for (p, field) in cases {
            match p.validate() {
                Err(ModelError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            seed: Some(1),
            ..Default::default()
        })
        .unwrap();
        s.observe_prompt(&[0, 0]);
        s.accept(1);
        s.accept(2);
        s.accept(2);
        let mut l = [2.0f32, -2.0, 1.0, 3.0];
        s.penalise(&mut l);
        // token 0: prompt only -> 2 / 2; token 1: output once -> -2 * 2 - 0.5 - 0.25;
        // token 2: output twice -> 1 / 2 - 0.5 - 0.5; token 3 untouched.
        assert_eq!(l, [1.0, -4.75, -0.5, 3.0]);
        // Greedy sampling sees the penalised logits: token 0 (2.0) beats 3 only without them.
        let mut g = Sampler::new(SamplingParams {
            repetition_penalty: 4.0,
            ..Default::default()
        })
        .unwrap();
        g.accept(0);
        assert_eq!(g.sample(&[5.0, 2.0, 1.0]), 1);
        let mut plain = Sampler::new(SamplingParams::default()).unwrap();
        plain.accept(0);
        assert_eq!(plain.sample(&[5.0, 2.0, 1.0]), 0);
    }
}
