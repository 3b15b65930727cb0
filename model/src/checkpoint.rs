//! The relaxed recursive checkpoint format (version 1): a directory holding
//!
//! - `rrt_checkpoint.json`: format name and version, architecture, recursion (L, K, B, init,
//!   per-module ranks), how the matrices are stored (`weights`: `f32`, `q8_0` or `q4_1`;
//!   absent in checkpoints written before it existed, which read as `f32`), exit settings,
//!   whether there is a learned exit gate (`exit_gate: true`; absent means none), tokenizer
//!   facts, chat template, provenance (source file and its sha256);
//! - `model.safetensors`: tensors `embed`, `norm`, `lm_head` (untied models only),
//!   `shared.{k}.{attn_norm,ffn_norm}`, `shared.{k}.{q,k,v,o,gate,up,down}` (`out x in`),
//!   `lora.{l}.{module}.a` (`rank x in`) / `.b` (`out x rank`) for every unrolled layer `l` and
//!   every module with a non-zero rank, and with `exit_gate: true` the gate's
//!   `exit_gate.weight` (`1 x hidden`) and `exit_gate.bias` (`1`);
//! - `tokenizer.json`.
//!
//! The exit gate (trained by `rrt-train train --exit-gate`, or fitted after training by `rrt
//! calibrate --fit-gate` through [`write_exit_gate`]; Ouro's gate, for our checkpoints):
//! `g = w . h + b` on each loop's output `h` as the forward pass holds it, which for these
//! Llama-family checkpoints is the residual stream *before* the final norm; `sigmoid(g)` is
//! the probability of exiting after that loop. It loads into [`Weights::exit_gate`], which is
//! what [`Model::gate_logits`], the engine's gate criterion and `rrt calibrate --criterion
//! gate` read: a checkpoint's gate comes from this flag, not from its family. Without the flag
//! (every checkpoint written before it existed) there is no gate and `exit_gate.*` tensors are
//! not read. [`save`] sets the flag from the model and omits it without a gate, so gate-less
//! checkpoints are written exactly as before; [`quantize`] carries the gate through unchanged.
//! Weights are written to a temporary file renamed over `model.safetensors`, so a process
//! that has the old file mapped keeps reading the old bytes.
//!
//! With `weights: f32` every tensor is f32. With `q8_0` the shared-layer matrices and
//! `embed` / `lm_head` are GGML Q8_0 blocks; with `q4_1` the shared-layer matrices are Q4_1
//! blocks and `embed` / `lm_head` Q8_0 (the scheme of the Q4_1 GGUF SmolLM2 ships as). Blocks
//! are stored as `U8` tensors of shape `[out, row_bytes]` under the same names (row `r` of
//! the matrix is bytes `r * row_bytes ..`; 34 bytes per 32 weights for Q8_0, 20 for Q4_1, in
//! ggml's block layout), made by ggml's reference quantizers ([`crate::quant`]). They load as
//! [`crate::weights::Weight::Quant`] and are multiplied in that form, like a GGUF file's.
//! Norms, LoRA factors and the exit gate are always f32. [`quantize`] rewrites a checkpoint in
//! another format (`rrt quantize`).
//!
//! Loading validates the version, every tensor's presence, type and shape (a block tensor's
//! byte length against the architecture's matrix), every value (NaN/Inf; for blocks, every
//! f16 scale and minimum), and refuses a partial or inconsistent checkpoint with an error naming
//! the file and tensor.

