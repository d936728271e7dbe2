//! A processor binary given hostile-but-valid requests and an unlucky operator's day, every
//! setting at its default: memory stays under its documented bound, health says the truth,
//! shutdown ends, every reply is counted for what it was. (The flood is in `flood.rs`, a
//! test binary of its own so that nothing else competes for the CPU while it is timed.)

mod common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::*;
use processor::config::Config;
use producer::{Client, ClientOptions};
use schemas::{decode, headers, Encoding, ErrorBody, ErrorCode, InferOptions, InferRequest, Task};
use testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_valid_fill_mask_request_succeeds_in_bounded_memory() {
    let server = NatsServer::start();
    let mut command = processor(&server.url(), "bert");
    command.env("PROCESSOR_MODEL__PATH", tiny_mlm_dir());
    let mlm = start(command);
    let idle_mib = mlm.memory_mib().0;
    let defaults = Config::default().service;
    // max_inputs inputs of max_masks_per_input masks each, max_top_k candidates per mask.
    let text = vec!["[MASK]"; defaults.max_masks_per_input].join(" ");
    let inputs = vec![text.as_str(); defaults.max_inputs];
    let request = InferRequest {
        inputs: inputs.iter().map(|&s| schemas::Input::from(s)).collect(),
        options: InferOptions {
            top_k: Some(defaults.max_top_k),
            ..InferOptions::default()
        },
        timeout_ms: None,
    };
    for encoding in [Encoding::Cbor, Encoding::Json] {
        let options = ClientOptions {
            encoding,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&server.url(), options).await.unwrap();
        let reply = client.request(Task::FillMask, &request).await.unwrap();
        assert_eq!(reply.outputs.len(), defaults.max_inputs, "{encoding:?}");
        match &reply.outputs[defaults.max_inputs - 1] {
            schemas::Output::FillMask(fill) => {
                assert_eq!(fill.masks.len(), defaults.max_masks_per_input);
                assert!(fill
                    .masks
                    .iter()
                    .all(|m| m.len() == defaults.max_top_k as usize));
            }
            other => panic!("{other:?}"),
        }
    }
    let (_, peak) = mlm.memory_mib();
    eprintln!("tiny MLM processor: idle {idle_mib:.0} MiB, peak {peak:.0} MiB over the worst fill_mask requests");
    // README "Limits and memory": the worst fill_mask request adds under 256 MiB.
    assert!(
        peak - idle_mib < 256.0,
        "idle {idle_mib:.0} MiB, peak {peak:.0} MiB"
    );

    // One over each bound is refused before any work, with the key to change.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let over_top_k = format!(
        r#"{{"inputs":["a [MASK]"],"options":{{"top_k":{}}}}}"#,
        defaults.max_top_k + 1
    );
    let over_masks = format!(
        r#"{{"inputs":["{}"]}}"#,
        vec!["[MASK]"; defaults.max_masks_per_input + 1].join(" ")
    );
    for (payload, kind, key) in [
        (over_top_k, ErrorCode::InvalidInput, "service.max_top_k"),
        (
            over_masks,
            ErrorCode::TooLarge,
            "service.max_masks_per_input",
        ),
    ] {
        let reply = nats
            .request("bert.fill_mask", payload.into())
            .await
            .unwrap();
        let body: ErrorBody = decode(Encoding::Json, &reply.payload).unwrap();
        assert_eq!(body.kind, kind, "{}", body.message);
        assert!(body.message.contains(key), "{}", body.message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_nats_connection_and_sigterm_ends_during_an_outage() {
    let mut server = NatsServer::start();
    let echo = start(processor(&server.url(), "echo"));
    let address = http_address(&echo);
    assert_eq!(http_get(&address, "/readyz").0, 200);

    server.stop();
    let started = Instant::now();
    let (status, body) = loop {
        let (status, body) = http_get(&address, "/readyz");
        if status != 200 || started.elapsed() > Duration::from_secs(10) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "/readyz during a NATS outage: {body}");
    assert!(body.contains("NATS disconnected"), "{body}");
    // Liveness holds for a short outage: restarting the pod would not bring NATS back.
    assert_eq!(http_get(&address, "/livez").0, 200);

    server.restart();
    let started = Instant::now();
    while http_get(&address, "/readyz").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not ready again after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM while NATS is down: the processor exits promptly, cleanly.
    server.stop();
    let started = Instant::now();
    while http_get(&address, "/readyz").0 == 200 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut echo = echo;
    echo.terminate();
    let status = echo.wait(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        echo.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_could_not_be_published_is_not_counted_as_ok() {
    let server = NatsServer::start();
    let echo = start(processor(&server.url(), "echo"));
    let nats = async_nats::connect(server.url()).await.unwrap();
    // A request whose reply subject nobody may publish to is still "answered" by a publish
    // that succeeds (NATS drops it); a request with no reply subject at all cannot be.
    let mut request_headers = HeaderMap::new();
    request_headers.insert(headers::CONTENT_TYPE, schemas::media_types::JSON);
    nats.publish_with_headers(
        "bert.embed",
        request_headers,
        r#"{"inputs":["nobody listens"]}"#.into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    let address = http_address(&echo);
    let started = Instant::now();
    let metrics = loop {
        let metrics = http_get(&address, "/metrics").1;
        if metric(&metrics, "bert_undeliverable_replies_total") > 0.0
            || started.elapsed() > Duration::from_secs(5)
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&metrics, "bert_undeliverable_replies_total{task=\"embed\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "bert_requests_total{task=\"embed\",outcome=\"ok\"}"
        ),
        0.0,
        "{metrics}"
    );
}
