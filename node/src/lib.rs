//! The node process: keeps the model resident on its backend and runs the continuous
//! depth-wise batching engine ([`engine`]), served to the async world by the engine actor
//! ([`engine_actor`]). The gRPC ingress and the internal node service come with issue D.

pub mod engine;
pub mod engine_actor;
pub mod grpc;

pub use engine::{
    Batching, Engine, EngineConfig, EngineError, EngineStats, Event, ExitControl, ExitRule, FinishReason, GenParams,
    KvFill, LoadReport, Request, RequestId, ResidentModel, TokenEvent, Usage,
};
