//! One request message → what to compute, and one result → the reply message: decoding,
//! limits, deadlines and reply encoding, the same for every transport. Pure functions of
//! the message (no NATS connection, no model), so each rule is tested on its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use schemas::{
    decode, encode, headers, CodecError, Encoding, ErrorBody, ErrorCode, InferOptions, InferReply,
    InferRequest, Input, Priority, Task,
};
use tokio::time::Instant;

use crate::config::ServiceConfig;

/// What a request may ask for (from `[service]`, plus the model's mask token).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_inputs: usize,
    pub max_input_bytes: usize,
    pub max_top_k: u32,
    pub max_masks_per_input: usize,
    /// The text of the model's mask token, if it serves `fill_mask`.
    pub mask_token: Option<Arc<str>>,
}

impl Limits {
    pub fn new(service: &ServiceConfig, mask_token: Option<Arc<str>>) -> Self {
        Limits {
            max_inputs: service.max_inputs,
            max_input_bytes: service.max_input_bytes,
            max_top_k: service.max_top_k,
            max_masks_per_input: service.max_masks_per_input,
            mask_token,
        }
    }
}

/// A request that decoded and is within every limit.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub inputs: Vec<Input>,
    pub options: InferOptions,
    /// The `Priority` header (interactive when absent).
    pub priority: Priority,
    /// When computing it stops being useful.
    pub deadline: Option<Instant>,
    /// The requester's `Request-Id`, for the logs.
    pub request_id: Option<Arc<str>>,
}

/// A header's value, if the message has it.
pub(crate) fn header<'a>(message_headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    message_headers
        .and_then(|h| h.get(name))
        .map(|value| value.as_str())
}

/// A span carrying the request's subject and `Request-Id` (if any) through its logs.
pub(crate) fn span(message: &async_nats::Message) -> tracing::Span {
    let id = header(message.headers.as_ref(), headers::REQUEST_ID);
    tracing::debug_span!("request", subject = %message.subject, id)
}

/// The encoding of a request (and so of its reply): its `Content-Type`, else its first byte.
pub(crate) fn encoding_of(message_headers: Option<&HeaderMap>, payload: &[u8]) -> Encoding {
    Encoding::detect(header(message_headers, headers::CONTENT_TYPE), payload)
}

/// Decodes and checks a request for `task`. `received` is when its time budget
/// (`Request-Timeout-Ms`, `timeout_ms`) starts.
pub(crate) fn parse(
    task: Task,
    encoding: Encoding,
    payload: &[u8],
    message_headers: Option<&HeaderMap>,
    received: Instant,
    limits: &Limits,
) -> Result<Parsed, ErrorBody> {
    let request: InferRequest =
        decode(encoding, payload).map_err(|e| malformed(encoding, payload, e))?;
    let deadline = deadline(message_headers, request.timeout_ms, received)?;
    let priority = match header(message_headers, headers::PRIORITY) {
        None => Priority::default(),
        Some(value) => value
            .parse()
            .map_err(|e: String| ErrorBody::new(ErrorCode::MalformedRequest, one_line(&e)))?,
    };
    check(task, &request, limits)?;
    Ok(Parsed {
        inputs: request.inputs,
        options: request.options,
        priority,
        deadline,
        request_id: header(message_headers, headers::REQUEST_ID).map(Arc::from),
    })
}

/// A decoding error in words a client author can act on.
fn malformed(encoding: Encoding, payload: &[u8], error: CodecError) -> ErrorBody {
    let first = payload.iter().copied().find(|b| !b.is_ascii_whitespace());
    let message = match (encoding, first) {
        (_, None) => "the payload is empty; send a request map such as {\"inputs\": [\"some text\"]}".to_string(),
        // Without a Content-Type, only `{` marks JSON: a JSON array or string was read as CBOR.
        (Encoding::Cbor, Some(b'[' | b'"')) => {
            "the payload looks like JSON but is not an object: a request is a map such as {\"inputs\": [\"some text\"]}".to_string()
        }
        (Encoding::Json, Some(b)) if b != b'{' => {
            "the JSON payload is not an object: a request is a map such as {\"inputs\": [\"some text\"]}".to_string()
        }
        _ => format!("the payload is not a valid request: {error}"),
    };
    ErrorBody::new(ErrorCode::MalformedRequest, message)
}

