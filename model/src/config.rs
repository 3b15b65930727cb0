//! The architecture hyper-parameters of a Llama-family decoder, read from GGUF metadata or a
//! Hugging Face `config.json`, validated once.
//!
//! A family's structural differences are answered here, by [`ModelConfig`]'s methods
//! ([`ModelConfig::branch_norms`], [`ModelConfig::loop_end_norm`],
//! [`ModelConfig::has_exit_gate`]); the forward pass, the engine and the kernels ask those
//! methods and never match on the family themselves.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use rrt_kernels::RopeScaling;
use serde_json::Value as Json;
use std::path::Path;

/// The model families this crate runs. They differ only in details handled by flags below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// ByteDance's Ouro: natively looped (all L layers run `total_ut_steps` times), sandwich
    /// norms in every layer, the final norm at the end of every loop, a learned exit gate.
    Ouro,
}

/// The loop of a natively looped family (Ouro): how many steps it was trained with and its
/// configured early-exit threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Looped {
    /// Loop steps (Ouro's `total_ut_steps`): `n_layers` = steps x stored layers.
    pub steps: usize,
    /// Exit when the cumulative exit probability reaches this (Ouro's
    /// `early_exit_threshold`; 1.0 runs every step).
    pub exit_threshold: f32,
}

/// Hyper-parameters of a decoder-only Llama-family transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    /// Leading dimensions of each head that rotate (= head_dim for these families).
    pub rope_dim: usize,
    pub rope_scaling: RopeScaling,
    pub max_positions: usize,
    /// Sliding attention window (Mistral), if any.
    pub sliding_window: Option<usize>,
    /// q/k/v projections carry a bias (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The LM head is the token embedding matrix.
    pub tie_embeddings: bool,
    /// Natively looped families: `n_layers` counts unrolled layers (steps x stored layers).
    pub looped: Option<Looped>,
}

impl ModelConfig {
    /// Every layer norms each residual branch before adding it (Ouro's `input_layernorm_2` and
    /// `post_attention_layernorm_2`): `h = x + n2(attn(n1(x)))`, `out = h + n4(mlp(n3(h)))`.
    pub fn branch_norms(&self) -> bool {
        self.family == Family::Ouro
    }

    /// Each loop ends with the final norm, and that normed state is both the loop's output (the
    /// LM head reads it as it is, with no norm of its own) and the next loop's input.
    pub fn loop_end_norm(&self) -> bool {
        self.family == Family::Ouro
    }

    /// The family publishes a learned exit gate in its weights (Ouro's `model.early_exit_gate`:
    /// hidden -> 1 with bias, read on each loop's output), which the weight loader then
    /// requires. Whether a loaded model has a gate is [`crate::weights::Weights::exit_gate`]:
    /// an rrt checkpoint's comes from its `exit_gate` field (`crate::checkpoint`), whatever
    /// the family.
    pub fn has_exit_gate(&self) -> bool {
        self.family == Family::Ouro
    }

    /// Layers stored in the weights (`n_layers` / loop steps for a natively looped model).
    pub fn stored_layers(&self) -> usize {
        match self.looped {
            Some(l) if l.steps > 0 => self.n_layers / l.steps,
            _ => self.n_layers,
        }
    }

