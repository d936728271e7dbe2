//! The NATS side: registers the micro service and its endpoints, decodes requests, hands
//! them to the batcher and publishes one reply per request.
//!
//! Nothing here computes; every request runs in its own small task so a slow batch never
//! stops the endpoint loops from draining their subscriptions.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::service::{endpoint::Endpoint, Request, Service, ServiceExt};
use async_nats::HeaderMap;
use futures::StreamExt;
use schemas::{
    decode, encode, headers, Encoding, ErrorBody, ErrorCode, InferReply, InferRequest, Task,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::batcher::{BatchPolicy, Batcher, Workers};
use crate::config::{Config, ServiceConfig, Transport, WarmUp};
use crate::jetstream;
use crate::model;
use crate::telemetry::Telemetry;

/// What an endpoint serves.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// `{prefix}.{task}`
    Task(Task),
    /// `{prefix}.*`: answers subjects that name no task; ignores the known ones.
    UnknownTask,
}

/// Request counters shown in `$SRV.STATS` next to the batcher's.
#[derive(Debug, Default)]
pub(crate) struct ReplyStats {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// What every request task needs.
pub(crate) struct Context {
    pub(crate) batcher: Batcher,
    limits: ServiceConfig,
    pub(crate) stats: Arc<ReplyStats>,
    pub(crate) telemetry: Arc<Telemetry>,
}

/// A started processor: model loaded, endpoints subscribed. Call [`Processor::run_until`].
pub struct Processor {
    client: async_nats::Client,
    service: Service,
    intake: Intake,
    context: Arc<Context>,
    workers: Workers,
    /// The metrics and health listener, if `http.listen` is set.
    http: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

/// Where requests come from.
enum Intake {
    /// Service endpoints in the queue group.
    Core(Vec<(Route, Endpoint)>),
    /// The durable pull consumer of the work-queue stream.
    JetStream(Box<jetstream::Intake>),
}

/// Starts a processor and serves until `shutdown` completes, then stops taking requests,
/// answers every request it holds and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Processor::start(config).await?.run_until(shutdown).await
}

impl Processor {
    /// Loads the model, connects to NATS and registers the service. When this returns, the
    /// endpoints are subscribed on the server and requests will be answered.
    pub async fn start(config: Config) -> anyhow::Result<Processor> {
        // Health and metrics first: /readyz says "not ready" while the model loads.
        let telemetry = Telemetry::new(&config);
        let http = match config.http.listen.as_str() {
            "" => None,
            listen => Some(telemetry.serve(listen).await?),
        };
        let policy = BatchPolicy {
            warm_up_shapes: config.model.warmup() == WarmUp::Shapes,
            ..BatchPolicy::from(&config.batch)
        };
        let model_config = config.model.clone();
        let workers = config.model.workers();
        let loading = std::time::Instant::now();
        let (batcher, workers) = Batcher::start(policy, workers, move |index| {
            model::load(&model_config, index)
        })
        .await
        .context("loading the model")?;
        telemetry.model_loaded(batcher.stats().clone(), loading.elapsed().as_secs_f64());
        telemetry.model_warmed_up();

        let url = &config.nats.url;
        let client = config
            .nats
            .connect_options(&config.service.name)
            .await?
            .connect(url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;

        let reply_stats = Arc::new(ReplyStats::default());
        let service = {
            let batcher_stats = batcher.stats().clone();
            let reply_stats = reply_stats.clone();
            let metadata = HashMap::from([
                ("model".to_string(), batcher.model_name().to_string()),
                (
                    "subject_prefix".to_string(),
                    config.service.subject_prefix.clone(),
                ),
            ]);
            client
                .service_builder()
                .description("batched BERT inference (embed, fill_mask)")
                .queue_group(&config.service.queue_group)
                .metadata(metadata)
                .stats_handler(move |_endpoint, _stats| {
                    let mut data = batcher_stats.to_json();
                    data["replies_ok"] = reply_stats.ok.load(Ordering::Relaxed).into();
                    data["replies_error"] = reply_stats.errors.load(Ordering::Relaxed).into();
                    data
                })
                .start(&config.service.name, env!("CARGO_PKG_VERSION"))
                .await
                .map_err(|e| anyhow::anyhow!("registering the NATS service: {e}"))?
        };

        let prefix = &config.service.subject_prefix;
        let intake = match config.service.transport {
            Transport::Core => Intake::Core(add_endpoints(&service, &config.service).await?),
            Transport::Jetstream => Intake::JetStream(Box::new(
                jetstream::Intake::start(&client, &config)
                    .await
                    .context("setting up the JetStream stream and consumer")?,
            )),
        };
        client
            .flush()
            .await
            .context("flushing subscriptions to NATS")?;
        telemetry.serving(client.clone());
        tracing::info!(
            model = batcher.model_name(),
            url = %url,
            prefix = %prefix,
            queue_group = %config.service.queue_group,
            transport = ?config.service.transport,
            "processor ready"
        );
        Ok(Processor {
            client,
            service,
            intake,
            context: Arc::new(Context {
                batcher,
                limits: config.service,
                stats: reply_stats,
                telemetry,
            }),
            workers,
            http,
        })
    }

    /// Where `/metrics`, `/livez` and `/readyz` are served, if `http.listen` is set.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(address, _)| *address)
    }

