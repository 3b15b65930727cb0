//! Multi-process integration tests of the whole cluster (coordinator + node processes on
//! loopback). Filled in with issue D; model-level tests live beside the model crate.
