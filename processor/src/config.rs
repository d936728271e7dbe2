//! Processor configuration: built-in defaults < `processor.toml` (or `--config FILE`) <
//! environment `PROCESSOR_SECTION__KEY` < command-line flags.
//!
//! Every struct denies unknown keys, and `validate` checks values, so a typo or a bad value
//! stops the processor at start with a message naming the key and where it came from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// File read when no `--config` is given (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "processor.toml";
/// Prefix of the environment variables that set config keys.
pub const ENV_PREFIX: &str = "PROCESSOR_";
/// Environment variable naming the config file (same as `--config`).
pub const ENV_CONFIG_FILE: &str = "PROCESSOR_CONFIG";

/// The whole configuration tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Connection to NATS.
    pub nats: NatsConfig,
    /// The NATS micro service this processor registers.
    pub service: ServiceConfig,
    /// The model that computes batches.
    pub model: ModelConfig,
    /// How requests are grouped into batches.
    pub batch: BatchConfig,
    /// The per-input output cache.
    pub cache: CacheConfig,
    /// The durable transport (used when `service.transport = "jetstream"`).
    pub jetstream: JetStreamConfig,
    /// Metrics and health endpoints.
    pub http: HttpConfig,
    /// Log output.
    pub logging: LoggingConfig,
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/metrics`, `/livez` and `/readyz` (`host:port`; port 0 picks a free one;
    /// empty turns the listener off).
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:9464".to_string(),
        }
    }
}

/// `[logging]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `human` (default) or `json` (one object per line, for log collectors).
    pub format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable text.
    #[default]
    Human,
    /// JSON objects, one per line.
    Json,
}

/// `[nats]`: where and how to connect. Use at most one of `credentials_file`, `nkey_seed`,
/// `token` and `user`/`password`; secrets are best set through the environment
/// (`PROCESSOR_NATS__PASSWORD`) or a mounted file.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. The client also learns every server of a cluster from
    /// the one it connects to, and reconnects to another when that one goes.
    pub url: String,
    /// A `.creds` file (JWT and NKey seed), as issued by an operator/account setup.
    pub credentials_file: Option<PathBuf>,
    /// An NKey user seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// A server token.
    pub token: Option<String>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// CA certificate (PEM) to trust for the server's TLS certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_string(),
            credentials_file: None,
            nkey_seed: None,
            token: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
        }
    }
}

/// Shows every secret as `***` (a `Debug` print may end up in a log line).
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.redacted();
        f.debug_struct("NatsConfig")
            .field("url", &shown.url)
            .field("credentials_file", &shown.credentials_file)
            .field("nkey_seed", &shown.nkey_seed)
            .field("token", &shown.token)
            .field("user", &shown.user)
            .field("password", &shown.password)
            .field("tls_ca_file", &shown.tls_ca_file)
            .field("tls_cert_file", &shown.tls_cert_file)
            .field("tls_key_file", &shown.tls_key_file)
            .field("tls_required", &shown.tls_required)
            .finish()
    }
}

