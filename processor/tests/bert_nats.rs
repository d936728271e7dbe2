//! The BERT model served through a real nats-server: the golden answers come back through the
//! producer library, batched with other requests.

mod common;

use std::time::Duration;

use common::*;
use processor::config::{Config, ModelKind};
use processor::{Processor, ProcessorHandle};
use producer::{Client, ClientOptions};
use schemas::{ErrorCode, InferRequest, Task};
use testkit::NatsServer;

async fn start_bert(url: &str, path: std::path::PathBuf, prefix: &str) -> ProcessorHandle {
    let mut config = Config::default();
    config.http.listen = "127.0.0.1:0".into();
    config.nats.url = url.to_string();
    config.model.kind = ModelKind::Bert;
    config.model.path = path;
    config.service.subject_prefix = prefix.to_string();
    config.batch.max_latency_ms = 20;
    Processor::start(config)
        .await
        .expect("processor starts")
        .spawn()
}

async fn client(url: &str, prefix: &str) -> Client {
    let options = ClientOptions {
        prefix: prefix.to_string(),
        timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    Client::connect_with(url, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_through_nats_equal_the_golden_ones() {
    let server = NatsServer::start();
    let processor = start_bert(&server.url(), minilm_dir(), "bert").await;
    let client = client(&server.url(), "bert").await;
    let golden = golden("minilm_embeddings.json");
    let items = golden["items"].as_array().unwrap();
    // One request per sentence, all in flight at once, so they share batches.
    let replies = futures::future::join_all(items.iter().map(|item| {
        let client = client.clone();
        let text = item["text"].as_str().unwrap().to_string();
        async move { client.embed(&[&text]).await }
    }))
    .await;
    for (item, reply) in items.iter().zip(replies) {
        let got = reply.unwrap().remove(0);
        let diff = max_abs_diff(&got, &floats(&item["embedding"]));
        assert!(diff <= 1e-4, "{}: differs by {diff}", item["text"]);
    }
    // MiniLM has no MLM head: fill_mask is refused with a reason, the processor keeps serving.
    let error = client.fill_mask(&["a [MASK]."]).await.unwrap_err();
    let body = error.service_error().expect("an error reply");
    assert_eq!((body.kind, body.code), (ErrorCode::UnsupportedTask, 422));
    assert!(body.message.contains("masked-LM head"), "{}", body.message);
    // Too long for the model (256 tokens) without truncate: a clear error; with it: served.
    let long = "word ".repeat(400);
    let error = client.embed(&[&long]).await.unwrap_err();
    assert!(
        error.service_error().unwrap().message.contains("truncate"),
        "{error}"
    );
    let mut request = InferRequest::new([long]);
    request.options.truncate = Some(true);
    assert!(client.request(Task::Embed, &request).await.is_ok());
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_mask_through_nats_equals_the_golden_answers() {
    let server = NatsServer::start();
    let processor = start_bert(&server.url(), tiny_mlm_dir(), "tiny").await;
    let client = client(&server.url(), "tiny").await;
    let golden = golden("tiny_mlm_fill_mask.json");
    let items = golden["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let outputs = client.fill_mask(&texts).await.unwrap();
    for (item, output) in items.iter().zip(outputs) {
        for (got, expected) in output.masks.iter().zip(item["masks"].as_array().unwrap()) {
            for (p, e) in got.iter().zip(expected["top5"].as_array().unwrap()) {
                assert_eq!(
                    &*p.token,
                    e["token_str"].as_str().unwrap(),
                    "{}",
                    item["text"]
                );
                assert!((p.score - e["score"].as_f64().unwrap() as f32).abs() <= 1e-4);
            }
        }
    }
    let rhyme = client
        .fill_mask(&["twinkle twinkle [MASK] star, how i wonder what you are."])
        .await
        .unwrap();
    assert_eq!(&*rhyme[0].masks[0][0].token, "little");
    let error = client.fill_mask(&["no mask at all"]).await.unwrap_err();
    assert_eq!(
        error.service_error().map(|b| b.kind),
        Some(ErrorCode::InvalidInput)
    );
    processor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_embed_request_is_answered_in_json_and_cbor_despite_max_payload() {
    let server = NatsServer::start();
    let processor = start_bert(&server.url(), minilm_dir(), "bert").await;
    let max_inputs = Config::default().service.max_inputs;
    let texts: Vec<String> = (0..max_inputs)
        .map(|i| format!("sentence number {i} of the largest request a client may send"))
        .collect();

    // 256 embeddings as JSON are over the server's 1 MiB: a plain client is told how many fit.
    let nats = async_nats::connect(server.url()).await.unwrap();
    let payload = serde_json::to_vec(&serde_json::json!({ "inputs": texts })).unwrap();
    let request = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(Duration::from_secs(60)));
    let reply = nats
        .send_request("bert.embed".to_string(), request)
        .await
        .unwrap();
    let body: schemas::ErrorBody = schemas::decode(schemas::Encoding::Json, &reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)));
    assert_eq!(
        (body.kind, body.code),
        (ErrorCode::TooLarge, 413),
        "{}",
        body.message
    );
    let fit = body.max_inputs.expect("how many inputs fit") as usize;
    assert!((100..max_inputs).contains(&fit), "{fit}: {}", body.message);
    assert!(body.message.contains("max_payload"), "{}", body.message);

    // The producer splits by that hint, in JSON; in CBOR the whole reply fits.
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for encoding in [schemas::Encoding::Json, schemas::Encoding::Cbor] {
        let options = ClientOptions {
            encoding,
            timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&server.url(), options).await.unwrap();
        let embeddings = client.embed(&refs).await.unwrap();
        assert_eq!(embeddings.len(), max_inputs, "{encoding:?}");
        assert!(embeddings.iter().all(|e| e.len() == 384));
        let alone = client.embed(&[refs[200]]).await.unwrap().remove(0);
        assert!(
            max_abs_diff(&alone, &embeddings[200]) <= 1e-4,
            "outputs stay in input order"
        );
    }
    processor.shutdown().await.unwrap();
}