    /// The RoPE table of this model.
    pub fn rope_table(&self) -> rrt_kernels::RopeTable {
        rrt_kernels::RopeTable::new(self.head_dim, self.rope_dim, self.rope_theta, &self.rope_scaling)
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of the fused q|k|v projection.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Parameters of one transformer layer (matrices, biases, norms).
    pub fn layer_params(&self) -> usize {
        let bias = if self.qkv_bias { self.qkv_dim() } else { 0 };
        self.hidden * self.qkv_dim()
            + bias
            + self.q_dim() * self.hidden
            + 3 * self.hidden * self.intermediate
            + if self.branch_norms() { 4 } else { 2 } * self.hidden
    }

    /// Checks the invariants every kernel relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(ModelError::format(path, msg));
        if self.hidden == 0 || self.intermediate == 0 || self.n_layers == 0 || self.vocab == 0 {
            return bad(format!(
                "zero-sized model: hidden {} intermediate {} layers {} vocab {}",
                self.hidden, self.intermediate, self.n_layers, self.vocab
            ));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is not a positive even number",
                self.head_dim
            ));
        }
        if self.rope_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad(format!(
                "rotary dimension {} does not fit head dimension {}",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rms_eps > 0.0 && self.rms_eps.is_finite()) {
            return bad(format!("RMSNorm epsilon {} is not a positive number", self.rms_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("RoPE theta {} is not a positive number", self.rope_theta));
        }
        if let Some(l) = self.looped {
            if l.steps == 0 || !self.n_layers.is_multiple_of(l.steps) {
                return bad(format!(
                    "{} layers do not unroll into {} loop steps",
                    self.n_layers, l.steps
                ));
            }
            if !(l.exit_threshold > 0.0 && l.exit_threshold <= 1.0) {
                return bad(format!("early_exit_threshold {} is not in (0, 1]", l.exit_threshold));
            }
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling
            && f.len() != self.rope_dim / 2
        {
            return bad(format!(
                "rope_freqs has {} factors, expected {}",
                f.len(),
                self.rope_dim / 2
            ));
        }
        Ok(())
    }

    /// Reads the hyper-parameters of a GGUF file (`llama` and `qwen2` architectures).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let arch = g
            .opt_str("general.architecture")?
            .ok_or_else(|| ModelError::format(path, "missing metadata key `general.architecture`"))?
            .to_string();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            other => {
                return Err(ModelError::unsupported(
                    path,
                    format!("GGUF architecture `{other}` (supported: llama, mistral, qwen2)"),
                ));
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> { Ok(g.req_u64(&key(k))? as usize) };
        let hidden = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = g
            .opt_u64(&key("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let head_dim = match g.opt_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let vocab = match g.opt_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => g.str_array("tokenizer.ggml.tokens")?.map(|t| t.len()).unwrap_or(0),
        };
        let rope_scaling = match g.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(ModelError::unsupported(path, format!("RoPE scaling `{other}`")));
            }
        };
        let cfg = ModelConfig {
            family,
            hidden,
            intermediate: usize_of("feed_forward_length")?,
            n_layers: usize_of("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab,
            rms_eps: g.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
            rope_theta: g.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
            rope_dim: g
                .opt_u64(&key("rope.dimension_count"))?
                .map(|v| v as usize)
                .unwrap_or(head_dim),
            rope_scaling,
            max_positions: g.opt_u64(&key("context_length"))?.unwrap_or(2048) as usize,
            sliding_window: None,
            qkv_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            tie_embeddings: g.tensor_info("output.weight").is_none(),
            looped: None,
        };
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (Llama, Mistral, Qwen2, SmolLM and Ouro models).
    pub fn from_hf_json(path: &Path, json: &Json) -> Result<Self> {
        let model_type = json.get("model_type").and_then(Json::as_str).unwrap_or("");
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "ouro" => Family::Ouro,
            other => {
                return Err(ModelError::unsupported(
                    path,
                    format!("model_type `{other}` (supported: llama, mistral, qwen2, ouro)"),
                ));
            }
        };
        let num = |k: &str| -> Result<usize> {
            json.get(k)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::format(path, format!("`{k}` is missing or not an unsigned integer")))
        };
        let opt_num = |k: &str| json.get(k).and_then(Json::as_u64).map(|v| v as usize);
        let opt_f = |k: &str| json.get(k).and_then(Json::as_f64);
        let looped = if family == Family::Ouro {
            let threshold = match json.get("early_exit_threshold") {
                None | Some(Json::Null) => 1.0,
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| ModelError::format(path, "`early_exit_threshold` is not a number"))?
                    as f32,
            };
            Some(Looped {
                steps: num("total_ut_steps")?,
                exit_threshold: threshold,
            })
        } else {
            None
        };
        let hidden = num("hidden_size")?;
        let n_heads = num("num_attention_heads")?;
        let head_dim = opt_num("head_dim").unwrap_or(hidden.checked_div(n_heads).unwrap_or(0));
        let rope_scaling = match json.get("rope_scaling") {
            None | Some(Json::Null) => RopeScaling::None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("");
                let f = |k: &str| rs.get(k).and_then(Json::as_f64);
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor").unwrap_or(1.0),
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor").unwrap_or(8.0),
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position: f("original_max_position_embeddings").unwrap_or(8192.0),
                    },
                    other => {
                        return Err(ModelError::unsupported(path, format!("rope_scaling type `{other}`")));
                    }
                }
            }
        };
        let sliding_window = match family {
            Family::Mistral => opt_num("sliding_window"),
            Family::Qwen2 if json.get("use_sliding_window").and_then(Json::as_bool) == Some(true) => {
                opt_num("sliding_window")
            }
            _ => None,
        };
        let stored = num("num_hidden_layers")?;
        Ok(ModelConfig {
            family,
            hidden,
            intermediate: num("intermediate_size")?,
            n_layers: stored * looped.map_or(1, |l| l.steps),
            n_heads,
            n_kv_heads: opt_num("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            vocab: num("vocab_size")?,
            rms_eps: opt_f("rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta: opt_f("rope_theta").unwrap_or(10000.0),
            rope_dim: head_dim,
            rope_scaling,
            max_positions: opt_num("max_position_embeddings").unwrap_or(2048),
            sliding_window,
            qkv_bias: family == Family::Qwen2 || json.get("attention_bias").and_then(Json::as_bool) == Some(true),
            tie_embeddings: json.get("tie_word_embeddings").and_then(Json::as_bool).unwrap_or(false),
            looped,
        })
    }
}
