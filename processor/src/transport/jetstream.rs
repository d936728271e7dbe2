//! The durable transport: requests wait in a JetStream work-queue stream and every processor
//! pulls from one shared durable consumer, so a request held by a processor that dies is
//! redelivered to another one after `ack_wait`.
//!
//! A processor asks the server for exactly as many messages as it has room for (its workers'
//! batches plus one batch waiting), so it never holds a delivered message it cannot start on,
//! and free processors take the work. A message waiting for a place in the queue stays ours
//! (progress acks), it is not given back: redeliveries are spent only on failures. The
//! requester's inbox travels in the `Reply-Inbox` header (JetStream uses the message's own reply
//! subject for acks); the reply goes there first, then the message is acked. Failed batches are
//! nak'ed with a delay, and a message delivered more than `max_deliver` times gets an error
//! reply and is terminated.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{self, pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Message;
use futures::StreamExt;
use schemas::{headers, Encoding, ErrorBody, ErrorCode, InferReply, Priority, Task};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, JetStreamConfig, Replicas};
use crate::pipeline::{Pipeline, Refusal, Ticket};
use crate::request::{self, Reply};

/// The consumer a processor pulls from, and how it treats messages.
pub(crate) struct Intake {
    consumer: PullConsumer,
    settings: JetStreamConfig,
    prefix: String,
    /// Messages held at most (being computed or queued): room for every worker's batch plus
    /// one more batch, so the next batch is ready when a worker frees up.
    capacity: usize,
    /// Messages one pull asks for at most: one batch.
    pull_size: usize,
    /// How long a message waits for a place in the queue (`batch.max_queue_wait_ms`) before
    /// it is answered `overloaded`.
    max_wait: Duration,
    /// Messages waiting for a place take it in the order they came (tokio's mutex is fair),
    /// so a large request is not passed forever by small ones; one line per priority class
    /// (interactive, bulk), as the queue admits them on different terms and a waiting bulk
    /// message must not hold up interactive ones.
    placing: [tokio::sync::Mutex<()>; 2],
}

/// How long one pull stays open at the server. Messages arriving meanwhile are delivered at
/// once, so this costs no latency; it bounds how long a pull lost with a server restart goes
/// unnoticed, and how long shutdown waits for the pull under way.
const PULL_EXPIRY: Duration = Duration::from_secs(2);

/// How long past its expiry a pull is waited for before it is given up as lost (messages a
/// slow server delivers to it later come back after `ack_wait`). A pull made before a
/// reconnection is given up at once.
const PULL_LOST_AFTER: Duration = Duration::from_secs(1);

/// Pause after a failed pull before the next. Short: in a cluster, the consumer has no
/// leader for the few seconds of an election, and the processor should pull again as soon
/// as the new leader is there; long enough not to spin.
const PULL_RETRY: Duration = Duration::from_millis(200);

/// How often a message that found no place in the queue asks again.
const PLACE_RETRY: Duration = Duration::from_millis(50);

impl Intake {
    /// Creates the stream and the durable consumer, or brings existing ones to the configured
    /// settings (every processor does this at start; it is idempotent).
    pub(crate) async fn start(
        client: &async_nats::Client,
        config: &Config,
    ) -> anyhow::Result<Self> {
        let settings = config.jetstream.clone();
        let prefix = config.service.subject_prefix.clone();
        let context = async_nats::jetstream::new(client.clone());
        let clustered = client.server_info().cluster.is_some();
        let stream = ensure_stream(&context, &settings, &prefix, clustered).await?;
        let consumer = ensure_consumer(&stream, &settings).await?;
        let workers = config.model.workers();
        Ok(Intake {
            consumer,
            capacity: config.batch.max_size * (workers + 1),
            pull_size: config.batch.max_size,
            max_wait: Duration::from_millis(config.batch.max_queue_wait_ms),
            placing: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            settings,
            prefix,
        })
    }

