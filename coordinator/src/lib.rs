//! The coordinator: gRPC front door, OpenAI-compatible HTTP API, routing across nodes and
//! per-request state for migration. Built in issue D; it never depends on `rrt-kernels`.
