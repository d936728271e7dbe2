//! A processor's life: load the model, connect, register the service and the intake, serve,
//! and at shutdown drain within the grace period. Request handling itself is in
//! `pipeline` and `transport`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::{BatchPolicy, Batcher, Workers};
use crate::cache::OutputCache;
use crate::config::{Config, Transport, WarmUp};
use crate::model;
use crate::pipeline::{Admission, Pipeline};
use crate::request::Limits;
use crate::telemetry::Telemetry;
use crate::transport::{self, Intake};

/// A started processor: model loaded, endpoints subscribed. Call [`Processor::run_until`].
pub struct Processor {
    client: async_nats::Client,
    /// Answers `$SRV` discovery (on the intake connection with the core transport); stops
    /// once the intake has, or when dropped.
    discovery: tokio_util::task::AbortOnDropHandle<()>,
    intake: Intake,
    pipeline: Arc<Pipeline>,
    workers: Workers,
    /// How long shutdown may take.
    grace: Duration,
    /// The metrics and health listener, if `http.listen` is set.
    http: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

/// Starts a processor and serves until `shutdown` completes, then stops taking requests,
/// answers every request it holds (within `service.shutdown_grace_s`) and returns.
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
        // Outputs of the test models (echo, sim) are not worth keeping: they would only
        // flatter the middleware's measurements.
        let cache = (config.model.kind == crate::config::ModelKind::Bert
            && config.cache.max_bytes > 0)
            .then(|| {
                Arc::new(OutputCache::new(
                    config.cache.max_bytes,
                    &config.cache.tasks,
                ))
            });
        let batcher = batcher.with_cache(cache);
        telemetry.model_loaded(batcher.stats().clone(), loading.elapsed().as_secs_f64());
        telemetry.model_warmed_up();

        let shown_url = config.nats.redacted_url();
        let client = connect(&config, &config.service.name, &telemetry).await?;

        let limits = Limits::new(&config.service, batcher.mask_token());
        let admission = Admission::new(
            config.service.max_in_flight_requests,
            config.service.max_in_flight_bytes,
        );
        let pipeline = Arc::new(Pipeline::new(
            batcher,
            limits,
            admission,
            telemetry.clone(),
            client.clone(),
        ));
        let prefix = &config.service.subject_prefix;
        let (intake, discovery) = match config.service.transport {
            Transport::Core => {
                // The endpoints get a connection of their own: at shutdown it is drained (the
                // messages already on their way are still delivered) and closed, while replies
                // go on over the main one.
                let name = format!("{}-intake", config.service.name);
                let intake_client = connect(&config, &name, &telemetry).await?;
                let (intake, endpoints) =
                    transport::core::Intake::start(intake_client.clone(), &config.service).await?;
                let discovery = discovery(&config, &pipeline, endpoints)
                    .start(intake_client.clone())
                    .await?;
                intake_client
                    .flush()
                    .await
                    .context("flushing subscriptions to NATS")?;
                (Intake::Core(Box::new(intake)), discovery)
            }
            Transport::Jetstream => {
                let discovery = discovery(&config, &pipeline, Vec::new())
                    .start(client.clone())
                    .await?;
                let intake = transport::jetstream::Intake::start(&client, &config)
                    .await
                    .context("setting up the JetStream stream and consumer")?;
                (Intake::JetStream(Box::new(intake)), discovery)
            }
        };
        client
            .flush()
            .await
            .context("flushing subscriptions to NATS")?;
        telemetry.serving(client.clone());
        tracing::info!(
            model = pipeline.batcher.model_name(),
            url = %shown_url,
            prefix = %prefix,
            queue_group = %config.service.queue_group,
            transport = ?config.service.transport,
            "processor ready"
        );
        Ok(Processor {
            client,
            discovery,
            intake,
            pipeline,
            workers,
            grace: Duration::from_secs(config.service.shutdown_grace_s),
            http,
        })
    }

    /// Where `/metrics`, `/livez` and `/readyz` are served, if `http.listen` is set.
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(address, _)| *address)
    }

    /// The metrics in the Prometheus text format (as `/metrics` serves them).
    pub fn metrics(&self) -> String {
        self.pipeline.telemetry.render()
    }

    /// Serves in a background task until [`ProcessorHandle::shutdown`] is called.
    pub fn spawn(self) -> ProcessorHandle {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run_until(async {
            let _ = stopped.await;
        }));
        ProcessorHandle { stop, task }
    }

    /// Serves until `shutdown` completes; then stops taking requests, answers everything already
    /// received, stops the model workers and returns. Every step of that drain shares the
    /// grace period (`service.shutdown_grace_s`), NATS being unreachable included: what is
    /// not done by then is given up, with a log line that counts it.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let requests = TaskTracker::new();
        let mut intake = tokio::spawn(self.intake.serve(
            self.client.clone(),
            self.pipeline.clone(),
            requests.clone(),
            stop.clone(),
        ));
        shutdown.await;
        let deadline = Instant::now() + self.grace;
        tracing::info!(
            grace_s = self.grace.as_secs(),
            "shutting down: no new requests, answering the ones held"
        );
        self.pipeline.telemetry.draining();
        stop.cancel();
        if tokio::time::timeout_at(deadline, &mut intake)
            .await
            .is_err()
        {
            intake.abort();
            tracing::warn!("the intake did not stop within the grace period");
        }
        requests.close();
        if tokio::time::timeout_at(deadline, requests.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unanswered = self.pipeline.held_requests(),
                "grace period over: exiting with requests unanswered"
            );
        }
        // Taking no more requests: no longer listed as an instance either.
        self.discovery.abort();
        let stats = self.pipeline.stats.clone();
        drop(self.pipeline);
        if self.client.connection_state() != async_nats::connection::State::Connected {
            // Waiting for a server that is not there would only use up the grace period.
            tracing::warn!("NATS is unreachable: replies not yet sent to it are lost");
        } else {
            let stopped = tokio::time::timeout_at(deadline, async {
                self.client.flush().await.context("flushing replies")
            })
            .await;
            match stopped {
                Ok(result) => result?,
                Err(_) => tracing::warn!("grace period over: NATS did not take the last replies"),
            }
        }
        // The workers end once the last holder of the scheduler (the pipeline, its tasks) let go of it.
        let workers = self.workers;
        let joined = tokio::task::spawn_blocking(move || workers.join());
        if tokio::time::timeout_at(deadline, joined).await.is_err() {
            tracing::warn!("grace period over: model workers still computing; exiting anyway");
        }
        if let Some((_, server)) = self.http {
            server.abort();
        }
        tracing::info!(
            replies_ok = stats.ok.load(Ordering::Relaxed),
            replies_error = stats.errors.load(Ordering::Relaxed),
            "processor stopped"
        );
        Ok(())
    }
}