    /// Pulls and answers messages until `stop`; then answers what the pull under way still
    /// delivers (it ends within [`PULL_EXPIRY`]) and returns. The request tasks it spawned are
    /// tracked by `requests`.
    pub(crate) async fn serve(
        self,
        client: async_nats::Client,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        let this = Arc::new(self);
        let room = Arc::new(Semaphore::new(this.capacity));
        while let Some(places) = this.reserve(&room, &stop).await {
            // Made before the pull goes out, so a reconnection after it is not missed; the
            // connection count tells a reconnection from a late event about an older one.
            let reconnected = pipeline.telemetry.next_connection();
            let connects = connections(&client);
            if client.connection_state() != async_nats::connection::State::Connected {
                // A pull now would only be queued and sent after the reconnection, to expire
                // there unanswered: wait for the connection instead.
                drop(places);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = reconnected => {}
                    _ = tokio::time::sleep(PULL_RETRY) => {}
                }
                continue;
            }
            let wanted = places.num_permits();
            let pull = this
                .consumer
                .batch()
                .max_messages(wanted)
                .expires(PULL_EXPIRY)
                .messages()
                .await;
            let failed = match pull {
                // Messages delivered after `stop` are ours too: they are answered like the rest.
                Ok(pull) => {
                    !this
                        .take(
                            pull,
                            places,
                            (reconnected, connects),
                            &client,
                            &pipeline,
                            &requests,
                        )
                        .await
                }
                Err(err) => {
                    drop(places);
                    tracing::warn!(%err, "pulling from the JetStream consumer");
                    true
                }
            };
            if failed {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(PULL_RETRY) => {}
                }
            }
        }
        tracing::info!("stopped pulling from the JetStream consumer");
    }

    /// Places for the next pull: waits for one, then takes every free one up to a batch.
    /// `None` once `stop` is cancelled.
    async fn reserve(
        &self,
        room: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        let mut places = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            place = room.clone().acquire_owned() => place.expect("never closed"),
        };
        let more = room.available_permits().min(self.pull_size - 1);
        if more > 0 {
            if let Ok(extra) = room.clone().try_acquire_many_owned(more as u32) {
                places.merge(extra);
            }
        }
        Some(places)
    }

    /// Hands every message of one pull to a request task of its own, each with one of the
    /// places reserved for the pull; the places not used are freed when the pull ends.
    /// False if the pull failed (or was lost with the connection).
    async fn take<'p>(
        self: &Arc<Self>,
        mut pull: pull::Batch,
        mut places: OwnedSemaphorePermit,
        (reconnected, connects): (tokio::sync::futures::Notified<'p>, u64),
        client: &async_nats::Client,
        pipeline: &'p Arc<Pipeline>,
        requests: &TaskTracker,
    ) -> bool {
        // The server ends the pull at its expiry; one that outlives it was lost with the
        // connection and is not waited for (async-nats alone would wait 5 s more). A new
        // connection (to this server or, in a cluster, another) means the same, at once.
        let lost_at = Instant::now() + PULL_EXPIRY + PULL_LOST_AFTER;
        let mut reconnected = Box::pin(reconnected);
        while places.num_permits() > 0 {
            let message = tokio::select! {
                _ = tokio::time::sleep_until(lost_at) => return false,
                _ = &mut reconnected => {
                    if connections(client) != connects {
                        tracing::info!("reconnected to NATS: pulling again");
                        return false;
                    }
                    // The event of a connection made before this pull: keep it.
                    reconnected = Box::pin(pipeline.telemetry.next_connection());
                    continue;
                }
                message = pull.next() => message,
            };
            match message {
                Some(Ok(message)) => {
                    let place = places.split(1).expect("a place per message asked for");
                    let (this, client, pipeline) = (self.clone(), client.clone(), pipeline.clone());
                    let span = request::span(&message);
                    requests.spawn(
                        async move {
                            this.handle(message, &client, &pipeline).await;
                            drop(place);
                        }
                        .instrument(span),
                    );
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, "receiving from the JetStream consumer");
                    return false;
                }
                None => break,
            }
        }
        true
    }

    async fn handle(
        &self,
        message: Message,
        client: &async_nats::Client,
        pipeline: &Arc<Pipeline>,
    ) {
        let inbox =
            request::header(message.headers.as_ref(), headers::REPLY_INBOX).map(str::to_string);
        let encoding = request::encoding_of(message.headers.as_ref(), &message.payload);
        let task = self.task_of(&message);
        let (delivered, age) = match message.info() {
            Ok(info) => (info.delivered.max(1) as u32, age_of(info.published)),
            Err(_) => (1, Duration::ZERO),
        };
        // Deadline budgets count from when the stream received the request.
        let received = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        // The ticket is held until the reply is published and the message settled.
        let (result, inputs, ticket) = if delivered > self.settings.max_deliver {
            let error = ErrorBody::new(
                ErrorCode::ModelFailed,
                format!(
                    "the request was delivered {} times without being answered; giving up",
                    delivered - 1
                ),
            );
            (Err(error), 0, None)
        } else {
            match task {
                Err(ref unknown) => (Err(unknown.clone()), 0, None),
                Ok(task) => {
                    self.compute(task, &message, encoding, received, pipeline)
                        .await
                }
            }
        };

        let retry =
            matches!(&result, Err(e) if is_failure(e)) && delivered < self.settings.max_deliver;
        if retry {
            let delay = Duration::from_millis(self.settings.nak_delay_ms);
            if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(%err, "nak'ing a failed request");
            }
            return;
        }
        let failed = result.is_err();
        let Reply {
            headers: mut reply_headers,
            body,
            error,
        } = pipeline.reply(encoding, result, inputs).await;
        if delivered > 1 {
            reply_headers.insert(headers::DELIVERY_COUNT, delivered.to_string().as_str());
        }
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

    /// Runs the request once it has a place in the queue (waiting for one while this processor
    /// is busy: the message is not given back), telling the server every quarter `ack_wait`
    /// that it is still in progress.
    async fn compute(
        &self,
        task: Task,
        message: &Message,
        encoding: Encoding,
        received: Instant,
        pipeline: &Arc<Pipeline>,
    ) -> (Result<InferReply, ErrorBody>, usize, Option<Ticket>) {
        let payload = &message.payload;
        let message_headers = message.headers.as_ref();
        let waiting_since = Instant::now();
        // A malformed value queues as interactive here; decoding reports it.
        let line = match request::header(message_headers, headers::PRIORITY)
            .and_then(|value| value.parse().ok())
        {
            Some(Priority::Bulk) => 1,
            _ => 0,
        };
        let work = async {
            loop {
                let turn = self.placing[line].lock().await;
                let ticket = loop {
                    match pipeline.place(task, payload.len(), message_headers, received) {
                        Ok(ticket) => break ticket,
                        // Busy for now; a deadline that passes meanwhile ends the wait
                        // (`timeout`), and so does `max_wait` (`overloaded`, final: the
                        // requester re-sends).
                        Err(Refusal {
                            shed: Some(_),
                            error,
                        }) => {
                            if waiting_since.elapsed() >= self.max_wait {
                                return (Err(error), 0, None);
                            }
                            tokio::time::sleep(PLACE_RETRY).await;
                        }
                        Err(Refusal { error, .. }) => return (Err(error), 0, None),
                    }
                };
                drop(turn);
                let (result, inputs) = pipeline
                    .compute(task, encoding, payload, message_headers, received)
                    .await;
                match result {
                    // The queue turned it away after all (it filled meanwhile): wait again.
                    Err(error)
                        if error.kind == ErrorCode::Overloaded
                            && waiting_since.elapsed() < self.max_wait =>
                    {
                        drop(ticket);
                        tokio::time::sleep(PLACE_RETRY).await;
                    }
                    result => return (result, inputs, Some(ticket)),
                }
            }
        };
        tokio::pin!(work);
        let mut progress = tokio::time::interval(self.settings.ack_wait() / 4);
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

/// The work-queue stream as configured: created if missing; an existing one is updated where
/// its settings differ, or refused where JetStream cannot change them. `clustered`: the
/// server is part of a cluster (its INFO names one), which makes `replicas = auto` mean 3.
async fn ensure_stream(
    context: &async_nats::jetstream::Context,
    settings: &JetStreamConfig,
    prefix: &str,
    clustered: bool,
) -> anyhow::Result<stream::Stream> {
    let name = &settings.stream;
    let replicas = match settings.replicas {
        Replicas::Exactly(n) => {
            if n > 1 && !clustered {
                tracing::warn!(
                    replicas = n,
                    "jetstream.replicas asks for {n} copies but the server is not part of a \
                     cluster: the stream has one"
                );
            }
            n
        }
        Replicas::Auto if clustered => AUTO_REPLICAS,
        Replicas::Auto => 1,
    };
    let wanted = stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        // A full stream refuses the publish (the producer sees it), rather than dropping
        // the oldest requests unanswered.
        discard: DiscardPolicy::New,
        max_messages: settings.max_messages,
        max_bytes: settings.max_bytes,
        max_age: Duration::from_secs(settings.max_age_s),
        duplicate_window: Duration::from_secs(settings.duplicate_window_s),
        num_replicas: replicas,
        ..Default::default()
    };
    let mut stream = create_stream(context, &wanted, settings.replicas).await?;
    let current = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("stream {name}: {e}"))?
        .config
        .clone();
    let recreate = |setting: &str, found: String| {
        anyhow::anyhow!(
            "stream {name} exists with {setting} {found}, which JetStream cannot change; this \
             processor needs a {:?} {:?} stream: remove it (`nats stream rm {name}`, losing \
             the requests it holds) or set jetstream.stream to another name",
            wanted.retention,
            wanted.storage,
        )
    };
    if current.retention != wanted.retention {
        return Err(recreate("retention", format!("{:?}", current.retention)));
    }
    if current.storage != wanted.storage {
        return Err(recreate("storage", format!("{:?}", current.storage)));
    }
    // `auto` never lowers the count an operator (or an earlier processor) chose.
    let replicas = match settings.replicas {
        Replicas::Auto => replicas.max(current.num_replicas),
        Replicas::Exactly(n) => n,
    };
    let mut changed = Vec::new();
    let mut compare = |setting: &str, found: String, want: String| {
        if found != want {
            changed.push(format!("{setting} {found} -> {want}"));
        }
    };
    compare(
        "subjects",
        format!("{:?}", current.subjects),
        format!("{:?}", wanted.subjects),
    );
    compare(
        "discard",
        format!("{:?}", current.discard),
        format!("{:?}", wanted.discard),
    );
    compare(
        "max_messages",
        current.max_messages.to_string(),
        wanted.max_messages.to_string(),
    );
    compare(
        "max_bytes",
        current.max_bytes.to_string(),
        wanted.max_bytes.to_string(),
    );
    compare(
        "max_age_s",
        current.max_age.as_secs().to_string(),
        wanted.max_age.as_secs().to_string(),
    );
    compare(
        "duplicate_window_s",
        current.duplicate_window.as_secs().to_string(),
        wanted.duplicate_window.as_secs().to_string(),
    );
    // A single server reports one replica whatever was asked: nothing to change there.
    if clustered {
        compare(
            "replicas",
            current.num_replicas.to_string(),
            replicas.to_string(),
        );
    }
    if !changed.is_empty() {
        let changed = changed.join(", ");
        // Everything else the operator set on the stream is kept.
        let updated = stream::Config {
            subjects: wanted.subjects,
            discard: wanted.discard,
            max_messages: wanted.max_messages,
            max_bytes: wanted.max_bytes,
            max_age: wanted.max_age,
            duplicate_window: wanted.duplicate_window,
            num_replicas: if clustered {
                replicas
            } else {
                current.num_replicas
            },
            ..current.clone()
        };
        let mut done = changed;
        match context.update_stream(&updated).await {
            Ok(_) => {}
            // `auto` asked for 3 copies, which the cluster cannot place now (a server is
            // down): keep the count the stream has, change the rest; a later start tries again.
            Err(e)
                if settings.replicas == Replicas::Auto
                    && current.num_replicas < replicas
                    && too_few_peers(&e) =>
            {
                tracing::warn!(
                    stream = %name,
                    replicas = current.num_replicas,
                    "the cluster cannot place {replicas} copies of the stream now ({e}): \
                     keeping {}; a processor started later raises it",
                    current.num_replicas
                );
                let kept = stream::Config {
                    num_replicas: current.num_replicas,
                    ..updated
                };
                done = done
                    .split(", ")
                    .filter(|change| !change.starts_with("replicas"))
                    .collect::<Vec<_>>()
                    .join(", ");
                if kept != current {
                    context
                        .update_stream(&kept)
                        .await
                        .map_err(|e| anyhow::anyhow!("stream {name}: changing {done}: {e}"))?;
                }
            }
            Err(e) => return Err(anyhow::anyhow!("stream {name}: changing {done}: {e}")),
        }
        if !done.is_empty() {
            tracing::info!(stream = %name, changed = %done, "updated the stream to the configuration");
        }
        stream = context
            .get_stream(name)
            .await
            .map_err(|e| anyhow::anyhow!("stream {name}: {e}"))?;
    }
    Ok(stream)
}

