//! The crate's error type.

use std::path::PathBuf;

/// What went wrong in load generation or capacity planning, and on what.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file could not be read.
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Text that should be JSON of a known shape is not (`what` says which text).
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A length distribution that does not parse or is out of range.
    #[error("invalid length distribution `{spec}`: {reason}")]
    Dist { spec: String, reason: String },
    /// A workload that cannot make requests.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// A load point that cannot run.
    #[error("invalid load point: {0}")]
    Point(String),
    /// A target that cannot be driven as asked.
    #[error("target {url}: {reason}")]
    Target { url: String, reason: String },
    /// An API key that cannot be sent as gRPC metadata.
    #[error("the API key is not valid ASCII metadata")]
    ApiKey(#[source] tonic::metadata::errors::InvalidMetadataValue),
    /// A gRPC connection failed (`what` says to where).
    #[error("{what}")]
    Transport {
        what: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A gRPC call failed.
    #[error("{what}")]
    Rpc {
        what: String,
        #[source]
        source: tonic::Status,
    },
    /// An HTTP request failed.
    #[error("{what}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// A server answered, but not with what was needed.
    #[error("unexpected response from {url}: {detail}")]
    Response { url: String, detail: String },
    /// The progress bar's template does not parse.
    #[error("progress bar template")]
    Progress(#[from] indicatif::style::TemplateError),
    /// Too few `engine.step` spans to fit a node's costs.
    #[error("{found} engine.step spans in the traces: run nodes with `--trace-file` under load first")]
    NotEnoughSteps { found: usize },
    /// The step spans do not vary enough to determine every term of the cost model.
    #[error("the step spans do not determine the cost model (too little variety)")]
    Underdetermined,
    /// A bench report (`rrt bench load --json`) without what validation needs.
    #[error("bench report: {0}")]
    BenchReport(String),
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    /// A simulated engine refused its configuration or a request.
    #[error("simulated engine")]
    Engine(#[from] rrt_node::EngineError),
}
