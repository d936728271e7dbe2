//! The producer library and CLI against real processors on a real nats-server.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use processor::config::{Config, ModelKind};
use processor::{Processor, ProcessorHandle};
use producer::{Client, ClientOptions, Error};
use schemas::{ErrorCode, InferRequest, Output, Task};
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

fn producer(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_producer"));
    command.args(["--server", url, "--timeout", "5s"]);
    command
}

/// Runs the producer CLI against `url` with `args`, checks it succeeded, and returns its
/// stdout lines parsed as JSON.
async fn producer_json_lines(url: &str, args: Vec<String>) -> Vec<serde_json::Value> {
    let url = url.to_string();
    let output = tokio::task::spawn_blocking(move || producer(&url).args(&args).output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_one_json_object_per_input_in_order() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |_| {}).await;
    let lines = producer_json_lines(
        &server.url(),
        args(&["--chunk", "2", "embed", "first", "second one", "third"]),
    )
    .await;
    assert_eq!(
        lines,
        [
            serde_json::json!({"input": "first", "text": "first"}),
            serde_json::json!({"input": "second one", "text": "second one"}),
            serde_json::json!({"input": "third", "text": "third"}),
        ]
    );
    // `input` comes first in every line.
    for line in &lines {
        assert_eq!(
            line.as_object().unwrap().keys().next().map(String::as_str),
            Some("input")
        );
    }
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_stdin_and_prints_service_errors_as_lines() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| c.service.max_input_bytes = 10).await;
    let url = server.url();
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        let mut child = producer(&url)
            .args(["--json", "fill-mask", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"a [MASK]\n\nb [MASK]\n")
            .unwrap();
        let ok = child.wait_with_output().unwrap();
        let refused = producer(&url)
            .args([
                "--chunk",
                "1",
                "embed",
                "short",
                "far longer than ten bytes",
                "tiny",
            ])
            .output()
            .unwrap();
        (ok, refused)
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8(ok.stdout).unwrap();
    let inputs: Vec<String> = stdout
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["input"].to_string())
        .collect();
    assert_eq!(inputs, [r#""a [MASK]""#, r#""b [MASK]""#]);

    // A refused input still gets its line, with the service's error, in its place among the
    // others; the exit status says that something failed.
    assert!(!refused.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(refused.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        lines[0],
        serde_json::json!({"input": "short", "text": "short"})
    );
    assert_eq!(
        lines[2],
        serde_json::json!({"input": "tiny", "text": "tiny"})
    );
    assert_eq!(lines[1]["input"], "far longer than ten bytes");
    assert_eq!(lines[1]["error"]["code"], 413);
    let message = lines[1]["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_input_bytes"), "{message}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("1 of 3 inputs failed"), "{stderr}");
    processor.shutdown().await.unwrap();
}

#[test]
fn cli_fails_clearly_without_a_server() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = producer(&format!("nats://127.0.0.1:{port}"))
        .args(["embed", "hello"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("connecting to NATS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_before_any_processor_is_retried_until_one_answers() {
    let server = NatsServer::start();
    let client = Client::connect_with(
        &server.url(),
        ClientOptions {
            retries: 8,
            backoff: Duration::from_millis(100),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let pending = tokio::spawn(async move { client.embed(&["early"]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let processor = start_processor(&server.url(), |_| {}).await;
    // Echo answers an embed with text, which the typed call refuses: proof the reply came.
    match pending.await.unwrap() {
        Err(Error::BadReply(message)) => assert!(message.contains("early"), "{message}"),
        other => panic!("expected the echoed reply, got {other:?}"),
    }
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_happened() {
    let server = NatsServer::start();
    let options = ClientOptions {
        timeout: Duration::from_millis(100),
        retries: 1,
        backoff: Duration::from_millis(1),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&server.url(), options).await.unwrap();
    let error = client
        .request(Task::Embed, &InferRequest::new(["x"]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::NoResponders { attempts: 2, .. }),
        "{error}"
    );

    let processor = start_processor(&server.url(), |c| {
        c.model.kind = ModelKind::Sim;
        c.model.batch_ms = 400.0;
    })
    .await;
    let error = client
        .request(Task::Embed, &InferRequest::new(["x"]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::TimedOut { attempts: 2, .. }),
        "{error}"
    );

    let error = client
        .request(Task::Embed, &InferRequest::new(Vec::<String>::new()))
        .await
        .unwrap_err();
    assert_eq!(
        error.service_error().map(|e| e.kind),
        Some(ErrorCode::InvalidInput)
    );
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_from_one_client_in_both_encodings() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |_| {}).await;
    for encoding in [schemas::Encoding::Cbor, schemas::Encoding::Json] {
        let options = ClientOptions {
            encoding,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&server.url(), options).await.unwrap();
        let replies = futures::future::join_all((0..200).map(|i| {
            let client = client.clone();
            async move {
                (
                    i,
                    client
                        .request(Task::FillMask, &InferRequest::new([format!("{i}")]))
                        .await,
                )
            }
        }))
        .await;
        for (i, reply) in replies {
            assert_eq!(
                reply.unwrap().outputs,
                vec![Output::Text {
                    text: i.to_string()
                }]
            );
        }
    }
    processor.shutdown().await.unwrap();
}

/// The tiny masked-LM checkpoint committed with the processor's test fixtures.
fn tiny_mlm_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../processor/tests/fixtures/tiny-bert-mlm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fill_mask_with_the_tiny_checkpoint_answers_little() {
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.model.kind = ModelKind::Bert;
        c.model.path = tiny_mlm_dir();
    })
    .await;
    let lines = producer_json_lines(
        &server.url(),
        args(&[
            "fill-mask",
            "--top-k",
            "2",
            "twinkle twinkle [MASK] star, how i wonder what you are.",
            "happy birthday to [MASK].",
        ]),
    )
    .await;
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0]["input"],
        "twinkle twinkle [MASK] star, how i wonder what you are."
    );
    assert_eq!(lines[0]["masks"][0][0]["token"], "little");
    assert_eq!(lines[0]["masks"][0].as_array().unwrap().len(), 2);
    assert_eq!(
        lines[0]["sequence"],
        "twinkle twinkle little star, how i wonder what you are."
    );
    // goldens: "happy birthday to [MASK]." → you (0.946)
    assert_eq!(lines[1]["masks"][0][0]["token"], "you");
    assert!((lines[1]["masks"][0][0]["score"].as_f64().unwrap() - 0.946).abs() < 1e-3);
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_embed_with_minilm_prints_the_golden_embeddings() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/all-MiniLM-L6-v2");
    assert!(
        model.join("model.safetensors").is_file(),
        "the all-MiniLM-L6-v2 checkpoint is not in {}: run `scripts/fetch-model` (scripts/test does)",
        model.display()
    );
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("processor/tests/fixtures/minilm_embeddings.json"))
            .unwrap(),
    )
    .unwrap();
    let items: Vec<&serde_json::Value> =
        golden["items"].as_array().unwrap().iter().take(4).collect();
    let server = NatsServer::start();
    let processor = start_processor(&server.url(), |c| {
        c.model.kind = ModelKind::Bert;
        c.model.path = model;
    })
    .await;
    let mut command = args(&["embed"]);
    command.extend(
        items
            .iter()
            .map(|i| i["text"].as_str().unwrap().to_string()),
    );
    let lines = producer_json_lines(&server.url(), command).await;
    assert_eq!(lines.len(), items.len());
    for (line, item) in lines.iter().zip(items) {
        assert_eq!(line["input"], item["text"]);
        let got = line["embedding"].as_array().unwrap();
        let want = item["embedding"].as_array().unwrap();
        assert_eq!(got.len(), 384);
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() <= 1e-4,
                "{}",
                item["text"]
            );
        }
    }
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_timeout_reply_to_an_earlier_attempt_does_not_end_a_durable_request() {
    use async_nats::jetstream::{consumer, stream};
    use futures::StreamExt;
    // The test plays the processor: it pulls the requests from the work queue itself.
    let server = NatsServer::start_jetstream();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats.clone());
    let queue = jetstream
        .create_stream(stream::Config {
            name: "BERT_REQUESTS".into(),
            subjects: vec!["bert.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let pull: consumer::PullConsumer = queue
        .create_consumer(consumer::pull::Config {
            durable_name: Some("test".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let options = ClientOptions {
        transport: producer::Transport::Jetstream,
        timeout: Duration::from_millis(800),
        retries: 2,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&server.url(), options).await.unwrap();
    let request = tokio::spawn(async move {
        client
            .request(Task::Embed, &InferRequest::new(["late"]))
            .await
    });
    let next = || async {
        let batch = pull.batch().max_messages(1).expires(Duration::from_secs(5));
        let message = batch
            .messages()
            .await
            .unwrap()
            .next()
            .await
            .unwrap()
            .unwrap();
        message.ack().await.unwrap();
        message
    };
    let first = next().await;
    // No reply within the attempt's 800 ms: the producer sends the request again.
    let second = next().await;
    let id = |m: &async_nats::jetstream::Message| {
        m.headers
            .as_ref()
            .unwrap()
            .get("Nats-Msg-Id")
            .unwrap()
            .to_string()
    };
    assert_ne!(
        id(&first),
        id(&second),
        "a new attempt has a new message id"
    );
    let inbox = second
        .headers
        .as_ref()
        .unwrap()
        .get("Reply-Inbox")
        .unwrap()
        .to_string();
    // The first attempt's deadline ran out: its `timeout` reply comes late, then the answer
    // to the second attempt.
    let mut late = async_nats::HeaderMap::new();
    late.insert("Content-Type", "application/json");
    late.insert("Nats-Service-Error", "timeout");
    late.insert("Nats-Service-Error-Code", "504");
    let body = schemas::ErrorBody::new(ErrorCode::Timeout, "deadline passed");
    nats.publish_with_headers(
        inbox.clone(),
        late,
        serde_json::to_vec(&body).unwrap().into(),
    )
    .await
    .unwrap();
    let mut ok = async_nats::HeaderMap::new();
    ok.insert("Content-Type", "application/json");
    let reply = schemas::InferReply {
        outputs: vec![Output::Text {
            text: "late".into(),
        }],
        model: "test".into(),
        batch_size: 1,
    };
    nats.publish_with_headers(inbox, ok, serde_json::to_vec(&reply).unwrap().into())
        .await
        .unwrap();
    let answer = request
        .await
        .unwrap()
        .expect("the second attempt's answer is taken");
    assert_eq!(answer.outputs, reply.outputs);
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../processor/tests/fixtures")
        .join(name)
}

/// A processor serving a tiny checkpoint of the repo's fixtures on `prefix`.
async fn start_bert(url: &str, checkpoint: &str, prefix: &str) -> ProcessorHandle {
    let (checkpoint, prefix) = (fixture(checkpoint), prefix.to_string());
    start_processor(url, move |config| {
        config.model.kind = ModelKind::Bert;
        config.model.path = checkpoint;
        config.service.name = format!("{prefix}-processor");
        config.service.subject_prefix = prefix;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_and_classify_through_nats_equal_the_model_called_directly() {
    use processor::model::bert::BertModel;
    use processor::model::{cpu_device, BatchModel};
    use schemas::{InferOptions, Input, Priority};

    let server = NatsServer::start();
    let rank = start_bert(&server.url(), "tiny-xlm-roberta-rerank", "rank").await;
    let cls = start_bert(&server.url(), "tiny-bert-classify", "cls").await;
    let passages = [
        "Paris is the capital of France.",
        "Bananas are yellow.",
        "東京は日本の首都です",
    ];
    let query = "what is the capital of france";

    let mut direct = BertModel::load(&fixture("tiny-xlm-roberta-rerank"), &cpu_device()).unwrap();
    let bulk_passages = ["Berlin is in Germany.", "A passage sent as bulk work."];
    // Interactive, then bulk (other passages: computed in the bulk lane), then the first
    // passages again (answered from the cache).
    let rounds = [
        (Priority::Interactive, &passages[..]),
        (Priority::Bulk, &bulk_passages[..]),
        (Priority::Interactive, &passages[..]),
    ];
    for (priority, passages) in rounds {
        let pairs: Vec<Input> = passages.iter().map(|&p| Input::from((query, p))).collect();
        let expected = direct.run_inputs(Task::Rerank, &pairs, &InferOptions::default());
        let options = ClientOptions {
            prefix: "rank".into(),
            priority,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&server.url(), options).await.unwrap();
        let scores = client.rerank(query, passages).await.unwrap();
        assert_eq!(scores.len(), passages.len());
        for (got, expected) in scores.iter().zip(&expected) {
            let Ok(Output::Score { score, raw_score }) = expected else {
                panic!("{expected:?}")
            };
            assert!(
                (got.raw_score - raw_score).abs() <= 1e-5,
                "{got:?} vs {raw_score}"
            );
            assert!((got.score - score).abs() <= 1e-5);
            assert!(got.score > 0.0 && got.score < 1.0);
        }
    }
    // The third round was answered from the cache: the same scores, and counted.
    let stats: serde_json::Value = {
        let client = async_nats::connect(server.url()).await.unwrap();
        let reply = client
            .request("$SRV.STATS.rank-processor", "".into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    };
    let caches: Vec<&serde_json::Value> = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject"] == "rank.rerank")
        .map(|e| &e["data"]["cache"])
        .collect();
    assert!(
        caches.iter().any(|c| c["hits"].as_u64() >= Some(3)),
        "{caches:?}"
    );

    // A pair sent to classify, a text sent to rerank: 400 invalid_input; rerank on a
    // classifier: 422 unsupported_task.
    let client = Client::connect_with(
        &server.url(),
        ClientOptions {
            prefix: "cls".into(),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let labels = client
        .classify(&["a lovely day", "a terrible day"], Some(2))
        .await
        .unwrap();
    assert!(labels
        .iter()
        .all(|l| l.len() == 2 && l[0].score >= l[1].score));
    let mut direct = BertModel::load(&fixture("tiny-bert-classify"), &cpu_device()).unwrap();
    let expected = direct.run_texts(Task::Classify, &["a lovely day"], &InferOptions::default());
    let Ok(Output::Labels { labels: all }) = &expected[0] else {
        panic!("{expected:?}")
    };
    assert_eq!(labels[0][0].label, all[0].label);
    assert!((labels[0][0].score - all[0].score).abs() <= 1e-5);
    let error = client
        .request(Task::Rerank, &InferRequest::new([("q", "p")]))
        .await
        .unwrap_err();
    assert_eq!(
        error.service_error().unwrap().kind,
        ErrorCode::UnsupportedTask
    );
    let error = client
        .request(Task::Classify, &InferRequest::new([("q", "p")]))
        .await
        .unwrap_err();
    assert_eq!(error.service_error().unwrap().kind, ErrorCode::InvalidInput);

    // The CLI: one line per passage, the pair as the input.
    let lines = producer_json_lines(
        &server.url(),
        args(&[
            "--prefix",
            "rank",
            "--priority",
            "bulk",
            "rerank",
            "--query",
            query,
            passages[0],
            passages[1],
        ]),
    )
    .await;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["input"], serde_json::json!([query, passages[0]]));
    assert!(lines[0]["score"].as_f64().unwrap() > 0.0);
    let lines = producer_json_lines(
        &server.url(),
        args(&[
            "--prefix",
            "cls",
            "classify",
            "--top-k",
            "1",
            "a lovely day",
        ]),
    )
    .await;
    assert_eq!(
        lines[0]["labels"][0]["label"],
        serde_json::json!(&*all[0].label)
    );
    rank.shutdown().await.unwrap();
    cls.shutdown().await.unwrap();
}
