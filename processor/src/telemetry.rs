//! What an operator watches, on `http.listen`: Prometheus metrics at `/metrics`, liveness at
//! `/livez` and readiness at `/readyz`.
//!
//! The scheduler's figures are read from [`BatcherStats`] at scrape time (the same numbers as
//! `$SRV.STATS`), so nothing is counted twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::http::{header, StatusCode};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use schemas::{ErrorBody, Task};

use crate::stats::{BatcherStats, Histogram};

/// Liveness fails only after NATS has been unreachable this long: a short server restart
/// must not get every processor restarted too.
const NATS_GRACE: Duration = Duration::from_secs(60);

/// Labels of `bert_requests_total`.
type RequestLabels = Vec<(&'static str, String)>;

/// Why a request was answered `overloaded` before it was decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The queue is full (`batch.queue_capacity`).
    QueueFull,
    /// The queue holds more work than `batch.max_queue_wait_ms`.
    QueueWait,
    /// `service.max_in_flight_requests` reached.
    InFlightRequests,
    /// `service.max_in_flight_bytes` reached.
    InFlightBytes,
}

impl Shed {
    fn as_str(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::QueueWait => "queue_wait",
            Shed::InFlightRequests => "in_flight_requests",
            Shed::InFlightBytes => "in_flight_bytes",
        }
    }
}

/// Metrics and health of one processor.
pub struct Telemetry {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// `requests{task, outcome="ok"}` per task (`Task::ALL` order), resolved once: the
    /// family's lookup (label strings, hashing, a lock) is not paid per answered request.
    requests_ok: Vec<Counter>,
    shed: Family<RequestLabels, Counter>,
    dropped: Family<RequestLabels, Counter>,
    undeliverable: Family<RequestLabels, Counter>,
    state: Arc<State>,
}

/// What the scrape-time collector and the health checks read.
#[derive(Debug, Default)]
struct State {
    batcher: OnceLock<Arc<BatcherStats>>,
    nats: OnceLock<async_nats::Client>,
    model_load_seconds: OnceLock<f64>,
    /// The model is loaded and has computed one batch.
    model_ready: AtomicBool,
    /// Endpoints (or the JetStream pull) are up.
    serving: AtomicBool,
    /// Shutting down: no new requests.
    draining: AtomicBool,
    disconnected_since: Mutex<Option<Instant>>,
    /// Woken each time a NATS connection is (re)established: what was waiting on the old
    /// connection (a JetStream pull) is gone.
    connected: tokio::sync::Notify,
}