use crate::chat::ChatTemplate;
use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::forward::Model;
use crate::loader::{LoadedModel, SourceKind};
use crate::recursive::{Init, Lora, MODULES, Recursion};
use crate::sources::SafetensorsSource;
use crate::tokenizer::{Tokenizer, TokenizerFacts};
use crate::weights::{ExitGate, Layer, Linear, TensorSource, Weight, Weights};
use rrt_kernels::RopeScaling;
use rrt_kernels::qmatmul::QFormat;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "rrt-recursive-checkpoint";
pub const VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "rrt_checkpoint.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Architecture {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    /// L: unrolled layers.
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub rope_dim: usize,
    /// `{"type": "none" | "linear" | "llama3" | "factors", ...}`.
    pub rope_scaling: serde_json::Value,
    pub max_positions: usize,
    pub sliding_window: Option<usize>,
    pub tie_embeddings: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RecursionConfig {
    pub loops: usize,
    pub shared_layers: usize,
    pub init: Init,
    /// Rank per module name (q, k, v, o, gate, up, down).
    pub ranks: std::collections::BTreeMap<String, usize>,
}

/// Early-exit settings (filled by `rrt calibrate`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ExitConfig {
    pub criterion: Option<crate::exit::Criterion>,
    /// One threshold per loop before the last; `null` = never exit after that loop.
    pub thresholds: Vec<Option<f32>>,
    /// The agreement rate the thresholds were calibrated for.
    #[serde(default)]
    pub target_agreement: Option<f64>,
    /// Where and on how many tokens they were calibrated.
    #[serde(default)]
    pub calibration: serde_json::Value,
}

/// How a checkpoint's matrices are stored (`weights` in `rrt_checkpoint.json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WeightFormat {
    /// Every tensor f32 (the format before `weights` existed).
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// Shared-layer matrices, `embed` and `lm_head` as Q8_0 blocks.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Shared-layer matrices as Q4_1 blocks, `embed` and `lm_head` as Q8_0.
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl WeightFormat {
    /// The name used in `rrt_checkpoint.json` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_1 => "q4_1",
        }
    }

    /// The block format of the shared layers' matrices (`None`: f32).
    pub fn shared(self) -> Option<QFormat> {
        match self {
            WeightFormat::F32 => None,
            WeightFormat::Q8_0 => Some(QFormat::Q8_0),
            WeightFormat::Q4_1 => Some(QFormat::Q4_1),
        }
    }

    /// The block format of `embed` and `lm_head` (`None`: f32).
    pub fn embeddings(self) -> Option<QFormat> {
        match self {
            WeightFormat::F32 => None,
            WeightFormat::Q8_0 | WeightFormat::Q4_1 => Some(QFormat::Q8_0),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub source: String,
    pub source_sha256: String,
    pub tool: String,
    #[serde(default)]
    pub extra: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointConfig {
    pub format: String,
    pub version: u32,
    pub architecture: Architecture,
    pub recursion: RecursionConfig,
    /// How the matrices are stored; `f32` when absent (checkpoints written before it existed).
    #[serde(default)]
    pub weights: WeightFormat,
    #[serde(default)]
    pub exit: ExitConfig,
    /// The checkpoint holds a learned exit gate (`exit_gate.weight` / `.bias`); `false` when
    /// absent (checkpoints written before it existed), and then not written.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exit_gate: bool,
    pub tokenizer: TokenizerFacts,
    pub chat_template: Option<String>,
    pub provenance: Provenance,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Tensor names of the learned exit gate.
pub const EXIT_GATE_WEIGHT: &str = "exit_gate.weight";
pub const EXIT_GATE_BIAS: &str = "exit_gate.bias";

fn rope_to_json(r: &RopeScaling) -> serde_json::Value {
    match r {
        RopeScaling::None => serde_json::json!({"type": "none"}),
        RopeScaling::Linear { factor } => serde_json::json!({"type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => serde_json::json!({
            "type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position": original_max_position
        }),
        RopeScaling::Factors(f) => serde_json::json!({"type": "factors", "factors": f}),
    }
}

fn rope_from_json(path: &Path, v: &serde_json::Value) -> Result<RopeScaling> {
    let f = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| ModelError::format(path, format!("rope_scaling.{k} is missing")))
    };
    Ok(match v.get("type").and_then(|t| t.as_str()) {
        Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear { factor: f("factor")? },
        Some("llama3") => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position: f("original_max_position")?,
        },
        Some("factors") => RopeScaling::Factors(
            serde_json::from_value(v["factors"].clone())
                .map_err(|e| ModelError::format(path, format!("rope_scaling.factors: {e}")))?,
        ),
        other => return Err(ModelError::format(path, format!("unknown rope_scaling type {other:?}"))),
    })
}

