//! Errors of the coordinator, with their gRPC status and HTTP status / OpenAI error type.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request is invalid; `field` names what is wrong.
    #[error("{field}: {msg}")]
    InvalidArgument { field: String, msg: String },
    /// The request asks for a model this cluster does not serve.
    #[error("the model `{asked}` is not served here (served: `{served}`)")]
    ModelNotFound { asked: String, served: String },
    /// No healthy node can take the request.
    #[error("no healthy node is available{0}")]
    Unavailable(String),
    /// A node answered with an error status.
    #[error("node {node}: {}", status.message())]
    Node { node: String, status: Status },
    /// The admission limit (requests in flight) is reached; retry later.
    #[error("the cluster is at its limit of {limit} requests in flight; retry in a moment")]
    Overloaded { limit: usize },
    /// The request's deadline passed.
    #[error("the request's deadline passed after {0:?}")]
    DeadlineExceeded(std::time::Duration),
    /// A request with this id is already in flight.
    #[error("request_id: `{0}` is already in flight")]
    AlreadyExists(String),
    /// No valid API key.
    #[error("a valid API key is required: `Authorization: Bearer KEY`")]
    Unauthenticated,
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordError {
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// The gRPC code clients see.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::ModelNotFound { .. } => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Node { status, .. } => match status.code() {
                // A node's own failure is the cluster's unavailability, not the caller's fault.
                c @ (Code::InvalidArgument | Code::ResourceExhausted | Code::Cancelled) => c,
                _ => Code::Unavailable,
            },
            Self::Overloaded { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status of the same error.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            Code::InvalidArgument => 400,
            Code::NotFound => 404,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            Code::Cancelled => 499,
            Code::DeadlineExceeded => 504,
            Code::AlreadyExists => 409,
            Code::Unauthenticated => 401,
            _ => 500,
        }
    }

    /// The OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self.code() {
            Code::InvalidArgument | Code::NotFound | Code::Unauthenticated | Code::AlreadyExists => {
                "invalid_request_error"
            }
            Code::ResourceExhausted => "rate_limit_error",
            Code::DeadlineExceeded => "timeout_error",
            _ => "server_error",
        }
    }

    /// The OpenAI error `param`: the offending field, when known.
    pub fn param(&self) -> Option<String> {
        match self {
            Self::InvalidArgument { field, .. } => Some(field.clone()),
            Self::ModelNotFound { .. } => Some("model".into()),
            Self::AlreadyExists(_) => Some("request_id".into()),
            // Nodes name the field the same way: "field: message".
            Self::Node { status, .. } if status.code() == Code::InvalidArgument => status
                .message()
                .split_once(':')
                .map(|(f, _)| f)
                .filter(|f| f.chars().all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)))
                .map(str::to_string),
            _ => None,
        }
    }

    /// The message clients see (a node's INVALID_ARGUMENT passes its own message through).
    pub fn client_message(&self) -> String {
        match self {
            Self::Node { status, .. } if status.code() == Code::InvalidArgument => status.message().to_string(),
            e => e.to_string(),
        }
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Self {
        let mut s = Status::new(e.code(), e.client_message());
        if matches!(e, CoordError::Overloaded { .. }) {
            // A retry hint, as HTTP's Retry-After.
            s.metadata_mut()
                .insert("retry-after", tonic::metadata::MetadataValue::from_static("1"));
        }
        s
    }
}
