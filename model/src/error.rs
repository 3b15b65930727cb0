//! The model crate's error type. Every error that comes from a file names the file, and the
//! tensor or metadata key when there is one.

use std::path::{Path, PathBuf};

/// Errors from loading, tokenizing and running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    BadVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: tensor `{tensor}`: unknown or unsupported tensor type {ty}")]
    UnknownTensorType { path: PathBuf, tensor: String, ty: String },
    #[error("{path}: tensor `{tensor}`: shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}`: non-finite weight {value} at flat index {index}")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: unsupported model: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid argument `{field}`: {msg}")]
    InvalidArgument { field: &'static str, msg: String },
    #[error("KV cache is full: {needed} more blocks needed, {free} free")]
    KvFull { needed: usize, free: usize },
}

impl ModelError {
    /// A stable short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::Io { .. } => "io",
            ModelError::BadMagic { .. } => "bad_magic",
            ModelError::BadVersion { .. } => "bad_version",
            ModelError::Truncated { .. } => "truncated",
            ModelError::UnknownTensorType { .. } => "unknown_tensor_type",
            ModelError::Shape { .. } => "shape",
            ModelError::MissingTensor { .. } => "missing_tensor",
            ModelError::NonFinite { .. } => "non_finite",
            ModelError::Format { .. } => "format",
            ModelError::Unsupported { .. } => "unsupported",
            ModelError::Tokenizer(_) => "tokenizer",
            ModelError::Template(_) => "template",
            ModelError::InvalidArgument { .. } => "invalid_argument",
            ModelError::KvFull { .. } => "kv_full",
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