impl NatsConfig {
    /// Connection options carrying the configured authentication and TLS, and the server
    /// URLs to give them (credentials written in `url` are moved into the options).
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> anyhow::Result<(async_nats::ConnectOptions, Vec<String>)> {
        let servers =
            schemas::ServerUrls::parse(&self.url).map_err(|e| anyhow::anyhow!("nats.url: {e}"))?;
        // Pinged every 5 s: a server lost without closing the socket (a host gone) is left
        // for another within about 10 s, not the minutes of async-nats' 60 s default.
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .ping_interval(Duration::from_secs(5));
        match servers.credentials.clone() {
            Some(schemas::UrlCredentials::UserPassword { user, password }) => {
                options = options.user_and_password(user, password);
            }
            Some(schemas::UrlCredentials::Token(token)) => options = options.token(token),
            None => {}
        }
        if let Some(path) = &self.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| anyhow::anyhow!("nats.credentials_file {}: {e}", path.display()))?;
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok((options.require_tls(self.tls_required), servers.urls))
    }

    /// `url` with passwords and tokens replaced by `***`.
    pub fn redacted_url(&self) -> String {
        schemas::redact_server_urls(&self.url)
    }

    /// A copy to show people: every secret replaced by `***`.
    fn redacted(&self) -> NatsConfig {
        let hide = |secret: &Option<String>| secret.as_ref().map(|_| "***".to_string());
        NatsConfig {
            url: self.redacted_url(),
            nkey_seed: hide(&self.nkey_seed),
            token: hide(&self.token),
            password: hide(&self.password),
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        let in_url = schemas::ServerUrls::parse(&self.url)
            .map_err(|reason| invalid("nats.url", &reason))?
            .credentials
            .is_some();
        let methods = [
            self.credentials_file.is_some(),
            self.nkey_seed.is_some(),
            self.token.is_some(),
            self.user.is_some() || self.password.is_some(),
            in_url,
        ];
        if methods.iter().filter(|&&set| set).count() > 1 {
            return Err(invalid(
                "nats",
                "set only one of credentials_file, nkey_seed, token, user/password and credentials in nats.url",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid("nats.user", "user and password go together"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "nats.tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        for (key, path) in [
            ("nats.credentials_file", &self.credentials_file),
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: format!("{} is not a readable file", path.display()),
                    });
                }
            }
        }
        Ok(())
    }
}

/// `[service]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// NATS micro service name (A-Z, a-z, 0-9, `-`, `_`), used by `$SRV.*` discovery.
    pub name: String,
    /// Tasks are served on `{subject_prefix}.{task}`.
    pub subject_prefix: String,
    /// Queue group shared by all processors of one deployment.
    pub queue_group: String,
    /// Most inputs one request may carry.
    pub max_inputs: usize,
    /// Most bytes one input text may have.
    pub max_input_bytes: usize,
    /// `fill_mask`: most candidates per mask a request may ask for (`options.top_k`).
    pub max_top_k: u32,
    /// `fill_mask`: most mask tokens in one input.
    pub max_masks_per_input: usize,
    /// Requests taken and not yet answered, at most; beyond it a request is answered
    /// `overloaded` before it is decoded.
    pub max_in_flight_requests: usize,
    /// Payload bytes of the requests taken and not yet answered, at most (same refusal).
    pub max_in_flight_bytes: usize,
    /// Messages async-nats buffers per subscription before the processor reads them (a burst
    /// of requests lands here); beyond it the client drops them (counted in
    /// `bert_dropped_requests_total`). The admission loop keeps the buffers near empty; they
    /// fill only while it is starved of CPU.
    pub subscription_capacity: usize,
    /// At shutdown, how long the processor may take to answer what it holds, stop the service
    /// and flush replies before it exits anyway (logging how many requests went unanswered).
    pub shutdown_grace_s: u64,
    /// Answer requests on `{subject_prefix}.<unknown>` with an `unknown_task` error. This costs
    /// a second delivery of every request to the pool (on a catch-all subscription that
    /// ignores known tasks); turn it off to save that and let unknown subjects get "no
    /// responders".
    pub reply_unknown_tasks: bool,
    /// `core` (request/reply in a queue group) or `jetstream` (a durable work queue).
    pub transport: Transport,
    /// Threads of the async runtime: the NATS connections, admission, decoding of small
    /// payloads and the replies. That work is a handful of tasks (each connection is read and
    /// written by one), so one thread serves it (the whole processor used about 3 µs of CPU
    /// per echo request on a 2-vCPU EPYC) and leaves the cores to the model workers; a
    /// second one cost 13% more CPU per request there and served 5% fewer requests. Tokenizing, large payloads and large replies use blocking
    /// threads of their own.
    pub io_threads: usize,
}

/// How requests reach the processors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Core NATS request/reply: at most once, lowest latency.
    Core,
    /// A JetStream work-queue stream with one durable pull consumer shared by all
    /// processors: a request held by a processor that dies is redelivered to another.
    Jetstream,
}

