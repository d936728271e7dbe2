//! The core transport: one queue subscription per task in the processors' queue group (the
//! endpoints `$SRV` discovery shows, see `discovery`), one reply per request on its reply
//! subject.
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

use async_nats::{Message, Subject, Subscriber};
use futures::{FutureExt, StreamExt};
use schemas::{Encoding, ErrorBody, ErrorCode, InferReply, Task};
use tokio::sync::{mpsc, RwLock};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::discovery::{self, EndpointCounters};
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

/// An endpoint's subscription and its counters.
struct Subscription {
    route: Route,
    messages: Subscriber,
    counters: Arc<EndpointCounters>,
}

/// The endpoints of one processor.
pub(crate) struct Intake {
    subscriptions: Vec<Subscription>,
    /// The connection the endpoints subscribe on, drained at shutdown.
    connection: async_nats::Client,
}

/// Whether replies still go over the intake connection: set to false, under the write lock,
/// just before that connection is drained, so no reply is handed to it after the drain began
/// (it closes once drained, and would lose it).
type ReplyRoute = Arc<RwLock<bool>>;

impl Intake {
    /// One endpoint per task in the queue group, plus the unknown-task catch-all, subscribed
    /// on `connection`; returns them with how discovery shows them.
    pub(crate) async fn start(
        connection: async_nats::Client,
        config: &ServiceConfig,
    ) -> anyhow::Result<(Self, Vec<discovery::Endpoint>)> {
        let prefix = &config.subject_prefix;
        let mut routes: Vec<(Route, String, String, String)> = Task::ALL
            .iter()
            .map(|&task| {
                let (name, subject) = (task.as_str().to_string(), schemas::subject(prefix, task));
                (Route::Task(task), name, subject, config.queue_group.clone())
            })
            .collect();
        if config.reply_unknown_tasks {
            // A queue group of its own: this subscription also matches the known subjects,
            // and must not take those messages away from their endpoints.
            routes.push((
                Route::UnknownTask,
                "unknown_task".to_string(),
                format!("{prefix}.*"),
                format!("{}.unknown_task", config.queue_group),
            ));
        }
        let mut subscriptions = Vec::with_capacity(routes.len());
        let mut endpoints = Vec::with_capacity(routes.len());
        for (route, name, subject, queue_group) in routes {
            let messages = connection
                .queue_subscribe(subject.clone(), queue_group.clone())
                .await
                .map_err(|e| {
                    anyhow::anyhow!("subscribing the {name} endpoint to {subject}: {e}")
                })?;
            let counters = Arc::new(EndpointCounters::default());
            subscriptions.push(Subscription {
                route,
                messages,
                counters: counters.clone(),
            });
            endpoints.push(discovery::Endpoint {
                name,
                subject,
                queue_group,
                counters,
            });
        }
        let intake = Intake {
            subscriptions,
            connection,
        };
        Ok((intake, endpoints))
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
        let replier = Replier {
            pipeline: pipeline.clone(),
            intake: self.connection.clone(),
            route: route_replies.clone(),
        };
        requests.spawn(reply_loop(replies, replier.clone(), requests.clone()));
        let mut loops = tokio::task::JoinSet::new();
        for subscription in self.subscriptions {
            loops.spawn(serve_endpoint(
                subscription,
                replier.clone(),
                answered.clone(),
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
    /// Where it came from (for the logs) and where its reply goes.
    subject: Subject,
    inbox: Subject,
    received: Instant,
    counters: Arc<EndpointCounters>,
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

/// What sends replies: the pipeline (encoding, counting), the intake connection and the reply
/// route (see [`ReplyRoute`]).
#[derive(Clone)]
struct Replier {
    pipeline: Arc<Pipeline>,
    intake: async_nats::Client,
    route: ReplyRoute,
}

async fn serve_endpoint(
    subscription: Subscription,
    replier: Replier,
    answered: mpsc::UnboundedSender<Answered>,
) {
    let Subscription {
        route,
        mut messages,
        counters,
    } = subscription;
    let pipeline = &replier.pipeline;
    while let Some(first) = messages.next().await {
        // Every message already received is queued before a sleeping worker is woken (the
        // catch-all queues nothing: no hold). Nothing in the burst awaits: the replies that
        // need no model (refusals) are sent once it is handed over.
        let hold = matches!(route, Route::Task(_)).then(|| pipeline.hold_dispatch());
        let mut at_once = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(message) = next.take() {
            // A panic while taking one request (it is answered `internal`, see `Pending`)
            // must not end the loop: this task would go unserved.
            let took = std::panic::catch_unwind(AssertUnwindSafe(|| {
                take(route, message, &counters, pipeline, &answered)
            }));
            match took {
                Ok(Some(answer)) => at_once.push(answer),
                Ok(None) => {}
                Err(panic) => log_panic(panic.as_ref(), "taking a request panicked"),
            }
            taken += 1;
            if taken < MAX_BURST {
                next = messages.next().now_or_never().flatten();
            }
        }
        drop(hold);
        if at_once.is_empty() {
            continue;
        }
        let via_intake = replier.route.read().await;
        for AtOnce {
            subject,
            inbox,
            received,
            task,
            reply,
        } in at_once
        {
            let sent = AssertUnwindSafe(replier.send(&subject, inbox, task, reply, *via_intake))
                .catch_unwind()
                .await;
            match sent {
                Ok(error) => counters.record(received.elapsed(), error.as_ref()),
                Err(panic) => log_panic(panic.as_ref(), "answering a request panicked"),
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
    subject: Subject,
    inbox: Subject,
    received: Instant,
    task: Option<Task>,
    reply: Reply,
}

/// Admits one message and hands it to the pipeline, or returns the reply that answers it at
/// once. Nothing here waits: the result of a computed request reaches the replier through
/// `answered`.
fn take(
    route: Route,
    message: Message,
    counters: &Arc<EndpointCounters>,
    pipeline: &Arc<Pipeline>,
    answered: &mpsc::UnboundedSender<Answered>,
) -> Option<AtOnce> {
    let received = Instant::now();
    // The last subject token, for a catch-all message: the task it names, if none.
    let (task, unknown) = match route {
        Route::Task(task) => (Some(task), None),
        Route::UnknownTask => {
            let name = message.subject.rsplit('.').next().unwrap_or_default();
            if name.parse::<Task>().is_ok() {
                return None; // its own endpoint answers it
            }
            (None, Some(name))
        }
    };
    let Some(inbox) = message.reply.clone() else {
        // Nobody to answer: computing it would be wasted.
        tracing::warn!(subject = %message.subject, "a request without a reply subject: dropped");
        pipeline.record(task, None, false);
        return None;
    };
    let encoding = request::encoding_of(message.headers.as_ref(), &message.payload);
    let refuse = |error| {
        Some(AtOnce {
            subject: message.subject.clone(),
            inbox: inbox.clone(),
            received,
            task,
            reply: request::error_reply(encoding, error),
        })
    };
    let Some(task) = task else {
        return refuse(request::unknown_task(unknown.unwrap_or_default()));
    };
    let ticket = match pipeline.admit(
        task,
        message.payload.len(),
        message.headers.as_ref(),
        received,
    ) {
        Ok(ticket) => ticket,
        Err(overloaded) => return refuse(overloaded),
    };
    // Its `Request-Id` in the logs of its reply (a disabled span when debug logs are off).
    let span = request::span(&message);
    let Message {
        subject,
        payload,
        headers,
        ..
    } = message;
    let pending = Pending {
        held: Some(Taken {
            subject,
            inbox,
            received,
            counters: counters.clone(),
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
        headers.as_ref(),
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
    replier: Replier,
    requests: TaskTracker,
) {
    let mut ready = Vec::with_capacity(REPLIES_PER_WAKE);
    while replies.recv_many(&mut ready, REPLIES_PER_WAKE).await > 0 {
        // One look at the route for the whole wake, not one per reply.
        let via_intake = replier.route.read().await;
        for answered in ready.drain(..) {
            if !crate::pipeline::encodes_quickly(answered.taken.encoding, &answered.result) {
                let replier = replier.clone();
                requests.spawn(async move { replier.reply_to(answered, None).await });
                continue;
            }
            // A panic while answering one request must not end the replier: every later reply
            // goes through it.
            let replied = AssertUnwindSafe(replier.reply_to(answered, Some(*via_intake)))
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

impl Replier {
    /// Encodes and sends one reply. `via_intake` is the reply route if the caller read it
    /// (and holds its read guard until the reply is sent); `None` reads it once the reply is
    /// encoded (a large one, on a task of its own).
    async fn reply_to(&self, answered: Answered, via_intake: Option<bool>) {
        let Answered {
            taken:
                Taken {
                    subject,
                    inbox,
                    received,
                    counters,
                    task,
                    encoding,
                    ticket,
                    span,
                },
            result,
            inputs,
        } = answered;
        async {
            let reply = self.pipeline.reply(encoding, result, inputs).await;
            let error = match via_intake {
                Some(via_intake) => {
                    self.send(&subject, inbox, Some(task), reply, via_intake)
                        .await
                }
                None => {
                    let via_intake = self.route.read().await;
                    self.send(&subject, inbox, Some(task), reply, *via_intake)
                        .await
                }
            };
            counters.record(received.elapsed(), error.as_ref());
        }
        .instrument(span)
        .await;
        drop(ticket);
    }

    /// Sends a reply to `inbox`: over the intake connection if `via_intake` (the reply route,
    /// read by the caller under its guard), else over the main connection. Counts it, and
    /// returns its error body if it was an error reply.
    async fn send(
        &self,
        subject: &Subject,
        inbox: Subject,
        task: Option<Task>,
        reply: Reply,
        via_intake: bool,
    ) -> Option<ErrorBody> {
        let Reply {
            headers,
            body,
            error,
        } = reply;
        let connection = if via_intake {
            &self.intake
        } else {
            self.pipeline.connection()
        };
        // A CBOR success reply has no headers: a plain `PUB`.
        let sent = if headers.is_empty() {
            connection.publish(inbox, body).await
        } else {
            connection.publish_with_headers(inbox, headers, body).await
        };
        if let Err(err) = &sent {
            tracing::warn!(%err, %subject, "could not send a reply");
        }
        self.pipeline.record(task, error.as_ref(), sent.is_ok());
        error
    }
}