impl Architecture {
    pub fn from_config(c: &ModelConfig) -> Self {
        Self {
            family: c.family,
            hidden: c.hidden,
            intermediate: c.intermediate,
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            vocab: c.vocab,
            rms_eps: c.rms_eps,
            rope_theta: c.rope_theta,
            rope_dim: c.rope_dim,
            rope_scaling: rope_to_json(&c.rope_scaling),
            max_positions: c.max_positions,
            sliding_window: c.sliding_window,
            tie_embeddings: c.tie_embeddings,
        }
    }

    fn to_config(&self, path: &Path) -> Result<ModelConfig> {
        if self.family == crate::config::Family::Ouro {
            return Err(ModelError::unsupported(
                path,
                "an rrt checkpoint of an Ouro model: Ouro is natively looped; serve its Hugging Face directory",
            ));
        }
        Ok(ModelConfig {
            family: self.family,
            hidden: self.hidden,
            intermediate: self.intermediate,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            vocab: self.vocab,
            rms_eps: self.rms_eps,
            rope_theta: self.rope_theta,
            rope_dim: self.rope_dim,
            rope_scaling: rope_from_json(path, &self.rope_scaling)?,
            max_positions: self.max_positions,
            sliding_window: self.sliding_window,
            qkv_bias: false,
            tie_embeddings: self.tie_embeddings,
            looped: None,
        })
    }
}

