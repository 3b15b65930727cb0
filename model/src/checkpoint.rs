//! The relaxed recursive checkpoint format (version 1): a directory holding
//!
//! - `rrt_checkpoint.json`: format name and version, architecture, recursion (L, K, B, init,
//!   per-module ranks), exit settings, tokenizer facts, chat template, provenance (source file
//!   and its sha256);
//! - `model.safetensors`: f32 tensors `embed`, `norm`, `lm_head` (untied models only),
//!   `shared.{k}.{attn_norm,ffn_norm}`, `shared.{k}.{q,k,v,o,gate,up,down}` (`out x in`), and
//!   `lora.{l}.{module}.a` (`rank x in`) / `.b` (`out x rank`) for every unrolled layer `l` and
//!   every module with a non-zero rank;
//! - `tokenizer.json`.
//!
//! Loading validates the version, every tensor's presence and shape, and every value (NaN/Inf),
//! and refuses a partial or inconsistent checkpoint with an error naming the file and tensor.

use crate::chat::ChatTemplate;
use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::forward::Model;
use crate::loader::{LoadedModel, SourceKind};
use crate::recursive::{Init, Lora, MODULES, Recursion};
use crate::sources::SafetensorsSource;
use crate::tokenizer::{Tokenizer, TokenizerFacts};
use crate::weights::{Layer, Linear, TensorSource, Weights};
use rrt_kernels::RopeScaling;
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
    #[serde(default)]
    pub exit: ExitConfig,
    pub tokenizer: TokenizerFacts,
    pub chat_template: Option<String>,
    pub provenance: Provenance,
}

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

struct St(Vec<usize>, Vec<u8>);

impl safetensors::View for &St {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.1)
    }
    fn data_len(&self) -> usize {
        self.1.len()
    }
}

fn st(shape: Vec<usize>, v: &[f32]) -> St {
    St(shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// Writes a recursive model as a checkpoint directory (created if missing).
pub fn save(
    dir: &Path,
    model: &Model,
    tokenizer: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    provenance: Provenance,
) -> Result<()> {
    let rec = model.recursion.as_ref().ok_or_else(|| ModelError::InvalidArgument {
        field: "model",
        msg: "not a recursive model".into(),
    })?;
    let c = &model.config;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let w = &model.weights;
    let mut t: Vec<(String, St)> = vec![
        ("embed".into(), st(vec![c.vocab, c.hidden], &w.embed.w_f32())),
        ("norm".into(), st(vec![c.hidden], &w.norm)),
    ];
    if let Some(head) = &w.lm_head {
        t.push(("lm_head".into(), st(vec![c.vocab, c.hidden], &head.w_f32())));
    }
    let (qd, kd, h, i) = (c.q_dim(), c.kv_dim(), c.hidden, c.intermediate);
    for (k, layer) in w.layers.iter().enumerate() {
        t.push((format!("shared.{k}.attn_norm"), st(vec![h], &layer.attn_norm)));
        t.push((format!("shared.{k}.ffn_norm"), st(vec![h], &layer.ffn_norm)));
        let qkv = layer.qkv.w_f32();
        let gu = layer.gate_up.w_f32();
        t.push((format!("shared.{k}.q"), st(vec![qd, h], &qkv[..qd * h])));
        t.push((format!("shared.{k}.k"), st(vec![kd, h], &qkv[qd * h..(qd + kd) * h])));
        t.push((format!("shared.{k}.v"), st(vec![kd, h], &qkv[(qd + kd) * h..])));
        t.push((format!("shared.{k}.o"), st(vec![h, qd], &layer.o.w_f32())));
        t.push((format!("shared.{k}.gate"), st(vec![i, h], &gu[..i * h])));
        t.push((format!("shared.{k}.up"), st(vec![i, h], &gu[i * h..])));
        t.push((format!("shared.{k}.down"), st(vec![h, i], &layer.down.w_f32())));
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
    let wpath = dir.join("model.safetensors");
    safetensors::serialize_to_file(t.iter().map(|(n, s)| (n.clone(), s)), None, &wpath)
        .map_err(|e| ModelError::format(&wpath, format!("cannot write: {e}")))?;
    let tpath = dir.join("tokenizer.json");
    std::fs::write(&tpath, tokenizer.to_json()?).map_err(|e| ModelError::io(&tpath, e))?;
    let cfg = CheckpointConfig {
        format: FORMAT.into(),
        version: VERSION,
        architecture: Architecture::from_config(c),
        recursion: RecursionConfig {
            loops: rec.loops,
            shared_layers: w.layers.len(),
            init: rec.init,
            ranks: MODULES.iter().zip(rec.ranks).map(|(m, r)| (m.to_string(), r)).collect(),
        },
        exit: ExitConfig::default(),
        tokenizer: tokenizer.facts(),
        chat_template: chat_template.map(|t| t.source.clone()),
        provenance,
    };
    write_config(dir, &cfg)
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
    let lin = |name: &str, o: usize, inp: usize| -> Result<Linear> {
        Ok(Linear::f32(o, inp, src.load(name, &[o, inp])?, None))
    };
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
    let embed = lin("embed", config.vocab, h)?;
    let lm_head = if config.tie_embeddings {
        None
    } else {
        Some(lin("lm_head", config.vocab, h)?)
    };
    let weights = Weights {
        embed,
        layers,
        norm: src.load("norm", &[h])?,
        lm_head,
        exit_gate: None,
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