/// `[jetstream]`: the stream and consumer, created at start if missing; an existing one whose
/// settings differ is updated to these (or refused with an error naming the setting that
/// JetStream cannot change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JetStreamConfig {
    /// Stream name; it captures `{service.subject_prefix}.>`.
    pub stream: String,
    /// Durable pull consumer shared by every processor.
    pub consumer: String,
    /// A message not acked within this long is redelivered: how soon the requests held by a
    /// processor that died go to another one. Processors send a progress ack every quarter of
    /// it for each message they hold, so a long batch is never redelivered. Keep it well below
    /// the producers' timeout (10 s by default).
    pub ack_wait_ms: u64,
    /// Deliveries of one message before it gets an error reply and is terminated. Only failed
    /// batches and processors dying count; a busy processor never takes a message it has no
    /// room for, and never gives one back.
    pub max_deliver: u32,
    /// Messages delivered and not yet acked, across all processors (the consumer's
    /// `max_ack_pending`). Each processor holds at most `batch.max_size * (workers + 1)`.
    pub max_ack_pending: i64,
    /// Redelivery delay after a failed batch.
    pub nak_delay_ms: u64,
    /// Stream limits: most messages, bytes and age held. A full stream refuses new requests at
    /// publish time (discard policy `new`); the producer reports that as `overloaded`.
    pub max_messages: i64,
    /// See `max_messages`.
    pub max_bytes: i64,
    /// See `max_messages`.
    pub max_age_s: u64,
    /// Window in which a retried publish with the same `Nats-Msg-Id` is dropped.
    pub duplicate_window_s: u64,
    /// Stream replicas (the consumer follows the stream): `auto` gives 3 on a cluster (1, with
    /// a warning, while the cluster cannot place 3) and 1 on a single server, and never lowers
    /// an existing stream's count; a number (1-5) is set exactly.
    pub replicas: Replicas,
}

/// `jetstream.replicas`: how many servers keep a copy of every request (and of the
/// consumer's state). R3 survives the loss of any one of three servers; R1 loses the requests
/// on a server that is lost for good, and pauses while it is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// 3 when the server is part of a cluster, 1 otherwise; 1 with a warning when the
    /// cluster cannot place 3 (a later start raises it). Never 2: both copies would be needed
    /// for a quorum. An existing stream with more is left as it is.
    #[default]
    Auto,
    /// Exactly this many.
    Exactly(usize),
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Replicas::Auto => serializer.serialize_str("auto"),
            Replicas::Exactly(n) => serializer.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Replicas;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of replicas (1 to 5) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Replicas, E> {
                Ok(Replicas::Exactly(usize::try_from(n).unwrap_or(usize::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Replicas, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Replicas, E> {
                match text.trim() {
                    "auto" => Ok(Replicas::Auto),
                    number => number
                        .parse::<u64>()
                        .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(text), &self))
                        .and_then(|n| self.visit_u64(n)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            stream: "BERT_REQUESTS".to_string(),
            consumer: "bert-processors".to_string(),
            ack_wait_ms: 4_000,
            max_deliver: 3,
            max_ack_pending: 20_000,
            nak_delay_ms: 1_000,
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_age_s: 3_600,
            duplicate_window_s: 120,
            replicas: Replicas::Auto,
        }
    }
}

impl JetStreamConfig {
    /// `ack_wait_ms` as a duration.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: "bert-processor".to_string(),
            subject_prefix: schemas::DEFAULT_SUBJECT_PREFIX.to_string(),
            queue_group: "bert-processors".to_string(),
            max_inputs: 256,
            max_input_bytes: 64 * 1024,
            max_top_k: 100,
            max_masks_per_input: 16,
            max_in_flight_requests: 2048,
            max_in_flight_bytes: 64 << 20,
            subscription_capacity: 65_536,
            shutdown_grace_s: 25,
            reply_unknown_tasks: true,
            transport: Transport::Core,
            io_threads: 1,
        }
    }
}

/// Which model to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Returns its inputs (middleware overhead only).
    Echo,
    /// Echo that sleeps `batch_ms + item_ms * n` per batch (a simulated accelerator).
    Sim,
    /// A BERT checkpoint from `model.path`, run with burn.
    Bert,
}