/// sha256 of a file (or of every file of a directory, in name order), hex.
pub fn sha256_of(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut files = vec![];
    if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        files.extend(v);
    } else {
        files.push(path.to_path_buf());
    }
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| ModelError::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| ModelError::io(&f, e))?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// One tensor to write: f32 values or raw bytes (quantized blocks), little-endian.
struct St {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &St {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn st(shape: Vec<usize>, v: &[f32]) -> St {
    St {
        dtype: safetensors::Dtype::F32,
        shape,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A matrix as stored in a checkpoint: f32 (`fmt` `None`), or blocks of `fmt`, written as they
/// are when the matrix is already held in `fmt` and quantized from its f32 values otherwise.
fn matrix(path: &Path, name: &str, lin: &Linear, fmt: Option<QFormat>) -> Result<St> {
    let Some(fmt) = fmt else {
        return Ok(st(vec![lin.out_dim, lin.in_dim], &lin.w_f32()));
    };
    let data = match &lin.w {
        Weight::Quant(f, b) if *f == fmt => b.clone(),
        _ => {
            if !lin.in_dim.is_multiple_of(32) {
                return Err(ModelError::InvalidArgument {
                    field: "weights",
                    msg: format!(
                        "`{name}` has rows of {} weights, not whole blocks of 32: it cannot be stored as {fmt:?}",
                        lin.in_dim
                    ),
                });
            }
            let b = crate::quant::quantize(fmt, &lin.w_f32());
            if let Some((block, v)) = crate::quant::first_non_finite_block(fmt, &b) {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tensor `{name}`: block {block} quantizes to a non-finite f16 scale ({v}): weights too large for {fmt:?}"
                    ),
                ));
            }
            b
        }
    };
    Ok(St {
        dtype: safetensors::Dtype::U8,
        shape: vec![lin.out_dim, fmt.row_bytes(lin.in_dim)],
        data,
    })
}

/// Writes a recursive model as a checkpoint directory (created if missing), its matrices in
/// `format` (quantized from f32 where needed; see the module doc).
pub fn save(
    dir: &Path,
    model: &Model,
    tokenizer: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    provenance: Provenance,
    format: WeightFormat,
) -> Result<()> {
    let rec = recursion_of(model)?;
    save_weights(dir, model, format)?;
    let tpath = dir.join("tokenizer.json");
    std::fs::write(&tpath, tokenizer.to_json()?).map_err(|e| ModelError::io(&tpath, e))?;
    let cfg = CheckpointConfig {
        format: FORMAT.into(),
        version: VERSION,
        architecture: Architecture::from_config(&model.config),
        recursion: RecursionConfig {
            loops: rec.loops,
            shared_layers: model.weights.layers.len(),
            init: rec.init,
            ranks: MODULES.iter().zip(rec.ranks).map(|(m, r)| (m.to_string(), r)).collect(),
        },
        weights: format,
        exit: ExitConfig::default(),
        exit_gate: model.weights.exit_gate.is_some(),
        tokenizer: tokenizer.facts(),
        chat_template: chat_template.map(|t| t.source.clone()),
        provenance,
    };
    write_config(dir, &cfg)
}

fn recursion_of(model: &Model) -> Result<&Recursion> {
    model.recursion.as_ref().ok_or_else(|| ModelError::InvalidArgument {
        field: "model",
        msg: "not a recursive model".into(),
    })
}

/// Writes `model.safetensors` of a recursive model into `dir` (created if missing, and only
/// once every tensor is ready: a model that cannot be stored in `format` leaves nothing).
fn save_weights(dir: &Path, model: &Model, format: WeightFormat) -> Result<()> {
    let rec = recursion_of(model)?;
    let c = &model.config;
    let w = &model.weights;
    let wpath = dir.join("model.safetensors");
    let (sh, emb) = (format.shared(), format.embeddings());
    let mut t: Vec<(String, St)> = vec![
        ("embed".into(), matrix(&wpath, "embed", &w.embed, emb)?),
        ("norm".into(), st(vec![c.hidden], &w.norm)),
    ];
    if let Some(head) = &w.lm_head {
        t.push(("lm_head".into(), matrix(&wpath, "lm_head", head, emb)?));
    }
    let (qd, kd, i) = (c.q_dim(), c.kv_dim(), c.intermediate);
    for (k, layer) in w.layers.iter().enumerate() {
        let p = format!("shared.{k}");
        t.push((format!("{p}.attn_norm"), st(vec![c.hidden], &layer.attn_norm)));
        t.push((format!("{p}.ffn_norm"), st(vec![c.hidden], &layer.ffn_norm)));
        let parts = [
            ("q", layer.qkv.rows(0..qd)),
            ("k", layer.qkv.rows(qd..qd + kd)),
            ("v", layer.qkv.rows(qd + kd..qd + 2 * kd)),
            ("o", layer.o.clone()),
            ("gate", layer.gate_up.rows(0..i)),
            ("up", layer.gate_up.rows(i..2 * i)),
            ("down", layer.down.clone()),
        ];
        for (m, lin) in parts {
            let name = format!("{p}.{m}");
            let tensor = matrix(&wpath, &name, &lin, sh)?;
            t.push((name, tensor));
        }
    }
    for (l, mods) in rec.lora.iter().enumerate() {
        for (m, lo) in mods.iter().enumerate() {
            if let Some(lo) = lo {
                t.push((
                    format!("lora.{l}.{}.a", MODULES[m]),
                    st(vec![lo.rank, lo.in_dim], &lo.a),
                ));
                t.push((
                    format!("lora.{l}.{}.b", MODULES[m]),
                    st(vec![lo.out_dim, lo.rank], &lo.b),
                ));
            }
        }
    }
    if let Some(g) = &w.exit_gate {
        if g.w.len() != c.hidden {
            return Err(ModelError::InvalidArgument {
                field: "exit_gate",
                msg: format!(
                    "the exit gate has {} weights for a hidden size of {}",
                    g.w.len(),
                    c.hidden
                ),
            });
        }
        t.push((EXIT_GATE_WEIGHT.into(), st(vec![1, c.hidden], &g.w)));
        t.push((EXIT_GATE_BIAS.into(), st(vec![1], &[g.b])));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_tensors(&wpath, &t)
}

/// Writes `tensors` to `path` through a temporary file renamed over it: a reader that has the
/// old file mapped keeps its bytes, and a failed write leaves the old file whole.
fn write_tensors(path: &Path, tensors: &[(String, St)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(tensors.iter().map(|(n, s)| (n.clone(), s)), None, &tmp)
        .map_err(|e| ModelError::format(&tmp, format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Gives the checkpoint in `dir` the exit gate `gate` (`rrt calibrate --fit-gate`), replacing
/// any it had: `exit_gate.weight` / `.bias` are written as f32, every other tensor is copied
/// byte for byte, and the config's `exit_gate` flag is set. Returns the config written.
pub fn write_exit_gate(dir: &Path, gate: &ExitGate) -> Result<CheckpointConfig> {
    let mut cfg = read_config(dir)?;
    let hidden = cfg.architecture.hidden;
    if gate.w.len() != hidden || !gate.b.is_finite() || gate.w.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::InvalidArgument {
            field: "exit_gate",
            msg: format!(
                "an exit gate for this checkpoint needs {hidden} finite weights and a finite bias, got {} weights",
                gate.w.len()
            ),
        });
    }
    let wpath = dir.join("model.safetensors");
    let bytes = std::fs::read(&wpath).map_err(|e| ModelError::io(&wpath, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::format(&wpath, format!("cannot read: {e}")))?;
    let mut t: Vec<(String, St)> = file
        .iter()
        .filter(|(name, _)| *name != EXIT_GATE_WEIGHT && *name != EXIT_GATE_BIAS)
        .map(|(name, v)| {
            (
                name.to_string(),
                St {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    t.push((EXIT_GATE_WEIGHT.into(), st(vec![1, hidden], &gate.w)));
    t.push((EXIT_GATE_BIAS.into(), st(vec![1], &[gate.b])));
    write_tensors(&wpath, &t)?;
    cfg.exit_gate = true;
    write_config(dir, &cfg)?;
    Ok(cfg)
}

/// Rewrites the checkpoint `src` into `out` with its matrices in `format` (`rrt quantize`):
/// the same model, config (exit calibration included), tokenizer file and chat template; the
/// provenance keeps the original source, names `tool`, and records the rewrite under
/// `extra.quantize`. Matrices already in `format` are copied without requantizing. Returns the
/// config written.
pub fn quantize(src: &Path, out: &Path, format: WeightFormat, tool: &str) -> Result<CheckpointConfig> {
    let old = read_config(src)?;
    let same = match (std::fs::canonicalize(src), std::fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(ModelError::InvalidArgument {
            field: "out",
            msg: format!(
                "{} is the input checkpoint: write the rewritten checkpoint to another directory",
                out.display()
            ),
        });
    }
    let lm = load(src)?;
    save_weights(out, &lm.model, format)?;
    let (tfrom, tto) = (src.join("tokenizer.json"), out.join("tokenizer.json"));
    std::fs::copy(&tfrom, &tto).map_err(|e| ModelError::io(&tfrom, e))?;
    let mut extra = match old.provenance.extra.clone() {
        serde_json::Value::Object(m) => m,
        serde_json::Value::Null => serde_json::Map::new(),
        other => serde_json::Map::from_iter([("previous_extra".to_string(), other)]),
    };
    extra.insert(
        "quantize".into(),
        serde_json::json!({
            "from": src.display().to_string(),
            "from_weights": old.weights.name(),
            "from_tool": old.provenance.tool.clone(),
            "weights": format.name(),
        }),
    );
    let cfg = CheckpointConfig {
        weights: format,
        exit_gate: lm.model.weights.exit_gate.is_some(),
        provenance: Provenance {
            tool: tool.to_string(),
            extra: serde_json::Value::Object(extra),
            ..old.provenance.clone()
        },
        ..old
    };
    write_config(out, &cfg)?;
    Ok(cfg)
}

/// Rewrites `rrt_checkpoint.json` (e.g. after calibrating exits).
pub fn write_config(dir: &Path, cfg: &CheckpointConfig) -> Result<()> {
    let cpath = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(cfg).map_err(|e| ModelError::format(&cpath, e.to_string()))?;
    std::fs::write(&cpath, text).map_err(|e| ModelError::io(&cpath, e))
}

/// Reads and checks `rrt_checkpoint.json`.
pub fn read_config(dir: &Path) -> Result<CheckpointConfig> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|e| ModelError::io(&cpath, e))?;
    let cfg: CheckpointConfig = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&cpath, format!("invalid checkpoint config: {e}")))?;
    if cfg.format != FORMAT {
        return Err(ModelError::format(
            &cpath,
            format!("format `{}` is not `{FORMAT}`", cfg.format),
        ));
    }
    if cfg.version != VERSION {
        return Err(ModelError::format(
            &cpath,
            format!(
                "checkpoint version {} is not supported (this rrt reads version {VERSION})",
                cfg.version
            ),
        ));
    }
    let r = &cfg.recursion;
    if r.loops == 0 || r.shared_layers * r.loops != cfg.architecture.n_layers {
        return Err(ModelError::format(
            &cpath,
            format!(
                "{} shared layers x {} loops != {} layers",
                r.shared_layers, r.loops, cfg.architecture.n_layers
            ),
        ));
    }
    for m in MODULES {
        if !r.ranks.contains_key(m) {
            return Err(ModelError::format(
                &cpath,
                format!("recursion.ranks has no entry for `{m}`"),
            ));
        }
    }
    Ok(cfg)
}

/// Loads a checkpoint directory written by [`save`].
pub fn load(dir: &Path) -> Result<LoadedModel> {
    let cfg = read_config(dir)?;
    let cpath = dir.join(CONFIG_FILE);
    let config = cfg.architecture.to_config(&cpath)?;
    config.validate(&cpath)?;
    let src = SafetensorsSource::open_dir(dir)?;
    let (qd, kd, h, i) = (config.q_dim(), config.kv_dim(), config.hidden, config.intermediate);
    let weights_fmt = cfg.weights;
    // A matrix in the form the config declares: f32 values or `fmt` blocks, `[o, row_bytes]`.
    let matrix = |name: &str, o: usize, inp: usize, fmt: Option<QFormat>| -> Result<Linear> {
        let stored = src.dtype(name);
        let path = src.path_for(name);
        let Some(fmt) = fmt else {
            if stored == Some(safetensors::Dtype::U8) {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}` holds U8 blocks but {CONFIG_FILE} declares `weights: f32`"),
                ));
            }
            return Ok(Linear::f32(o, inp, src.load(name, &[o, inp])?, None));
        };
        if stored.is_some_and(|d| d != safetensors::Dtype::U8) {
            return Err(ModelError::format(
                path,
                format!(
                    "tensor `{name}` is stored as {:?} but {CONFIG_FILE} declares `weights: {weights_fmt}` ({fmt:?} blocks as U8)",
                    stored.unwrap_or(safetensors::Dtype::U8)
                ),
            ));
        }
        if !inp.is_multiple_of(32) {
            return Err(ModelError::format(
                path,
                format!("tensor `{name}`: rows of {inp} weights are not whole {fmt:?} blocks of 32"),
            ));
        }
        let rb = fmt.row_bytes(inp);
        let bytes = src.load_u8(name, &[o, rb])?;
        if let Some((block, v)) = crate::quant::first_non_finite_block(fmt, bytes) {
            let per_row = inp / 32;
            return Err(ModelError::format(
                path,
                format!(
                    "tensor `{name}`: {fmt:?} block {block} (row {}, weights {}..{}) has a non-finite f16 scale or minimum ({v})",
                    block / per_row,
                    block % per_row * 32,
                    block % per_row * 32 + 32
                ),
            ));
        }
        Ok(Linear::new(o, inp, Weight::Quant(fmt, bytes.to_vec()), None))
    };
    let sh = weights_fmt.shared();
    let lin = |name: &str, o: usize, inp: usize| matrix(name, o, inp, sh);
    let layers = (0..cfg.recursion.shared_layers)
        .map(|k| -> Result<Layer> {
            let p = format!("shared.{k}");
            Ok(Layer {
                attn_norm: src.load(&format!("{p}.attn_norm"), &[h])?,
                qkv: Linear::stack(vec![
                    lin(&format!("{p}.q"), qd, h)?,
                    lin(&format!("{p}.k"), kd, h)?,
                    lin(&format!("{p}.v"), kd, h)?,
                ]),
                o: lin(&format!("{p}.o"), h, qd)?,
                ffn_norm: src.load(&format!("{p}.ffn_norm"), &[h])?,
                gate_up: Linear::stack(vec![lin(&format!("{p}.gate"), i, h)?, lin(&format!("{p}.up"), i, h)?]),
                down: lin(&format!("{p}.down"), h, i)?,
                branch_norms: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dims = [(qd, h), (kd, h), (kd, h), (h, qd), (i, h), (i, h), (h, i)];
    let mut ranks = [0usize; 7];
    for (m, name) in MODULES.iter().enumerate() {
        ranks[m] = cfg.recursion.ranks[*name];
        if ranks[m] > dims[m].0.min(dims[m].1) {
            return Err(ModelError::format(
                &cpath,
                format!("rank {} of `{name}` exceeds min(in, out)", ranks[m]),
            ));
        }
    }
    let lora = (0..config.n_layers)
        .map(|l| -> Result<[Option<Lora>; 7]> {
            let mut out: [Option<Lora>; 7] = Default::default();
            for m in 0..7 {
                let r = ranks[m];
                if r == 0 {
                    continue;
                }
                let (o, inp) = dims[m];
                let a = src.load(&format!("lora.{l}.{}.a", MODULES[m]), &[r, inp])?;
                let b = src.load(&format!("lora.{l}.{}.b", MODULES[m]), &[o, r])?;
                out[m] = Some(Lora {
                    rank: r,
                    in_dim: inp,
                    out_dim: o,
                    a,
                    b,
                });
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    let emb = weights_fmt.embeddings();
    let embed = matrix("embed", config.vocab, h, emb)?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(matrix("lm_head", config.vocab, h, emb)?)
    };
    // f32 (or f16 / bf16, widened) values, shapes `[1, hidden]` and `[1]`, finite: errors name
    // the tensor.
    let exit_gate = if cfg.exit_gate {
        for name in [EXIT_GATE_WEIGHT, EXIT_GATE_BIAS] {
            if src.dtype(name) == Some(safetensors::Dtype::U8) {
                return Err(ModelError::format(
                    src.path_for(name),
                    format!("tensor `{name}` holds U8 blocks: the exit gate is stored as f32"),
                ));
            }
        }
        let w = src.load(EXIT_GATE_WEIGHT, &[1, h])?;
        let b = src.load(EXIT_GATE_BIAS, &[1])?;
        Some(ExitGate { w, b: b[0] })
    } else {
        None
    };
    let weights = Weights {
        embed,
        layers,
        norm: src.load("norm", &[h])?,
        lm_head,
        exit_gate,
    };
    let recursion = Recursion {
        loops: cfg.recursion.loops,
        init: cfg.recursion.init,
        ranks,
        lora,
    };
    let tokenizer = Tokenizer::from_json_file(&dir.join("tokenizer.json"), cfg.tokenizer.clone())?;
    let chat_template = cfg.chat_template.as_deref().map(ChatTemplate::new).transpose()?;
    Ok(LoadedModel {
        model: Model::recursive(config, weights, recursion)?,
        tokenizer,
        chat_template,
        path: dir.to_path_buf(),
        kind: SourceKind::Recursive,
    })
}
