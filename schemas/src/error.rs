//! Error replies: a stable code and kind plus a message a person can act on.

use serde::{Deserialize, Serialize};

/// Why a request failed. Each kind has a fixed numeric code (HTTP-like) that is sent in the
/// `Nats-Service-Error-Code` header and in the body; PROTOCOL.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is neither CBOR nor JSON, or does not have the request's shape.
    MalformedRequest,
    /// The request decoded but its content is unusable (no inputs, an empty input, ...).
    InvalidInput,
    /// The subject names a task that the protocol does not define.
    UnknownTask,
    /// The model cannot serve this task (e.g. a checkpoint without a masked-LM head).
    UnsupportedTask,
    /// Too many inputs, or an input or payload over the configured size limit.
    TooLarge,
    /// The model could not compute an input it accepted.
    ModelFailed,
    /// The processor's queue is full; retry later or on another processor.
    Overloaded,
    /// The request's deadline passed before it was computed.
    Timeout,
    /// A bug or an unexpected state in the processor.
    Internal,
}

impl ErrorCode {
    /// The numeric code sent in `Nats-Service-Error-Code`.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MalformedRequest | ErrorCode::InvalidInput => 400,
            ErrorCode::UnknownTask => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::UnsupportedTask => 422,
            ErrorCode::ModelFailed | ErrorCode::Internal => 500,
            ErrorCode::Overloaded => 503,
            ErrorCode::Timeout => 504,
        }
    }

    /// Whether sending the same request again (possibly to another processor) may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Overloaded)
    }
}

/// Body of an error reply, in the request's encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Numeric code, equal to the `Nats-Service-Error-Code` header.
    pub code: u16,
    /// Stable machine-readable kind.
    pub kind: ErrorCode,
    /// What went wrong and how to fix it.
    pub message: String,
    /// On `too_large` for a reply over the server's message size: how many inputs per
    /// request would fit (a client splits the request into requests of at most this many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inputs: Option<u32>,
}

impl ErrorBody {
    /// An error body of this kind with its numeric code filled in.
    pub fn new(kind: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code: kind.status(),
            kind,
            message: message.into(),
            max_inputs: None,
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code,
            self.kind.as_str(),
            self.message
        )
    }
}

impl std::error::Error for ErrorBody {}

impl ErrorCode {
    /// The kind's name as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::UnknownTask => "unknown_task",
            ErrorCode::UnsupportedTask => "unsupported_task",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ModelFailed => "model_failed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}
