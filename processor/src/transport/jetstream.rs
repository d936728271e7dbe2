//! The durable transport: requests wait in a JetStream work-queue stream and every processor
//! pulls from one shared durable consumer, so a request held by a processor that dies is
//! redelivered to another one.
//!
//! A processor pulls one batch at a time and takes messages only while it has room for them
//! (its workers' batches plus one batch waiting), so free processors take the work. The requester's inbox travels in the
//! `Reply-Inbox` header (JetStream uses the message's own reply subject for acks); the reply
//! goes there first, then the message is acked. Failed batches are nak'ed with a delay, and a
//! message delivered more than `max_deliver` times gets an error reply and is terminated.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::Message;
use futures::StreamExt;
use schemas::{headers, Encoding, ErrorBody, ErrorCode, InferReply, Task};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, JetStreamConfig};
use crate::pipeline::Pipeline;
use crate::request::{self, Reply};

/// The consumer a processor pulls from, and how it treats messages.
pub(crate) struct Intake {
    consumer: PullConsumer,
    settings: JetStreamConfig,
    prefix: String,
    /// Messages taken at most (being computed or queued): room for every worker's batch plus
    /// one more batch, so the next batch is ready when a worker frees up.
    capacity: usize,
    /// Messages one pull asks for: one batch.
    pull_size: usize,
}

/// How long one pull request stays open at the server. Messages arriving meanwhile are
/// delivered at once, so this costs no latency; it only bounds how long a lost pull goes
/// unnoticed (heartbeats are a quarter of it).
const PULL_EXPIRY: Duration = Duration::from_secs(20);