    /// The metrics in the Prometheus text format (as `/metrics` serves them).
    pub fn metrics(&self) -> String {
        self.context.telemetry.render()
    }

    /// Serves in a background task until [`ProcessorHandle::shutdown`] is called.
    pub fn spawn(self) -> ProcessorHandle {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run_until(async {
            let _ = stopped.await;
        }));
        ProcessorHandle { stop, task }
    }

    /// Serves until `shutdown` completes; then unsubscribes, answers everything already
    /// received, stops the model workers and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let requests = TaskTracker::new();
        let mut loops = tokio::task::JoinSet::new();
        match self.intake {
            Intake::Core(endpoints) => {
                for (route, endpoint) in endpoints {
                    loops.spawn(serve_endpoint(
                        route,
                        endpoint,
                        self.context.clone(),
                        requests.clone(),
                        stop.clone(),
                    ));
                }
            }
            Intake::JetStream(intake) => {
                loops.spawn(intake.serve(
                    self.client.clone(),
                    self.context.clone(),
                    requests.clone(),
                    stop.clone(),
                ));
            }
        }
        shutdown.await;
        tracing::info!("shutting down: no new requests, answering the ones held");
        self.context.telemetry.draining();
        stop.cancel();
        while loops.join_next().await.is_some() {}
        requests.close();
        requests.wait().await;
        drop(self.context);
        self.service
            .stop()
            .await
            .map_err(|e| anyhow::anyhow!("stopping the NATS service: {e}"))?;
        self.client.flush().await.context("flushing replies")?;
        let workers = self.workers;
        tokio::task::spawn_blocking(move || workers.join())
            .await
            .context("joining model workers")?;
        if let Some((_, server)) = self.http {
            server.abort();
        }
        tracing::info!("processor stopped");
        Ok(())
    }
}

/// One endpoint per task in the queue group, plus the unknown-task catch-all.
async fn add_endpoints(
    service: &Service,
    config: &ServiceConfig,
) -> anyhow::Result<Vec<(Route, Endpoint)>> {
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
    Ok(endpoints)
}

/// A processor serving in the background (see [`Processor::spawn`]).
pub struct ProcessorHandle {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ProcessorHandle {
    /// Stops taking requests, answers the ones held, and waits until the processor is done.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the processor task panicked")?
    }
}

async fn serve_endpoint(
    route: Route,
    mut endpoint: Endpoint,
    context: Arc<Context>,
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
                Some(request) => {
                    requests.spawn(handle(route, request, context.clone()));
                }
                None => break,
            },
        }
    }
}

async fn handle(route: Route, request: Request, context: Arc<Context>) {
    let span = request_span(&request.message);
    handle_in_span(route, request, context)
        .instrument(span)
        .await
}

/// A span carrying the request's subject and `Request-Id` (if any) through its logs.
pub(crate) fn request_span(message: &async_nats::Message) -> tracing::Span {
    let id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::REQUEST_ID))
        .map(|v| v.as_str().to_string());
    tracing::debug_span!("request", subject = %message.subject, id)
}

async fn handle_in_span(route: Route, request: Request, context: Arc<Context>) {
    let received = Instant::now();
    let message = &request.message;
    let content_type = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CONTENT_TYPE))
        .map(|v| v.as_str());
    let encoding = Encoding::detect(content_type, &message.payload);
    let task = match route {
        Route::Task(task) => task,
        Route::UnknownTask => {
            let name = message.subject.rsplit('.').next().unwrap_or_default();
            if Task::ALL.iter().any(|task| task.as_str() == name) {
                return; // its own endpoint answers it
            }
            let error = ErrorBody::new(
                ErrorCode::UnknownTask,
                format!("unknown task `{name}`; this service serves embed and fill_mask"),
            );
            return reply(&request, encoding, None, Err(error), &context).await;
        }
    };
    let result = context.infer(task, message, encoding, received).await;
    reply(&request, encoding, Some(task), result, &context).await
}

