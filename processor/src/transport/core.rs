//! The core transport: NATS micro service endpoints in the processors' queue group, one
//! reply per request on its reply subject.
//!
//! Each endpoint's loop only admits and hands over: a message over the in-flight bounds is
//! answered `overloaded` right there (nothing decoded), the others are decoded and queued
//! (large payloads, and inputs that need tokenising, on a task of their own), so the loop
//! keeps draining its subscription however slow the model is. No task waits for a request:
//! its result goes to one replier task, which encodes and sends the replies.
//!
//! The endpoints live on a connection of their own. At shutdown that connection is drained:
//! async-nats unsubscribes, reads and hands over what the server had already sent, and then
//! closes it (without waiting for the server's PONG, so a request still on the wire at that
//! instant can be missed; far fewer than unsubscribing alone drops); replies from then on go
//! over the processor's main connection.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_nats::service::{endpoint::Endpoint, Request, Service};
use futures::{FutureExt, StreamExt};
use schemas::{Encoding, ErrorBody, ErrorCode, InferReply, Task};
use tokio::sync::{mpsc, RwLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ServiceConfig;
use crate::pipeline::{Pipeline, Ticket};
use crate::request::{self, Reply};

/// What an endpoint serves.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route {
    /// `{prefix}.{task}`
    Task(Task),
    /// `{prefix}.*`: answers subjects that name no task; ignores the known ones.
    UnknownTask,
}

/// The endpoints of one processor.
pub(crate) struct Intake {
    endpoints: Vec<(Route, Endpoint)>,
    /// The registration the endpoints belong to (on `connection`).
    _service: Service,
    /// The connection the endpoints subscribe on, drained at shutdown.
    connection: async_nats::Client,
}

/// Whether replies still go over the intake connection: set to false, under the write lock,
/// just before that connection is drained, so no reply is handed to it after the drain began
/// (it closes once drained, and would lose it).
type ReplyRoute = Arc<RwLock<bool>>;

impl Intake {
    /// One endpoint per task in the queue group, plus the unknown-task catch-all, on the
    /// connection `service` was registered on.
    pub(crate) async fn start(
        service: Service,
        connection: async_nats::Client,
        config: &ServiceConfig,
    ) -> anyhow::Result<Self> {
        let prefix = &config.subject_prefix;
        let mut endpoints = Vec::new();
        for task in Task::ALL {
            let endpoint = service
                .endpoint_builder()
                .name(task.as_str())
                .add(schemas::subject(prefix, task))
                .await
                .map_err(|e| anyhow::anyhow!("adding the {task} endpoint: {e}"))?;
            endpoints.push((Route::Task(task), endpoint));
        }
        if config.reply_unknown_tasks {
            // A queue group of its own: this subscription also matches the known subjects,
            // and must not take those messages away from their endpoints.
            let endpoint = service
                .endpoint_builder()
                .name("unknown_task")
                .queue_group(format!("{}.unknown_task", config.queue_group))
                .add(format!("{prefix}.*"))
                .await
                .map_err(|e| anyhow::anyhow!("adding the unknown-task endpoint: {e}"))?;
            endpoints.push((Route::UnknownTask, endpoint));
        }
        Ok(Intake {
            endpoints,
            _service: service,
            connection,
        })
    }

    /// Serves every endpoint until `stop`; then drains the intake connection and answers
    /// every request the server had sent before it stopped routing here. The replier task
    /// (and the encoding of large replies) is tracked by `requests`: it ends once every
    /// request taken is answered.
    pub(crate) async fn serve(
        self,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        let route_replies: ReplyRoute = Arc::new(RwLock::new(true));
        let (answered, replies) = mpsc::unbounded_channel();
        requests.spawn(reply_loop(
            replies,
            pipeline.clone(),
            requests.clone(),
            route_replies.clone(),
        ));
        let mut loops = tokio::task::JoinSet::new();
        for (route, endpoint) in self.endpoints {
            loops.spawn(serve_endpoint(
                route,
                endpoint,
                pipeline.clone(),
                answered.clone(),
                route_replies.clone(),
            ));
        }
        // The loops and the requests in flight hold the other senders.
        drop(answered);
        tokio::select! {
            _ = stop.cancelled() => {}
            // Every endpoint ended by itself: the connection was closed.
            _ = async { while loops.join_next().await.is_some() {} } => return,
        }
        if self.connection.connection_state() != async_nats::connection::State::Connected {
            // Nothing more can arrive, and a drain would wait for the server to come back.
            loops.abort_all();
            return;
        }
        *route_replies.write().await = false;
        if let Err(err) = self.connection.drain().await {
            tracing::warn!(%err, "draining the intake connection");
            loops.abort_all();
        }
        // Drained: the server stopped routing here, and what it had sent before is delivered;
        // then the connection closes and each endpoint's stream ends after its last message.
        while loops.join_next().await.is_some() {}
    }
}

