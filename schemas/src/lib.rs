//! Wire types shared by the processor, the producer and any other NATS client.
//!
//! Everything here is plain data plus pure functions (codec, subject names): no I/O, so that
//! every side of the bus agrees on one definition. `PROTOCOL.md` documents the same contract
//! for clients written in other languages.

mod codec;
mod error;
mod server_url;
mod task;
mod types;

pub use codec::{decode, encode, encode_with_capacity, CodecError, Encoding};
pub use error::{ErrorBody, ErrorCode};
pub use server_url::{redact_server_urls, ServerUrls, UrlCredentials};
pub use task::{subject, Task, UnknownTask, DEFAULT_SUBJECT_PREFIX};
pub use types::{
    FillMaskOutput, InferOptions, InferReply, InferRequest, Input, LabelScore, MaskPrediction,
    Output, Priority,
};

/// Header names used on requests and replies.
pub mod headers {
    /// `application/json` or `application/cbor`; on requests it picks the decoder, on replies
    /// it says which encoding was used (always the request's).
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Set on error replies: a short human-readable description (NATS micro convention).
    pub const SERVICE_ERROR: &str = "Nats-Service-Error";
    /// Set on error replies: the numeric error code (NATS micro convention).
    pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
    /// On requests: the requester's time budget in milliseconds, counted from when a
    /// processor receives the message. A request still queued when it runs out is not
    /// computed and gets a `timeout` error. No clock agreement is needed.
    pub const REQUEST_TIMEOUT_MS: &str = "Request-Timeout-Ms";
    /// On requests: an absolute deadline, Unix time in milliseconds (for requesters whose
    /// clocks agree with the processors', or requests that wait in a stream).
    pub const REQUEST_DEADLINE_MS: &str = "Request-Deadline-Ms";
    /// On requests (optional): an id of the caller's choosing, carried through the processor's
    /// logs of the request and of the batch that computed it.
    pub const REQUEST_ID: &str = "Request-Id";
    /// On requests (optional): `interactive` (the default) or `bulk`. Bulk inputs fill what
    /// room interactive ones leave in each batch, and are served first once they have waited
    /// the processor's `batch.bulk_max_wait_ms`, so they are never starved.
    pub const PRIORITY: &str = "Priority";
    /// On requests sent through the JetStream transport: the inbox to reply to (JetStream
    /// uses the message's own reply subject for acknowledgements).
    pub const REPLY_INBOX: &str = "Reply-Inbox";
    /// On requests sent through the JetStream transport: a unique id per request, so that a
    /// retried publish is stored once (JetStream de-duplication).
    pub const MESSAGE_ID: &str = "Nats-Msg-Id";
    /// On replies through the JetStream transport: how many times the stream delivered the
    /// request (above 1, an earlier delivery may have been answered too: a duplicate).
    pub const DELIVERY_COUNT: &str = "Delivery-Count";
}

/// Media types for [`headers::CONTENT_TYPE`].
pub mod media_types {
    /// JSON payloads.
    pub const JSON: &str = "application/json";
    /// CBOR payloads (the default when no content type is given).
    pub const CBOR: &str = "application/cbor";
}
