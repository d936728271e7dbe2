//! The core transport: NATS micro service endpoints in the processors' queue group, one
//! reply per request on its reply subject.
//!
//! Each endpoint's loop only admits: a message over the in-flight bounds is answered
//! `overloaded` right there (nothing decoded), the others get a small task of their own, so
//! the loop keeps draining its subscription however slow the model is.
//!
//! The endpoints live on a connection of their own. At shutdown that connection is drained:
//! async-nats unsubscribes, reads and hands over what the server had already sent, and then
//! closes it (without waiting for the server's PONG, so a request still on the wire at that
//! instant can be missed; far fewer than unsubscribing alone drops); replies from then on go
//! over the processor's main connection.

use std::sync::Arc;

use async_nats::service::{endpoint::Endpoint, Request, Service};
use futures::StreamExt;
use schemas::{Encoding, Task};
use tokio::sync::RwLock;
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
    /// every request the server had sent before it stopped routing here. Request tasks are
    /// tracked by `requests`.
    pub(crate) async fn serve(
        self,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        let route_replies: ReplyRoute = Arc::new(RwLock::new(true));
        let mut loops = tokio::task::JoinSet::new();
        for (route, endpoint) in self.endpoints {
            loops.spawn(serve_endpoint(
                route,
                endpoint,
                pipeline.clone(),
                requests.clone(),
                route_replies.clone(),
            ));
        }
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

async fn serve_endpoint(
    route: Route,
    mut endpoint: Endpoint,
    pipeline: Arc<Pipeline>,
    requests: TaskTracker,
    route_replies: ReplyRoute,
) {
    while let Some(request) = endpoint.next().await {
        take(route, request, &pipeline, &requests, &route_replies).await;
    }
}

/// Admits one message, or answers it at once.
async fn take(
    route: Route,
    request: Request,
    pipeline: &Arc<Pipeline>,
    requests: &TaskTracker,
    route_replies: &ReplyRoute,
) {
    let received = Instant::now();
    let message = &request.message;
    let encoding = request::encoding_of(message.headers.as_ref(), &message.payload);
    let task = match route {
        Route::Task(task) => task,
        Route::UnknownTask => {
            let name = message.subject.rsplit('.').next().unwrap_or_default();
            if Task::ALL.iter().any(|task| task.as_str() == name) {
                return; // its own endpoint answers it
            }
            let reply = request::error_reply(encoding, request::unknown_task(name));
            return send(&request, None, reply, pipeline, route_replies).await;
        }
    };
    if message.reply.is_none() {
        // Nobody to answer: computing it would be wasted.
        tracing::warn!(subject = %message.subject, "a request without a reply subject: dropped");
        pipeline.record(Some(task), None, false);
        return;
    }
    match pipeline.admit(
        task,
        message.payload.len(),
        message.headers.as_ref(),
        received,
    ) {
        Ok(ticket) => {
            let span = request::span(message);
            let (pipeline, route_replies) = (pipeline.clone(), route_replies.clone());
            requests.spawn(
                handle(
                    task,
                    encoding,
                    request,
                    pipeline,
                    ticket,
                    received,
                    route_replies,
                )
                .instrument(span),
            );
        }
        Err(overloaded) => {
            let reply = request::error_reply(encoding, overloaded);
            send(&request, Some(task), reply, pipeline, route_replies).await;
        }
    }
}

async fn handle(
    task: Task,
    encoding: Encoding,
    request: Request,
    pipeline: Arc<Pipeline>,
    ticket: Ticket,
    received: Instant,
    route_replies: ReplyRoute,
) {
    let message = &request.message;
    let (result, inputs) = pipeline
        .compute(
            task,
            encoding,
            &message.payload,
            message.headers.as_ref(),
            received,
        )
        .await;
    let reply = pipeline.reply(encoding, result, inputs).await;
    send(&request, Some(task), reply, &pipeline, &route_replies).await;
    drop(ticket);
}

async fn send(
    request: &Request,
    task: Option<Task>,
    reply: Reply,
    pipeline: &Pipeline,
    route_replies: &ReplyRoute,
) {
    let Reply {
        headers,
        body,
        error,
    } = reply;
    let route = route_replies.read().await;
    let sent = if *route {
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
    drop(route);
    let published = match sent {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(%err, subject = %request.message.subject, "could not send a reply");
            false
        }
    };
    pipeline.record(task, error.as_ref(), published);
}