/// An admitted request, from admission until its reply is sent.
struct Taken {
    request: Request,
    task: Task,
    encoding: Encoding,
    /// Its place in the in-flight bounds, given back once the reply is sent.
    ticket: Ticket,
    /// Carries its subject and `Request-Id` into the logs of its reply.
    span: tracing::Span,
}

/// A request whose result is known, on its way to the replier.
struct Answered {
    taken: Taken,
    result: Result<InferReply, ErrorBody>,
    inputs: usize,
}

async fn serve_endpoint(
    route: Route,
    mut endpoint: Endpoint,
    pipeline: Arc<Pipeline>,
    answered: mpsc::UnboundedSender<Answered>,
    route_replies: ReplyRoute,
) {
    while let Some(first) = endpoint.next().await {
        // Every message already received is queued before a sleeping worker is woken (the
        // catch-all queues nothing: no hold). Nothing in the burst awaits: the replies that
        // need no model (refusals) are sent once it is handed over.
        let hold = matches!(route, Route::Task(_)).then(|| pipeline.hold_dispatch());
        let mut at_once = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(request) = next.take() {
            // A panic while taking one request (it is answered `internal`, see `Pending`)
            // must not end the loop: the endpoint would unsubscribe and this task go unserved.
            let took = std::panic::catch_unwind(AssertUnwindSafe(|| {
                take(route, request, &pipeline, &answered)
            }));
            match took {
                Ok(Some(answer)) => at_once.push(answer),
                Ok(None) => {}
                Err(panic) => log_panic(panic.as_ref(), "taking a request panicked"),
            }
            taken += 1;
            if taken < MAX_BURST {
                next = endpoint.next().now_or_never().flatten();
            }
        }
        drop(hold);
        if at_once.is_empty() {
            continue;
        }
        let via_endpoint = route_replies.read().await;
        for AtOnce {
            request,
            task,
            reply,
        } in at_once
        {
            let sent = AssertUnwindSafe(send(&request, task, reply, &pipeline, *via_endpoint))
                .catch_unwind()
                .await;
            if let Err(panic) = sent {
                log_panic(panic.as_ref(), "answering a request panicked");
            }
        }
    }
}

/// Logs a panic caught on the request path (the loop that caught it goes on).
fn log_panic(panic: &(dyn std::any::Any + Send), what: &str) {
    let message = crate::batcher::panic_message(panic);
    tracing::error!(panic = message, "{what}");
}

/// Messages taken under one dispatch hold at most: a worker waits for no more than the
/// decoding of this many requests (tens of microseconds) before it is handed the burst.
const MAX_BURST: usize = 64;

/// A request answered without the model (unknown task, overloaded), its reply to be sent.
struct AtOnce {
    request: Request,
    task: Option<Task>,
    reply: Reply,
}

/// Admits one message and hands it to the pipeline, or returns the reply that answers it at
/// once. Nothing here waits: the result of a computed request reaches the replier through
/// `answered`.
fn take(
    route: Route,
    request: Request,
    pipeline: &Arc<Pipeline>,
    answered: &mpsc::UnboundedSender<Answered>,
) -> Option<AtOnce> {
    let received = Instant::now();
    let message = &request.message;
    let encoding = request::encoding_of(message.headers.as_ref(), &message.payload);
    let task = match route {
        Route::Task(task) => task,
        Route::UnknownTask => {
            let name = message.subject.rsplit('.').next().unwrap_or_default();
            if Task::ALL.iter().any(|task| task.as_str() == name) {
                return None; // its own endpoint answers it
            }
            let reply = request::error_reply(encoding, request::unknown_task(name));
            return Some(AtOnce {
                request,
                task: None,
                reply,
            });
        }
    };
    if message.reply.is_none() {
        // Nobody to answer: computing it would be wasted.
        tracing::warn!(subject = %message.subject, "a request without a reply subject: dropped");
        pipeline.record(Some(task), None, false);
        return None;
    }
    let ticket = match pipeline.admit(
        task,
        message.payload.len(),
        message.headers.as_ref(),
        received,
    ) {
        Ok(ticket) => ticket,
        Err(overloaded) => {
            let reply = request::error_reply(encoding, overloaded);
            return Some(AtOnce {
                request,
                task: Some(task),
                reply,
            });
        }
    };
    // Its `Request-Id` in the logs of its reply (a disabled span when debug logs are off).
    let span = request::span(message);
    // The headers are only read while the request is decoded: taken, not copied.
    let payload = message.payload.clone();
    let mut request = request;
    let message_headers = request.message.headers.take();
    let pending = Pending {
        held: Some(Taken {
            request,
            task,
            encoding,
            ticket,
            span,
        }),
        answered: answered.clone(),
        pipeline: pipeline.clone(),
    };
    pipeline.start(
        task,
        encoding,
        &payload,
        message_headers.as_ref(),
        received,
        move |result, inputs| pending.answer(result, inputs),
    );
    None
}