/// Where the BERT model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's CPU backend (all cores).
    Cpu,
    /// NVIDIA GPUs through burn-cuda (needs the `cuda` cargo feature).
    Cuda,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// `echo`, `sim` or `bert`.
    pub kind: ModelKind,
    /// `bert`: directory of a HuggingFace checkpoint (config.json, model.safetensors,
    /// tokenizer.json).
    pub path: PathBuf,
    /// `bert`: `cpu` or `cuda`.
    pub device: DeviceKind,
    /// `bert` on `cuda`: GPU indices, each running `workers_per_device` model replicas.
    /// `sim` treats each entry as a simulated accelerator the same way; the CPU has one.
    pub devices: Vec<usize>,
    /// Model replicas per device, each with its own worker thread, all pulling batches from
    /// one shared queue. Unset: on the CPU (`bert`), one single-threaded replica per core
    /// (at most [`MAX_AUTO_CPU_REPLICAS`]): measured faster than one replica using every
    /// core (README "Thread use on the CPU"); elsewhere 1. Several replicas on the CPU split
    /// the cores between them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_per_device: Option<usize>,
    /// `sim`: fixed cost of one batch, in milliseconds.
    pub batch_ms: f64,
    /// `sim`: cost of each input of a batch, in milliseconds.
    pub item_ms: f64,
    /// `bert`: the float type the model computes in. `f16` and `bf16` are for GPUs (half the
    /// memory traffic, tensor cores); on the CPU they are correct but slower than `f32`.
    pub dtype: Precision,
    /// `bert`: how self-attention is computed. `auto` picks per device (see README "CUDA").
    pub attention: AttentionImpl,
    /// `bert`: what each replica computes before the processor reports ready. `auto`: every
    /// batch shape the scheduler can produce on `cuda` (kernels are compiled and autotuned per
    /// shape class), one small batch on `cpu`.
    pub warmup: WarmUp,
}

/// `model.dtype`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats, as the checkpoints are stored (the golden tests' precision).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa.
    Bf16,
}

/// `model.attention`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// On `cpu` in `f32`: the processor's own fused, unpadded CPU encoder (attention fused
    /// per head, inside it). On `cuda`: `fused` for `f16`/`bf16`, `explicit` for `f32`.
    /// Otherwise `explicit`.
    #[default]
    Auto,
    /// burn's attention op in burn's encoder (a flash-attention kernel on CUDA, in f16 on
    /// tensor cores; a tiled kernel on the CPU).
    Fused,
    /// burn's encoder with scores, padding bias, softmax and the value product as separate
    /// tensor ops.
    Explicit,
}

/// The most CPU replicas an unset `model.workers_per_device` starts: each holds its own copy
/// of the weights, so memory grows with them.
pub const MAX_AUTO_CPU_REPLICAS: usize = 8;

/// `model.warmup`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WarmUp {
    /// `shapes` on `cuda`, `one` on `cpu`.
    #[default]
    Auto,
    /// One small batch per task.
    One,
    /// Every (batch size, length) class the scheduler can produce: powers of two up to
    /// `batch.max_size` and the model's longest input, within `batch.max_tokens`.
    Shapes,
}

impl ModelConfig {
    /// The attention implementation `auto` stands for: fused for half precision on `cuda`;
    /// explicit otherwise, because burn-cubecl's fused kernel on tensor cores computes in f16
    /// whatever the model's dtype, so an f32 model would not be f32 throughout.
    pub fn attention(&self) -> AttentionImpl {
        match (self.attention, self.device, self.dtype) {
            (AttentionImpl::Auto, DeviceKind::Cuda, Precision::F16 | Precision::Bf16) => {
                AttentionImpl::Fused
            }
            (AttentionImpl::Auto, _, _) => AttentionImpl::Explicit,
            (chosen, _, _) => chosen,
        }
    }