/// Replicas that `auto` asks for on a cluster: a copy on each of three servers survives the
/// loss of any one of them, with a quorum (2 of 3) left to go on.
const AUTO_REPLICAS: usize = 3;

/// Gets the stream, or creates it as `wanted`. With `auto` replicas, a cluster that cannot
/// place 3 copies (a server down, or fewer than 3 servers) is asked again for a few seconds
/// (processors starting together can briefly overload the JetStream API, which answers with
/// the same code), then the stream is created with 1 copy and a warning: 2 copies would need
/// both servers for a quorum, surviving no loss while writing slower than 1.
async fn create_stream(
    context: &async_nats::jetstream::Context,
    wanted: &stream::Config,
    setting: Replicas,
) -> anyhow::Result<stream::Stream> {
    let name = &wanted.name;
    let mut tries = 0;
    loop {
        tries += 1;
        match context.get_or_create_stream(wanted.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(e) if setting == Replicas::Auto && wanted.num_replicas > 1 && too_few_peers(&e) => {
                if tries < PLACEMENT_TRIES {
                    tokio::time::sleep(PLACEMENT_RETRY).await;
                    continue;
                }
                // Loud: the deployment is not as safe as asked for until a later start.
                tracing::error!(
                    stream = %name,
                    "the cluster cannot place {} copies of the stream ({e}): creating it with \
                     1; a processor started once the cluster can hold 3 raises it",
                    wanted.num_replicas
                );
                let single = stream::Config {
                    num_replicas: 1,
                    ..wanted.clone()
                };
                return context
                    .get_or_create_stream(single)
                    .await
                    .map_err(|e| anyhow::anyhow!("stream {name}: {e}"));
            }
            Err(e) => return Err(anyhow::anyhow!("stream {name}: {e}")),
        }
    }
}

