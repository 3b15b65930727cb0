//! Tokenizers built on the `tokenizers` crate: from GGUF metadata (the `gpt2` byte-level BPE
//! family and SentencePiece-style `llama` vocabularies) or from a Hugging Face
//! `tokenizer.json`; special tokens; incremental detokenization for streaming.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Regex of llama.cpp's `llama-bpe` pre-tokenizer (Llama 3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Regex of llama.cpp's `qwen2` pre-tokenizer.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Token texts that end generation when they are control tokens of the vocabulary
/// (llama.cpp's end-of-generation set).
const EOG_TEXTS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "</s>",
];

/// A model's tokenizer with its special-token facts.
#[derive(Clone)]
pub struct Tokenizer {
    /// Encodes special-token text as plain text.
    plain: tokenizers::Tokenizer,
    /// Recognises special tokens such as `<|im_start|>` in the text.
    special: tokenizers::Tokenizer,
    /// Prepend BOS when encoding with `add_special` (GGUF `tokenizer.ggml.add_bos_token`).
    /// For tokenizers from `tokenizer.json` the post-processor does this instead.
    manual_bos: bool,
    pub bos: Option<u32>,
    /// Ids that end generation (EOS and the end-of-turn tokens).
    pub eog: Vec<u32>,
    /// Texts of BOS / EOS for chat templates.
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
    pub add_bos: bool,
    vocab_size: usize,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let model = g.opt_str("tokenizer.ggml.model")?.unwrap_or("").to_string();
        let tokens = g
            .str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| ModelError::format(path, "missing metadata key `tokenizer.ggml.tokens`"))?;
        let types: Vec<i64> = match g.num_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t.into_iter().map(|v| v as i64).collect(),
            Some(t) => {
                return Err(ModelError::format(
                    path,
                    format!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        t.len(),
                        tokens.len()
                    ),
                ));
            }
            None => vec![1; tokens.len()],
        };
        let id_of = |key: &str| -> Result<Option<u32>> {
            match g.opt_u64(key)? {
                Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
                Some(v) => Err(ModelError::format(
                    path,
                    format!("`{key}` = {v} is outside the vocabulary of {}", tokens.len()),
                )),
                None => Ok(None),
            }
        };
        let bos = id_of("tokenizer.ggml.bos_token_id")?;
        let eos = id_of("tokenizer.ggml.eos_token_id")?;
        let eot = id_of("tokenizer.ggml.eot_token_id")?;
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry((*t).to_string()).or_insert(i as u32);
        }
        let (base, add_bos_default) = match model.as_str() {
            "gpt2" => {
                let merges = g
                    .str_array("tokenizer.ggml.merges")?
                    .ok_or_else(|| ModelError::format(path, "missing metadata key `tokenizer.ggml.merges`"))?;
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| {
                                ModelError::format(path, format!("tokenizer.ggml.merges: `{m}` is not a pair"))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .build()
                    .map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
                t.with_pre_tokenizer(Some(gpt2_pre_tokenizer(path, pre)?));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
                (t, false)
            }
            "llama" => {
                let scores = g
                    .num_array("tokenizer.ggml.scores")?
                    .unwrap_or_else(|| vec![0.0; tokens.len()]);
                if scores.len() != tokens.len() {
                    return Err(ModelError::format(
                        path,
                        "tokenizer.ggml.scores does not match tokenizer.ggml.tokens",
                    ));
                }
                let merges = spm_merges(&tokens, &scores, &types);
                let unk = id_of("tokenizer.ggml.unknown_token_id")?.map(|i| tokens[i as usize].to_string());
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(u) = unk {
                    builder = builder.unk_token(u);
                }
                let mut t = tokenizers::Tokenizer::new(builder.build().map_err(tok_err)?);
                let space_prefix = g.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let mut norms = Vec::new();
                if space_prefix {
                    norms.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
                }
                norms.push(NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(tok_err)?));
                t.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
                    .map_err(tok_err)?;
                let mut decs = vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
                    DecoderWrapper::ByteFallback(ByteFallback::default()),
                    DecoderWrapper::Fuse(Fuse::default()),
                ];
                if space_prefix {
                    decs.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
                }
                t.with_decoder(Some(DecoderSequence::new(decs)));
                (t, true)
            }
            other => {
                return Err(ModelError::unsupported(
                    path,
                    format!("tokenizer model `{other}` (supported: gpt2, llama)"),
                ));
            }
        };
        let mut specials = Vec::new();
        let mut user = Vec::new();
        let mut eog = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            match *ty {
                TOKEN_TYPE_CONTROL => {
                    specials.push(AddedToken::from(t.to_string(), true));
                    if EOG_TEXTS.contains(t) {
                        eog.push(i as u32);
                    }
                }
                TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(t.to_string(), false)),
                _ => {}
            }
        }
        let mut special = base;
        special.add_special_tokens(specials).map_err(tok_err)?;
        special.add_tokens(user).map_err(tok_err)?;
        for id in [eos, eot].into_iter().flatten() {
            if !eog.contains(&id) {
                eog.push(id);
            }
        }
        eog.sort_unstable();
        let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default) && bos.is_some();
        let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
        Ok(Self::assemble(
            special,
            true,
            bos,
            eog,
            text_of(bos),
            text_of(eos),
            add_bos,
            tokens.len(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        special: tokenizers::Tokenizer,
        manual_bos: bool,
        bos: Option<u32>,
        eog: Vec<u32>,
        bos_text: Option<String>,
        eos_text: Option<String>,
        add_bos: bool,
        vocab_size: usize,
    ) -> Self {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        Self {
            plain,
            special,
            manual_bos,
            bos,
            eog,
            bos_text,
            eos_text,
            add_bos,
            vocab_size,
        }
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` (and `generation_config.json` /
    /// `config.json` for end-of-generation ids) from a Hugging Face model directory.
    pub fn from_hf_dir(dir: &Path, config: &serde_json::Value, tok_config: &serde_json::Value) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::format(&tj, format!("cannot load tokenizer: {e}")))?;
        let token_text = |v: Option<&serde_json::Value>| -> Option<String> {
            match v? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            }
        };
        let bos_text = token_text(tok_config.get("bos_token"));
        let eos_text = token_text(tok_config.get("eos_token"));
        let bos = bos_text
            .as_deref()
            .and_then(|t| tok.token_to_id(t))
            .or_else(|| config.get("bos_token_id").and_then(|v| v.as_u64()).map(|v| v as u32));
        let mut eog: Vec<u32> = Vec::new();
        let mut push_ids = |v: Option<&serde_json::Value>| match v {
            Some(serde_json::Value::Number(n)) => eog.extend(n.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(a)) => eog.extend(a.iter().filter_map(|x| x.as_u64()).map(|v| v as u32)),
            _ => {}
        };
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let gen_cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::format(&gen_path, format!("invalid JSON: {e}")))?;
            push_ids(gen_cfg.get("eos_token_id"));
        }
        push_ids(config.get("eos_token_id"));
        if let Some(id) = eos_text.as_deref().and_then(|t| tok.token_to_id(t)) {
            eog.push(id);
        }
        for t in EOG_TEXTS {
            if let Some(id) = tok.token_to_id(t)
                && tok.get_added_tokens_decoder().get(&id).is_some_and(|a| a.special)
            {
                eog.push(id);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let vocab_size = tok.get_vocab_size(true);
        let probe = tok.encode("a", true).map_err(tok_err)?;
        let add_bos = bos.is_some() && probe.get_ids().first() == bos.as_ref();
        Ok(Self::assemble(
            tok, false, bos, eog, bos_text, eos_text, add_bos, vocab_size,
        ))
    }

    /// Token ids of `text`. `add_special` adds BOS when the model asks for it;
    /// `parse_special` recognises special-token text (e.g. `<|im_start|>`) as those tokens,
    /// otherwise such text is tokenized like any other.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let t = if parse_special { &self.special } else { &self.plain };
        let add_post = add_special && !self.manual_bos;
        let enc = t.encode(text, add_post).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.manual_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; `skip_special` drops control tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.special.decode(ids, skip_special).map_err(tok_err)
    }

    /// Text of one token as stored in the vocabulary (for diagnostics).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.special.token_to_id(text)
    }

    /// Number of token ids (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The special-token facts that `tokenizer.json` alone does not carry (written into
    /// checkpoints next to it).
    pub fn facts(&self) -> TokenizerFacts {
        TokenizerFacts {
            bos: self.bos,
            eog: self.eog.clone(),
            bos_text: self.bos_text.clone(),
            eos_text: self.eos_text.clone(),
            add_bos: self.add_bos,
            manual_bos: self.manual_bos,
        }
    }

    /// Rebuilds a tokenizer from a `tokenizer.json` written by [`Self::to_json`] and its facts.
    pub fn from_json_file(path: &Path, f: TokenizerFacts) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::format(path, format!("cannot load tokenizer: {e}")))?;
        let vocab_size = tok.get_vocab_size(true);
        Ok(Self::assemble(
            tok,
            f.manual_bos,
            f.bos,
            f.eog,
            f.bos_text,
            f.eos_text,
            f.add_bos,
            vocab_size,
        ))
    }

    /// Serialises the tokenizer as a `tokenizer.json` (used when writing checkpoints).
    pub fn to_json(&self) -> Result<String> {
        self.special.to_string(false).map_err(tok_err)
    }
}

/// The pre-tokenizer of a GGUF `gpt2` vocabulary, by llama.cpp's `tokenizer.ggml.pre` name.
fn gpt2_pre_tokenizer(path: &Path, pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?,
        ))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]))
        }
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]))
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]))
        }
        other => {
            return Err(ModelError::unsupported(
                path,
                format!("pre-tokenizer `{other}` (supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2)"),
            ));
        }
    })
}

/// Merges of a SentencePiece BPE vocabulary derived from the token scores, as Hugging Face's
/// `LlamaConverter` does: every split `a + b` of a normal token whose halves are both tokens is a
/// merge, ranked by the merged token's score (higher first), ties by id.
fn spm_merges(tokens: &[&str], scores: &[f64], types: &[i64]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (split, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(split);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((scores[id], id, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a].to_string(), tokens[b].to_string()))
        .collect()
}

/// Special-token facts of a tokenizer (see [`Tokenizer::facts`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerFacts {
    pub bos: Option<u32>,
    pub eog: Vec<u32>,
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
    pub add_bos: bool,
    /// BOS is prepended by rrt, not by the tokenizer.json post-processor.
    pub manual_bos: bool,
}

/// Incremental detokenizer for streaming: emits text only once it is complete UTF-8 and
/// stable, so a multi-byte character split across tokens is never cut, and decoders that
/// strip or merge across token boundaries see enough context.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// `context` is the tail of the prompt (a few tokens), used only so the first generated
    /// token is decoded as a continuation.
    pub fn new(context: &[u32]) -> Self {
        let ctx = &context[context.len().saturating_sub(4)..];
        Self {
            ids: ctx.to_vec(),
            prefix: 0,
            read: ctx.len(),
        }
    }

    /// Adds a token; returns the new text, if any is ready.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever text is still held back (at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        match after.strip_prefix(&before) {
            Some(d) if !d.is_empty() => Ok(Some(d.to_string())),
            _ => Ok(None),
        }
    }
}
