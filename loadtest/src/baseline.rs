//! The figures each run is compared with, measured in the same run: the bare model's batched
//! throughput (no NATS; the seed's "Batched" column) and the raw NATS request/reply ceiling (a
//! responder that only echoes the bytes back).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use processor::model::{BatchModel, EchoModel, SimModel};
use schemas::{encode, Encoding, InferOptions, InferRequest, Task};

use crate::{Cli, ModelArg};

/// The baselines of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baselines {
    /// Inputs per second of the bare model, one worker, batches of `model_batch_size`.
    pub model_inputs_per_s: f64,
    /// The batch size it was measured at (`--max-batch-size`).
    pub model_batch_size: usize,
    /// Requests per second of plain NATS request/reply (echo responder) at the same
    /// concurrency.
    pub nats_echo_requests_per_s: f64,
    /// Median latency of that request/reply, in milliseconds.
    pub nats_echo_p50_ms: f64,
    /// The same at each closed-loop concurrency of the run (the largest is the one above).
    pub nats_echo: Vec<EchoBaseline>,
    /// The same responder run as a process of its own, as a processor is (`--client raw`
    /// only): the plain echo's responder shares the load generator's runtime, which a
    /// processor cannot; the gap between the two is what any separate responder pays here.
    pub process_echo: Vec<EchoBaseline>,
    /// The processor rows' own client (the producer library, the same request and reply
    /// messages) against a responder that answers each request at once with a pre-encoded
    /// reply: what is left between it and a processor row is the processor's own cost.
    pub client_echo: Vec<EchoBaseline>,
}

/// Plain NATS request/reply at one concurrency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EchoBaseline {
    /// Requests kept in flight.
    pub concurrency: usize,
    pub requests_per_s: f64,
    pub p50_ms: f64,
}

impl EchoBaseline {
    /// The one of `measured` at `concurrency` in flight, if any.
    fn at(measured: &[EchoBaseline], concurrency: usize) -> Option<&EchoBaseline> {
        measured.iter().find(|echo| echo.concurrency == concurrency)
    }
}

impl Baselines {
    /// The plain NATS echo at `concurrency` in flight (the largest measured if that one was
    /// not).
    pub fn echo_at(&self, concurrency: usize) -> (f64, f64) {
        EchoBaseline::at(&self.nats_echo, concurrency).map_or(
            (self.nats_echo_requests_per_s, self.nats_echo_p50_ms),
            |echo| (echo.requests_per_s, echo.p50_ms),
        )
    }

    /// The echo process (see [`Baselines::process_echo`]) at `concurrency` in flight, if it
    /// was measured there.
    pub fn process_echo_at(&self, concurrency: usize) -> Option<&EchoBaseline> {
        EchoBaseline::at(&self.process_echo, concurrency)
    }

    /// The client echo (see [`Baselines::client_echo`]) at `concurrency` in flight, if it was
    /// measured there.
    pub fn client_echo_at(&self, concurrency: usize) -> Option<&EchoBaseline> {
        EchoBaseline::at(&self.client_echo, concurrency)
    }
}

/// Measures both baselines.
pub async fn measure(
    cli: &Cli,
    processor_bin: &Path,
    inputs: &[String],
    pids: &mut Vec<u32>,
) -> anyhow::Result<Baselines> {
    let model_inputs_per_s = {
        let (cli, processor_bin) = (cli.clone(), processor_bin.to_path_buf());
        let batch: Vec<String> = (0..cli.max_batch_size)
            .map(|i| inputs[i % inputs.len()].clone())
            .collect();
        tokio::task::spawn_blocking(move || bare_model(&cli, &processor_bin, &batch)).await??
    };
    // One nats-server for both echo baselines.
    let (_server, url) = cli.nats_server(pids);
    let nats_echo = nats_echo(cli, &url, inputs).await?;
    let process_echo = process_echo(cli, &url, inputs, pids).await?;
    let client_echo = client_echo(cli, &url, inputs).await?;
    let largest = nats_echo
        .iter()
        .max_by_key(|echo| echo.concurrency)
        .expect("at least one concurrency")
        .clone();
    Ok(Baselines {
        model_inputs_per_s,
        model_batch_size: cli.max_batch_size,
        nats_echo_requests_per_s: largest.requests_per_s,
        nats_echo_p50_ms: largest.p50_ms,
        nats_echo,
        process_echo,
        client_echo,
    })
}