/// Attempts at placing `auto`'s 3 copies before settling for 1, and the pause between them.
const PLACEMENT_TRIES: u32 = 4;
const PLACEMENT_RETRY: Duration = Duration::from_secs(1);

/// Whether JetStream refused a stream's placement: no suitable peers (10005, newer servers)
/// or insufficient resources (10023: what nats-server 2.9 answers with too few servers; also
/// too little storage for the copies).
fn too_few_peers(error: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match error.kind() {
        CreateStreamErrorKind::JetStream(e) => matches!(
            e.error_code(),
            ErrorCode::CLUSTER_NO_PEERS | ErrorCode::INSUFFICIENT_RESOURCES
        ),
        _ => false,
    }
}

/// The durable pull consumer as configured: created if missing; an existing one is updated
/// where its settings differ, or refused where JetStream cannot change them.
async fn ensure_consumer(
    stream: &stream::Stream,
    settings: &JetStreamConfig,
) -> anyhow::Result<PullConsumer> {
    let name = &settings.consumer;
    let wanted = pull::Config {
        durable_name: Some(name.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait(),
        // One delivery more than allowed: the extra one only answers with an error.
        max_deliver: i64::from(settings.max_deliver) + 1,
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    };
    let existing: consumer::Consumer<consumer::Config> = match stream.get_consumer(name).await {
        Ok(existing) => existing,
        Err(_) => {
            return stream
                .get_or_create_consumer(name, wanted)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"));
        }
    };
    let current = &existing.cached_info().config;
    if current.deliver_subject.is_some() {
        bail!(
            "consumer {name} on stream {} is a push consumer; this processor needs a pull \
             consumer: remove it (`nats consumer rm {} {name}`) or set jetstream.consumer to \
             another name",
            settings.stream,
            settings.stream
        );
    }
    if current.ack_policy != wanted.ack_policy {
        bail!(
            "consumer {name} exists with ack policy {:?}, which JetStream cannot change; this \
             processor needs {:?}: remove it (`nats consumer rm {} {name}`) or set \
             jetstream.consumer to another name",
            current.ack_policy,
            wanted.ack_policy,
            settings.stream
        );
    }
    let mut changed = Vec::new();
    if current.ack_wait != wanted.ack_wait {
        changed.push(format!(
            "ack_wait_ms {} -> {}",
            current.ack_wait.as_millis(),
            wanted.ack_wait.as_millis()
        ));
    }
    if current.max_deliver != wanted.max_deliver {
        // Shown as configured: the consumer holds one delivery more (see above).
        changed.push(format!(
            "max_deliver {} -> {}",
            current.max_deliver - 1,
            settings.max_deliver
        ));
    }
    if current.max_ack_pending != wanted.max_ack_pending {
        changed.push(format!(
            "max_ack_pending {} -> {}",
            current.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if !changed.is_empty() {
        let changed = changed.join(", ");
        // Creating a durable that exists with other settings updates it, where allowed.
        stream
            .create_consumer(wanted)
            .await
            .with_context(|| format!("consumer {name}: changing {changed}"))?;
        tracing::info!(consumer = %name, %changed, "updated the consumer to the configuration");
    }
    stream
        .get_consumer(name)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))
}

/// Errors worth another delivery, maybe on another processor: the batch failed. Everything
/// else is final: the request's own fault, or its deadline.
fn is_failure(error: &ErrorBody) -> bool {
    matches!(error.kind, ErrorCode::ModelFailed | ErrorCode::Internal)
}

/// Connections the client has made so far (the first one and every reconnection).
fn connections(client: &async_nats::Client) -> u64 {
    client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed)
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
