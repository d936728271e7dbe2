//! End-to-end tests through a real nats-server: processors in this process, requests from the
//! producer library and from a plain NATS client that knows only PROTOCOL.md.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use processor::config::{Config, ModelKind};
use processor::{Processor, ProcessorHandle};
use producer::{Client, ClientOptions};
use schemas::{decode, headers, Encoding, ErrorBody, ErrorCode, InferRequest, Output, Task};
use testkit::NatsServer;

async fn start_processor(url: &str, tweak: impl FnOnce(&mut Config)) -> ProcessorHandle {
    let mut config = Config::default();
    config.http.listen = "127.0.0.1:0".into();
    config.nats.url = url.to_string();
    config.model.kind = ModelKind::Echo;
    tweak(&mut config);
    Processor::start(config)
        .await
        .expect("processor starts")
        .spawn()
}

/// Every `$SRV.STATS` answer for the service within half a second (one per processor).
async fn service_stats(nats: &async_nats::Client, service: &str) -> Vec<serde_json::Value> {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply(format!("$SRV.STATS.{service}"), inbox, "".into())
        .await
        .unwrap();
    let mut stats = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), replies.next()).await
    {
        stats.push(serde_json::from_slice(&message.payload).unwrap());
    }
    stats
}

fn endpoint_requests(stats: &serde_json::Value, name: &str) -> u64 {
    stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in {stats}"))["num_requests"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_answer_2000_concurrent_requests_each_with_its_own_reply() {
    let server = NatsServer::start();
    let first = start_processor(&server.url(), |_| {}).await;
    let second = start_processor(&server.url(), |_| {}).await;
    let client = Client::connect(&server.url()).await.unwrap();

    let requests = (0..2000u32).map(|i| {
        let client = client.clone();
        async move {
            // Every tenth request carries two inputs, and tasks alternate.
            let inputs: Vec<String> = if i % 10 == 0 {
                vec![format!("req {i} a"), format!("req {i} b")]
            } else {
                vec![format!("req {i}")]
            };
            let task = if i.is_multiple_of(2) {
                Task::Embed
            } else {
                Task::FillMask
            };
            let reply = client
                .request(task, &InferRequest::new(inputs.clone()))
                .await;
            (inputs, reply)
        }
    });
    let results = futures::future::join_all(requests).await;

    let mut largest_batch = 0;
    for (inputs, reply) in results {
        let reply = reply.unwrap_or_else(|e| panic!("request {inputs:?} failed: {e}"));
        let echoed: Vec<String> = reply
            .outputs
            .iter()
            .map(|o| match o {
                Output::Text { text } => text.clone(),
                other => panic!("unexpected output {other:?}"),
            })
            .collect();
        assert_eq!(echoed, inputs);
        assert_eq!(reply.model, "echo");
        largest_batch = largest_batch.max(reply.batch_size);
    }
    assert!(largest_batch > 1, "no request was batched with another");

    let nats = async_nats::connect(server.url()).await.unwrap();
    let stats = service_stats(&nats, "bert-processor").await;
    assert_eq!(
        stats.len(),
        2,
        "both processors answer $SRV.STATS: {stats:?}"
    );
    let mut total = 0;
    for instance in &stats {
        let served =
            endpoint_requests(instance, "embed") + endpoint_requests(instance, "fill_mask");
        assert!(served > 0, "a processor answered nothing: {instance}");
        // The catch-all endpoint saw every request too but answered none of them.
        assert_eq!(endpoint_requests(instance, "unknown_task"), 0);
        assert!(
            instance["endpoints"][0]["data"]["mean_batch_size"]
                .as_f64()
                .unwrap()
                >= 1.0
        );
        total += served;
    }
    assert_eq!(total, 2000, "each request answered exactly once");

    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// A request from a bare NATS client: subject, payload bytes, optional headers.
async fn raw_request(
    nats: &async_nats::Client,
    subject: &str,
    payload: &'static [u8],
    content_type: Option<&str>,
) -> async_nats::Message {
    let mut request_headers = HeaderMap::new();
    if let Some(content_type) = content_type {
        request_headers.insert(headers::CONTENT_TYPE, content_type);
    }
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(request_headers)
        .timeout(Some(Duration::from_secs(5)));
    nats.send_request(subject.to_string(), request)
        .await
        .unwrap()
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_reply_and_the_next_request_is_answered() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.service.max_inputs = 3;
        c.service.max_input_bytes = 16;
    })
    .await;
    let nats = async_nats::connect(server.url()).await.unwrap();

    // (subject, payload, Content-Type header, expected kind, expected code, reply encoding)
    type Case = (
        &'static str,
        &'static [u8],
        Option<&'static str>,
        ErrorCode,
        u16,
        Encoding,
    );
    #[rustfmt::skip]
    let cases: [Case; 10] = [
        ("bert.embed", b"\x00\xffnot cbor", None, ErrorCode::MalformedRequest, 400, Encoding::Cbor),
        ("bert.embed", br#"{"inputs": ["unterminated"#, None, ErrorCode::MalformedRequest, 400, Encoding::Json),
        ("bert.embed", br#"{"inputs": 5}"#, None, ErrorCode::MalformedRequest, 400, Encoding::Json),
        ("bert.embed", br#"{"inputs": [1, 2]}"#, Some("application/json"), ErrorCode::MalformedRequest, 400, Encoding::Json),
        ("bert.fill_mask", br#"{"inputs": []}"#, None, ErrorCode::InvalidInput, 400, Encoding::Json),
        ("bert.embed", br#"{"inputs": ["ok", ""]}"#, None, ErrorCode::InvalidInput, 400, Encoding::Json),
        ("bert.embed", br#"{"inputs": ["a", "b", "c", "d"]}"#, None, ErrorCode::TooLarge, 413, Encoding::Json),
        ("bert.translate", br#"{"inputs": ["hello"]}"#, None, ErrorCode::UnknownTask, 404, Encoding::Json),
        ("bert.embed", br#"{"inputs": ["x"], "timeout_ms": "soon"}"#, None, ErrorCode::MalformedRequest, 400, Encoding::Json),
        ("bert.embed", br#"{"inputs": ["x"], "timeout_ms": 0}"#, None, ErrorCode::Timeout, 504, Encoding::Json),
    ];
    for (subject, payload, content_type, kind, code, encoding) in cases {
        let what = format!("{subject} {:?}", String::from_utf8_lossy(payload));
        let reply = raw_request(&nats, subject, payload, content_type).await;
        assert_eq!(
            header(&reply, headers::SERVICE_ERROR_CODE),
            Some(code.to_string().as_str()),
            "{what}"
        );
        let description = header(&reply, headers::SERVICE_ERROR).unwrap_or_default();
        assert!(!description.is_empty(), "{what}: no Nats-Service-Error");
        let body: ErrorBody = decode(encoding, &reply.payload)
            .unwrap_or_else(|e| panic!("{what}: error body does not decode: {e}"));
        assert_eq!(
            (body.kind, body.code),
            (kind, code),
            "{what}: {}",
            body.message
        );
        assert_eq!(body.message, description, "{what}");

        // The processor is still serving, in the same encoding.
        let ok = raw_request(&nats, "bert.embed", b"{\"inputs\": [\"still here\"]}", None).await;
        assert!(
            header(&ok, headers::SERVICE_ERROR_CODE).is_none(),
            "{what}: next request failed"
        );
        let json: serde_json::Value = serde_json::from_slice(&ok.payload).unwrap();
        assert_eq!(json["outputs"][0]["text"], "still here");
    }
    // `$SRV.STATS` counts every reply on the endpoint that took the request, error replies
    // as errors too, with the last one's message and code.
    let stats = service_stats(&nats, "bert-processor").await;
    assert_eq!(stats.len(), 1, "{stats:?}");
    let endpoint = |name: &str| {
        stats[0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no endpoint {name} in {stats:?}"))
            .clone()
    };
    let counts = |name: &str| {
        let e = endpoint(name);
        (e["num_requests"].as_u64(), e["num_errors"].as_u64())
    };
    // 8 bad embed requests, each followed by a good one; 1 bad fill_mask; 1 unknown task.
    assert_eq!(counts("embed"), (Some(18), Some(8)));
    assert_eq!(counts("fill_mask"), (Some(1), Some(1)));
    assert_eq!(counts("unknown_task"), (Some(1), Some(1)));
    let unknown = endpoint("unknown_task");
    let last_error = unknown["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.starts_with("404:") && last_error.contains("`translate`"),
        "{unknown}"
    );
    assert!(endpoint("embed")["processing_time"].as_u64().unwrap() > 0);
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_nats_client_can_use_the_json_protocol() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |_| {}).await;
    // Nothing from our crates on this side: subject, JSON text, and the reply as JSON.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let reply = nats
        .request(
            "bert.fill_mask",
            r#"{"inputs": ["twinkle twinkle [MASK] star.", "hello"], "options": {"top_k": 3}}"#
                .into(),
        )
        .await
        .unwrap();
    assert_eq!(header(&reply, "Content-Type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(json["model"], "echo");
    assert_eq!(json["outputs"][0]["text"], "twinkle twinkle [MASK] star.");
    assert_eq!(json["outputs"][1]["text"], "hello");
    assert!(json["batch_size"].as_u64().unwrap() >= 2);
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_is_discoverable_with_one_endpoint_per_task() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.service.subject_prefix = "nlp.v1".into();
        c.service.queue_group = "gpu-pool".into();
    })
    .await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let ping = nats
        .request("$SRV.PING.bert-processor", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "bert-processor");
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    // Addressed to every service, or to this instance by its id: the same instance answers.
    let id = ping["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 22, "{ping}");
    for subject in [
        "$SRV.PING".to_string(),
        format!("$SRV.STATS.bert-processor.{id}"),
    ] {
        let answer = nats.request(subject.clone(), "".into()).await.unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        assert_eq!(answer["id"], id.as_str(), "{subject}: {answer}");
    }

    let info = nats
        .request("$SRV.INFO.bert-processor", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["metadata"]["model"], "echo");
    let endpoints: HashSet<(String, String)> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subject"].as_str().unwrap().to_string(),
                e["queue_group"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for task in ["embed", "fill_mask"] {
        assert!(
            endpoints.contains(&(format!("nlp.v1.{task}"), "gpu-pool".to_string())),
            "{endpoints:?}"
        );
    }
    let client = Client::connect_with(
        &server.url(),
        ClientOptions {
            prefix: "nlp.v1".into(),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let reply = client
        .request(Task::Embed, &InferRequest::new(["x"]))
        .await
        .unwrap();
    assert_eq!(reply.outputs, vec![Output::Text { text: "x".into() }]);
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_request_already_taken() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.model.kind = ModelKind::Sim;
        c.model.batch_ms = 150.0;
        c.model.item_ms = 0.0;
        c.batch.max_size = 4;
    })
    .await;
    let client = Client::connect(&server.url()).await.unwrap();
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .request(Task::Embed, &InferRequest::new([format!("{i}")]))
                    .await
            })
        })
        .collect();
    // Let the requests reach the processor (the first batch is computing), then stop it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    processor.shutdown().await.unwrap();
    for request in requests {
        let reply = request
            .await
            .unwrap()
            .expect("answered before the processor exited");
        assert_eq!(reply.model, "sim");
    }
}

/// What a flood request is, and so which reply it must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// One or two good inputs: echoed back, or refused as overloaded (503).
    Good,
    /// Not CBOR or JSON: 400 `malformed_request`.
    Malformed,
    /// `inputs: []`: 400 `invalid_input`.
    Empty,
    /// A subject that names no task: 404 `unknown_task`.
    UnknownTask,
    /// `Request-Timeout-Ms: 0`: 504 `timeout`, never computed.
    Expired,
}

impl Kind {
    fn of(i: usize) -> Kind {
        match i % 25 {
            3 => Kind::Malformed,
            7 => Kind::Empty,
            11 => Kind::UnknownTask,
            17 => Kind::Expired,
            _ => Kind::Good,
        }
    }
}

/// Publishes `n` requests of every kind as fast as possible to two processors, each with its
/// own reply subject, and checks that each gets exactly one reply, and the right one.
async fn flood(model: ModelKind, n: usize, queue_capacity: usize) -> (usize, usize) {
    let server = NatsServer::start();
    let tweak = |c: &mut Config| {
        c.model.kind = model;
        c.model.batch_ms = 2.0;
        c.model.item_ms = 0.05;
        c.batch.max_size = 16;
        c.batch.queue_capacity = queue_capacity;
        c.service.max_inputs = 16;
    };
    let first = start_processor(&server.url(), tweak).await;
    let second = start_processor(&server.url(), tweak).await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut replies = nats.subscribe("flood.>").await.unwrap();
    nats.flush().await.unwrap();

    for i in 0..n {
        let kind = Kind::of(i);
        let mut request_headers = HeaderMap::new();
        request_headers.insert(headers::CONTENT_TYPE, schemas::media_types::JSON);
        let mut subject = "bert.embed".to_string();
        let payload: Vec<u8> = match kind {
            Kind::Good if i.is_multiple_of(2) => format!(r#"{{"inputs":["r{i}"]}}"#).into(),
            Kind::Good => format!(r#"{{"inputs":["r{i}","r{i}b"]}}"#).into(),
            Kind::Malformed => b"{not json".to_vec(),
            Kind::Empty => br#"{"inputs":[]}"#.to_vec(),
            Kind::UnknownTask => {
                subject = "bert.summarise".into();
                format!(r#"{{"inputs":["r{i}"]}}"#).into()
            }
            Kind::Expired => {
                request_headers.insert(headers::REQUEST_TIMEOUT_MS, "0");
                format!(r#"{{"inputs":["r{i}"]}}"#).into()
            }
        };
        nats.publish_with_reply_and_headers(
            subject,
            format!("flood.{i}"),
            request_headers,
            payload.into(),
        )
        .await
        .unwrap();
    }
    nats.flush().await.unwrap();

    let mut seen = vec![0u32; n];
    let (mut ok, mut overloaded) = (0, 0);
    let mut timed_out = 0u64;
    // Everything should be answered; then wait a little longer for any duplicate.
    let mut answered = 0;
    while answered < n {
        let message = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .unwrap_or_else(|_| panic!("only {answered} of {n} requests were answered"))
            .unwrap();
        let i: usize = message.subject.rsplit('.').next().unwrap().parse().unwrap();
        seen[i] += 1;
        answered += 1;
        let kind = Kind::of(i);
        let code = header(&message, headers::SERVICE_ERROR_CODE);
        match code {
            None => {
                assert_eq!(kind, Kind::Good, "request {i} should have failed");
                let reply: schemas::InferReply = decode(Encoding::Json, &message.payload).unwrap();
                let expected: Vec<Output> = if i.is_multiple_of(2) {
                    vec![Output::Text {
                        text: format!("r{i}"),
                    }]
                } else {
                    vec![
                        Output::Text {
                            text: format!("r{i}"),
                        },
                        Output::Text {
                            text: format!("r{i}b"),
                        },
                    ]
                };
                assert_eq!(reply.outputs, expected, "request {i} got another's outputs");
                ok += 1;
            }
            Some(code) => {
                let body: ErrorBody = decode(Encoding::Json, &message.payload).unwrap();
                assert_eq!(code, body.code.to_string(), "header and body agree");
                let expected = match kind {
                    Kind::Good => ErrorCode::Overloaded,
                    Kind::Malformed => ErrorCode::MalformedRequest,
                    Kind::Empty => ErrorCode::InvalidInput,
                    Kind::UnknownTask => ErrorCode::UnknownTask,
                    Kind::Expired => ErrorCode::Timeout,
                };
                // While the queue refuses work, the processor answers every request on a
                // task subject with 503 before decoding it, bad ones included.
                if body.kind == ErrorCode::Overloaded && kind != Kind::UnknownTask {
                    overloaded += 1;
                    continue;
                }
                assert_eq!(
                    body.kind, expected,
                    "request {i} ({kind:?}): {}",
                    body.message
                );
                assert_eq!(body.code, expected.status());
                if body.kind == ErrorCode::Timeout {
                    timed_out += 1;
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(50), replies.next()).await
    {
        let i: usize = message.subject.rsplit('.').next().unwrap().parse().unwrap();
        seen[i] += 1;
    }
    let duplicated: Vec<usize> = (0..n).filter(|&i| seen[i] != 1).collect();
    assert!(
        duplicated.is_empty(),
        "answered more than once: {duplicated:?}"
    );

    // The processors counted what they did: every computed or refused request is in STATS.
    let stats = service_stats(&nats, "bert-processor").await;
    assert_eq!(stats.len(), 2);
    let total = |key: &str| -> u64 {
        stats
            .iter()
            .map(|s| s["endpoints"][0]["data"][key].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(total("expired"), timed_out);
    let refused =
        total("rejected_overloaded") + total("rejected_queue_wait") + total("shed_before_decoding");
    assert_eq!(refused, overloaded as u64);
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    (ok, overloaded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_under_a_flood_answers_every_request_once_with_the_right_code() {
    let (ok, overloaded) = flood(ModelKind::Echo, 3000, 4096).await;
    assert_eq!(overloaded, 0, "the queue was large enough");
    assert_eq!(ok, (0..3000).filter(|&i| Kind::of(i) == Kind::Good).count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_under_a_flood_answers_every_request_once_and_sheds_load_as_overloaded() {
    // Two slow processors with room for 32 inputs each: most of 3000 requests sent at once
    // are refused with 503, every other one is computed, and none is lost.
    let (ok, overloaded) = flood(ModelKind::Sim, 3000, 32).await;
    assert!(overloaded > 0, "a 32-input queue must overflow");
    assert!(ok > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_sends_its_timeout_so_abandoned_requests_are_not_computed() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.model.kind = ModelKind::Sim;
        c.model.batch_ms = 400.0;
        c.batch.max_size = 1;
    })
    .await;
    let patient = Client::connect(&server.url()).await.unwrap();
    let hasty = Client::connect_with(
        &server.url(),
        ClientOptions {
            timeout: Duration::from_millis(100),
            retries: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    // The first request holds the only worker for 400 ms; the hasty ones give up at 100 ms.
    let first = tokio::spawn(async move {
        patient
            .request(Task::Embed, &InferRequest::new(["first"]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let hasty_requests = (0..3).map(|i| {
        let hasty = hasty.clone();
        async move {
            hasty
                .request(Task::Embed, &InferRequest::new([format!("hasty {i}")]))
                .await
        }
    });
    for result in futures::future::join_all(hasty_requests).await {
        assert!(
            matches!(result, Err(producer::Error::TimedOut { .. })),
            "{result:?}"
        );
    }
    assert!(first.await.unwrap().is_ok());
    let nats = async_nats::connect(server.url()).await.unwrap();
    let stats = service_stats(&nats, "bert-processor").await;
    let data = &stats[0]["endpoints"][0]["data"];
    assert_eq!(data["expired"], 3, "{data}");
    assert_eq!(
        data["inputs"], 1,
        "only the patient request was computed: {data}"
    );
    processor.shutdown().await.unwrap();
}
