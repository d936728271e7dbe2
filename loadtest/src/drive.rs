//! Drives load: closed loop (a fixed number of requests in flight) or open loop (a fixed
//! schedule, each latency counted from the request's scheduled send time, so a slow server
//! cannot hide its queueing by slowing the sender: no coordinated omission).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use producer::Client;
use schemas::{encode, Encoding, ErrorBody, ErrorCode, InferRequest, Task};
use tokio::time::Instant;

/// The built-in inputs: the mixed 8-128-token sentences of the benchmarks.
const BUILT_IN: &str = include_str!("../../bench/inputs.json");

/// How requests are sent.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "loop")]
pub enum Load {
    /// `concurrency` requests always in flight.
    Closed {
        /// Requests in flight.
        concurrency: usize,
    },
    /// Requests sent at `rate` per second whatever the replies do.
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// What one measurement saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latency of every successful request.
    pub latencies: Vec<Duration>,
    /// Failed requests (error replies, timeouts).
    pub errors: u64,
    /// Of the errors: answered `overloaded` (503).
    pub overloaded: u64,
    /// Of the errors: no reply within the timeout, or no processor at all.
    pub no_reply: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Wall time of the measurement.
    pub elapsed: Duration,
}

/// The inputs: one per line of `file`, or the built-in set.
pub fn inputs(file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let inputs: Vec<String> = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => {
            let sets: serde_json::Value = serde_json::from_str(BUILT_IN)?;
            sets["mixed8_128"]
                .as_array()
                .ok_or_else(|| anyhow::anyhow!("no mixed8_128 set in the built-in inputs"))?
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        }
    };
    anyhow::ensure!(!inputs.is_empty(), "no inputs");
    Ok(inputs)
}

/// What sends the requests of a measurement.
#[derive(Clone)]
pub enum Sender {
    /// The producer library: CBOR encoding per request, its headers (`Content-Type`,
    /// `Request-Timeout-Ms`), its reply decoding.
    Producer(Client),
    /// Plain async-nats request/reply of CBOR requests encoded once, without headers, as a
    /// client in any language may send them; a reply counts as a success unless it carries
    /// `Nats-Service-Error-Code` (its body is not decoded, as in the plain NATS echo). So the
    /// only difference from the plain NATS echo baseline is the responder.
    Raw {
        nats: async_nats::Client,
        /// `{prefix}.embed`.
        subject: String,
        /// Per request, as the producer's default.
        timeout: Duration,
    },
}

/// How each lane sends: the requests, and for `Raw` their encoded payloads.
struct Requests {
    requests: Vec<InferRequest>,
    payloads: Vec<bytes::Bytes>,
}

impl Sender {
    async fn send(&self, requests: &Requests, i: usize) -> Result<(), producer::Error> {
        let i = i % requests.requests.len();
        match self {
            Sender::Producer(client) => client
                .request(Task::Embed, &requests.requests[i])
                .await
                .map(drop),
            Sender::Raw {
                nats,
                subject,
                timeout,
            } => {
                let request = async_nats::Request::new()
                    .payload(requests.payloads[i].clone())
                    .timeout(Some(*timeout));
                let reply = nats
                    .send_request(subject.clone(), request)
                    .await
                    .map_err(|err| raw_error(err, subject, *timeout))?;
                match reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(schemas::headers::SERVICE_ERROR_CODE))
                {
                    None => Ok(()),
                    Some(code) => {
                        let body = schemas::decode::<ErrorBody>(Encoding::Cbor, &reply.payload)
                            .unwrap_or_else(|_| {
                                let mut body = ErrorBody::new(ErrorCode::Internal, "error reply");
                                body.code = code.as_str().trim().parse().unwrap_or(500);
                                body
                            });
                        Err(producer::Error::Service(body))
                    }
                }
            }
        }
    }
}

fn raw_error(err: async_nats::RequestError, subject: &str, timeout: Duration) -> producer::Error {
    use async_nats::RequestErrorKind;
    match err.kind() {
        RequestErrorKind::NoResponders => producer::Error::NoResponders {
            subject: subject.to_string(),
            attempts: 1,
        },
        RequestErrorKind::TimedOut => producer::Error::TimedOut {
            subject: subject.to_string(),
            timeout,
            attempts: 1,
        },
        _ => producer::Error::Transport(err.to_string()),
    }
}

/// Sends load for `duration`; shows a progress bar when `label` is given.
pub async fn drive(
    sender: &Sender,
    inputs: &[String],
    per_request: usize,
    load: Load,
    duration: Duration,
    label: Option<&str>,
) -> Outcome {
    let requests: Vec<InferRequest> = (0..inputs.len())
        .map(|i| {
            InferRequest::new((0..per_request).map(|k| inputs[(i + k) % inputs.len()].clone()))
        })
        .collect();
    let payloads = match sender {
        Sender::Producer(_) => Vec::new(),
        Sender::Raw { .. } => requests
            .iter()
            .map(|request| encode(Encoding::Cbor, request).map(bytes::Bytes::from))
            .collect::<Result<_, _>>()
            .expect("a request always encodes"),
    };
    let requests = Arc::new(Requests { requests, payloads });
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let progress = label.map(|label| {
        let bar = ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>14} [{bar:30}] {elapsed:>4} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar
    });
    let started = Instant::now();
    let end = started + duration;
    let ticker = progress.clone().map(|bar| {
        let outcome = outcome.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let done = outcome.lock().expect("lock").latencies.len();
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(format!("{done} replies"));
            }
        })
    });

    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Closed { concurrency } => {
            for lane in 0..concurrency {
                let (sender, requests, outcome) =
                    (sender.clone(), requests.clone(), outcome.clone());
                tasks.spawn(async move {
                    let mut i = lane;
                    while Instant::now() < end {
                        let sent = Instant::now();
                        let result = sender.send(&requests, i).await;
                        record(&outcome, sent, result);
                        i += concurrency;
                    }
                });
            }
        }
        Load::Open { rate } => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let mut i = 0usize;
            loop {
                let scheduled = started + interval.mul_f64(i as f64);
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled).await;
                let (sender, requests, outcome) =
                    (sender.clone(), requests.clone(), outcome.clone());
                tasks.spawn(async move {
                    let result = sender.send(&requests, i).await;
                    record(&outcome, scheduled, result);
                });
                i += 1;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let mut outcome = std::mem::take(&mut *outcome.lock().expect("lock"));
    outcome.elapsed = started.elapsed();
    outcome
}

fn record(outcome: &Mutex<Outcome>, since: Instant, result: Result<(), producer::Error>) {
    let latency = since.elapsed();
    let mut outcome = outcome.lock().expect("lock");
    match result {
        Ok(_) => outcome.latencies.push(latency),
        Err(err) => {
            outcome.errors += 1;
            match &err {
                producer::Error::Service(body) if body.kind == schemas::ErrorCode::Overloaded => {
                    outcome.overloaded += 1
                }
                producer::Error::TimedOut { .. } | producer::Error::NoResponders { .. } => {
                    outcome.no_reply += 1
                }
                _ => {}
            }
            if outcome.error_samples.len() < 5 {
                outcome.error_samples.push(err.to_string());
            }
        }
    }
}