    /// The warm-up `auto` stands for on this device.
    pub fn warmup(&self) -> WarmUp {
        match (self.warmup, self.device) {
            (WarmUp::Auto, DeviceKind::Cuda) => WarmUp::Shapes,
            (WarmUp::Auto, DeviceKind::Cpu) => WarmUp::One,
            (chosen, _) => chosen,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Bert,
            path: PathBuf::from("models/all-MiniLM-L6-v2"),
            device: DeviceKind::Cpu,
            devices: vec![0],
            workers_per_device: None,
            batch_ms: 10.0,
            item_ms: 0.5,
            dtype: Precision::F32,
            attention: AttentionImpl::Auto,
            warmup: WarmUp::Auto,
        }
    }
}

/// `[batch]`: how the scheduler forms batches (see the `batcher` module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most inputs in one batch.
    pub max_size: usize,
    /// Most padded tokens in one batch (inputs × the longest input's tokens). An input longer
    /// than this on its own is computed alone.
    pub max_tokens: usize,
    /// An idle worker waits for this many queued inputs (or for `max_latency_ms`) before it
    /// starts; 1 starts at once with whatever is queued.
    pub min_size: usize,
    /// How long a queued input may wait for a batch to reach `min_size`.
    pub max_latency_ms: u64,
    /// Most inputs waiting for a batch; beyond it requests get an `overloaded` reply.
    pub queue_capacity: usize,
    /// A request is refused as `overloaded` when the work already queued ahead of it would
    /// take longer than this to compute (estimated from recent batches), or longer than its
    /// own deadline leaves, unless the queue is empty: under a flood, answers come back
    /// within the requester's deadline (ok or 503) instead of late. The default matches the
    /// producer's default timeout.
    pub max_queue_wait_ms: u64,
    /// Batch queued inputs of similar length together (less padding); the oldest input is
    /// always in the next batch, so long inputs are not starved.
    pub length_grouping: bool,
    /// How many of the oldest queued inputs length grouping chooses from.
    pub grouping_window: usize,
    /// Longest a `Priority: bulk` input waits behind interactive ones: once the oldest bulk
    /// input of a task has waited this long, bulk and interactive lead batches in turn.
    pub bulk_max_wait_ms: u64,
}

/// Default of `batch.bulk_max_wait_ms`.
pub const DEFAULT_BULK_MAX_WAIT_MS: u64 = 1000;

/// `[cache]`: outputs kept per input (see the `cache` module), for BERT models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Most bytes the cache holds (texts, outputs and per-entry overhead); 0 turns it off.
    pub max_bytes: u64,
    /// The tasks whose outputs are cached.
    pub tasks: Vec<schemas::Task>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            tasks: vec![schemas::Task::Embed, schemas::Task::Rerank],
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_size: 32,
            max_tokens: 16_384,
            min_size: 1,
            max_latency_ms: 5,
            queue_capacity: 4096,
            max_queue_wait_ms: 10_000,
            length_grouping: true,
            grouping_window: 256,
            bulk_max_wait_ms: DEFAULT_BULK_MAX_WAIT_MS,
        }
    }
}

impl ModelConfig {
    /// How many devices the workers are spread over: the listed GPUs (or simulated
    /// accelerators for `sim`), else the one CPU.
    fn device_slots(&self) -> usize {
        match (self.kind, self.device) {
            (ModelKind::Bert, DeviceKind::Cuda) | (ModelKind::Sim, _) => self.devices.len(),
            _ => 1,
        }
    }

    /// Model replicas per device: `workers_per_device`, or what unset stands for here.
    pub fn replicas_per_device(&self) -> usize {
        match (self.workers_per_device, self.kind, self.device) {
            (Some(n), _, _) => n,
            (None, ModelKind::Bert, DeviceKind::Cpu) => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_AUTO_CPU_REPLICAS),
            (None, _, _) => 1,
        }
    }

    /// How many model workers to start: `workers_per_device` on each device.
    pub fn workers(&self) -> usize {
        self.device_slots() * self.replicas_per_device()
    }

    /// The GPU index that worker `worker` runs on (worker `i` is slot `i % workers_per_device`
    /// of device `devices[i / workers_per_device]`).
    pub fn device_index(&self, worker: usize) -> usize {
        let slot = worker / self.replicas_per_device().max(1);
        self.devices.get(slot).copied().unwrap_or(0)
    }
}

