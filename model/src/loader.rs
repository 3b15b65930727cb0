//! Opening a model from a path: a GGUF file or a Hugging Face directory, into one
//! [`LoadedModel`] (weights, tokenizer, chat template).

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::Model;
use crate::gguf::GgufFile;
use crate::sources::{GgufSource, SafetensorsSource};
use crate::tokenizer::Tokenizer;
use crate::weights::load_weights;
use rrt_kernels::RopeScaling;
use std::path::{Path, PathBuf};

/// File name of the default model inside the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// What a model was loaded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    HuggingFace,
    /// A relaxed recursive checkpoint written by `rrt convert`.
    Recursive,
}

/// A model with everything needed to serve it.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
    pub kind: SourceKind,
}

/// Where the default model lives: `$RRT_MODEL_CACHE`, `./models`, or the repository's
/// `models/` folder, whichever holds the file first.
pub fn default_model_path() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("RRT_MODEL_CACHE") {
        candidates.push(PathBuf::from(dir).join(DEFAULT_MODEL_FILE));
    }
    candidates.push(PathBuf::from("models").join(DEFAULT_MODEL_FILE));
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("models")
            .join(DEFAULT_MODEL_FILE),
    );
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        ModelError::format(
            &candidates[0],
            "the default model is not in the model cache; run scripts/fetch-model.sh (or pass --model)",
        )
    })
}

/// Loads a GGUF file or a Hugging Face model directory.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        if path.join(crate::checkpoint::CONFIG_FILE).exists() {
            crate::checkpoint::load(path)
        } else {
            load_hf_dir(path)
        }
    } else {
        load_gguf(path)
    }
}

/// Loads a GGUF file.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let mut config = ModelConfig::from_gguf(&g)?;
    if let Some(info) = g.tensor_info("rope_freqs.weight") {
        let f = g.tensor_f32(info)?;
        config.rope_scaling = RopeScaling::Factors(f);
    }
    config.validate(path)?;
    let tokenizer = Tokenizer::from_gguf(&g)?;
    check_vocab(path, &config, &tokenizer)?;
    let chat_template = g
        .opt_str("tokenizer.chat_template")?
        .map(ChatTemplate::new)
        .transpose()?;
    let weights = load_weights(&config, &GgufSource::new(&g, &config))?;
    Ok(LoadedModel {
        model: Model::new(config, weights),
        tokenizer,
        chat_template,
        path: path.to_path_buf(),
        kind: SourceKind::Gguf,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}

/// Loads a Hugging Face directory: `config.json`, `*.safetensors` (sharded or not),
/// `tokenizer.json`, `tokenizer_config.json`.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let cfg_json = read_json(&cfg_path)?;
    let config = ModelConfig::from_hf_json(&cfg_path, &cfg_json)?;
    config.validate(&cfg_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tok_config = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        serde_json::json!({})
    };
    let tokenizer = Tokenizer::from_hf_dir(dir, &cfg_json, &tok_config)?;
    check_vocab(&cfg_path, &config, &tokenizer)?;
    let chat_template = hf_chat_template(dir, &tok_config)?;
    let src = SafetensorsSource::open_dir(dir)?;
    let weights = load_weights(&config, &src)?;
    let model = match config.looped {
        None => Model::new(config, weights),
        Some(l) => native_loop(config, weights, l.steps)?,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        path: dir.to_path_buf(),
        kind: SourceKind::HuggingFace,
    })
}

/// A natively looped model (Ouro) as a recursive model: its stored layers are the shared
/// block, looped `steps` times, with no LoRA (one KV layer per step and layer).
fn native_loop(config: ModelConfig, weights: crate::weights::Weights, steps: usize) -> Result<Model> {
    let n = config.n_layers;
    let recursion = crate::recursive::Recursion {
        loops: steps,
        init: crate::recursive::Init::Native,
        ranks: [0; 7],
        lora: (0..n).map(|_| Default::default()).collect(),
    };
    Model::recursive(config, weights, recursion)
}

/// The chat template of a Hugging Face directory: `tokenizer_config.json`'s `chat_template`
/// (a string, or a list whose `default` entry wins), else `chat_template.jinja`.
fn hf_chat_template(dir: &Path, tok_config: &serde_json::Value) -> Result<Option<ChatTemplate>> {
    let template_src = match tok_config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => {
            let jinja = dir.join("chat_template.jinja");
            jinja
                .exists()
                .then(|| std::fs::read_to_string(&jinja))
                .transpose()
                .map_err(|e| ModelError::io(&jinja, e))?
        }
    };
    template_src.as_deref().map(ChatTemplate::new).transpose()
}

/// The tokenizer and chat template of a model, without its weights (GGUF file, Hugging Face
/// directory, or rrt checkpoint).
pub fn load_tokenizer_and_template(path: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() && path.join(crate::checkpoint::CONFIG_FILE).exists() {
        let cfg = crate::checkpoint::read_config(path)?;
        let t = cfg.chat_template.as_deref().map(ChatTemplate::new).transpose()?;
        Ok((
            Tokenizer::from_json_file(&path.join("tokenizer.json"), cfg.tokenizer)?,
            t,
        ))
    } else if meta.is_dir() {
        let tc_path = path.join("tokenizer_config.json");
        let tok_config = if tc_path.exists() {
            read_json(&tc_path)?
        } else {
            serde_json::json!({})
        };
        Ok((load_tokenizer(path)?, hf_chat_template(path, &tok_config)?))
    } else {
        let g = GgufFile::open(path)?;
        let t = g
            .opt_str("tokenizer.chat_template")?
            .map(ChatTemplate::new)
            .transpose()?;
        Ok((Tokenizer::from_gguf(&g)?, t))
    }
}

/// Loads only the tokenizer of a model (no weights): what `rrt tokenize` needs.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() && path.join(crate::checkpoint::CONFIG_FILE).exists() {
        let cfg = crate::checkpoint::read_config(path)?;
        Tokenizer::from_json_file(&path.join("tokenizer.json"), cfg.tokenizer)
    } else if meta.is_dir() {
        let cfg_path = path.join("config.json");
        let cfg_json = read_json(&cfg_path)?;
        let tc_path = path.join("tokenizer_config.json");
        let tok_config = if tc_path.exists() {
            read_json(&tc_path)?
        } else {
            serde_json::json!({})
        };
        Tokenizer::from_hf_dir(path, &cfg_json, &tok_config)
    } else {
        Tokenizer::from_gguf(&GgufFile::open(path)?)
    }
}

fn check_vocab(path: &Path, config: &ModelConfig, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > config.vocab {
        return Err(ModelError::format(
            path,
            format!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                config.vocab
            ),
        ));
    }
    Ok(())
}

impl LoadedModel {
    /// Renders a single user message with the model's chat template (ChatML if it has none)
    /// and adds the assistant header.
    pub fn chat_prompt(&self, messages: &[crate::chat::Message]) -> Result<String> {
        let fallback;
        let t = match &self.chat_template {
            Some(t) => t,
            None => {
                fallback = ChatTemplate::new(crate::chat::CHATML)?;
                &fallback
            }
        };
        t.render(
            messages,
            true,
            self.tokenizer.bos_text.as_deref(),
            self.tokenizer.eos_text.as_deref(),
        )
    }
}