/// Refuses requests no model should see: no inputs, too many, too large, empty ones, and
/// `fill_mask` asking for more than its bounds (counted on the text: every mask token in it
/// becomes one, so this bounds the work before any tokenising).
fn check(task: Task, request: &InferRequest, limits: &Limits) -> Result<(), ErrorBody> {
    if request.inputs.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::InvalidInput,
            "`inputs` is empty; send at least one text",
        ));
    }
    if request.inputs.len() > limits.max_inputs {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "{} inputs in one request; the limit is {} (service.max_inputs): split it",
                request.inputs.len(),
                limits.max_inputs
            ),
        ));
    }
    for (i, input) in request.inputs.iter().enumerate() {
        match (task.takes_pairs(), input) {
            (true, Input::Text(_)) => {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidInput,
                    format!("input {i} is a single text; {task} takes [query, passage] pairs"),
                ))
            }
            (false, Input::Pair(..)) => {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "input {i} is a pair; {task} takes single texts (only rerank takes pairs)"
                    ),
                ))
            }
            _ => {}
        }
        if input.is_empty() {
            return Err(ErrorBody::new(
                ErrorCode::InvalidInput,
                format!("input {i} is empty"),
            ));
        }
        if input.len() > limits.max_input_bytes {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "input {i} has {} bytes; the limit is {} (service.max_input_bytes)",
                    input.len(),
                    limits.max_input_bytes
                ),
            ));
        }
    }
    if matches!(task, Task::FillMask | Task::Classify) {
        if let Some(top_k) = request.options.top_k {
            if top_k == 0 || top_k > limits.max_top_k {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "top_k must be between 1 and {} (service.max_top_k), not {top_k}",
                        limits.max_top_k
                    ),
                ));
            }
        }
        if let Some(mask) = limits.mask_token.as_deref() {
            for (i, input) in request.inputs.iter().enumerate() {
                let masks = input.text().matches(mask).count();
                if masks > limits.max_masks_per_input {
                    return Err(ErrorBody::new(
                        ErrorCode::TooLarge,
                        format!(
                            "input {i} has {masks} {mask} tokens; the limit is {} (service.max_masks_per_input)",
                            limits.max_masks_per_input
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The deadline the request's headers give (`Request-Timeout-Ms` from `received`,
/// `Request-Deadline-Ms`), read without decoding the payload; a malformed value counts as
/// none here ([`parse`] reports it).
pub(crate) fn header_deadline(
    message_headers: Option<&HeaderMap>,
    received: Instant,
) -> Option<Instant> {
    deadline(message_headers, None, received).ok().flatten()
}

/// When the request stops being worth computing: the earliest of its `Request-Timeout-Ms`
/// header and `timeout_ms` field (budgets counted from `received`) and its
/// `Request-Deadline-Ms` header (an absolute Unix time).
fn deadline(
    message_headers: Option<&HeaderMap>,
    timeout_ms: Option<u64>,
    received: Instant,
) -> Result<Option<Instant>, ErrorBody> {
    let number = |name: &str| -> Result<Option<u64>, ErrorBody> {
        let Some(value) = header(message_headers, name) else {
            return Ok(None);
        };
        value.trim().parse().map(Some).map_err(|_| {
            ErrorBody::new(
                ErrorCode::MalformedRequest,
                format!(
                    "header {name} must be a whole number of milliseconds, not {:?}",
                    one_line(value)
                ),
            )
        })
    };
    let mut deadline: Option<Instant> = None;
    let mut earliest = |candidate: Instant| {
        deadline = Some(deadline.map_or(candidate, |d| d.min(candidate)));
    };
    for ms in [number(headers::REQUEST_TIMEOUT_MS)?, timeout_ms]
        .into_iter()
        .flatten()
    {
        earliest(received + Duration::from_millis(ms));
    }
    if let Some(unix_ms) = number(headers::REQUEST_DEADLINE_MS)? {
        let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        earliest(Instant::now() + left);
    }
    Ok(deadline)
}

/// The error for a subject that names no task.
pub(crate) fn unknown_task(name: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::UnknownTask,
        format!("unknown task `{name}`; this service serves embed, fill_mask, rerank and classify"),
    )
}

/// Bytes NATS counts for a message's headers (`NATS/1.0\r\n`, `Name: value\r\n` each, and
/// the closing `\r\n`), so that headers + body can be compared with `max_payload`.
fn header_bytes(message_headers: &HeaderMap) -> usize {
    if message_headers.is_empty() {
        return 0; // sent as a plain message, without a header block
    }
    let fields: usize = message_headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    10 + fields + 2
}

/// A reply ready to publish, and what it says.
pub(crate) struct Reply {
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    /// `None` for success, else the error the reply carries.
    pub error: Option<ErrorBody>,
}

/// Bytes reserved for a reply before it is encoded: growing from empty costs a
/// reallocation at every doubling (seven for a 500-byte reply).
const ENCODE_CAPACITY: usize = 1024;

/// Encodes the reply to a request of `inputs` inputs. A success reply larger than
/// `max_payload` (the server's message limit, headers included) is replaced by a
/// `too_large` error that says how many inputs per request would fit.
pub(crate) fn reply(
    encoding: Encoding,
    result: Result<InferReply, ErrorBody>,
    inputs: usize,
    max_payload: usize,
) -> Reply {
    let error = match result {
        Ok(reply) => {
            // CBOR, the default, needs no header to be recognised (see `success_headers`).
            let headers = success_headers(encoding);
            match schemas::encode_with_capacity(encoding, &reply, ENCODE_CAPACITY) {
                Ok(body) if body.len() + header_bytes(&headers) <= max_payload => {
                    return Reply {
                        headers,
                        body: body.into(),
                        error: None,
                    }
                }
                Ok(body) => too_large_reply(body.len(), inputs, max_payload),
                Err(e) => ErrorBody::new(ErrorCode::Internal, format!("encoding the reply: {e}")),
            }
        }
        Err(error) => error,
    };
    error_reply(encoding, error)
}

/// The error for a reply of `size` bytes over `max_payload`, with how many inputs fit.
fn too_large_reply(size: usize, inputs: usize, max_payload: usize) -> ErrorBody {
    if inputs <= 1 {
        // Nothing to split: with the default limits this cannot happen (one input's largest
        // reply is well under 1 MiB), but a server may run with a smaller max_payload.
        return ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "the reply would be {size} bytes, over the server's max_payload of {max_payload}; \
                 ask for less (a smaller top_k) or send CBOR, which is about half the size of JSON"
            ),
        );
    }
    // Outputs of one request are alike in size; keep a tenth in reserve for the ones that
    // are larger than the average, and for the envelope.
    let per_input = size.div_ceil(inputs);
    let fit = ((max_payload * 9 / 10) / per_input.max(1)).clamp(1, inputs - 1);
    let mut error = ErrorBody::new(
        ErrorCode::TooLarge,
        format!(
            "the reply would be {size} bytes, over the server's max_payload of {max_payload}; \
             send at most {fit} of these inputs per request"
        ),
    );
    error.max_inputs = Some(fit as u32);
    error
}

/// Longest error message in a reply body, and in its `Nats-Service-Error` header: a message
/// may quote the request (a bad header value, a misspelt field), and the reply must stay
/// small whatever the request held.
const MAX_ERROR_MESSAGE: usize = 1024;
const MAX_ERROR_HEADER: usize = 256;

/// An error reply: the NATS micro headers and the body in the request's encoding.
pub(crate) fn error_reply(encoding: Encoding, mut error: ErrorBody) -> Reply {
    error.message = clip(&error.message, MAX_ERROR_MESSAGE);
    let mut reply_headers = content_type(encoding);
    let header_text = clip(&one_line(&error.message), MAX_ERROR_HEADER);
    reply_headers.insert(headers::SERVICE_ERROR, header_text.as_str());
    reply_headers.insert(headers::SERVICE_ERROR_CODE, error.code.to_string().as_str());
    let body = encode(encoding, &error).unwrap_or_else(|e| {
        // Our own types always encode; answer anyway rather than leave the requester waiting.
        format!("could not encode the error reply: {e}").into_bytes()
    });
    Reply {
        headers: reply_headers,
        body: body.into(),
        error: Some(error),
    }
}

/// The headers of a success reply: none for CBOR, `Content-Type` for JSON. A reply without
/// headers is a plain `MSG` rather than an `HMSG`, which costs the server and both clients
/// less per message; a CBOR body is recognised without the header (its first byte is not
/// `{`), and JSON keeps it for the generic tools that show or check it.
fn success_headers(encoding: Encoding) -> HeaderMap {
    match encoding {
        Encoding::Cbor => HeaderMap::new(),
        Encoding::Json => content_type(encoding),
    }
}

fn content_type(encoding: Encoding) -> HeaderMap {
    let mut reply_headers = HeaderMap::new();
    reply_headers.insert(headers::CONTENT_TYPE, encoding.media_type());
    reply_headers
}

/// Header values are single lines.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// `text` cut to at most `max` bytes (at a character boundary), marked with `…` if cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Output;

    fn limits() -> Limits {
        Limits::new(&ServiceConfig::default(), Some(Arc::from("[MASK]")))
    }

    fn parse_json(
        task: Task,
        json: &str,
        message_headers: Option<&HeaderMap>,
    ) -> Result<Parsed, ErrorBody> {
        parse(
            task,
            Encoding::Json,
            json.as_bytes(),
            message_headers,
            Instant::now(),
            &limits(),
        )
    }

    #[test]
    fn header_and_shape_errors_are_plain_words() {
        let mut bad = HeaderMap::new();
        bad.insert(headers::REQUEST_TIMEOUT_MS, "abc");
        let error = parse_json(Task::Embed, r#"{"inputs": ["x"]}"#, Some(&bad)).unwrap_err();
        assert_eq!(error.kind, ErrorCode::MalformedRequest);
        assert_eq!(
            error.message,
            "header Request-Timeout-Ms must be a whole number of milliseconds, not \"abc\""
        );
        // A top-level JSON array without a Content-Type: detected as CBOR, reported as JSON.
        let array = br#"["a", "b"]"#;
        let encoding = Encoding::detect(None, array);
        let error = parse(
            Task::Embed,
            encoding,
            array,
            None,
            Instant::now(),
            &limits(),
        )
        .unwrap_err();
        assert!(
            error
                .message
                .contains("looks like JSON but is not an object"),
            "{}",
            error.message
        );
        assert!(!error.message.contains("CBOR"), "{}", error.message);
        let error = parse_json(Task::Embed, "[1]", None).unwrap_err();
        assert!(
            error.message.contains("JSON payload is not an object"),
            "{}",
            error.message
        );
        let error = parse(
            Task::Embed,
            Encoding::Cbor,
            b"",
            None,
            Instant::now(),
            &limits(),
        )
        .unwrap_err();
        assert!(
            error.message.contains("payload is empty"),
            "{}",
            error.message
        );
    }

    #[test]
    fn an_error_reply_stays_small_whatever_the_request_quoted() {
        let mut bad = HeaderMap::new();
        let huge = "9x".repeat(300_000);
        bad.insert(headers::REQUEST_TIMEOUT_MS, huge.as_str());
        let error = parse_json(Task::Embed, r#"{"inputs": ["x"]}"#, Some(&bad)).unwrap_err();
        let reply = error_reply(Encoding::Json, error);
        assert!(reply.body.len() < 1200, "{}", reply.body.len());
        assert!(header_bytes(&reply.headers) < 400);
        let body: ErrorBody = schemas::decode(Encoding::Json, &reply.body).unwrap();
        assert!(body.message.ends_with('…'), "{}", body.message);
    }

    #[test]
    fn fill_mask_bounds_are_enforced_before_any_work() {
        let many = vec!["[MASK]"; 17].join(" ");
        let error = parse_json(
            Task::FillMask,
            &format!(r#"{{"inputs": ["ok [MASK]", "{many}"]}}"#),
            None,
        )
        .unwrap_err();
        assert_eq!(error.kind, ErrorCode::TooLarge);
        assert!(
            error
                .message
                .starts_with("input 1 has 17 [MASK] tokens; the limit is 16"),
            "{}",
            error.message
        );
        let sixteen = vec!["[MASK]"; 16].join(" ");
        assert!(parse_json(
            Task::FillMask,
            &format!(r#"{{"inputs": ["{sixteen}"]}}"#),
            None
        )
        .is_ok());
        for top_k in [0, 101] {
            let json = format!(r#"{{"inputs": ["a [MASK]"], "options": {{"top_k": {top_k}}}}}"#);
            let error = parse_json(Task::FillMask, &json, None).unwrap_err();
            assert_eq!(error.kind, ErrorCode::InvalidInput);
            assert!(
                error.message.contains("service.max_top_k"),
                "{}",
                error.message
            );
        }
        // Embedding texts may contain the mask token's text as often as they like.
        assert!(parse_json(Task::Embed, &format!(r#"{{"inputs": ["{many}"]}}"#), None).is_ok());
    }

    #[test]
    fn pairs_go_to_rerank_only_and_priority_is_read_from_its_header() {
        let pairs = r#"{"inputs": [["what is nats", "a message bus"]]}"#;
        let parsed = parse_json(Task::Rerank, pairs, None).unwrap();
        assert_eq!(parsed.priority, Priority::Interactive);
        assert_eq!(parsed.inputs[0].passage(), Some("a message bus"));
        let error = parse_json(Task::Embed, pairs, None).unwrap_err();
        assert_eq!(error.kind, ErrorCode::InvalidInput);
        assert!(
            error.message.contains("only rerank takes pairs"),
            "{}",
            error.message
        );
        let error = parse_json(Task::Rerank, r#"{"inputs": ["text"]}"#, None).unwrap_err();
        assert!(
            error.message.contains("[query, passage] pairs"),
            "{}",
            error.message
        );
        let error = parse_json(Task::Rerank, r#"{"inputs": [["q", ""]]}"#, None).unwrap_err();
        assert_eq!(error.message, "input 0 is empty");
        // The byte limit counts both texts of a pair.
        let half = "x".repeat(ServiceConfig::default().max_input_bytes / 2 + 1);
        let json = format!(r#"{{"inputs": [["{half}", "{half}"]]}}"#);
        let error = parse_json(Task::Rerank, &json, None).unwrap_err();
        assert_eq!(error.kind, ErrorCode::TooLarge);

        let mut bulk = HeaderMap::new();
        bulk.insert(headers::PRIORITY, "bulk");
        let parsed = parse_json(Task::Classify, r#"{"inputs": ["x"]}"#, Some(&bulk)).unwrap();
        assert_eq!(parsed.priority, Priority::Bulk);
        let mut bad = HeaderMap::new();
        bad.insert(headers::PRIORITY, "urgent");
        let error = parse_json(Task::Embed, r#"{"inputs": ["x"]}"#, Some(&bad)).unwrap_err();
        assert_eq!(error.kind, ErrorCode::MalformedRequest);
        assert!(error.message.contains("interactive"), "{}", error.message);
    }

    #[test]
    fn a_reply_over_max_payload_becomes_too_large_with_how_many_inputs_fit() {
        let outputs: Vec<Output> = (0..100)
            .map(|_| Output::Embedding {
                embedding: vec![0.123_456_7; 384],
            })
            .collect();
        let result = Ok(InferReply {
            outputs,
            model: "m".into(),
            batch_size: 32,
        });
        let reply = reply(Encoding::Json, result.clone(), 100, 1 << 20);
        assert!(reply.error.is_none());
        let small = super::reply(Encoding::Json, result, 100, 100_000);
        let error = small.error.expect("too large");
        assert_eq!(error.kind, ErrorCode::TooLarge);
        let fit = error.max_inputs.expect("a hint") as usize;
        // Each output is about 4 KB of JSON: about 22 fit in 90 KB.
        assert!((15..=25).contains(&fit), "{fit}");
        assert!(small.body.len() < 1000);
        assert_eq!(
            header(Some(&small.headers), headers::SERVICE_ERROR_CODE),
            Some("413")
        );
    }

    #[test]
    fn cbor_success_replies_carry_no_header_and_json_ones_their_content_type() {
        let result = Ok(InferReply {
            outputs: vec![Output::Text { text: "a".into() }],
            model: "m".into(),
            batch_size: 1,
        });
        let cbor = reply(Encoding::Cbor, result.clone(), 1, 1 << 20);
        assert!(cbor.error.is_none());
        assert!(cbor.headers.is_empty(), "{:?}", cbor.headers);
        // Recognised as CBOR without the header, as the protocol says.
        assert_eq!(Encoding::detect(None, &cbor.body), Encoding::Cbor);
        let json = reply(Encoding::Json, result, 1, 1 << 20);
        assert_eq!(
            header(Some(&json.headers), headers::CONTENT_TYPE),
            Some(schemas::media_types::JSON)
        );
        // Error replies always carry the service headers and the content type.
        let error = error_reply(
            Encoding::Cbor,
            ErrorBody::new(ErrorCode::InvalidInput, "no"),
        );
        assert_eq!(
            header(Some(&error.headers), headers::SERVICE_ERROR_CODE),
            Some("400")
        );
        assert_eq!(
            header(Some(&error.headers), headers::CONTENT_TYPE),
            Some(schemas::media_types::CBOR)
        );
    }
}