impl BatchConfig {
    /// `max_latency_ms` as a duration.
    pub fn max_latency(&self) -> Duration {
        Duration::from_millis(self.max_latency_ms)
    }

    /// `max_queue_wait_ms` as a duration.
    pub fn max_queue_wait(&self) -> Duration {
        Duration::from_millis(self.max_queue_wait_ms)
    }
}

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key is unknown, a value has the wrong type, or a file does not parse.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// The file named with `--config` does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value has the right type but is not usable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `batch.max_size`.
        key: &'static str,
        /// Why the value is refused.
        reason: String,
    },
}

impl Config {
    /// A copy to print or log: passwords, tokens, seeds and URL credentials replaced by `***`.
    pub fn redacted(&self) -> Config {
        Config {
            nats: self.nats.redacted(),
            ..self.clone()
        }
    }

    /// The figment with every layer below the command line: defaults, the config file
    /// (`file`, else `processor.toml` if present) and the environment.
    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.into())),
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        let env = Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]);
        Ok(figment.merge(env))
    }

    /// Extracts and validates the configuration from a figment.
    pub fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        if self.nats.url.trim().is_empty() {
            return Err(invalid("nats.url", "must not be empty"));
        }
        self.nats.validate()?;
        let name = &self.service.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "service.name",
                format!("{name:?} may only use A-Z, a-z, 0-9, `-` and `_`"),
            ));
        }
        if !is_subject_prefix(&self.service.subject_prefix) {
            return Err(invalid(
                "service.subject_prefix",
                format!(
                    "{:?} is not a NATS subject prefix (dot-separated tokens, no spaces or wildcards)",
                    self.service.subject_prefix
                ),
            ));
        }
        if self.service.queue_group.is_empty()
            || self.service.queue_group.contains(char::is_whitespace)
        {
            return Err(invalid("service.queue_group", "must be one word"));
        }
        if self.service.max_inputs == 0 {
            return Err(invalid("service.max_inputs", "must be at least 1"));
        }
        for (key, value) in [
            ("service.max_input_bytes", self.service.max_input_bytes),
            ("service.max_top_k", self.service.max_top_k as usize),
            (
                "service.max_masks_per_input",
                self.service.max_masks_per_input,
            ),
            (
                "service.max_in_flight_requests",
                self.service.max_in_flight_requests,
            ),
            (
                "service.max_in_flight_bytes",
                self.service.max_in_flight_bytes,
            ),
            (
                "service.subscription_capacity",
                self.service.subscription_capacity,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (key, ms) in [
            ("model.batch_ms", self.model.batch_ms),
            ("model.item_ms", self.model.item_ms),
        ] {
            if !(ms.is_finite() && (0.0..=3_600_000.0).contains(&ms)) {
                return Err(invalid(
                    key,
                    format!("{ms} is not a duration in milliseconds"),
                ));
            }
        }
        if self.model.device == DeviceKind::Cuda {
            if !cfg!(feature = "cuda") {
                return Err(invalid(
                    "model.device",
                    "`cuda` needs a processor built with `--features cuda` (scripts/build-cuda)",
                ));
            }
            if self.model.devices.is_empty() {
                return Err(invalid("model.devices", "list at least one GPU index"));
            }
        }
        let js = &self.jetstream;
        for (key, name) in [
            ("jetstream.stream", &js.stream),
            ("jetstream.consumer", &js.consumer),
        ] {
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    key,
                    format!("{name:?} must be one word without `.`, `*`, `>`, slashes or spaces"),
                ));
            }
        }
        let listen = &self.http.listen;
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                format!("{listen:?} is not host:port (e.g. 0.0.0.0:9464), or empty for none"),
            ));
        }
        if js.ack_wait_ms < 1_000 {
            // Progress acks go out every quarter of it: shorter leaves no margin for a busy
            // runtime, and held requests would be computed twice.
            return Err(invalid("jetstream.ack_wait_ms", "must be at least 1000"));
        }
        if js.max_ack_pending < 1 {
            return Err(invalid("jetstream.max_ack_pending", "must be at least 1"));
        }
        if js.max_deliver == 0 {
            return Err(invalid("jetstream.max_deliver", "must be at least 1"));
        }
        if let Replicas::Exactly(0 | 6..) = js.replicas {
            return Err(invalid(
                "jetstream.replicas",
                "must be between 1 and 5, or auto",
            ));
        }
        if self.model.kind == ModelKind::Sim && self.model.devices.is_empty() {
            return Err(invalid(
                "model.devices",
                "list at least one simulated device",
            ));
        }
        if !(1..=64).contains(&self.service.io_threads) {
            return Err(invalid("service.io_threads", "must be between 1 and 64"));
        }
        if self.model.workers_per_device == Some(0) {
            return Err(invalid("model.workers_per_device", "must be at least 1"));
        }
        if self.batch.max_size == 0 {
            return Err(invalid("batch.max_size", "must be at least 1"));
        }
        if self.batch.min_size == 0 || self.batch.min_size > self.batch.max_size {
            return Err(invalid(
                "batch.min_size",
                format!(
                    "{} must be between 1 and batch.max_size ({})",
                    self.batch.min_size, self.batch.max_size
                ),
            ));
        }
        if self.batch.max_tokens == 0 {
            return Err(invalid("batch.max_tokens", "must be at least 1"));
        }
        if self.batch.grouping_window < self.batch.max_size {
            return Err(invalid(
                "batch.grouping_window",
                format!(
                    "{} is smaller than batch.max_size ({}); length grouping needs at least one batch to choose from",
                    self.batch.grouping_window, self.batch.max_size
                ),
            ));
        }
        if self.batch.queue_capacity < self.batch.max_size {
            return Err(invalid(
                "batch.queue_capacity",
                format!(
                    "{} is smaller than batch.max_size ({}), so no batch could fill",
                    self.batch.queue_capacity, self.batch.max_size
                ),
            ));
        }
        if self.service.max_inputs > self.batch.queue_capacity {
            return Err(invalid(
                "service.max_inputs",
                format!(
                    "{} is larger than batch.queue_capacity ({}), so such a request could never be queued",
                    self.service.max_inputs, self.batch.queue_capacity
                ),
            ));
        }
        Ok(())
    }
}

