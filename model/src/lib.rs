//! Loading and running Llama-family decoders on the CPU.
//!
//! - [`gguf`] / [`sources`]: GGUF v2/v3 and safetensors readers behind one
//!   [`weights::TensorSource`] interface; [`quant`] dequantizes every supported ggml type.
//! - [`loader`]: a path (GGUF file or Hugging Face directory) to a [`loader::LoadedModel`].
//! - [`tokenizer`] / [`chat`]: tokenization, streaming detokenization, chat templates.
//! - [`forward`]: the batched forward pass over a paged KV cache ([`kv`]).
//! - [`sampling`], [`generate`], [`eval`]: decoding and perplexity.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod exit;
pub mod exit_fit;
pub mod forward;
pub mod generate;
pub mod gguf;
pub mod kv;
pub mod loader;
pub mod quant;
pub mod recursive;
pub mod sampling;
pub mod sources;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
pub use forward::{Model, Row};
pub use loader::{LoadedModel, default_model_path, load};
