//! Processors as real child processes, killed and stopped under load: the JetStream transport
//! loses nothing when a processor dies, both transports drain on SIGTERM, and core NATS
//! processors survive a nats-server restart.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use producer::{Client, ClientOptions, Transport};
use schemas::{InferRequest, Output, Task};
use testkit::{ChildProcess, NatsServer};

/// Starts a `processor` binary serving the `sim` model on `url`.
fn processor(url: &str, transport: &str, extra: &[(&str, &str)]) -> ChildProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .env("RUST_LOG", "info")
        .env("PROCESSOR_NATS__URL", url)
        .env("PROCESSOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("PROCESSOR_SERVICE__TRANSPORT", transport)
        .env("PROCESSOR_MODEL__KIND", "sim")
        .env("PROCESSOR_MODEL__BATCH_MS", "20")
        .env("PROCESSOR_MODEL__ITEM_MS", "0.2")
        .env("PROCESSOR_BATCH__MAX_SIZE", "32")
        .env("PROCESSOR_JETSTREAM__ACK_WAIT_MS", "1500")
        .env("PROCESSOR_JETSTREAM__NAK_DELAY_MS", "100");
    for (key, value) in extra {
        command.env(key, value);
    }
    ChildProcess::spawn(command, "processor ready", Duration::from_secs(30))
}

async fn client(url: &str, transport: Transport) -> Client {
    let options = ClientOptions {
        transport,
        timeout: Duration::from_secs(20),
        retries: 5,
        backoff: Duration::from_millis(100),
        ..ClientOptions::default()
    };
    Client::connect_with(url, options).await.unwrap()
}

/// Sends `n` one-input requests at once; counts replies as they come, checks each is its own.
async fn send_all(
    client: &Client,
    n: usize,
    answered: Arc<AtomicUsize>,
) -> Vec<Result<(), String>> {
    let requests = (0..n).map(|i| {
        let client = client.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let text = format!("request {i}");
            let reply = client
                .request(Task::Embed, &InferRequest::new([text.clone()]))
                .await
                .map_err(|e| format!("request {i}: {e}"))?;
            answered.fetch_add(1, Ordering::Relaxed);
            if reply.outputs != [Output::Text { text }] {
                return Err(format!("request {i} got {:?}", reply.outputs));
            }
            Ok(())
        })
    });
    let mut results = Vec::with_capacity(n);
    for request in requests.collect::<Vec<_>>() {
        results.push(request.await.unwrap());
    }
    results
}

/// Closed-loop load: `lanes` senders, each sending one request after another until `stop`.
fn keep_sending(
    client: &Client,
    lanes: usize,
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Result<(), String>>> {
    let client = client.clone();
    tokio::spawn(async move {
        let lanes = (0..lanes).map(|lane| {
            let (client, answered, stop) = (client.clone(), answered.clone(), stop.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("lane {lane} request {i}");
                    i += 1;
                    let result = client
                        .request(Task::Embed, &InferRequest::new([text.clone()]))
                        .await
                        .map_err(|e| format!("{text}: {e}"))
                        .and_then(|reply| {
                            if reply.outputs == [Output::Text { text: text.clone() }] {
                                Ok(())
                            } else {
                                Err(format!("{text} got {:?}", reply.outputs))
                            }
                        });
                    answered.fetch_add(1, Ordering::Relaxed);
                    results.push(result);
                }
                results
            })
        });
        let mut results = Vec::new();
        for lane in lanes.collect::<Vec<_>>() {
            results.extend(lane.await.unwrap());
        }
        results
    })
}

fn assert_all_ok(results: &[Result<(), String>]) {
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed, first: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
}

