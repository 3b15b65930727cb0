//! Rotary position embeddings in the "rotate half" convention (Hugging Face / GPT-NeoX):
//! within each head, element `i` is paired with element `i + rot_dim / 2`.
//!
//! GGUF files of the `llama` architecture store the q/k projections permuted for the
//! interleaved convention; the model loader undoes that permutation so one kernel serves all.

/// How the rotary frequencies are scaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (Hugging Face `"linear"`).
    Linear { factor: f64 },
    /// Llama 3's frequency-dependent scaling (Hugging Face `"llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// Explicit per-frequency divisors (GGUF `rope_freqs.weight`), length `rot_dim / 2`.
    Factors(Vec<f32>),
}

/// Inverse frequencies of one model, computed once in f64.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f64>,
    head_dim: usize,
    /// Multiplier applied to positions (1 / linear factor).
    pos_scale: f64,
}

impl RopeTable {
    /// `rot_dim` (<= head_dim, even) is how many leading dimensions of each head rotate.
    pub fn new(head_dim: usize, rot_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = rot_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / rot_dim as f64))
            .collect();
        let mut pos_scale = 1.0;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => pos_scale = 1.0 / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth =
                            (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Factors(div) => {
                for (f, d) in inv_freq.iter_mut().zip(div) {
                    *f /= *d as f64;
                }
            }
        }
        Self {
            inv_freq,
            head_dim,
            pos_scale,
        }
    }

    /// The inverse frequencies with the position scale folded in: the angle of pair `i` at
    /// position `p` is `p * scaled_inv_freq()[i]` (what the CUDA backend uploads).
    pub fn scaled_inv_freq(&self) -> Vec<f64> {
        self.inv_freq.iter().map(|f| f * self.pos_scale).collect()
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Number of rotated pairs per head.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Fills `cos` and `sin` (each `half()` long) for one position.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f64 * self.pos_scale;
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (p * f).sin_cos();
            cos[i] = c as f32;
            sin[i] = s as f32;
        }
    }

    /// Rotates every head of one row (`n_heads * head_dim` values) in place.
    pub fn apply(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.half();
        for head in row.chunks_exact_mut(self.head_dim) {
            let (a, b) = head[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x1 * cos[i] + x0 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_matches_formula() {
        let t = RopeTable::new(4, 4, 10000.0, &RopeScaling::None);
        let mut cos = [0f32; 2];
        let mut sin = [0f32; 2];
        t.cos_sin(3, &mut cos, &mut sin);
        let mut row = [1.0f32, 2.0, 3.0, 4.0];
        t.apply(&mut row, &cos, &sin);
        // pair (0, 2) rotates by 3 rad, pair (1, 3) by 3 / 100 rad.
        let (c0, s0) = (3f64.cos(), 3f64.sin());
        assert!((row[0] as f64 - (1.0 * c0 - 3.0 * s0)).abs() < 1e-6);
        assert!((row[2] as f64 - (3.0 * c0 + 1.0 * s0)).abs() < 1e-6);
        let (c1, s1) = (0.03f64.cos(), 0.03f64.sin());
        assert!((row[1] as f64 - (2.0 * c1 - 4.0 * s1)).abs() < 1e-6);
        let n: f32 = row.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let a = RopeTable::new(8, 8, 10000.0, &RopeScaling::Linear { factor: 2.0 });
        let b = RopeTable::new(8, 8, 10000.0, &RopeScaling::None);
        let (mut c1, mut s1, mut c2, mut s2) = ([0f32; 4], [0f32; 4], [0f32; 4], [0f32; 4]);
        a.cos_sin(10, &mut c1, &mut s1);
        b.cos_sin(5, &mut c2, &mut s2);
        assert_eq!(c1, c2);
        assert_eq!(s1, s2);
    }
}
