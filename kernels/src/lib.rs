//! Compute kernels for Relaxed Recursive Transformers.
//!
//! Everything here works on plain row-major `f32` slices so that the model crate, the engine
//! and the tests can call it without any tensor framework. The CPU implementations are the
//! embedded default backend and the test oracle for the GPU kernels.
//!
//! Conventions:
//! - A weight matrix of a linear map `in -> out` is stored `out x in`, row-major (the layout of
//!   PyTorch's `nn.Linear.weight` and of GGUF tensors), so `y = x W^T`.
//! - Activations are `n x dim`, row-major: one row per token.
//! - Nothing in this crate panics on well-formed sizes; sizes are checked with `debug_assert!`
//!   because the callers (the model crate) validate shapes once at load time.

pub mod attention;
pub mod backend;
pub mod cuda;
pub mod elementwise;
pub mod lora;
pub mod matmul;
pub mod pool;
pub mod qdot;
pub mod qmatmul;
pub mod rope;
pub mod skinny;

pub use attention::{AttnRow, AttnShape, KvDtype, KvLayout, KvValue, attention_paged, cpu_kv_dtype, set_cpu_kv_dtype};
pub use backend::{Backend, BackendError, CpuBackend, CpuKv, CpuMatrix, HeadTop, MatrixData};
pub use elementwise::{add_inplace, axpy, dot, logsumexp, rmsnorm, silu_mul, softmax_inplace};
pub use matmul::{MatmulMode, matmul_nt};
pub use pool::on_compute_pool;
pub use qdot::{CpuProducts, cpu_products, set_cpu_products};
pub use rope::{RopeScaling, RopeTable};