/// Connects to NATS as configured, counting the messages async-nats drops (a subscription's
/// buffer was full) and logging connection events.
async fn connect(
    config: &Config,
    name: &str,
    telemetry: &Arc<Telemetry>,
) -> anyhow::Result<async_nats::Client> {
    let (options, urls) = config.nats.connect_options(name).await?;
    let events = telemetry.clone();
    options
        .subscription_capacity(config.service.subscription_capacity)
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(_) => events.count_dropped("slow_consumer"),
                    async_nats::Event::Connected => {
                        tracing::info!(event = %event, "NATS connection");
                        events.connected();
                    }
                    other => tracing::info!(event = %other, "NATS connection"),
                }
            }
        })
        .connect(urls.as_slice())
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats.redacted_url()))
}

/// How `$SRV` discovery shows this processor: its name, model, subject prefix, `endpoints`,
/// and in every endpoint's `data` the scheduler's and the replies' counters.
fn discovery(
    config: &Config,
    pipeline: &Pipeline,
    endpoints: Vec<transport::discovery::Endpoint>,
) -> transport::discovery::Discovery {
    let batcher_stats = pipeline.batcher.stats().clone();
    let reply_stats = pipeline.stats.clone();
    let metadata = HashMap::from([
        (
            "model".to_string(),
            pipeline.batcher.model_name().to_string(),
        ),
        (
            "subject_prefix".to_string(),
            config.service.subject_prefix.clone(),
        ),
    ]);
    transport::discovery::Discovery::new(
        config.service.name.clone(),
        "batched BERT inference (embed, fill_mask, rerank, classify)".to_string(),
        metadata,
        endpoints,
        Box::new(move || {
            let mut data = batcher_stats.to_json();
            data["replies_ok"] = reply_stats.ok.load(Ordering::Relaxed).into();
            data["replies_error"] = reply_stats.errors.load(Ordering::Relaxed).into();
            data["shed_before_decoding"] = reply_stats.shed.load(Ordering::Relaxed).into();
            data
        }),
    )
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