/// Waits until `answered` reaches `at_least` (load is flowing through both processors).
async fn wait_for(answered: &AtomicUsize, at_least: usize) {
    let started = std::time::Instant::now();
    while answered.load(Ordering::Relaxed) < at_least {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "load never flowed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_loses_nothing_when_a_processor_is_killed_mid_batch() {
    let server = NatsServer::start_jetstream();
    let mut doomed = processor(&server.url(), "jetstream", &[]);
    let survivor = processor(&server.url(), "jetstream", &[]);
    let client = client(&server.url(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, answered) = (client.clone(), answered.clone());
        tokio::spawn(async move { send_all(&client, 5000, answered).await })
    };
    // Both processors are busy (every batch lasts 20+ ms), so this lands inside a batch and
    // the killed processor holds up to 64 unacknowledged requests.
    wait_for(&answered, 1000).await;
    doomed.kill();
    let results = load.await.unwrap();
    assert_all_ok(&results);
    assert_eq!(answered.load(Ordering::Relaxed), 5000);
    drop(survivor);
}

async fn sigterm_under_load(transport: &str, client_transport: Transport) {
    let server = if transport == "jetstream" {
        NatsServer::start_jetstream()
    } else {
        NatsServer::start()
    };
    let mut stopping = processor(&server.url(), transport, &[]);
    let mut staying = processor(&server.url(), transport, &[]);
    let client = client(&server.url(), client_transport).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_sending(&client, 128, answered.clone(), stop.clone());
    wait_for(&answered, 500).await;
    stopping.terminate();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = stopping.wait(Duration::from_secs(20));
        (status, stopping.log())
    })
    .await
    .unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("processor stopped"), "{log}");
    // Load goes on after the exit: the other processor takes all of it.
    let at_exit = answered.load(Ordering::Relaxed);
    wait_for(&answered, at_exit + 500).await;
    stop.store(true, Ordering::Relaxed);
    assert_all_ok(&load.await.unwrap());
    staying.terminate();
    let status = tokio::task::spawn_blocking(move || staying.wait(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_sigterm_under_load_answers_what_it_took_and_exits_0() {
    sigterm_under_load("core", Transport::Core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_sigterm_under_load_answers_what_it_took_and_exits_0() {
    sigterm_under_load("jetstream", Transport::Jetstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_processors_and_producers_survive_a_nats_server_restart() {
    let mut server = NatsServer::start();
    let processor = processor(&server.url(), "core", &[("PROCESSOR_MODEL__KIND", "echo")]);
    let client = client(&server.url(), Transport::Core).await;
    let ask = move |text: &'static str| {
        let client = client.clone();
        async move {
            client
                .request(Task::Embed, &InferRequest::new([text]))
                .await
                .map(|reply| reply.outputs)
        }
    };
    assert_eq!(
        ask("before").await.unwrap(),
        [Output::Text {
            text: "before".into()
        }]
    );

    // Light load across the restart: requests keep coming while the server is down.
    let during = tokio::spawn({
        let ask = ask.clone();
        async move {
            let mut ok = 0;
            for _ in 0..40 {
                if ask("during").await.is_ok() {
                    ok += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ok
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();

    // Once reconnected, requests succeed again, served by the same processor process.
    let mut after = Err(String::new());
    for _ in 0..50 {
        after = ask("after").await.map_err(|e| e.to_string());
        if after.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        after.expect("a request succeeds after the restart"),
        [Output::Text {
            text: "after".into()
        }]
    );
    assert!(during.await.unwrap() > 0);
    let log = processor.log();
    assert!(
        !log.contains("processor stopped"),
        "the processor must not have restarted: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_redelivers_a_failed_batch_then_gives_up_with_an_error_reply() {
    let server = NatsServer::start_jetstream();
    let processor = processor(
        &server.url(),
        "jetstream",
        &[
            ("PROCESSOR_JETSTREAM__MAX_DELIVER", "3"),
            ("PROCESSOR_JETSTREAM__NAK_DELAY_MS", "200"),
        ],
    );
    let client = client(&server.url(), Transport::Jetstream).await;
    // The sim model fails inputs containing [fail]: every delivery fails, the third is the
    // last, and its error reaches the requester, after two nak delays.
    let started = std::time::Instant::now();
    let error = client
        .request(Task::Embed, &InferRequest::new(["doomed [fail]"]))
        .await
        .unwrap_err();
    let body = error.service_error().expect("an error reply");
    assert_eq!(
        body.kind,
        schemas::ErrorCode::ModelFailed,
        "{}",
        body.message
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered after {:?}: it was not redelivered twice",
        started.elapsed()
    );
    // A request that is the client's own fault is answered at once and not redelivered.
    let error = client
        .request(Task::Embed, &InferRequest::new([""]))
        .await
        .unwrap_err();
    assert_eq!(
        error.service_error().map(|b| b.kind),
        Some(schemas::ErrorCode::InvalidInput)
    );
    let ok = client
        .request(Task::Embed, &InferRequest::new(["fine"]))
        .await
        .unwrap();
    assert_eq!(
        ok.outputs,
        [Output::Text {
            text: "fine".into()
        }]
    );

    // Nothing is left in the work queue: the failed request was terminated, not kept.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream.get_stream("BERT_REQUESTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 0, "{:?}", info.state);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("bert-processors").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    drop(processor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_into_the_batch_that_computed_it() {
    let server = NatsServer::start();
    let processor = processor(
        &server.url(),
        "core",
        &[
            ("PROCESSOR_LOGGING__FORMAT", "json"),
            ("RUST_LOG", "processor=debug"),
        ],
    );
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut request_headers = async_nats::HeaderMap::new();
    request_headers.insert(schemas::headers::REQUEST_ID, "trace-me-42");
    let reply = nats
        .request_with_headers(
            "bert.embed",
            request_headers,
            r#"{"inputs": ["hello"]}"#.into(),
        )
        .await
        .unwrap();
    assert!(reply
        .headers
        .as_ref()
        .and_then(|h| h.get(schemas::headers::SERVICE_ERROR_CODE))
        .is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = processor.log();
    let batch_line = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["fields"]["message"] == "batch computed")
        .unwrap_or_else(|| panic!("no JSON `batch computed` line in:\n{log}"));
    let ids = batch_line["fields"]["request_ids"]
        .as_str()
        .unwrap_or_default();
    assert!(ids.contains("trace-me-42"), "{batch_line}");
}
