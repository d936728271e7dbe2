//! The core transport: NATS micro service endpoints in the processors' queue group, one
//! reply per request on its reply subject.
//!
//! Each endpoint's loop only admits: a message over the in-flight bounds is answered
//! `overloaded` right there (nothing decoded), the others get a small task of their own, so
//! the loop keeps draining its subscription however slow the model is.

use std::sync::Arc;

use async_nats::service::{endpoint::Endpoint, Request, Service};
use futures::StreamExt;
use schemas::{Encoding, Task};
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
}

impl Intake {
    /// One endpoint per task in the queue group, plus the unknown-task catch-all.
    pub(crate) async fn start(service: &Service, config: &ServiceConfig) -> anyhow::Result<Self> {
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
        Ok(Intake { endpoints })
    }

    /// Serves every endpoint until `stop`; then unsubscribes, and answers what was already
    /// delivered. Request tasks are tracked by `requests`.
    pub(crate) async fn serve(
        self,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        let mut loops = tokio::task::JoinSet::new();
        for (route, endpoint) in self.endpoints {
            loops.spawn(serve_endpoint(
                route,
                endpoint,
                pipeline.clone(),
                requests.clone(),
                stop.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
    }
}

async fn serve_endpoint(
    route: Route,
    mut endpoint: Endpoint,
    pipeline: Arc<Pipeline>,
    requests: TaskTracker,
    stop: CancellationToken,
) {
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                // Unsubscribing ends the stream after the messages already delivered to us,
                // which are still answered below.
                if let Err(err) = endpoint.stop().await {
                    tracing::warn!(%err, "unsubscribing an endpoint");
                    break;
                }
            }
            request = endpoint.next() => match request {
                Some(request) => take(route, request, &pipeline, &requests).await,
                None => break,
            },
        }
    }
}

/// Admits one message, or answers it at once.
async fn take(route: Route, request: Request, pipeline: &Arc<Pipeline>, requests: &TaskTracker) {
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
            return send(&request, None, reply, pipeline).await;
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
            let pipeline = pipeline.clone();
            requests.spawn(
                handle(task, encoding, request, pipeline, ticket, received).instrument(span),
            );
        }
        Err(overloaded) => {
            let reply = request::error_reply(encoding, overloaded);
            send(&request, Some(task), reply, pipeline).await;
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
    send(&request, Some(task), reply, &pipeline).await;
    drop(ticket);
}

async fn send(request: &Request, task: Option<Task>, reply: Reply, pipeline: &Pipeline) {
    let Reply {
        headers,
        body,
        error,
    } = reply;
    let published = match request.respond_with_headers(Ok(body), headers).await {
        Ok(()) => true,
        Err(err) => {
            tracing::warn!(%err, subject = %request.message.subject, "could not send a reply (no reply inbox?)");
            false
        }
    };
    pipeline.record(task, error.as_ref(), published);
}