/// Inputs/s of the BERT model on full batches of `batch`, measured by `processor bench` of the
/// processor binary under test, on its device and in its precision (so a GPU run is compared
/// with the same GPU).
fn bare_bert(cli: &Cli, processor_bin: &Path, batch: &[String]) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("loadtest-bare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (texts, json) = (dir.join("batch.txt"), dir.join("bench.json"));
    // Inputs longer than the model takes are cut, as the processors are asked to (truncate).
    std::fs::write(&texts, batch.join("\n"))?;
    let output = std::process::Command::new(processor_bin)
        .arg("bench")
        .arg("--inputs")
        .arg(&texts)
        .args([
            "--batch-sizes",
            &batch.len().to_string(),
            "--min-time",
            "2s",
        ])
        .arg("--json")
        .arg(&json)
        .env_remove("PROCESSOR_CONFIG")
        .env("PROCESSOR_MODEL__KIND", "bert")
        .env("PROCESSOR_MODEL__PATH", &cli.model_path)
        .env("PROCESSOR_MODEL__DEVICE", &cli.device)
        .env("PROCESSOR_MODEL__DTYPE", &cli.dtype)
        // The bench warms up on its own batch; no need to compile every shape first.
        .env("PROCESSOR_MODEL__WARMUP", "one")
        .output()
        .with_context(|| format!("running {} bench", processor_bin.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} bench failed: {}",
        processor_bin.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    report["rows"][0]["sentences_per_s"]
        .as_f64()
        .context("processor bench wrote no sentences_per_s")
}

/// Inputs/s of the model called directly on full batches (after one warm-up batch); BERT's
/// through `processor bench` (see [`bare_bert`]).
fn bare_model(cli: &Cli, processor_bin: &Path, batch: &[String]) -> anyhow::Result<f64> {
    let mut model: Box<dyn BatchModel> = match cli.model {
        ModelArg::Echo => Box::new(EchoModel),
        ModelArg::Sim => Box::new(SimModel::new(
            Duration::from_secs_f64(cli.sim_batch_ms / 1000.0),
            Duration::from_secs_f64(cli.sim_item_ms / 1000.0),
        )),
        ModelArg::Bert => return bare_bert(cli, processor_bin, batch),
    };
    let texts: Vec<&str> = batch.iter().map(String::as_str).collect();
    let options = InferOptions {
        truncate: Some(true),
        ..InferOptions::default()
    };
    model.run_texts(Task::Embed, &texts, &options);
    let started = Instant::now();
    let mut inputs = 0;
    let mut batches = 0;
    while batches < 3 || started.elapsed() < Duration::from_secs(2) {
        inputs += model.run_texts(Task::Embed, &texts, &options).len();
        batches += 1;
    }
    Ok(inputs as f64 / started.elapsed().as_secs_f64())
}

/// The plain echo's responder: sends every request's payload back to its reply subject.
async fn echo_back(responder: async_nats::Client, mut requests: async_nats::Subscriber) {
    while let Some(message) = requests.next().await {
        if let Some(reply) = message.reply {
            let _ = responder.publish(reply, message.payload).await;
        }
    }
}

/// The plain echo's responder as a process of its own (`loadtest --echo-responder`): logs
/// `ready` once subscribed, then echoes until killed.
pub async fn echo_responder(url: &str, subject: &str) -> anyhow::Result<()> {
    let responder = crate::connect(url).await?;
    let requests = responder.subscribe(subject.to_string()).await?;
    responder.flush().await?;
    eprintln!("echo responder ready on {subject}");
    echo_back(responder, requests).await;
    Ok(())
}

/// Plain request/reply through a nats-server with a responder that echoes the payload, at
/// each closed-loop concurrency of the run (the largest one only for open loops), 2 s each.
async fn nats_echo(cli: &Cli, url: &str, inputs: &[String]) -> anyhow::Result<Vec<EchoBaseline>> {
    let subject = format!("loadtest{}.echo", std::process::id());
    let responder = crate::connect(url).await?;
    let requests = responder.subscribe(subject.clone()).await?;
    let echo = tokio::spawn(echo_back(responder, requests));
    let baselines = echo_levels(cli, url, &subject, inputs).await;
    echo.abort();
    baselines
}

/// The plain echo with its responder in a process of its own (`--client raw` only: the raw
/// rows are the ones compared with it).
async fn process_echo(
    cli: &Cli,
    url: &str,
    inputs: &[String],
    pids: &mut Vec<u32>,
) -> anyhow::Result<Vec<EchoBaseline>> {
    if cli.client != crate::ClientArg::Raw || cli.rate.is_some() || cli.overload.is_some() {
        return Ok(Vec::new());
    }
    let subject = format!("loadtest{}.process_echo", std::process::id());
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.arg("--echo-responder").arg(url).arg(&subject);
    let responder = tokio::task::spawn_blocking(move || {
        testkit::ChildProcess::spawn(command, "echo responder ready", Duration::from_secs(10))
    })
    .await?;
    pids.push(responder.pid());
    let baselines = echo_levels(cli, url, &subject, inputs).await;
    drop(responder);
    baselines
}

/// The raw client against an echo responder on `subject`, at each closed-loop concurrency of
/// the run (the largest one only for open loops), 2 s each.
async fn echo_levels(
    cli: &Cli,
    url: &str,
    subject: &str,
    inputs: &[String],
) -> anyhow::Result<Vec<EchoBaseline>> {
    let client = crate::connect(url).await?;
    let request =
        InferRequest::new((0..cli.inputs_per_request).map(|i| inputs[i % inputs.len()].clone()));
    let payload = bytes::Bytes::from(encode(Encoding::Cbor, &request)?);
    let mut levels = cli.concurrency.clone();
    if levels.is_empty() || cli.rate.is_some() || cli.overload.is_some() {
        levels = vec![cli.concurrency.iter().copied().max().unwrap_or(256)];
    }
    let mut baselines = Vec::with_capacity(levels.len());
    for concurrency in levels {
        let (requests_per_s, p50_ms) = echo_at(
            &client,
            subject,
            &payload,
            concurrency,
            Duration::from_secs(2),
        )
        .await?;
        baselines.push(EchoBaseline {
            concurrency,
            requests_per_s,
            p50_ms,
        });
    }
    Ok(baselines)
}

/// The producer library (as the processor rows use it) against a responder that answers
/// every request on `{prefix}.embed` with one pre-encoded reply of the processor's form (CBOR
/// body, no headers, the request's inputs echoed), at each closed-loop concurrency of
/// the run, 2 s each. Open loops have none.
async fn client_echo(cli: &Cli, url: &str, inputs: &[String]) -> anyhow::Result<Vec<EchoBaseline>> {
    if cli.rate.is_some() || cli.overload.is_some() || cli.client == crate::ClientArg::Raw {
        // Raw rows are compared with the plain NATS echo: the same client.
        return Ok(Vec::new());
    }
    let prefix = format!("loadtest{}client", std::process::id());
    let responder = crate::connect(url).await?;
    let mut requests = responder
        .subscribe(schemas::subject(&prefix, Task::Embed))
        .await?;
    let reply = schemas::InferReply {
        outputs: (0..cli.inputs_per_request)
            .map(|i| schemas::Output::Text {
                text: inputs[i % inputs.len()].clone(),
            })
            .collect(),
        model: "echo".to_string(),
        batch_size: 1,
    };
    let body = bytes::Bytes::from(encode(Encoding::Cbor, &reply)?);
    let echo = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(inbox) = message.reply {
                // A CBOR success reply has no headers, as the processor's.
                let _ = responder.publish(inbox, body.clone()).await;
            }
        }
    });
    let options = producer::ClientOptions {
        prefix,
        timeout: Duration::from_secs(30),
        retries: 0,
        ..producer::ClientOptions::default()
    };
    let client =
        crate::drive::Sender::Producer(producer::Client::connect_with(url, options).await?);
    let levels = match cli.concurrency.as_slice() {
        [] => vec![256],
        levels => levels.to_vec(),
    };
    let mut baselines = Vec::with_capacity(levels.len());
    for concurrency in levels {
        let load = crate::drive::Load::Closed { concurrency };
        let measure = Duration::from_secs(2);
        let outcome =
            crate::drive::drive(&client, inputs, cli.inputs_per_request, load, measure, None).await;
        if outcome.errors > 0 {
            echo.abort();
            anyhow::bail!(
                "the client echo baseline failed: {:?}",
                outcome.error_samples
            );
        }
        let mut latencies = outcome.latencies;
        latencies.sort();
        baselines.push(EchoBaseline {
            concurrency,
            requests_per_s: latencies.len() as f64 / outcome.elapsed.as_secs_f64(),
            p50_ms: latencies
                .get(latencies.len() / 2)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        });
    }
    echo.abort();
    Ok(baselines)
}

/// Requests/s and median latency (ms) of `concurrency` lanes of request/reply for `measure`.
async fn echo_at(
    client: &async_nats::Client,
    subject: &str,
    payload: &bytes::Bytes,
    concurrency: usize,
    measure: Duration,
) -> anyhow::Result<(f64, f64)> {
    let completed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, subject, payload, completed) = (
            client.clone(),
            subject.to_string(),
            payload.clone(),
            completed.clone(),
        );
        lanes.spawn(async move {
            let mut latencies = Vec::new();
            while started.elapsed() < measure {
                let sent = Instant::now();
                if client
                    .request(subject.clone(), payload.clone())
                    .await
                    .is_ok()
                {
                    latencies.push(sent.elapsed());
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(lane) = lanes.join_next().await {
        latencies.extend(lane?);
    }
    let rate = completed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    Ok((rate, p50))
}