impl Telemetry {
    /// Metrics for a processor of this version, model kind and transport.
    pub fn new(config: &crate::Config) -> Arc<Telemetry> {
        let state = Arc::new(State::default());
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "bert_requests",
            "Requests answered, by task and outcome (ok, or the error kind)",
            requests.clone(),
        );
        let shed = Family::<RequestLabels, Counter>::default();
        registry.register(
            "bert_shed_requests",
            "Requests answered overloaded before decoding, by the bound they met (the queue's own refusals are bert_rejected_requests)",
            shed.clone(),
        );
        let dropped = Family::<RequestLabels, Counter>::default();
        registry.register(
            "bert_dropped_requests",
            "Requests lost without a reply, by reason (slow_consumer: the NATS client's buffer for a subscription was full; a lower bound, the client reports at most 128 at once)",
            dropped.clone(),
        );
        let undeliverable = Family::<RequestLabels, Counter>::default();
        registry.register(
            "bert_undeliverable_replies",
            "Requests answered whose reply could not be published, by task",
            undeliverable.clone(),
        );
        registry.register(
            "bert_build",
            "Version, model kind and transport of this processor",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                (
                    "model_kind",
                    format!("{:?}", config.model.kind).to_lowercase(),
                ),
                (
                    "device",
                    format!("{:?}", config.model.device).to_lowercase(),
                ),
                (
                    "transport",
                    format!("{:?}", config.service.transport).to_lowercase(),
                ),
            ]),
        );
        registry.register_collector(Box::new(ScrapeTime(state.clone())));
        let requests_ok = Task::ALL
            .iter()
            .map(|task| {
                let labels = vec![
                    ("task", task.as_str().to_string()),
                    ("outcome", "ok".to_string()),
                ];
                requests.get_or_create(&labels).clone()
            })
            .collect();
        Arc::new(Telemetry {
            registry,
            requests,
            requests_ok,
            shed,
            dropped,
            undeliverable,
            state,
        })
    }

    /// Counts one answered request.
    pub fn count_request(&self, task: Option<Task>, outcome: Result<(), &ErrorBody>) {
        if let (Some(task), Ok(())) = (task, outcome) {
            self.requests_ok[crate::batcher::task_index(task)].inc();
            return;
        }
        let task = task.map_or("unknown", Task::as_str).to_string();
        let outcome = match outcome {
            Ok(()) => "ok".to_string(),
            Err(error) => error.kind.as_str().to_string(),
        };
        self.requests
            .get_or_create(&vec![("task", task), ("outcome", outcome)])
            .inc();
    }

    /// Counts one request shed before decoding.
    pub fn count_shed(&self, reason: Shed) {
        self.shed
            .get_or_create(&vec![("reason", reason.as_str().to_string())])
            .inc();
    }

    /// Counts requests lost without a reply.
    pub fn count_dropped(&self, reason: &'static str) {
        self.dropped
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc();
    }

    /// Counts an answer that could not be published.
    pub fn count_undeliverable(&self, task: Option<Task>) {
        let task = task.map_or("unknown", Task::as_str).to_string();
        self.undeliverable
            .get_or_create(&vec![("task", task)])
            .inc();
    }

    /// The model is loaded (after `seconds`) and the batcher's statistics can be read.
    pub(crate) fn model_loaded(&self, stats: Arc<BatcherStats>, seconds: f64) {
        let _ = self.state.batcher.set(stats);
        let _ = self.state.model_load_seconds.set(seconds);
    }

    /// The model has computed its warm-up batch.
    pub(crate) fn model_warmed_up(&self) {
        self.state.model_ready.store(true, Ordering::Relaxed);
    }

    /// Connected to NATS, and requests are being taken.
    pub(crate) fn serving(&self, nats: async_nats::Client) {
        let _ = self.state.nats.set(nats);
        self.state.serving.store(true, Ordering::Relaxed);
    }

    /// A NATS connection was (re)established.
    pub(crate) fn connected(&self) {
        self.state.connected.notify_waiters();
    }

    /// Completes at the next (re)connection after this call: a pull request made before
    /// it was lost with the old connection.
    pub(crate) fn next_connection(&self) -> tokio::sync::futures::Notified<'_> {
        self.state.connected.notified()
    }

    /// Shutting down: readiness fails so that no new traffic is routed here.
    pub(crate) fn draining(&self) {
        self.state.draining.store(true, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Binds `listen` and serves `/metrics`, `/livez` and `/readyz` in the background until
    /// the returned handle is dropped or aborted. Returns the bound address.
    pub async fn serve(
        self: &Arc<Self>,
        listen: &str,
    ) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding http.listen {listen}"))?;
        let address = listener.local_addr()?;
        let metrics = self.clone();
        let live = self.clone();
        let ready = self.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(move || async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }),
            )
            .route("/livez", get(move || async move { live.liveness() }))
            .route("/readyz", get(move || async move { ready.readiness() }));
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%err, "the HTTP listener stopped");
            }
        });
        tracing::info!(%address, "http listening (/metrics, /livez, /readyz)");
        Ok((address, server))
    }

    /// 200 while the process can recover by itself: 503 once the scheduler cannot compute
    /// any more (its queue actor or every model worker is gone), or NATS has been
    /// unreachable for over a minute. Kubernetes restarts the pod then.
    fn liveness(&self) -> (StatusCode, String) {
        if let Some(stats) = self.state.batcher.get() {
            if !stats.can_compute() && !self.state.draining.load(Ordering::Relaxed) {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "dead: the scheduler cannot compute (its queue or every model worker stopped)\n"
                        .to_string(),
                );
            }
        }
        let Some(nats) = self.state.nats.get() else {
            return (
                StatusCode::OK,
                "alive; not connected to NATS yet\n".to_string(),
            );
        };
        let connection = nats.connection_state();
        let mut since = self.state.disconnected_since.lock().expect("lock");
        if connection == async_nats::connection::State::Connected {
            *since = None;
            return (StatusCode::OK, "alive; NATS connected\n".to_string());
        }
        let down = since.get_or_insert_with(Instant::now).elapsed();
        let status = if down > NATS_GRACE {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (
            status,
            format!("NATS {connection:?} for {:.0} s\n", down.as_secs_f64()),
        )
    }

    /// 200 only while requests can be taken and answered: the model is warmed up, the
    /// endpoints (or the JetStream pull) are up, NATS is connected, the scheduler can
    /// compute, and the processor is not draining.
    pub fn readiness(&self) -> (StatusCode, String) {
        let state = &self.state;
        let connected = state
            .nats
            .get()
            .map(|c| c.connection_state() == async_nats::connection::State::Connected);
        let reason = if state.draining.load(Ordering::Relaxed) {
            Some("draining")
        } else if !state.model_ready.load(Ordering::Relaxed) {
            Some("model not loaded and warmed up yet")
        } else if state
            .batcher
            .get()
            .is_some_and(|stats| !stats.can_compute())
        {
            Some("the scheduler cannot compute (its queue or every model worker stopped)")
        } else if !state.serving.load(Ordering::Relaxed) {
            Some("not taking requests yet")
        } else if connected == Some(false) {
            Some("NATS disconnected")
        } else {
            None
        };
        match reason {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        }
    }
}

