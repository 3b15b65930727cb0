//! Multi-process integration tests of the whole cluster (`tests/cluster.rs`: a coordinator and
//! two `rrt node` processes on loopback, driven over gRPC and the OpenAI HTTP API, and by the
//! Python `grpcio` and `openai` clients in `python/clients.py`). Model-level tests live beside
//! the model crate; engine tests beside the node crate.
