//! The operations endpoints: `/readyz` before and after the model is ready, `/metrics` moved
//! by real traffic through a real nats-server.

use std::net::SocketAddr;
use std::time::Duration;

use processor::config::{Config, ModelKind};
use processor::Processor;
use producer::Client;
use schemas::{InferRequest, Task};
use testkit::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.0 GET: (status code, body), or `None` if nothing listens yet.
async fn get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the first sample line starting with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_model_and_metrics_count_the_traffic() {
    let server = NatsServer::start();
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = Config::default();
    config.nats.url = server.url();
    config.http.listen = address.to_string();
    config.model.kind = ModelKind::Sim;
    // The warm-up batch takes a second: the window in which the model is not ready.
    config.model.batch_ms = 1000.0;
    config.model.item_ms = 0.0;
    let starting = tokio::spawn(Processor::start(config));

    let mut seen_not_ready = None;
    while !starting.is_finished() {
        if let Some((status, body)) = get(address, "/readyz").await {
            seen_not_ready.get_or_insert((status, body));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = seen_not_ready.expect("the listener answered while the model loaded");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("model"), "{body}");
    let processor = starting.await.unwrap().unwrap();
    assert_eq!(processor.http_address(), Some(address));
    let (status, _) = get(address, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let (status, body) = get(address, "/livez").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("connected"), "{body}");

    let before = get(address, "/metrics").await.unwrap().1;
    assert_eq!(
        sample(&before, "bert_inputs_total"),
        0.0,
        "warm-up is not counted"
    );
    let processor = processor.spawn();
    let client = Client::connect(&server.url()).await.unwrap();
    for i in 0..3 {
        let request = InferRequest::new([format!("one {i}"), format!("two {i}")]);
        client.request(Task::Embed, &request).await.unwrap();
    }
    let empty = client
        .request(Task::FillMask, &InferRequest::new([""]))
        .await;
    assert!(empty.is_err());

    let (status, metrics) = get(address, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            r#"bert_requests_total{task="embed",outcome="ok"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"bert_requests_total{task="fill_mask",outcome="invalid_input"}"#
        ),
        1.0
    );
    assert_eq!(sample(&metrics, "bert_inputs_total"), 6.0);
    assert_eq!(sample(&metrics, "bert_batches_total"), 3.0);
    assert_eq!(sample(&metrics, "bert_batch_size_count"), 3.0);
    assert_eq!(sample(&metrics, "bert_queue_wait_seconds_count"), 6.0);
    assert!(
        sample(&metrics, "bert_compute_seconds_sum") >= 3.0,
        "three 1 s batches"
    );
    assert_eq!(sample(&metrics, "bert_queue_depth"), 0.0);
    assert_eq!(sample(&metrics, "bert_nats_connected"), 1.0);
    assert!(sample(&metrics, "bert_model_load_seconds") >= 1.0);
    assert!(metrics.contains(r#"bert_build_info{version="#), "{metrics}");
    processor.shutdown().await.unwrap();
}
