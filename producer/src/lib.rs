//! Async client for the processors: encodes a request, sends it on `{prefix}.{task}` with a
//! reply inbox, waits for the reply and decodes it (or its error body).
//!
//! One [`Client`] may have any number of requests in flight (they share one NATS connection
//! and its multiplexed inbox). Requests that found no processor, timed out or were refused as
//! overloaded are retried with jittered exponential backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use futures::StreamExt;
use schemas::{
    decode, encode, headers, Encoding, ErrorBody, ErrorCode, FillMaskOutput, InferOptions,
    InferReply, InferRequest, LabelScore, Output, Priority, Task,
};

/// How requests travel to the processors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Core NATS request/reply to the processors' queue group (lowest latency, at most once).
    #[default]
    Core,
    /// Published into the processors' JetStream work-queue stream with a reply inbox: the
    /// request survives a processor dying while it holds it.
    Jetstream,
}

/// How requests are sent.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Core request/reply or the durable JetStream work queue (the processors' own
    /// `service.transport` must match).
    pub transport: Transport,
    /// Subject prefix of the service (`bert` unless the deployment chose another).
    pub prefix: String,
    /// How long one attempt waits for its reply (with JetStream: from the publish; storing
    /// it in the stream is retried within that time).
    pub timeout: Duration,
    /// Attempts after the first one, for retryable failures: no reply in time, no processor,
    /// overloaded. With JetStream each attempt is a new message (new `Nats-Msg-Id`) on the
    /// same inbox, and the first answer to any of them is taken.
    pub retries: u32,
    /// Base of the exponential backoff between attempts (full jitter, capped at 2 s).
    pub backoff: Duration,
    /// Encoding of requests (replies come back in the same one).
    pub encoding: Encoding,
    /// Sent as the `Priority` header: `bulk` work lets interactive requests go first.
    pub priority: Priority,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            transport: Transport::Core,
            prefix: schemas::DEFAULT_SUBJECT_PREFIX.to_string(),
            timeout: Duration::from_secs(10),
            retries: 3,
            backoff: Duration::from_millis(50),
            encoding: Encoding::Cbor,
            priority: Priority::Interactive,
        }
    }
}

/// A `rerank` result: how relevant a passage is to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Relevance {
    /// `sigmoid(raw_score)`, in (0, 1).
    pub score: f32,
    /// The cross-encoder's logit.
    pub raw_score: f32,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to the NATS server.
    #[error("connecting to NATS at {url}: {message}")]
    Connect {
        /// The server URL tried.
        url: String,
        /// The connection error.
        message: String,
    },
    /// No processor listens on the subject (after every retry).
    #[error("no processor is serving {subject} (tried {attempts} times)")]
    NoResponders {
        /// The request subject.
        subject: String,
        /// Attempts made.
        attempts: u32,
    },
    /// No reply within the timeout (after every retry).
    #[error("no reply on {subject} within {timeout:?} (tried {attempts} times)")]
    TimedOut {
        /// The request subject.
        subject: String,
        /// Per-attempt timeout.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The processor answered with an error reply.
    #[error("the service refused the request: {0}")]
    Service(ErrorBody),
    /// The reply could not be understood.
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// Any other NATS failure.
    #[error("NATS: {0}")]
    Transport(String),
}

impl Error {
    /// The service's error body, if the processor answered with an error.
    pub fn service_error(&self) -> Option<&ErrorBody> {
        match self {
            Error::Service(body) => Some(body),
            _ => None,
        }
    }
}

/// A client of the inference service.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    options: ClientOptions,
    /// Where durable requests' replies arrive: one subscription for all of them, made at the
    /// first one.
    replies: Arc<tokio::sync::OnceCell<ReplyRouter>>,
    /// Attempts sent after a first one, over all requests (see [`Client::retries_sent`]).
    retried: Arc<std::sync::atomic::AtomicU64>,
}