impl Intake {
    /// Creates the stream and the durable consumer if they do not exist yet (idempotent:
    /// every processor does this at start, and existing ones are used as they are).
    pub(crate) async fn start(
        client: &async_nats::Client,
        config: &Config,
    ) -> anyhow::Result<Self> {
        let settings = config.jetstream.clone();
        let prefix = config.service.subject_prefix.clone();
        let context = async_nats::jetstream::new(client.clone());
        let stream = context
            .get_or_create_stream(stream::Config {
                name: settings.stream.clone(),
                subjects: vec![format!("{prefix}.>")],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                max_messages: settings.max_messages,
                max_bytes: settings.max_bytes,
                max_age: Duration::from_secs(settings.max_age_s),
                duplicate_window: Duration::from_secs(settings.duplicate_window_s),
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", settings.stream))?;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &settings.consumer,
                pull::Config {
                    durable_name: Some(settings.consumer.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: settings.ack_wait(),
                    // One delivery more than allowed: the extra one only answers with an error.
                    max_deliver: i64::from(settings.max_deliver) + 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("consumer {}: {e}", settings.consumer))?;
        let workers = config.model.workers();
        Ok(Intake {
            consumer,
            capacity: config.batch.max_size * (workers + 1),
            pull_size: config.batch.max_size,
            settings,
            prefix,
        })
    }

    /// Pulls and answers messages until `stop`; then answers what the pulls under way still
    /// deliver and returns. The request tasks it spawned are tracked by `requests`.
    pub(crate) async fn serve(
        self,
        client: async_nats::Client,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        let this = Arc::new(self);
        let room = Arc::new(Semaphore::new(this.capacity));
        'pulling: while !stop.is_cancelled() {
            // Pulls of one batch at a time, kept outstanding by async-nats (with heartbeats, so
            // a lost pull or a server restart is noticed and the pull re-issued).
            let messages = this
                .consumer
                .stream()
                .max_messages_per_batch(this.pull_size)
                .expires(PULL_EXPIRY)
                .heartbeat(PULL_EXPIRY / 4)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(%err, "pulling from the JetStream consumer; retrying in 1 s");
                    tokio::select! {
                        _ = stop.cancelled() => break 'pulling,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pulling,
                    }
                }
            };
            loop {
                // Take a message only when there is room for it: what a processor holds stays
                // bounded by what its workers can compute next, and the rest of the stream
                // stays with the server for the other processors.
                let permit = tokio::select! {
                    _ = stop.cancelled() => break 'pulling,
                    permit = room.clone().acquire_owned() => permit.expect("never closed"),
                };
                let message = tokio::select! {
                    _ = stop.cancelled() => {
                        drop(permit);
                        this.finish_pull(&mut messages, &client, &pipeline, &requests).await;
                        break 'pulling;
                    }
                    message = messages.next() => message,
                };
                match message {
                    Some(Ok(message)) => {
                        let (this, client, pipeline) =
                            (this.clone(), client.clone(), pipeline.clone());
                        let span = request::span(&message);
                        requests.spawn(
                            async move {
                                this.handle(message, &client, &pipeline).await;
                                drop(permit);
                            }
                            .instrument(span),
                        );
                    }
                    Some(Err(err)) => {
                        tracing::warn!(%err, "receiving from the JetStream consumer");
                        if matches!(
                            err.kind(),
                            pull::MessagesErrorKind::ConsumerDeleted
                                | pull::MessagesErrorKind::PushBasedConsumer
                                | pull::MessagesErrorKind::RequestLimitExceeded
                        ) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue 'pulling;
                        }
                    }
                    None => continue 'pulling,
                }
            }
        }
        tracing::info!("stopped pulling from the JetStream consumer");
    }

    /// At shutdown: answers the messages the pulls under way still deliver (they are ours
    /// until acked), up to two pulls' worth, until a short pause; any later ones are
    /// redelivered to another processor after `ack_wait`.
    async fn finish_pull(
        self: &Arc<Self>,
        messages: &mut pull::Stream,
        client: &async_nats::Client,
        pipeline: &Arc<Pipeline>,
        requests: &TaskTracker,
    ) {
        for _ in 0..2 * self.pull_size {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_millis(50), messages.next()).await
            else {
                break;
            };
            let (this, client, pipeline) = (self.clone(), client.clone(), pipeline.clone());
            let span = request::span(&message);
            requests.spawn(
                async move { this.handle(message, &client, &pipeline).await }.instrument(span),
            );
        }
    }

    async fn handle(&self, message: Message, client: &async_nats::Client, pipeline: &Pipeline) {
        let inbox =
            request::header(message.headers.as_ref(), headers::REPLY_INBOX).map(str::to_string);
        let encoding = request::encoding_of(message.headers.as_ref(), &message.payload);
        let task = self.task_of(&message);
        let (delivered, age) = match message.info() {
            Ok(info) => (info.delivered.max(1) as u32, age_of(info.published)),
            Err(_) => (1, Duration::ZERO),
        };
        // Held until the reply is published and the message settled.
        let mut ticket = None;
        let (result, inputs) = if delivered > self.settings.max_deliver {
            let error = ErrorBody::new(
                ErrorCode::ModelFailed,
                format!(
                    "the request was delivered {} times without being answered; giving up",
                    delivered - 1
                ),
            );
            (Err(error), 0)
        } else {
            match &task {
                Err(unknown) => (Err(unknown.clone()), 0),
                Ok(task) => {
                    // Deadline budgets count from when the stream received the request.
                    let received = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                    let admitted = pipeline.admit(
                        *task,
                        message.payload.len(),
                        message.headers.as_ref(),
                        received,
                    );
                    match admitted {
                        // Refused for now (overloaded: transient, so nak'ed below).
                        Err(refused) => (Err(refused), 0),
                        Ok(admitted) => {
                            ticket = Some(admitted);
                            self.compute(*task, &message, encoding, received, pipeline)
                                .await
                        }
                    }
                }
            }
        };

        let retry =
            matches!(&result, Err(e) if is_transient(e)) && delivered < self.settings.max_deliver;
        if retry {
            let delay = Duration::from_millis(self.settings.nak_delay_ms);
            if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(%err, "nak'ing a failed request");
            }
            return;
        }
        let failed = result.is_err();
        let Reply {
            headers: reply_headers,
            body,
            error,
        } = pipeline.reply(encoding, result, inputs).await;
        match inbox {
            Some(inbox) => {
                if let Err(err) = client
                    .publish_with_headers(inbox, reply_headers, body)
                    .await
                {
                    // Not acked: it is redelivered and answered again.
                    tracing::warn!(%err, "sending a reply; leaving the request for redelivery");
                    pipeline.record(task.ok(), error.as_ref(), false);
                    return;
                }
                pipeline.record(task.ok(), error.as_ref(), true);
            }
            None => {
                tracing::warn!(
                    subject = %message.subject,
                    "a request without a {} header: computed, but nobody to answer",
                    headers::REPLY_INBOX
                );
                pipeline.record(task.ok(), error.as_ref(), false);
            }
        }
        let ack = if failed && delivered >= self.settings.max_deliver {
            AckKind::Term
        } else {
            AckKind::Ack
        };
        if let Err(err) = message.ack_with(ack).await {
            tracing::warn!(%err, "acking an answered request");
        }
        drop(ticket);
    }

    /// The task a message's subject names.
    fn task_of(&self, message: &Message) -> Result<Task, ErrorBody> {
        let name = message
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_default();
        name.parse().map_err(|_| request::unknown_task(name))
    }

    /// Runs the request, telling the server it is still in progress every half `ack_wait`.
    async fn compute(
        &self,
        task: Task,
        message: &Message,
        encoding: Encoding,
        received: Instant,
        pipeline: &Pipeline,
    ) -> (Result<InferReply, ErrorBody>, usize) {
        let work = pipeline.compute(
            task,
            encoding,
            &message.payload,
            message.headers.as_ref(),
            received,
        );
        tokio::pin!(work);
        let mut progress = tokio::time::interval(self.settings.ack_wait() / 2);
        progress.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = progress.tick() => {
                    if let Err(err) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(%err, "sending an in-progress ack");
                    }
                }
            }
        }
    }
}

/// Errors worth another delivery (maybe on another processor): the batch failed or this
/// processor could not take it. Everything else is the request's own fault and final.
fn is_transient(error: &ErrorBody) -> bool {
    matches!(
        error.kind,
        ErrorCode::ModelFailed | ErrorCode::Internal | ErrorCode::Overloaded
    )
}

/// How long ago the server stored a message (zero if its clock is ahead of ours).
fn age_of(published: async_nats::datetime::DateTime) -> Duration {
    let published_ns = published.unix_timestamp_nanos();
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    Duration::from_nanos(u64::try_from(now_ns - published_ns).unwrap_or(0))
}
