//! Random-weight models shaped like published ones, written as the Hugging Face directories
//! those models ship as, so tests and benchmarks run where the real weights cannot be fetched
//! (`rrt random-model --like ouro-1.4b`). The real weights load through the same code: only
//! the values differ, never the names, shapes or config keys.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use half::bf16;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::path::Path;

/// The architecture of an Ouro model (ByteDance's natively looped LM).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuroShape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub steps: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub max_positions: usize,
}

/// Ouro-1.4B (and its Thinking variant): hidden 2048, 24 layers, 16 heads of 128, SwiGLU
/// 5632, the SmolLM2 vocabulary, 4 loop steps.
pub const OURO_1_4B: OuroShape = OuroShape {
    name: "ouro-1.4b",
    hidden: 2048,
    layers: 24,
    heads: 16,
    kv_heads: 16,
    head_dim: 128,
    intermediate: 5632,
    vocab: 49152,
    steps: 4,
    rope_theta: 1e6,
    rms_eps: 1e-6,
    max_positions: 65536,
};

/// Ouro-2.6B: Ouro-1.4B with 48 layers.
pub const OURO_2_6B: OuroShape = OuroShape {
    name: "ouro-2.6b",
    layers: 48,
    ..OURO_1_4B
};

/// A tiny Ouro for tests: the same structure (sandwich norms, 4 steps, plain multi-head
/// attention, untied head, the SmolLM2 vocabulary) at a size a test runs in milliseconds.
pub const OURO_TINY: OuroShape = OuroShape {
    name: "ouro-tiny",
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 4,
    head_dim: 16,
    intermediate: 160,
    vocab: 49152,
    steps: 4,
    rope_theta: 1e6,
    rms_eps: 1e-6,
    max_positions: 4096,
};

/// The shape called `name` (`ouro-1.4b`, `ouro-2.6b`, `ouro-tiny`).
pub fn ouro_shape(name: &str) -> Option<OuroShape> {
    [OURO_1_4B, OURO_2_6B, OURO_TINY]
        .into_iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
}

/// How the tensors are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreType {
    F32,
    Bf16,
}

impl OuroShape {
    /// Parameters of the model (embeddings and head included).
    pub fn params(&self) -> usize {
        let (h, qd, kd) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let layer = h * (qd + 2 * kd) + qd * h + 3 * h * self.intermediate + 4 * h;
        2 * self.vocab * h + self.layers * layer + h + h + 1
    }

    /// The `config.json` of this shape (the keys Ouro's own config has).
    pub fn config_json(
        &self,
        exit_threshold: f32,
        bos: Option<u32>,
        eos: Option<u32>,
        store: StoreType,
    ) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["OuroForCausalLM"],
            "model_type": "ouro",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "vocab_size": self.vocab,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": false,
            "total_ut_steps": self.steps,
            "early_exit_threshold": exit_threshold,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": match store { StoreType::F32 => "float32", StoreType::Bf16 => "bfloat16" },
        })
    }
}

/// Writes a random model of `shape` as an Ouro Hugging Face directory: `config.json`,
/// `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (with `chat_template`)
/// from `tokenizer` / `chat_template`. Weights: linear maps uniform with standard deviation
/// `1 / sqrt(in)`, norm scales `1 +- 0.1`, embeddings of standard deviation 1, an exit gate
/// whose logits spread around 0 (so tokens exit at every step at thresholds 0.5 - 0.9).
#[allow(clippy::too_many_arguments)]
pub fn write_ouro(
    dir: &Path,
    shape: &OuroShape,
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
    seed: u64,
    store: StoreType,
    exit_threshold: f32,
) -> Result<()> {
    if tokenizer.vocab_size() > shape.vocab {
        return Err(ModelError::InvalidArgument {
            field: "tokenizer",
            msg: format!(
                "the tokenizer has {} tokens, more than the {} of {}",
                tokenizer.vocab_size(),
                shape.vocab,
                shape.name
            ),
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (h, qd, kd, inter) = (
        shape.hidden,
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
        shape.intermediate,
    );
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, dims: Vec<usize>, std: f32, center: f32, rng: &mut rand_chacha::ChaCha8Rng| {
        let n: usize = dims.iter().product();
        // Uniform with this standard deviation: half-width std * sqrt(3).
        let a = std * 3f32.sqrt();
        let bytes = match store {
            StoreType::F32 => {
                let mut b = Vec::with_capacity(4 * n);
                for _ in 0..n {
                    b.extend_from_slice(&(center + rng.random_range(-a..=a)).to_le_bytes());
                }
                b
            }
            StoreType::Bf16 => {
                let mut b = Vec::with_capacity(2 * n);
                for _ in 0..n {
                    b.extend_from_slice(&bf16::from_f32(center + rng.random_range(-a..=a)).to_le_bytes());
                }
                b
            }
        };
        tensors.push((name, dims, bytes));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![shape.vocab, h],
        1.0,
        0.0,
        &mut rng,
    );
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for (m, out, inp) in [
            ("self_attn.q_proj", qd, h),
            ("self_attn.k_proj", kd, h),
            ("self_attn.v_proj", kd, h),
            ("self_attn.o_proj", h, qd),
            ("mlp.gate_proj", inter, h),
            ("mlp.up_proj", inter, h),
            ("mlp.down_proj", h, inter),
        ] {
            add(
                format!("{p}.{m}.weight"),
                vec![out, inp],
                1.0 / (inp as f32).sqrt(),
                0.0,
                &mut rng,
            );
        }
        for n in [
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ] {
            add(format!("{p}.{n}.weight"), vec![h], 0.1 / 3f32.sqrt(), 1.0, &mut rng);
        }
    }
    add("model.norm.weight".into(), vec![h], 0.1 / 3f32.sqrt(), 1.0, &mut rng);
    // The gate reads a normed state (entries of size ~1): logits of standard deviation ~1.5.
    add(
        "model.early_exit_gate.weight".into(),
        vec![1, h],
        1.5 / (h as f32).sqrt(),
        0.0,
        &mut rng,
    );
    add("model.early_exit_gate.bias".into(), vec![1], 0.0, 0.0, &mut rng);
    add(
        "lm_head.weight".into(),
        vec![shape.vocab, h],
        1.0 / (h as f32).sqrt(),
        0.0,
        &mut rng,
    );

    let dtype = match store {
        StoreType::F32 => Dtype::F32,
        StoreType::Bf16 => Dtype::BF16,
    };
    let path = dir.join("model.safetensors");
    let views = tensors
        .iter()
        .map(|(name, dims, bytes)| {
            TensorView::new(dtype, dims.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::format(&path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &path)
        .map_err(|e| ModelError::format(&path, format!("cannot write: {e}")))?;

    let token = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let cfg = shape.config_json(
        exit_threshold,
        token(&tokenizer.bos_text),
        token(&tokenizer.eos_text),
        store,
    );
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| ModelError::io(&p, e))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg).expect("JSON values serialize"),
    )?;
    write("tokenizer.json", tokenizer.to_json()?)?;
    let tc = serde_json::json!({
        "bos_token": tokenizer.bos_text,
        "eos_token": tokenizer.eos_text,
        "chat_template": chat_template,
        "model_max_length": shape.max_positions,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tc).expect("JSON values serialize"),
    )?;
    Ok(())
}