fn is_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || c == '*' || c == '>')
        })
}

#[cfg(test)]
// figment's `Jail` closures return its large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_and_point_at_local_nats() {
        Jail::expect_with(|_jail| {
            let config = Config::from_figment(&Config::figment(None).unwrap()).unwrap();
            assert_eq!(config, Config::default());
            assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
            assert_eq!(config.service.subject_prefix, "bert");
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "processor.toml",
                "[model]\nkind = \"sim\"\nbatch_ms = 3.5\n[batch]\nmax_size = 8\n",
            )?;
            jail.set_env("PROCESSOR_BATCH__MAX_SIZE", "16");
            jail.set_env("PROCESSOR_NATS__URL", "nats://10.0.0.1:4222");
            jail.set_env("PROCESSOR_CONFIG", "ignored-here.toml");
            let config = Config::from_figment(&Config::figment(None).unwrap()).unwrap();
            assert_eq!(config.model.kind, ModelKind::Sim);
            assert_eq!(config.model.batch_ms, 3.5);
            assert_eq!(config.batch.max_size, 16);
            assert_eq!(config.nats.url, "nats://10.0.0.1:4222");
            Ok(())
        });
    }

    #[test]
    fn replicas_are_auto_or_a_number_from_one_to_five() {
        let load = |file: &str, env: Option<&str>| {
            let mut result = None;
            Jail::expect_with(|jail| {
                jail.create_file("processor.toml", file)?;
                if let Some(value) = env {
                    jail.set_env("PROCESSOR_JETSTREAM__REPLICAS", value);
                }
                result = Some(
                    Config::from_figment(&Config::figment(None).unwrap())
                        .map(|config| config.jetstream.replicas)
                        .map_err(|e| e.to_string()),
                );
                Ok(())
            });
            result.unwrap()
        };
        assert_eq!(load("", None), Ok(Replicas::Auto));
        assert_eq!(
            load("[jetstream]\nreplicas = \"auto\"\n", None),
            Ok(Replicas::Auto)
        );
        assert_eq!(
            load("[jetstream]\nreplicas = 3\n", None),
            Ok(Replicas::Exactly(3))
        );
        assert_eq!(load("", Some("5")), Ok(Replicas::Exactly(5)));
        assert_eq!(load("", Some("auto")), Ok(Replicas::Auto));
        for bad in ["0", "6", "-1", "three"] {
            let err = load("", Some(bad)).unwrap_err();
            assert!(err.contains("replicas"), "{bad}: {err}");
        }
        // Shown as written, so `--print-config` output can be fed back.
        let shown = toml::to_string(&JetStreamConfig::default()).unwrap();
        assert!(shown.contains("replicas = \"auto\""), "{shown}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        Jail::expect_with(|jail| {
            jail.set_env("PROCESSOR_MODEL__KINDD", "echo");
            let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
            assert!(err.to_string().contains("kindd"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("PROCESSOR_MODEL__KIND", "gpt");
            let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
            assert!(err.to_string().contains("gpt"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("PROCESSOR_BATCH__MAX_SIZE", "many");
            let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
            let text = err.to_string().to_lowercase();
            assert!(
                text.contains("batch.max_size") && text.contains("many"),
                "{err}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("PROCESSOR_BATCH__MAX_SIZE", "0");
            let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
            assert!(err.to_string().contains("batch.max_size"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("PROCESSOR_SERVICE__SUBJECT_PREFIX", "bert.*");
            let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
            assert!(err.to_string().contains("subject_prefix"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn scheduler_keys_are_checked_against_each_other() {
        for (key, value, named) in [
            ("PROCESSOR_BATCH__MIN_SIZE", "64", "batch.min_size"),
            ("PROCESSOR_BATCH__MIN_SIZE", "0", "batch.min_size"),
            ("PROCESSOR_BATCH__MAX_TOKENS", "0", "batch.max_tokens"),
            (
                "PROCESSOR_BATCH__GROUPING_WINDOW",
                "8",
                "batch.grouping_window",
            ),
            (
                "PROCESSOR_MODEL__WORKERS_PER_DEVICE",
                "0",
                "model.workers_per_device",
            ),
            ("PROCESSOR_SERVICE__IO_THREADS", "0", "service.io_threads"),
            ("PROCESSOR_SERVICE__IO_THREADS", "65", "service.io_threads"),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let err = Config::from_figment(&Config::figment(None).unwrap()).unwrap_err();
                assert!(err.to_string().contains(named), "{key}={value}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn workers_are_spread_over_devices_in_slots() {
        let mut model = ModelConfig {
            kind: ModelKind::Sim,
            devices: vec![4, 7],
            workers_per_device: Some(3),
            ..ModelConfig::default()
        };
        assert_eq!(model.workers(), 6);
        let gpus: Vec<usize> = (0..6).map(|w| model.device_index(w)).collect();
        assert_eq!(gpus, [4, 4, 4, 7, 7, 7]);
        // One CPU device, whatever `devices` lists.
        model.kind = ModelKind::Bert;
        assert_eq!(model.workers(), 3);
        model.workers_per_device = Some(1);
        assert_eq!(model.workers(), 1);
        // Unset: one replica per core on the CPU (at most 8), one per GPU.
        model.workers_per_device = None;
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(model.workers(), cores.min(MAX_AUTO_CPU_REPLICAS));
        model.device = DeviceKind::Cuda;
        assert_eq!(model.workers(), 2);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let config = NatsConfig {
            url: "nats://u:URLPW@h:4222".into(),
            password: Some("PW".into()),
            user: Some("u".into()),
            token: Some("TOKEN".into()),
            nkey_seed: Some("SUSEED".into()),
            ..NatsConfig::default()
        };
        let shown = format!("{config:?} {:?}", Config::default());
        for secret in ["URLPW", "\"PW\"", "TOKEN", "SUSEED"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let err = Config::figment(Some(Path::new("/nonexistent/p.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/p.toml"), "{err}");
    }
}
