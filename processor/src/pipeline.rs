//! The one request path both transports share: admission (before any decoding) → parse →
//! scheduler → reply (size-checked) → counted. A transport only moves messages: it asks
//! [`Pipeline::admit`] when a message arrives, [`Pipeline::start`] (a callback gets the
//! result; the core transport) or [`Pipeline::compute`] (awaited; JetStream) for the result,
//! and [`Pipeline::reply`] for the message to publish, then reports with
//! [`Pipeline::record`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use schemas::{Encoding, ErrorBody, ErrorCode, InferReply, Output, Task};
use tokio::time::Instant;

use crate::batcher::{Batcher, Busy, Completed, Done};
use crate::request::{self, Limits, Reply};
use crate::telemetry::{Shed, Telemetry};

/// Payloads up to this size are decoded on the async runtime's thread (microseconds);
/// larger ones on a blocking thread.
const DECODE_INLINE_BYTES: usize = 16 * 1024;

/// Replies whose outputs hold about this many values or fewer are encoded on the async
/// runtime's thread (tens of microseconds at most: with one runtime thread, the default,
/// nothing else is served meanwhile); larger ones on a blocking thread. JSON spells every
/// float out in decimal text, which costs several times CBOR's binary copy per value.
const ENCODE_INLINE_VALUES_CBOR: usize = 4 * 1024;
const ENCODE_INLINE_VALUES_JSON: usize = 1024;

/// About how many values (floats, candidates, labels, bytes of text / 16) a reply holds: what
/// its encoding costs, without encoding it.
fn reply_values(result: &Result<InferReply, ErrorBody>) -> usize {
    let Ok(reply) = result else { return 1 };
    reply
        .outputs
        .iter()
        .map(|output| match output {
            Output::Embedding { embedding } => embedding.len(),
            Output::FillMask(fill) => {
                fill.sequence.len() / 16 + fill.masks.iter().map(Vec::len).sum::<usize>() * 4
            }
            Output::Score { .. } => 2,
            Output::Labels { labels } => labels.len() * 4,
            Output::Text { text } => text.len() / 16 + 1,
        })
        .sum()
}

/// Whether [`Pipeline::reply`] encodes `result` at once, without a blocking thread.
pub(crate) fn encodes_quickly(encoding: Encoding, result: &Result<InferReply, ErrorBody>) -> bool {
    let inline = match encoding {
        Encoding::Cbor => ENCODE_INLINE_VALUES_CBOR,
        Encoding::Json => ENCODE_INLINE_VALUES_JSON,
    };
    reply_values(result) <= inline
}

/// Why [`Pipeline::place`] found no place for a request.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// Set when the refusal is for now only (overloaded): why.
    pub shed: Option<Shed>,
    /// The error to answer with if the request is not kept.
    pub error: ErrorBody,
}

/// Request counters shown in `$SRV.STATS` next to the scheduler's.
#[derive(Debug, Default)]
pub(crate) struct ReplyStats {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// Answered `overloaded` before decoding (a refusing queue, the in-flight bounds).
    pub shed: AtomicU64,
}

/// Requests and payload bytes taken and not yet answered, bounded: the processor's memory
/// for requests does not grow with the offered load.
#[derive(Debug)]
pub(crate) struct Admission {
    /// (requests, bytes) held now; one lock so that both bounds are checked and taken at
    /// once (a refused request never counts, not even for a moment).
    held: Mutex<(usize, usize)>,
    max_requests: usize,
    max_bytes: usize,
}

/// A place taken in [`Admission`]; given back when dropped (the request was answered).
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    bytes: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.admission.held.lock().expect("admission lock");
        held.0 -= 1;
        held.1 -= self.bytes;
    }
}

