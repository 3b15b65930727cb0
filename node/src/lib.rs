//! The node process: keeps the model resident on its backend and runs the continuous
//! depth-wise batching engine ([`engine`]), served to the async world by the engine actor
//! ([`engine_actor`]). [`grpc`] is the ingress (the internal node service) and [`server`] starts a node.
//!
//! Simulation hooks (feature `sim`): `fake` (a node without a model, for measuring what is
//! around the engine) and `sim` (a compute-free backend and pass cost models, for capacity
//! planning and simulated clusters). Serving never needs them.

pub mod device;
pub mod engine;
pub mod engine_actor;
#[cfg(feature = "sim")]
pub mod fake;
pub mod fingerprint;
pub mod grpc;
pub mod metrics;
pub mod outbound;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod supervisor;

pub use device::{Device, GpuWeights};
pub use engine::{
    Batching, Engine, EngineConfig, EngineError, EngineStats, Event, ExitControl, ExitRule, FinishReason, GenParams,
    KvFill, KvGeometry, KvState, LoadReport, PassInfo, Request, RequestId, ResidentModel, TokenEvent, Usage,
};
