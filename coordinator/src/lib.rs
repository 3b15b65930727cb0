//! The coordinator: gRPC front door, OpenAI-compatible HTTP API, routing across nodes and
//! per-request state for migration (issue D; in progress: routing policy so far). It never
//! depends on `rrt-kernels`.

pub mod registry;
pub mod routing;