impl Admission {
    pub fn new(max_requests: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Admission {
            held: Mutex::new((0, 0)),
            max_requests,
            max_bytes,
        })
    }

    /// Takes a place for a request of `bytes`, or says which bound it would cross. A request
    /// larger than the byte bound on its own is taken when nothing else is in flight, so
    /// every request the server accepts can be served.
    pub fn try_admit(self: &Arc<Self>, bytes: usize) -> Result<Ticket, Shed> {
        let mut held = self.held.lock().expect("admission lock");
        let (requests, held_bytes) = *held;
        if requests >= self.max_requests {
            return Err(Shed::InFlightRequests);
        }
        if held_bytes > 0 && held_bytes + bytes > self.max_bytes {
            return Err(Shed::InFlightBytes);
        }
        *held = (requests + 1, held_bytes + bytes);
        Ok(Ticket {
            admission: self.clone(),
            bytes,
        })
    }

    /// Requests and payload bytes in flight now.
    pub fn held(&self) -> (usize, usize) {
        *self.held.lock().expect("admission lock")
    }
}

/// Everything a request needs on its way through, shared by the transport's tasks.
pub(crate) struct Pipeline {
    pub batcher: Batcher,
    limits: Limits,
    admission: Arc<Admission>,
    pub stats: Arc<ReplyStats>,
    pub telemetry: Arc<Telemetry>,
    /// The connection, for its negotiated `max_payload` (it may change on reconnect).
    nats: async_nats::Client,
    /// The model's name, as every reply gives it.
    model_name: Arc<str>,
}

impl Pipeline {
    pub fn new(
        batcher: Batcher,
        limits: Limits,
        admission: Arc<Admission>,
        telemetry: Arc<Telemetry>,
        nats: async_nats::Client,
    ) -> Self {
        Pipeline {
            model_name: batcher.model_name().into(),
            batcher,
            limits,
            admission,
            stats: Arc::new(ReplyStats::default()),
            telemetry,
            nats,
        }
    }

    /// Requests taken and not yet answered (JetStream messages waiting for a place are not
    /// counted).
    pub fn held_requests(&self) -> usize {
        self.admission.held().0
    }

    /// The processor's main NATS connection.
    pub fn connection(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Before anything else is done with a message: a place for it, or the error to answer it
    /// with at once, nothing decoded: `unsupported_task`, `timeout` (its header deadline had
    /// passed on arrival), or `overloaded` when the queue refuses work now or the in-flight
    /// bounds are reached (counted as shed).
    pub fn admit(
        &self,
        task: Task,
        payload_bytes: usize,
        message_headers: Option<&HeaderMap>,
        received: Instant,
    ) -> Result<Ticket, ErrorBody> {
        self.place(task, payload_bytes, message_headers, received)
            .map_err(|refusal| {
                if let Some(reason) = refusal.shed {
                    self.telemetry.count_shed(reason);
                    self.stats.shed.fetch_add(1, Ordering::Relaxed);
                }
                refusal.error
            })
    }

    /// [`Pipeline::admit`] without counting a refusal: for a caller that waits for room
    /// (the JetStream transport keeps the message, it does not shed it).
    pub fn place(
        &self,
        task: Task,
        payload_bytes: usize,
        message_headers: Option<&HeaderMap>,
        received: Instant,
    ) -> Result<Ticket, Refusal> {
        let fin = |error| Refusal { shed: None, error };
        // What is known without decoding and final comes first: no retry would help.
        if let Some(reason) = self.batcher.unsupported(task) {
            return Err(fin(ErrorBody::new(ErrorCode::UnsupportedTask, reason)));
        }
        let deadline = request::header_deadline(message_headers, received);
        if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            self.batcher.stats().expired.fetch_add(1, Ordering::Relaxed);
            return Err(fin(ErrorBody::new(
                ErrorCode::Timeout,
                "the request's deadline passed before it could be computed; it was not computed",
            )));
        }
        // A malformed value counts as interactive here; decoding reports it.
        let priority = request::header(message_headers, schemas::headers::PRIORITY)
            .and_then(|value| value.parse().ok())
            .unwrap_or_default();
        let refusal = match self.batcher.refuses_now(deadline, priority) {
            Some((busy, refused)) => {
                let reason = match busy {
                    Busy::Full => Shed::QueueFull,
                    Busy::Backlog => Shed::QueueWait,
                };
                Err((reason, refused.message))
            }
            None => self.admission.try_admit(payload_bytes).map_err(|shed| {
                let (requests, bytes) = self.admission.held();
                let message = match shed {
                    Shed::InFlightRequests => format!(
                        "this processor holds {requests} requests (service.max_in_flight_requests); retry later or on another processor"
                    ),
                    _ => format!(
                        "this processor holds {bytes} bytes of requests (service.max_in_flight_bytes); retry later or on another processor"
                    ),
                };
                (shed, message)
            }),
        };
        refusal.map_err(|(reason, message)| Refusal {
            shed: Some(reason),
            error: ErrorBody::new(ErrorCode::Overloaded, message),
        })
    }

