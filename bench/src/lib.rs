//! Load generation, capacity planning and benchmark plots for RRT clusters.
//!
//! - [`load`]: the load generator: workloads (prompts cut from a text, sampled prompt and
//!   output lengths), open-loop (Poisson arrivals) and closed-loop load points against a
//!   coordinator over its gRPC or OpenAI-compatible HTTP API, per-request records, the
//!   statistics of a point (TTFT, TPOT, end-to-end latency, throughput, exit loops), the
//!   results table, the JSON report and the SVG plots.
//! - [`capacity`]: capacity planning from a node's own traces: a step-cost model fitted to
//!   `engine.step` spans, a discrete-event simulation of real engines on the compute-free
//!   simulated backend behind the coordinator's routing, the highest rate one node sustains
//!   within latency limits, the node count for a target rate, and validation against a
//!   load-generator report.
//! - [`plot`]: line and bar charts as standalone SVG files (drawn with `plotters`), and
//!   [`uptrain`]: the plots of an uptraining run's log.
//!
//! The `rrt` binary's `bench load`, `capacity` and `bench sim-cluster` commands are thin
//! wiring over this crate: they parse and check flags, call it, print and write files.
//! Errors are [`BenchError`]s, which say what failed and on what.

pub mod capacity;
mod error;
pub mod frontier;
pub mod load;
pub mod plot;
pub mod uptrain;

pub use error::BenchError;

/// Results of this crate.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