/// One wildcard subscription, `{prefix}.*`, for the replies of every durable request of a
/// client, handed to each request by the last token of its inbox. Not a subscription per
/// request: in a cluster, a new subscription's interest reaches the other servers a moment
/// after the request itself may, and a processor on another server would answer into the
/// void.
#[derive(Debug)]
struct ReplyRouter {
    prefix: String,
    waiting: Arc<Mutex<Option<Routes>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyRouter {
    async fn start(nats: &async_nats::Client) -> Result<ReplyRouter, Error> {
        let prefix = format!("{}.reply", nats.new_inbox());
        let mut subscription = nats
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        // The server has the subscription before the first request goes out.
        nats.flush()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let waiting = Arc::new(Mutex::new(Some(Routes::new())));
        let routes = waiting.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let id = message.subject.rsplit('.').next().unwrap_or_default();
                // A reply for a request no longer waiting (answered already) is dropped.
                let routes = routes.lock().expect("reply routes");
                if let Some(waiter) = routes.as_ref().and_then(|routes| routes.get(id)) {
                    let _ = waiter.send(message);
                }
            }
            // The connection was closed (or drained): every waiting request hears it now, and
            // later ones are refused (`register`).
            routes.lock().expect("reply routes").take();
        });
        Ok(ReplyRouter {
            prefix,
            waiting,
            task,
        })
    }

    /// A fresh inbox and the replies that reach it, until the returned guard is dropped.
    fn register(&self, id: &str) -> Result<(String, Replies), Error> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.waiting
            .lock()
            .expect("reply routes")
            .as_mut()
            .ok_or_else(|| {
                Error::Transport("the NATS connection is closed: no reply can arrive".into())
            })?
            .insert(id.to_string(), sender);
        let replies = Replies {
            receiver,
            id: id.to_string(),
            waiting: self.waiting.clone(),
        };
        Ok((format!("{}.{id}", self.prefix), replies))
    }
}

impl Drop for ReplyRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waiting requests by the last token of their inbox; `None` once the connection closed.
type Routes = HashMap<String, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>;

/// The replies to one durable request; unregistered on drop.
struct Replies {
    receiver: tokio::sync::mpsc::UnboundedReceiver<async_nats::Message>,
    id: String,
    waiting: Arc<Mutex<Option<Routes>>>,
}

impl Replies {
    async fn next(&mut self) -> Option<async_nats::Message> {
        self.receiver.recv().await
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(routes) = self.waiting.lock().expect("reply routes").as_mut() {
            routes.remove(&self.id);
        }
    }
}

/// The longest pause between two tries at storing one attempt in the stream.
const STORE_RETRY_CAP: Duration = Duration::from_millis(250);

/// How often the connection is pinged: a server lost without closing the socket (a host or
/// network gone) is noticed after two unanswered pings, and the client moves to another.
/// async-nats' default (60 s) would take minutes, longer than a request's whole budget.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connection options for a server list as users write it (`nats://a:4222,b:4222`, with
/// `user:password@` or `token@` in the URLs), and the URLs without the credentials, as
/// async-nats takes several (a slice: it does not split a comma-separated string). Errors never
/// repeat a secret.
pub fn nats_options(urls: &str) -> Result<(async_nats::ConnectOptions, Vec<String>), String> {
    let servers = schemas::ServerUrls::parse(urls)?;
    let mut options = async_nats::ConnectOptions::new().ping_interval(PING_INTERVAL);
    match servers.credentials {
        Some(schemas::UrlCredentials::UserPassword { user, password }) => {
            options = options.user_and_password(user, password);
        }
        Some(schemas::UrlCredentials::Token(token)) => options = options.token(token),
        None => {}
    }
    Ok((options, servers.urls))
}

/// The outcome of one attempt, before retry decisions.
enum Attempt {
    Done(Result<InferReply, Error>),
    Retry(Error),
}

impl Client {
    /// Connects to a NATS server with default options.
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects to a NATS server with the given options. `url` may list several servers,
    /// comma-separated, and carry `user:password@` or `token@` (never shown in errors).
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Client, Error> {
        let failed = |message: String| Error::Connect {
            url: schemas::redact_server_urls(url),
            message,
        };
        let (connect, servers) = nats_options(url).map_err(failed)?;
        let nats = connect
            .name("producer")
            .connect(servers.as_slice())
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(Client::from_nats(nats, options))
    }

    /// Wraps an existing NATS connection.
    pub fn from_nats(nats: async_nats::Client, options: ClientOptions) -> Client {
        Client {
            nats,
            options,
            replies: Arc::default(),
            retried: Arc::default(),
        }
    }

