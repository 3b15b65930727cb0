//! The node process: keeps the model resident on its backend and runs the continuous
//! depth-wise batching engine ([`engine`]). The actors and the internal node gRPC service
//! come with issue D.

pub mod engine;

pub use engine::{
    Batching, Engine, EngineConfig, EngineError, EngineStats, Event, ExitControl, ExitRule, FinishReason, GenParams,
    KvFill, Request, RequestId, ResidentModel, TokenEvent, Usage,
};
