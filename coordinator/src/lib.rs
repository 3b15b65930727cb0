//! The coordinator: the client front doors (gRPC `rrt.v1.Generation` in [`grpc`], the
//! OpenAI-compatible HTTP API in [`http`]), the request core ([`core`]: tokenization on a
//! node, routing, the per-request token table, cancellation; [`pump`]: one admitted request's
//! life, migrations included), the node registry
//! ([`registry`]) and routing ([`routing`]). [`server`] runs it all.

pub mod auth;
pub mod core;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
mod pump;
pub mod registry;
pub mod request;
pub mod routing;
pub mod server;
pub mod tls;

pub use crate::core::{Coordinator, CoordinatorConfig, Generation, ModelInfo, Outcome};
pub use error::CoordError;
pub use request::{Finish, GenEvent, GenRequest, GenToken, GenUsage, Input};