    /// Attempts sent again so far, by every request of this client (and its clones): after a
    /// timeout, "no responders" or `overloaded`. With JetStream each is a new message.
    pub fn retries_sent(&self) -> u64 {
        self.retried.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The options in use.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Sentence embeddings, one vector per input.
    pub async fn embed(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let reply = self
            .request(Task::Embed, &InferRequest::new(inputs.iter().copied()))
            .await?;
        reply
            .outputs
            .into_iter()
            .map(|output| match output {
                Output::Embedding { embedding } => Ok(embedding),
                other => Err(Error::BadReply(format!(
                    "expected an embedding, got {other:?}"
                ))),
            })
            .collect()
    }

    /// Mask predictions, one [`FillMaskOutput`] per input.
    pub async fn fill_mask(&self, inputs: &[&str]) -> Result<Vec<FillMaskOutput>, Error> {
        let reply = self
            .request(Task::FillMask, &InferRequest::new(inputs.iter().copied()))
            .await?;
        reply
            .outputs
            .into_iter()
            .map(|output| match output {
                Output::FillMask(fill) => Ok(fill),
                other => Err(Error::BadReply(format!(
                    "expected mask predictions, got {other:?}"
                ))),
            })
            .collect()
    }

    /// Relevance of each passage to the query (a cross-encoder scores each pair), in passage
    /// order.
    pub async fn rerank(&self, query: &str, passages: &[&str]) -> Result<Vec<Relevance>, Error> {
        let pairs = passages.iter().map(|&passage| (query, passage));
        let reply = self
            .request(Task::Rerank, &InferRequest::new(pairs))
            .await?;
        reply
            .outputs
            .into_iter()
            .map(|output| match output {
                Output::Score { score, raw_score } => Ok(Relevance { score, raw_score }),
                other => Err(Error::BadReply(format!("expected a score, got {other:?}"))),
            })
            .collect()
    }

    /// The `top_k` most likely labels of each input (every label when `None`), most likely
    /// first.
    pub async fn classify(
        &self,
        inputs: &[&str],
        top_k: Option<u32>,
    ) -> Result<Vec<Vec<LabelScore>>, Error> {
        let request = InferRequest {
            options: InferOptions {
                top_k,
                ..InferOptions::default()
            },
            ..InferRequest::new(inputs.iter().copied())
        };
        let reply = self.request(Task::Classify, &request).await?;
        reply
            .outputs
            .into_iter()
            .map(|output| match output {
                Output::Labels { labels } => Ok(labels),
                other => Err(Error::BadReply(format!("expected labels, got {other:?}"))),
            })
            .collect()
    }

    /// Sends any request to a task and returns the whole reply. A request whose reply would
    /// exceed the server's message size (the processor answers `too_large` with how many
    /// inputs fit) is split into requests of that many inputs, and the replies joined.
    pub async fn request(&self, task: Task, request: &InferRequest) -> Result<InferReply, Error> {
        match self.request_whole(task, request).await {
            Err(Error::Service(body))
                if body.kind == ErrorCode::TooLarge && request.inputs.len() > 1 =>
            {
                match body.max_inputs {
                    Some(fit) => {
                        let fit = (fit as usize).clamp(1, request.inputs.len() - 1);
                        self.request_split(task, request, fit).await
                    }
                    None => Err(Error::Service(body)),
                }
            }
            other => other,
        }
    }

    /// Sends `request` as requests of at most `fit` inputs (a few at a time) and joins the
    /// replies in input order.
    fn request_split<'a>(
        &'a self,
        task: Task,
        request: &'a InferRequest,
        fit: usize,
    ) -> futures::future::BoxFuture<'a, Result<InferReply, Error>> {
        Box::pin(async move {
            let parts: Vec<InferRequest> = request
                .inputs
                .chunks(fit)
                .map(|inputs| InferRequest {
                    inputs: inputs.to_vec(),
                    ..request.clone()
                })
                .collect();
            // A few at a time: each may be as large as the server allows.
            let mut replies = Vec::with_capacity(parts.len());
            for group in parts.chunks(4) {
                let sent = group.iter().map(|part| self.request(task, part));
                replies.extend(futures::future::try_join_all(sent).await?);
            }
            let mut joined = InferReply {
                outputs: Vec::with_capacity(request.inputs.len()),
                model: String::new(),
                batch_size: 0,
            };
            for reply in replies {
                joined.outputs.extend(reply.outputs);
                joined.model = reply.model;
                joined.batch_size = joined.batch_size.max(reply.batch_size);
            }
            Ok(joined)
        })
    }

    /// One request as given (with retries), not split.
    async fn request_whole(&self, task: Task, request: &InferRequest) -> Result<InferReply, Error> {
        let subject = schemas::subject(&self.options.prefix, task);
        let encoding = self.options.encoding;
        let payload = encode(encoding, request).map_err(|e| Error::BadReply(e.to_string()))?;
        let payload = bytes::Bytes::from(payload);
        if self.options.transport == Transport::Jetstream {
            return self.request_durable(&subject, payload).await;
        }
        let attempts = self.options.retries + 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                self.retried
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let error = match self.attempt(&subject, payload.clone(), attempt).await {
                Attempt::Done(result) => return result,
                Attempt::Retry(error) => error,
            };
            if attempt >= attempts {
                return Err(error);
            }
            tokio::time::sleep(self.backoff(attempt)).await;
        }
    }

    async fn attempt(&self, subject: &str, payload: bytes::Bytes, attempt: u32) -> Attempt {
        let encoding = self.options.encoding;
        let mut request_headers = HeaderMap::new();
        request_headers.insert(headers::CONTENT_TYPE, encoding.media_type());
        // The processor drops the request instead of computing it after we stop waiting.
        let budget_ms = self.options.timeout.as_millis().max(1).to_string();
        request_headers.insert(headers::REQUEST_TIMEOUT_MS, budget_ms.as_str());
        if self.options.priority != Priority::Interactive {
            request_headers.insert(headers::PRIORITY, self.options.priority.as_str());
        }
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(request_headers)
            .timeout(Some(self.options.timeout));
        let message = match self.nats.send_request(subject.to_string(), request).await {
            Ok(message) => message,
            Err(err) => {
                return match err.kind() {
                    RequestErrorKind::NoResponders => Attempt::Retry(Error::NoResponders {
                        subject: subject.to_string(),
                        attempts: attempt,
                    }),
                    RequestErrorKind::TimedOut => Attempt::Retry(Error::TimedOut {
                        subject: subject.to_string(),
                        timeout: self.options.timeout,
                        attempts: attempt,
                    }),
                    _ => Attempt::Done(Err(Error::Transport(err.to_string()))),
                }
            }
        };
        parse_reply(&message)
    }

    /// Publishes the request into the stream and waits for the reply on its own inbox. An
    /// attempt whose reply does not come within the timeout (the processor holding it died
    /// after replying into a dead connection, the server restarted...) is followed by another
    /// one with a new message id, so the stream's de-duplication does not swallow it; the
    /// answer of whichever attempt arrives first is kept (they share the inbox).
    async fn request_durable(
        &self,
        subject: &str,
        payload: bytes::Bytes,
    ) -> Result<InferReply, Error> {
        // Set up once per client; bounded by one attempt's timeout (while disconnected,
        // async-nats would hold the subscription's flush until it reconnects).
        let router = tokio::time::timeout(
            self.options.timeout,
            self.replies
                .get_or_try_init(|| ReplyRouter::start(&self.nats)),
        )
        .await
        .map_err(|_| {
            Error::Transport(format!(
                "could not subscribe for replies within {:?} (is NATS reachable?)",
                self.options.timeout
            ))
        })??;
        // A unique id (NUID): the last token of the inbox, and the root of each attempt's
        // `Nats-Msg-Id`.
        let fresh = self.nats.new_inbox();
        let request_id = fresh.rsplit('.').next().unwrap_or(&fresh).to_string();
        let (inbox, mut replies) = router.register(&request_id)?;
        let mut request_headers = HeaderMap::new();
        request_headers.insert(headers::CONTENT_TYPE, self.options.encoding.media_type());
        request_headers.insert(headers::REPLY_INBOX, inbox.as_str());
        let budget_ms = self.options.timeout.as_millis().max(1).to_string();
        request_headers.insert(headers::REQUEST_TIMEOUT_MS, budget_ms.as_str());
        if self.options.priority != Priority::Interactive {
            request_headers.insert(headers::PRIORITY, self.options.priority.as_str());
        }

        let attempts = self.options.retries + 1;
        // The best error heard so far: a reply that may be about an earlier attempt (all
        // share the inbox) must not end a later one that can still succeed.
        let mut heard: Option<Error> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                self.retried
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let until = tokio::time::Instant::now() + self.options.timeout;
            let mut attempt_headers = request_headers.clone();
            let message_id = format!("{request_id}.{attempt}");
            attempt_headers.insert(headers::MESSAGE_ID, message_id.as_str());
            match self
                .store(subject, attempt_headers, payload.clone(), until)
                .await
            {
                Err(error) => heard = Some(error),
                Ok(()) => loop {
                    match tokio::time::timeout_at(until, replies.next()).await {
                        Ok(Some(message)) => match settle(&message) {
                            Ok(result) => return result,
                            Err(passing) => heard = Some(passing),
                        },
                        Ok(None) => {
                            return Err(Error::Transport("the reply subscription closed".into()))
                        }
                        Err(_) => break,
                    }
                },
            }
            if attempt >= attempts {
                return Err(heard.unwrap_or(Error::TimedOut {
                    subject: subject.to_string(),
                    timeout: self.options.timeout,
                    attempts: attempt,
                }));
            }
            // A reply to an earlier attempt that comes meanwhile is still taken.
            let pause = tokio::time::sleep(self.backoff(attempt));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    Some(message) = replies.next() => match settle(&message) {
                        Ok(result) => return result,
                        Err(passing) => heard = Some(passing),
                    },
                }
            }
        }
    }

    /// Publishes one attempt into the stream until the stream confirms it stored it, retrying
    /// (same message id: stored once) until `until`. A full stream refuses it as `overloaded`.
    async fn store(
        &self,
        subject: &str,
        request_headers: HeaderMap,
        payload: bytes::Bytes,
        until: tokio::time::Instant,
    ) -> Result<(), Error> {
        let jetstream = async_nats::jetstream::new(self.nats.clone());
        let mut tries = 0;
        loop {
            tries += 1;
            let stored = match jetstream
                .publish_with_headers(
                    subject.to_string(),
                    request_headers.clone(),
                    payload.clone(),
                )
                .await
            {
                Ok(ack) => match tokio::time::timeout_at(until, ack).await {
                    Ok(acked) => acked.map(|_| ()).map_err(|e| e.to_string()),
                    Err(_) => Err("no acknowledgement from the stream".to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            let message = match stored {
                Ok(()) => return Ok(()),
                Err(message) => message,
            };
            if stream_is_full(&message) {
                return Err(Error::Service(ErrorBody::new(
                    ErrorCode::Overloaded,
                    format!("the request stream is full ({message}); retry later"),
                )));
            }
            // Short pauses: the usual cause is a stream without a leader for the seconds of an
            // election, and the request should be stored as soon as the new one is there.
            let pause = self.backoff(tries).min(STORE_RETRY_CAP);
            if tokio::time::Instant::now() + pause >= until {
                return Err(Error::Transport(format!(
                    "publishing to the stream on {subject} ({tries} tries): {message}"
                )));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Full-jitter exponential backoff: uniform in [0, min(2 s, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = Duration::from_secs(2);
        let ceiling = self
            .options
            .backoff
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(cap);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// A reply on a durable request's inbox: final (a result, or an error about the request
/// itself), or passing (`Err`): `overloaded`, or `timeout`, which may answer an earlier
/// attempt whose deadline ran out after it was re-sent; later attempts still count.
fn settle(message: &async_nats::Message) -> Result<Result<InferReply, Error>, Error> {
    match parse_reply(message) {
        Attempt::Retry(error) => Err(error),
        Attempt::Done(Err(Error::Service(body))) if body.kind == ErrorCode::Timeout => {
            Err(Error::Service(body))
        }
        Attempt::Done(result) => Ok(result),
    }
}

/// Whether JetStream refused a publish because the stream is at one of its limits (its
/// discard policy is `new`).
fn stream_is_full(message: &str) -> bool {
    [
        "maximum messages exceeded",
        "maximum bytes exceeded",
        "maximum messages per subject exceeded",
    ]
    .iter()
    .any(|limit| message.contains(limit))
}

/// A reply message as the request's result: the decoded reply, or the error it carries
/// (retryable or not).
fn parse_reply(message: &async_nats::Message) -> Attempt {
    let reply_encoding = Encoding::detect(
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::CONTENT_TYPE))
            .map(|v| v.as_str()),
        &message.payload,
    );
    let error_code = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
        .map(|v| v.to_string());
    if let Some(code) = error_code {
        let body = decode::<ErrorBody>(reply_encoding, &message.payload).unwrap_or_else(|_| {
            // A service that is not ours (or a proxy) may send only the headers.
            let text = message
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::SERVICE_ERROR))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let mut body = ErrorBody::new(ErrorCode::Internal, text);
            body.code = code.trim().parse().unwrap_or(500);
            body
        });
        return if body.kind.is_retryable() {
            Attempt::Retry(Error::Service(body))
        } else {
            Attempt::Done(Err(Error::Service(body)))
        };
    }
    Attempt::Done(
        decode::<InferReply>(reply_encoding, &message.payload)
            .map_err(|e| Error::BadReply(e.to_string())),
    )
}
