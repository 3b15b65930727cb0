//! The node process: keeps the model resident, runs the continuous depth-wise batching engine
//! and serves the internal node gRPC service. Built in issues C (engine) and D (actors, gRPC);
//! until then the single-process forward pass lives in `rrt-model`.
