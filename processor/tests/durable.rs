//! Processors as real child processes, killed and stopped under load, with every reliability
//! setting (ack_wait, producer timeout and retries) at its default: the JetStream transport
//! answers every request through a SIGKILL of a processor and of nats-server, both transports
//! drain on SIGTERM, a full stream refuses at publish time, and a busy processor never takes
//! (or gives back) more than it has room for.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use producer::{ClientOptions, Transport};
use schemas::{headers, InferRequest, Output, Task};
use testkit::NatsServer;

mod common;
use common::load::{
    assert_all_ok, cli_through_fault, client, open_loop, processor, wait_for, ReplyCounter,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_answers_every_request_when_a_processor_is_killed() {
    let server = NatsServer::start_jetstream();
    let mut doomed = processor(&server.url(), "jetstream", &[]);
    let survivor = processor(&server.url(), "jetstream", &[]);
    let counter = ReplyCounter::start(&server.url()).await;
    let client = client(&server.url(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = open_loop(&client, 5000, 1000, answered.clone());
    // Both processors are busy (every batch lasts 20+ ms), so this lands inside a batch and
    // the killed processor holds up to 96 unacknowledged requests.
    wait_for(&answered, 2000).await;
    doomed.kill();
    let outcomes = load.await.unwrap();
    let (median, slowest) = assert_all_ok("processor SIGKILL", &outcomes);
    // Redelivery comes after ack_wait (4 s), well inside the producer's 10 s timeout.
    assert!(slowest < Duration::from_secs(10), "slowest {slowest:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (inboxes, duplicates) = counter.counts();
    assert!(inboxes >= 5000, "{inboxes} inboxes answered");
    println!(
        "processor SIGKILL: 5000 of 5000 answered, lost 0, duplicates {duplicates}, \
         median {median:?}, slowest {slowest:?}"
    );
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_answers_every_request_across_a_nats_server_crash_and_restart() {
    let mut server = NatsServer::start_jetstream();
    let first = processor(&server.url(), "jetstream", &[]);
    let second = processor(&server.url(), "jetstream", &[]);
    let counter = ReplyCounter::start(&server.url()).await;
    let client = client(&server.url(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = open_loop(&client, 5000, 1000, answered.clone());
    wait_for(&answered, 2000).await;
    // SIGKILL, down for a second, back on the same port and store.
    server.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    let outcomes = load.await.unwrap();
    let (median, slowest) = assert_all_ok("nats-server SIGKILL", &outcomes);
    let (inboxes, duplicates) = counter.counts();
    println!(
        "nats-server SIGKILL + restart after 1 s: 5000 of 5000 answered, lost 0, duplicates \
         seen {duplicates} ({inboxes} inboxes seen), median {median:?}, slowest {slowest:?}, \
         all done {:?} after the crash",
        down.elapsed()
    );
    // The same processes served before and after.
    for processor in [&first, &second] {
        assert!(!processor.log().contains("processor stopped"));
    }
}

/// SIGTERM to one of two processors under load: it answers what it took and exits 0; the
/// other one takes the rest. Returns how many requests needed the producer's retry (they
/// took longer than one attempt's timeout).
async fn sigterm_under_load(transport: &str, client_transport: Transport) -> usize {
    let server = if transport == "jetstream" {
        NatsServer::start_jetstream()
    } else {
        NatsServer::start()
    };
    let mut stopping = processor(&server.url(), transport, &[]);
    let mut staying = processor(&server.url(), transport, &[]);
    let client = client(&server.url(), client_transport).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = open_loop(&client, 5000, 1000, answered.clone());
    wait_for(&answered, 2000).await;
    stopping.terminate();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = stopping.wait(Duration::from_secs(30));
        (status, stopping.log())
    })
    .await
    .unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("processor stopped"), "{log}");
    let outcomes = load.await.unwrap();
    let (median, slowest) = assert_all_ok(&format!("{transport} SIGTERM"), &outcomes);
    let timeout = ClientOptions::default().timeout;
    let retried = outcomes
        .iter()
        .filter(|outcome| outcome.as_ref().is_ok_and(|(_, took)| *took >= timeout))
        .count();
    println!(
        "{transport} SIGTERM under load: 5000 of 5000 answered, {retried} after a producer \
         retry, median {median:?}, slowest {slowest:?}"
    );
    staying.terminate();
    let status = tokio::task::spawn_blocking(move || staying.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success());
    retried
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_sigterm_under_load_answers_every_request_and_exits_0() {
    // The drain is best-effort at the instant the connection closes (README, Transports): a
    // request on the wire then is answered by the producer's retry. It must stay rare.
    let retried = sigterm_under_load("core", Transport::Core).await;
    assert!(
        retried <= 5,
        "{retried} of 5000 requests were lost at shutdown and retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_sigterm_under_load_answers_every_request_and_exits_0() {
    let retried = sigterm_under_load("jetstream", Transport::Jetstream).await;
    assert_eq!(retried, 0, "JetStream answers what it took before its exit");
}

/// The `producer` binary, built beside this crate's binaries by `cargo test --workspace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_cli_prints_every_line_when_a_processor_is_killed() {
    let server = NatsServer::start_jetstream();
    let mut doomed = processor(&server.url(), "jetstream", &[]);
    let _others = [
        processor(&server.url(), "jetstream", &[]),
        processor(&server.url(), "jetstream", &[]),
    ];
    cli_through_fault(&server.url(), 3000, || doomed.kill()).await;
}

/// Stores `n` one-input JSON requests `"{text} {i}"` in the stream as a plain client would
/// (PROTOCOL.md), replies to `inbox`; panics if the stream refuses one.
async fn store_requests(
    jetstream: &async_nats::jetstream::Context,
    inbox: &str,
    text: &str,
    n: usize,
) {
    for i in 0..n {
        let mut request_headers = async_nats::HeaderMap::new();
        request_headers.insert(headers::REPLY_INBOX, inbox);
        request_headers.insert(headers::CONTENT_TYPE, "application/json");
        let payload = format!(r#"{{"inputs": ["{text} {i}"]}}"#);
        jetstream
            .publish_with_headers("bert.embed", request_headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("request {i} of {n} refused: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_at_publish_time_and_keeps_what_it_stored() {
    let server = NatsServer::start_jetstream();
    let limit = [("PROCESSOR_JETSTREAM__MAX_MESSAGES", "100")];
    // The stream is created by a processor, which then leaves: nothing consumes.
    let mut creator = processor(&server.url(), "jetstream", &limit);
    creator.terminate();
    tokio::task::spawn_blocking(move || creator.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut inbox = nats.subscribe("_INBOX.full").await.unwrap();
    let jetstream = async_nats::jetstream::new(nats.clone());
    store_requests(&jetstream, "_INBOX.full", "stored", 100).await;
    let refused = jetstream
        .publish("bert.embed", r#"{"inputs": ["one too many"]}"#.into())
        .await
        .unwrap()
        .await
        .expect_err("the 101st request is refused");
    assert!(
        refused.to_string().contains("maximum messages exceeded"),
        "{refused}"
    );
    // The producer, with its defaults, reports it as overloaded (after its retries).
    let client = client(&server.url(), Transport::Jetstream).await;
    let error = client
        .request(Task::Embed, &InferRequest::new(["one too many"]))
        .await
        .unwrap_err();
    assert_eq!(
        error.service_error().map(|body| body.kind),
        Some(schemas::ErrorCode::Overloaded),
        "{error}"
    );
    // Nothing stored was dropped: a processor answers all 100.
    let _processor = processor(&server.url(), "jetstream", &limit);
    let mut texts = Vec::new();
    while texts.len() < 100 {
        let reply = tokio::time::timeout(Duration::from_secs(10), inbox.next())
            .await
            .expect("the stored requests are answered")
            .unwrap();
        let reply: schemas::InferReply = serde_json::from_slice(&reply.payload).unwrap();
        texts.push(reply.outputs);
    }
    assert!(texts.contains(&vec![Output::Text {
        text: "stored 0".into()
    }]));
    client
        .request(Task::Embed, &InferRequest::new(["room again"]))
        .await
        .expect("a request fits once the stream has room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_processor_takes_only_what_it_has_room_for_and_gives_nothing_back() {
    let server = NatsServer::start_jetstream();
    // Room for 8 messages (4 per batch, one worker), 2 admitted at a time, 100 ms per batch:
    // 300 requests take 15 s or more, nearly four times the default ack_wait; the 6 messages
    // waiting for a place at any time take it in the order they came.
    let processor = processor(
        &server.url(),
        "jetstream",
        &[
            ("PROCESSOR_BATCH__MAX_SIZE", "4"),
            ("PROCESSOR_MODEL__BATCH_MS", "100"),
            ("PROCESSOR_SERVICE__MAX_IN_FLIGHT_REQUESTS", "2"),
        ],
    );
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut inbox = nats.subscribe("_INBOX.busy").await.unwrap();
    let jetstream = async_nats::jetstream::new(nats.clone());
    store_requests(&jetstream, "_INBOX.busy", "busy", 300).await;
    let mut answered = HashMap::new();
    let mut redelivered = 0;
    let mut errors = Vec::new();
    let quiet = async {
        while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(6), inbox.next()).await
        {
            let reply_headers = reply.headers.clone().unwrap_or_default();
            if reply_headers.get(headers::DELIVERY_COUNT).is_some() {
                redelivered += 1;
            }
            if let Some(code) = reply_headers.get(headers::SERVICE_ERROR_CODE) {
                errors.push(format!(
                    "{code}: {}",
                    String::from_utf8_lossy(&reply.payload)
                ));
                continue;
            }
            let reply: schemas::InferReply = serde_json::from_slice(&reply.payload).unwrap();
            *answered.entry(format!("{:?}", reply.outputs)).or_insert(0) += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), quiet)
        .await
        .expect("replies stop coming");
    assert!(
        errors.is_empty(),
        "{} error replies, first {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(answered.len(), 300, "distinct requests answered");
    let duplicates: usize = answered.values().map(|n| n - 1).sum();
    assert_eq!(
        (duplicates, redelivered),
        (0, 0),
        "computed twice / redelivered"
    );
    drop(processor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_stream_and_consumer_are_brought_to_the_config_or_refused() {
    use async_nats::jetstream::{consumer, stream};
    let server = NatsServer::start_jetstream();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats.clone());
    // As an older version left them: discard `old`, ack_wait 30 s.
    let old = jetstream
        .create_stream(stream::Config {
            name: "BERT_REQUESTS".into(),
            subjects: vec!["bert.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    old.create_consumer(consumer::pull::Config {
        durable_name: Some("bert-processors".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let processor = processor(&server.url(), "jetstream", &[]);
    let log = processor.log();
    assert!(log.contains("updated the stream"), "{log}");
    assert!(log.contains("updated the consumer"), "{log}");
    let mut stream = jetstream.get_stream("BERT_REQUESTS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.discard, stream::DiscardPolicy::New);
    assert_eq!(config.max_messages, 1_000_000);
    let mut pull: consumer::PullConsumer = stream.get_consumer("bert-processors").await.unwrap();
    assert_eq!(
        pull.info().await.unwrap().config.ack_wait,
        Duration::from_secs(4)
    );
    drop(processor);

    // A setting JetStream cannot change: the processor refuses to start, naming it.
    jetstream.delete_stream("BERT_REQUESTS").await.unwrap();
    jetstream
        .create_stream(stream::Config {
            name: "BERT_REQUESTS".into(),
            subjects: vec!["bert.>".into()],
            retention: stream::RetentionPolicy::Limits,
            ..Default::default()
        })
        .await
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_processor"))
        .env("PROCESSOR_NATS__URL", server.url())
        .env("PROCESSOR_HTTP__LISTEN", "")
        .env("PROCESSOR_SERVICE__TRANSPORT", "jetstream")
        .env("PROCESSOR_MODEL__KIND", "echo")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("retention") && stderr.contains("nats stream rm BERT_REQUESTS"),
        "{stderr}"
    );
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