/// An admitted request until its result is handed to the replier. Dropped without an answer
/// (a panic on its way), it answers `internal` itself: a request taken is never left
/// without a reply.
struct Pending {
    held: Option<Taken>,
    answered: mpsc::UnboundedSender<Answered>,
    pipeline: Arc<Pipeline>,
}

impl Pending {
    fn answer(mut self, result: Result<InferReply, ErrorBody>, inputs: usize) {
        self.hand_over(result, inputs);
    }

    fn hand_over(&mut self, result: Result<InferReply, ErrorBody>, inputs: usize) {
        let Some(taken) = self.held.take() else {
            return;
        };
        let task = taken.task;
        let answered = Answered {
            taken,
            result,
            inputs,
        };
        if self.answered.send(answered).is_err() {
            // The replier is gone (it ends only once every sender is, so: the runtime is
            // going down): the reply cannot be sent.
            self.pipeline.record(Some(task), None, false);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.held.is_some() {
            let error = ErrorBody::new(
                ErrorCode::Internal,
                "the processor failed while handling this request (its log says why); it was not computed",
            );
            self.hand_over(Err(error), 0);
        }
    }
}

/// Encodes and sends the replies of computed requests, in the order they were answered:
/// one task for all of them, woken once per batch rather than once per request. A large
/// reply (over about 4k values in CBOR, 1k in JSON: up to megabytes) is encoded on a
/// blocking thread by a task of its own, so that it holds up no other for more than tens of
/// microseconds.
async fn reply_loop(
    mut replies: mpsc::UnboundedReceiver<Answered>,
    pipeline: Arc<Pipeline>,
    requests: TaskTracker,
    route_replies: ReplyRoute,
) {
    let mut ready = Vec::with_capacity(REPLIES_PER_WAKE);
    while replies.recv_many(&mut ready, REPLIES_PER_WAKE).await > 0 {
        // One look at the route for the whole wake, not one per reply.
        let via_endpoint = route_replies.read().await;
        for answered in ready.drain(..) {
            if !crate::pipeline::encodes_quickly(answered.taken.encoding, &answered.result) {
                let (pipeline, route_replies) = (pipeline.clone(), route_replies.clone());
                requests.spawn(async move {
                    reply_to(answered, &pipeline, Via::Ask(&route_replies)).await
                });
                continue;
            }
            // A panic while answering one request must not end the replier: every later reply
            // goes through it.
            let replied =
                AssertUnwindSafe(reply_to(answered, &pipeline, Via::Known(*via_endpoint)))
                    .catch_unwind()
                    .await;
            if let Err(panic) = replied {
                log_panic(
                    panic.as_ref(),
                    "answering a request panicked; its reply is lost",
                );
            }
        }
    }
}

/// Replies taken from the replier's channel at once (it then sends them one after the other).
const REPLIES_PER_WAKE: usize = 256;

/// How [`reply_to`] learns the reply route (see [`ReplyRoute`]).
enum Via<'a> {
    /// Read by the caller, who holds the read guard until the reply is sent.
    Known(bool),
    /// To be read once the reply is encoded (a large one, on a task of its own).
    Ask(&'a ReplyRoute),
}

/// Encodes and sends one reply.
async fn reply_to(answered: Answered, pipeline: &Pipeline, via: Via<'_>) {
    let Answered {
        taken:
            Taken {
                request,
                task,
                encoding,
                ticket,
                span,
            },
        result,
        inputs,
    } = answered;
    async {
        let reply = pipeline.reply(encoding, result, inputs).await;
        match via {
            Via::Known(via_endpoint) => {
                send(&request, Some(task), reply, pipeline, via_endpoint).await;
            }
            Via::Ask(route_replies) => {
                let via_endpoint = route_replies.read().await;
                send(&request, Some(task), reply, pipeline, *via_endpoint).await;
            }
        }
    }
    .instrument(span)
    .await;
    drop(ticket);
}

/// Sends a reply: through the endpoint if `via_endpoint` (the reply route, read by the
/// caller under its guard), else over the main connection.
async fn send(
    request: &Request,
    task: Option<Task>,
    reply: Reply,
    pipeline: &Pipeline,
    via_endpoint: bool,
) {
    let Reply {
        headers,
        body,
        error,
    } = reply;
    let sent = if via_endpoint {
        // Through the endpoint, which counts it in the service's `$SRV.STATS`.
        request
            .respond_with_headers(Ok(body), headers)
            .await
            .map_err(|e| e.to_string())
    } else {
        match request.message.reply.clone() {
            Some(inbox) => pipeline
                .connection()
                .publish_with_headers(inbox, headers, body)
                .await
                .map_err(|e| e.to_string()),
            None => Err("the request has no reply subject".to_string()),
        }
    };
    let published = match sent {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(%err, subject = %request.message.subject, "could not send a reply");
            false
        }
    };
    pipeline.record(task, error.as_ref(), published);
}
