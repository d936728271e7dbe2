//! Load and fault helpers for the reliability tests (durable.rs, cluster.rs): sim processors
//! as child processes with every reliability setting at its default, an open-loop producer,
//! and a counter of the replies that reach producers' inboxes (to count duplicates).

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use producer::{Client, ClientOptions, Transport};
use schemas::{InferRequest, Output, Task};
use testkit::ChildProcess;

/// Starts a `processor` binary serving the `sim` model on `url` (about 1,200 one-input
/// requests/s); every reliability setting is left at its default.
pub fn processor(url: &str, transport: &str, extra: &[(&str, &str)]) -> ChildProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .env("RUST_LOG", "info")
        .env("PROCESSOR_NATS__URL", url)
        .env("PROCESSOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("PROCESSOR_SERVICE__TRANSPORT", transport)
        .env("PROCESSOR_MODEL__KIND", "sim")
        .env("PROCESSOR_MODEL__BATCH_MS", "20")
        .env("PROCESSOR_MODEL__ITEM_MS", "0.2")
        .env("PROCESSOR_BATCH__MAX_SIZE", "32");
    for (key, value) in extra {
        command.env(key, value);
    }
    ChildProcess::spawn(command, "processor ready", Duration::from_secs(30))
}

/// A producer client with every option at its default but the transport.
pub async fn client(url: &str, transport: Transport) -> Client {
    let options = ClientOptions {
        transport,
        ..ClientOptions::default()
    };
    Client::connect_with(url, options).await.unwrap()
}

/// One request's outcome: when it was sent and how long it took, or why it failed.
pub type Outcome = Result<(Instant, Duration), String>;

/// Sends `n` one-input requests, `per_second` of them a second (open loop), each on its own
/// task; counts answers as they come and checks each is its own.
pub fn open_loop(
    client: &Client,
    n: usize,
    per_second: u64,
    answered: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    open_loop_while(client, per_second, answered, move |i| i < n)
}

/// As [`open_loop`], sending request `i` while `more(i)` says so.
pub fn open_loop_while(
    client: &Client,
    per_second: u64,
    answered: Arc<AtomicUsize>,
    more: impl Fn(usize) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        let mut requests = Vec::new();
        let mut i = 0;
        while more(i) {
            tick.tick().await;
            let (client, answered) = (client.clone(), answered.clone());
            requests.push(tokio::spawn(async move {
                let text = format!("request {i}");
                let sent = Instant::now();
                let reply = client
                    .request(Task::Embed, &InferRequest::new([text.clone()]))
                    .await
                    .map_err(|e| format!("request {i}: {e}"))?;
                answered.fetch_add(1, Ordering::Relaxed);
                if reply.outputs != [Output::Text { text }] {
                    return Err(format!("request {i} got {:?}", reply.outputs));
                }
                Ok((sent, sent.elapsed()))
            }));
            i += 1;
        }
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            outcomes.push(request.await.unwrap());
        }
        outcomes
    })
}

/// Every reply that reaches a producer's durable-request inbox (`_INBOX.<client>.reply.<id>`),
/// seen from a connection of its own: replies beyond one per inbox are duplicates. (While
/// nats-server is down nothing is seen, so this is a lower bound.)
pub struct ReplyCounter {
    by_inbox: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyCounter {
    /// Watches from `url` (one server, or several comma-separated).
    pub async fn start(url: &str) -> ReplyCounter {
        let options = async_nats::ConnectOptions::new().retry_on_initial_connect();
        let urls: Vec<&str> = url.split(',').collect();
        let nats = options.connect(urls.as_slice()).await.unwrap();
        let mut replies = nats.subscribe("_INBOX.*.reply.*").await.unwrap();
        nats.flush().await.unwrap();
        let by_inbox = Arc::new(Mutex::new(HashMap::new()));
        let counts = by_inbox.clone();
        let task = tokio::spawn(async move {
            let _nats = nats;
            while let Some(reply) = replies.next().await {
                *counts
                    .lock()
                    .unwrap()
                    .entry(reply.subject.to_string())
                    .or_insert(0) += 1;
            }
        });
        ReplyCounter { by_inbox, task }
    }

    /// (inboxes answered, replies beyond the first on each).
    pub fn counts(&self) -> (usize, usize) {
        let by_inbox = self.by_inbox.lock().unwrap();
        let extra = by_inbox.values().map(|n| n - 1).sum();
        (by_inbox.len(), extra)
    }
}

impl Drop for ReplyCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks every request succeeded; prints and returns (median, slowest) latency.
pub fn assert_all_ok(what: &str, outcomes: &[Outcome]) -> (Duration, Duration) {
    let failed: Vec<&String> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} failed (lost), first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let mut latencies: Vec<Duration> = outcomes.iter().map(|r| r.as_ref().unwrap().1).collect();
    latencies.sort();
    let (median, slowest) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    (median, slowest)
}

/// Waits until `answered` reaches `at_least` (load is flowing).
pub async fn wait_for(answered: &AtomicUsize, at_least: usize) {
    let started = Instant::now();
    while answered.load(Ordering::Relaxed) < at_least {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "load never flowed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The longest time in which no request got its answer (answers come every few ms under
/// load; a fault shows as a gap), and when that gap began.
pub fn longest_stall(outcomes: &[Outcome]) -> (Duration, Instant) {
    let mut answered: Vec<Instant> = outcomes
        .iter()
        .filter_map(|outcome| outcome.as_ref().ok())
        .map(|(sent, took)| *sent + *took)
        .collect();
    answered.sort();
    answered
        .windows(2)
        .map(|pair| (pair[1] - pair[0], pair[0]))
        .max()
        .expect("at least two answers")
}

/// The `producer` CLI built beside the processor binary.
pub fn producer_binary() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_processor")).with_file_name("producer");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p producer` first)",
        path.display()
    );
    path
}

/// Runs the producer CLI as a user would (`--transport jetstream --chunk 1 embed -` on `url`)
/// over `n` lines `line {i}`, calls `fault` 2 s in (checking the CLI is still at work), and
/// checks it exits 0 having printed every line with its answer, in order.
pub async fn cli_through_fault(url: &str, n: usize, fault: impl FnOnce()) {
    let lines: String = (0..n).map(|i| format!("line {i}\n")).collect();
    let mut cli = Command::new(producer_binary())
        .args([
            "--server",
            url,
            "--transport",
            "jetstream",
            "--chunk",
            "1",
            "embed",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, lines.as_bytes()).unwrap();
    drop(stdin);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the CLI finished before the fault"
    );
    fault();
    let output = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}\n{} lines printed",
        String::from_utf8_lossy(&output.stderr),
        stdout.lines().count()
    );
    let printed: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(printed.len(), n);
    for (i, line) in printed.iter().enumerate() {
        let text = format!("line {i}");
        assert_eq!(line, &serde_json::json!({"input": text, "text": text}));
    }
}