impl Context {
    /// Decodes, checks and computes one request message. `received` is when the deadline
    /// budget (`Request-Timeout-Ms`, `timeout_ms`) starts.
    pub(crate) async fn infer(
        &self,
        task: Task,
        message: &async_nats::Message,
        encoding: Encoding,
        received: Instant,
    ) -> Result<InferReply, ErrorBody> {
        let request: InferRequest = decode(encoding, &message.payload).map_err(|e| {
            ErrorBody::new(
                ErrorCode::MalformedRequest,
                format!("the payload is not a valid request: {e}"),
            )
        })?;
        let deadline = deadline(message.headers.as_ref(), &request, received)?;
        self.check(&request)?;
        let request_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::REQUEST_ID))
            .map(|v| Arc::from(v.as_str()));
        let completed = self
            .batcher
            .infer_traced(task, request.inputs, request.options, deadline, request_id)
            .await?;
        Ok(InferReply {
            outputs: completed.outputs,
            model: self.batcher.model_name().to_string(),
            batch_size: completed.batch_size as u32,
        })
    }

    /// Refuses requests no model should see: none, too many or too large inputs.
    fn check(&self, request: &InferRequest) -> Result<(), ErrorBody> {
        let limits = &self.limits;
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
        Ok(())
    }
}

async fn reply(
    request: &Request,
    encoding: Encoding,
    task: Option<Task>,
    result: Result<InferReply, ErrorBody>,
    context: &Context,
) {
    let (reply_headers, body) = reply_message(encoding, task, &result, context);
    if let Err(err) = request.respond_with_headers(Ok(body), reply_headers).await {
        tracing::warn!(%err, subject = %request.message.subject, "could not send a reply (no reply inbox?)");
    }
}

/// The headers and body of a reply (success or error), counted in the statistics.
pub(crate) fn reply_message(
    encoding: Encoding,
    task: Option<Task>,
    result: &Result<InferReply, ErrorBody>,
    context: &Context,
) -> (HeaderMap, bytes::Bytes) {
    let stats = &context.stats;
    context
        .telemetry
        .count_request(task, result.as_ref().map(|_| ()));
    let mut reply_headers = HeaderMap::new();
    reply_headers.insert(headers::CONTENT_TYPE, encoding.media_type());
    let body = match result {
        Ok(reply) => {
            stats.ok.fetch_add(1, Ordering::Relaxed);
            encode(encoding, reply)
        }
        Err(error) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(code = error.code, kind = error.kind.as_str(), message = %error.message, "error reply");
            reply_headers.insert(headers::SERVICE_ERROR, one_line(&error.message).as_str());
            reply_headers.insert(headers::SERVICE_ERROR_CODE, error.code.to_string().as_str());
            encode(encoding, error)
        }
    };
    let body = body.unwrap_or_else(|e| {
        // Our own types always encode; answer anyway rather than leave the requester waiting.
        tracing::error!(%e, "encoding a reply");
        format!("could not encode the reply: {e}").into_bytes()
    });
    (reply_headers, body.into())
}

/// When the request stops being worth computing: the earliest of its `Request-Timeout-Ms`
/// header and `timeout_ms` field (budgets counted from `received`) and its
/// `Request-Deadline-Ms` header (an absolute Unix time).
fn deadline(
    message_headers: Option<&HeaderMap>,
    request: &InferRequest,
    received: Instant,
) -> Result<Option<Instant>, ErrorBody> {
    let header = |name: &str| -> Result<Option<u64>, ErrorBody> {
        let Some(value) = message_headers.and_then(|h| h.get(name)) else {
            return Ok(None);
        };
        value.as_str().trim().parse().map(Some).map_err(|_| {
            ErrorBody::new(
                ErrorCode::MalformedRequest,
                format!("header {name} must be a whole number of milliseconds, not {value:?}"),
            )
        })
    };
    let mut deadline: Option<Instant> = None;
    let mut earliest = |candidate: Instant| {
        deadline = Some(deadline.map_or(candidate, |d| d.min(candidate)));
    };
    for ms in [header(headers::REQUEST_TIMEOUT_MS)?, request.timeout_ms]
        .into_iter()
        .flatten()
    {
        earliest(received + Duration::from_millis(ms));
    }
    if let Some(unix_ms) = header(headers::REQUEST_DEADLINE_MS)? {
        let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        earliest(Instant::now() + left);
    }
    Ok(deadline)
}

/// Header values are single lines.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}