    /// Decodes, checks and computes one admitted request. `received` is when its time
    /// budget starts. Returns the result and the request's input count.
    pub async fn compute(
        self: &Arc<Self>,
        task: Task,
        encoding: Encoding,
        payload: &bytes::Bytes,
        message_headers: Option<&HeaderMap>,
        received: Instant,
    ) -> (Result<InferReply, ErrorBody>, usize) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.start(
            task,
            encoding,
            payload,
            message_headers,
            received,
            move |result, inputs| {
                let _ = tx.send((result, inputs));
            },
        );
        rx.await.unwrap_or_else(|_| {
            let error = ErrorBody::new(ErrorCode::Internal, "the request was dropped unanswered");
            (Err(error), 0)
        })
    }

    /// [`Pipeline::compute`] without waiting: `answer` gets the result and the request's
    /// input count, on whichever thread completes the request (it should only hand them
    /// over). A small payload is decoded here and now; a large one on a blocking thread.
    /// Must be called inside a tokio runtime.
    pub fn start(
        self: &Arc<Self>,
        task: Task,
        encoding: Encoding,
        payload: &bytes::Bytes,
        message_headers: Option<&HeaderMap>,
        received: Instant,
        answer: impl FnOnce(Result<InferReply, ErrorBody>, usize) + Send + 'static,
    ) {
        if payload.len() <= DECODE_INLINE_BYTES {
            let parsed = request::parse(
                task,
                encoding,
                payload,
                message_headers,
                received,
                &self.limits,
            );
            return self.submit(task, parsed, answer);
        }
        // Decoding a large payload takes milliseconds: not on the runtime's threads.
        let (payload, message_headers) = (payload.clone(), message_headers.cloned());
        let pipeline = self.clone();
        tokio::spawn(async move {
            let limits = pipeline.limits.clone();
            let parsed = tokio::task::spawn_blocking(move || {
                request::parse(
                    task,
                    encoding,
                    &payload,
                    message_headers.as_ref(),
                    received,
                    &limits,
                )
            })
            .await
            .unwrap_or_else(|e| {
                Err(ErrorBody::new(
                    ErrorCode::Internal,
                    format!("decoding: {e}"),
                ))
            });
            pipeline.submit(task, parsed, answer);
        });
    }

    /// Holds back the scheduler's hand-over to idle model workers while the guard lives: a
    /// transport takes the requests it already has under one hold, so a burst becomes one
    /// batch and one wake-up of a worker.
    pub fn hold_dispatch(&self) -> crate::batcher::DispatchHold {
        self.batcher.hold_dispatch()
    }

    /// Hands a decoded request to the scheduler (or answers its decoding error).
    fn submit(
        &self,
        task: Task,
        parsed: Result<request::Parsed, ErrorBody>,
        answer: impl FnOnce(Result<InferReply, ErrorBody>, usize) + Send + 'static,
    ) {
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return answer(Err(error), 0),
        };
        let inputs = parsed.inputs.len();
        let model = self.model_name.clone();
        let meta = crate::batcher::RequestMeta {
            deadline: parsed.deadline,
            priority: parsed.priority,
            request_id: parsed.request_id,
        };
        let done = Done::new(move |completed: Result<Completed, _>| {
            let result = completed
                .map(|completed| InferReply {
                    outputs: completed.outputs,
                    model: model.to_string(),
                    batch_size: completed.batch_size as u32,
                })
                .map_err(ErrorBody::from);
            answer(result, inputs)
        });
        self.batcher
            .submit(task, parsed.inputs, parsed.options, meta, done);
    }

    /// The message that answers a request of `inputs` inputs with `result`, within the
    /// server's message size. Large replies (up to megabytes of JSON) are encoded on a
    /// blocking thread.
    pub async fn reply(
        &self,
        encoding: Encoding,
        result: Result<InferReply, ErrorBody>,
        inputs: usize,
    ) -> Reply {
        let max_payload = self.nats.max_payload();
        if encodes_quickly(encoding, &result) {
            return request::reply(encoding, result, inputs, max_payload);
        }
        tokio::task::spawn_blocking(move || request::reply(encoding, result, inputs, max_payload))
            .await
            .unwrap_or_else(|e| {
                let error = ErrorBody::new(ErrorCode::Internal, format!("encoding the reply: {e}"));
                request::error_reply(encoding, error)
            })
    }

    /// Counts an answered request: by its outcome when the reply went out, as undeliverable
    /// when it could not be published.
    pub fn record(&self, task: Option<Task>, error: Option<&ErrorBody>, published: bool) {
        if !published {
            self.telemetry.count_undeliverable(task);
            return;
        }
        self.telemetry
            .count_request(task, error.map_or(Ok(()), Err));
        match error {
            None => self.stats.ok.fetch_add(1, Ordering::Relaxed),
            Some(error) => {
                tracing::debug!(code = error.code, kind = error.kind.as_str(), message = %error.message, "error reply");
                self.stats.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_of(outputs: Vec<Output>) -> Result<InferReply, ErrorBody> {
        Ok(InferReply {
            outputs,
            model: "m".into(),
            batch_size: 1,
        })
    }

    #[test]
    fn replies_are_encoded_at_once_unless_they_hold_many_values() {
        let embeddings = |n: usize, dims: usize| {
            reply_of(
                (0..n)
                    .map(|_| Output::Embedding {
                        embedding: vec![0.5; dims],
                    })
                    .collect(),
            )
        };
        // A request of 8 sentences of a 384-wide model: inline in CBOR, not in JSON (2 are);
        // 64 of a 768-wide one: in neither.
        assert!(encodes_quickly(Encoding::Cbor, &embeddings(8, 384)));
        assert!(!encodes_quickly(Encoding::Json, &embeddings(8, 384)));
        assert!(encodes_quickly(Encoding::Json, &embeddings(2, 384)));
        for encoding in [Encoding::Cbor, Encoding::Json] {
            assert!(!encodes_quickly(encoding, &embeddings(64, 768)));
        }
        // One input with many masks and the largest top_k is large whatever its input count.
        let candidates = (0..100)
            .map(|i| schemas::MaskPrediction {
                token: format!("t{i}").into(),
                token_id: i,
                score: 0.1,
            })
            .collect::<Vec<_>>();
        let fill = Output::FillMask(schemas::FillMaskOutput {
            masks: vec![candidates; 64],
            sequence: "x".repeat(1000),
        });
        assert!(!encodes_quickly(Encoding::Cbor, &reply_of(vec![fill])));
        let error = Err(ErrorBody::new(ErrorCode::InvalidInput, "no"));
        assert!(encodes_quickly(Encoding::Json, &error));
    }

    #[test]
    fn admission_bounds_requests_and_bytes_and_gives_places_back() {
        let admission = Admission::new(2, 100);
        let a = admission.try_admit(60).unwrap();
        assert_eq!(admission.try_admit(50).unwrap_err(), Shed::InFlightBytes);
        let b = admission.try_admit(40).unwrap();
        assert_eq!(admission.try_admit(1).unwrap_err(), Shed::InFlightRequests);
        assert_eq!(admission.held(), (2, 100));
        drop((a, b));
        assert_eq!(admission.held(), (0, 0));
        // Larger than the byte bound alone: taken when nothing else is in flight.
        let big = admission.try_admit(500).unwrap();
        assert_eq!(admission.try_admit(1).unwrap_err(), Shed::InFlightBytes);
        drop(big);
    }
}