/// Reads the scheduler's statistics and the connection state at each scrape.
#[derive(Debug)]
struct ScrapeTime(Arc<State>);

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let connected = state
            .nats
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        gauge(
            &mut encoder,
            "bert_nats_connected",
            "1 while connected to NATS",
            connected as i64,
        )?;
        if let Some(&seconds) = state.model_load_seconds.get() {
            gauge(
                &mut encoder,
                "bert_model_load_seconds",
                "Time taken to load the model",
                seconds,
            )?;
        }
        let Some(stats) = state.batcher.get() else {
            return Ok(());
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, value) in [
            ("bert_batches", "Batches computed", load(&stats.batches)),
            ("bert_inputs", "Inputs computed", load(&stats.inputs)),
            (
                "bert_tokens",
                "Tokens of the inputs computed",
                load(&stats.tokens),
            ),
            (
                "bert_padded_tokens",
                "Token positions computed (inputs x longest input, per batch)",
                load(&stats.padded_tokens),
            ),
            (
                "bert_expired_requests",
                "Requests whose deadline passed before their batch (answered 504)",
                load(&stats.expired),
            ),
            (
                "bert_rejected_requests",
                "Requests refused because the queue was full (answered 503)",
                load(&stats.rejected),
            ),
            (
                "bert_rejected_queue_wait_requests",
                "Requests refused because the queued work ahead would exceed batch.max_queue_wait_ms (answered 503)",
                load(&stats.rejected_wait),
            ),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        if let Some(cache) = stats.cache.get() {
            let cache = cache.stats();
            for (name, help, value) in [
                (
                    "bert_cache_hits",
                    "Inputs answered from the output cache",
                    cache.hits,
                ),
                (
                    "bert_cache_misses",
                    "Inputs looked up in the output cache and computed",
                    cache.misses,
                ),
            ] {
                let metric = ConstCounter::new(value);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
            let looked_up = cache.hits + cache.misses;
            let hit_rate = if looked_up == 0 {
                0.0
            } else {
                cache.hits as f64 / looked_up as f64
            };
            gauge(
                &mut encoder,
                "bert_cache_hit_ratio",
                "Share of looked-up inputs answered from the output cache, since start",
                hit_rate,
            )?;
            gauge(
                &mut encoder,
                "bert_cache_bytes",
                "Bytes the output cache holds",
                cache.bytes as i64,
            )?;
            gauge(
                &mut encoder,
                "bert_cache_entries",
                "Entries the output cache holds",
                cache.entries as i64,
            )?;
            gauge(
                &mut encoder,
                "bert_cache_capacity_bytes",
                "Most bytes the output cache holds (cache.max_bytes)",
                cache.capacity as i64,
            )?;
        }
        gauge(
            &mut encoder,
            "bert_queue_depth",
            "Inputs waiting for a batch",
            load(&stats.queued) as i64,
        )?;
        gauge(
            &mut encoder,
            "bert_model_workers_alive",
            "Model worker threads running",
            load(&stats.workers_alive) as i64,
        )?;
        gauge(
            &mut encoder,
            "bert_in_flight_batches",
            "Batches being computed",
            load(&stats.in_flight) as i64,
        )?;
        gauge(
            &mut encoder,
            "bert_padding_ratio",
            "Share of computed token positions that were padding",
            stats.padding_ratio(),
        )?;
        histogram(
            &mut encoder,
            "bert_batch_size",
            "Inputs per batch",
            &stats.batch_size,
        )?;
        histogram(
            &mut encoder,
            "bert_queue_wait_seconds",
            "Time an input waited in the queue before its batch started",
            &stats.queue_wait,
        )?;
        histogram(
            &mut encoder,
            "bert_compute_seconds",
            "Time the model took per batch",
            &stats.compute,
        )
    }
}

fn gauge<N>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &Histogram,
) -> std::fmt::Result {
    let counts = histogram.counts();
    let buckets: Vec<(f64, u64)> = histogram
        .bounds()
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .zip(counts.iter().copied())
        .collect();
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(histogram.sum(), counts.iter().sum(), &buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_once_the_scheduler_cannot_compute() {
        let telemetry = Telemetry::new(&crate::Config::default());
        let stats = Arc::new(BatcherStats::default());
        stats.queue_alive.store(true, Ordering::Relaxed);
        stats.workers_alive.store(1, Ordering::Relaxed);
        telemetry.model_loaded(stats.clone(), 1.0);
        telemetry.model_warmed_up();
        assert_eq!(telemetry.liveness().0, StatusCode::OK);
        // Not subscribed yet: not ready, but alive.
        assert!(telemetry.readiness().1.contains("not taking requests"));

        stats.workers_alive.store(0, Ordering::Relaxed);
        let (status, text) = telemetry.readiness();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("cannot compute"), "{text}");
        assert_eq!(telemetry.liveness().0, StatusCode::SERVICE_UNAVAILABLE);

        stats.workers_alive.store(1, Ordering::Relaxed);
        stats.queue_alive.store(false, Ordering::Relaxed);
        assert_eq!(telemetry.liveness().0, StatusCode::SERVICE_UNAVAILABLE);
        // While draining the scheduler stops on purpose: not a reason to restart.
        telemetry.draining();
        assert_eq!(telemetry.liveness().0, StatusCode::OK);
        assert!(telemetry.readiness().1.contains("draining"));
    }

    #[test]
    fn the_output_cache_is_in_the_metrics_once_there_is_one() {
        use schemas::{InferOptions, Input, Output, Task};
        let telemetry = Telemetry::new(&crate::Config::default());
        let stats = Arc::new(BatcherStats::default());
        telemetry.model_loaded(stats.clone(), 1.0);
        assert!(!telemetry.render().contains("bert_cache"));
        let cache = Arc::new(crate::cache::OutputCache::new(1 << 20, &[Task::Embed]));
        let _ = stats.cache.set(cache.clone());
        let options = InferOptions::default();
        let input = Input::from("a");
        let output = Output::Embedding {
            embedding: vec![0.5; 4],
        };
        assert_eq!(cache.get(Task::Embed, &options, &input), None);
        cache.insert(Task::Embed, &options, &input, &output);
        assert_eq!(cache.get(Task::Embed, &options, &input), Some(output));
        let text = telemetry.render();
        for line in [
            "bert_cache_hits_total 1",
            "bert_cache_misses_total 1",
            "bert_cache_hit_ratio 0.5",
            "bert_cache_entries 1",
            "bert_cache_capacity_bytes 1048576",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("bert_cache_bytes "))
            .expect("bert_cache_bytes");
        assert!(bytes.parse::<u64>().unwrap() > 16, "{bytes}");
    }
}
