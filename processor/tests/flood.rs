//! A flood far past capacity against a processor binary with every setting at its default,
//! from a client that needs each reply within a second and says so (`Request-Timeout-Ms:
//! 900`, as the producer sends its timeout): every request is answered (ok or 503) within that second,
//! nothing is dropped, memory stays under its documented ceiling, and afterwards requests are
//! served at normal latency. A test binary of its own,
//! so that no other test competes for the CPU while latency is measured.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use processor::config::Config;
use producer::Client;
use schemas::headers;
use testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_twenty_times_capacity_is_answered_within_a_second_in_bounded_memory() {
    let server = NatsServer::start();
    let sim = start(processor(&server.url(), "sim"));
    // What one default sim processor computes per second: full batches back to back.
    let defaults = Config::default();
    let batch = defaults.batch.max_size as f64;
    let batch_seconds = (defaults.model.batch_ms + defaults.model.item_ms * batch) / 1000.0;
    let capacity = batch / batch_seconds;
    let rate = 21.0 * capacity;
    let flood_for = Duration::from_secs(3);

    let nats = async_nats::connect(server.url()).await.unwrap();
    let mut replies = nats.subscribe("flood.>").await.unwrap();
    nats.flush().await.unwrap();
    let sent_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let publisher = {
        let (nats, sent_at) = (nats.clone(), sent_at.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut sent = 0usize;
            while started.elapsed() < flood_for {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * rate) as usize;
                while sent < due {
                    let payload = format!(r#"{{"inputs":["flood {sent}"]}}"#);
                    // A client that needs its reply within one second, and tells the
                    // service so: 900 ms, keeping 100 ms for the trip there and back
                    // (which on this flooded machine includes NATS' buffers).
                    let mut request_headers = async_nats::HeaderMap::new();
                    request_headers.insert(headers::REQUEST_TIMEOUT_MS, "900");
                    sent_at.lock().unwrap().push(Instant::now());
                    nats.publish_with_reply_and_headers(
                        "bert.embed",
                        format!("flood.{sent}"),
                        request_headers,
                        payload.into(),
                    )
                    .await
                    .unwrap();
                    sent += 1;
                }
            }
            nats.flush().await.unwrap();
            (sent, started.elapsed())
        })
    };

    let mut latency = Vec::new();
    let (mut ok, mut overloaded, mut duplicates) = (0usize, 0usize, 0usize);
    let mut other: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut peak_mib: f64 = 0.0;
    let mut last_sample = Instant::now();
    let (sent, took) = loop {
        let next = tokio::time::timeout(Duration::from_secs(2), replies.next()).await;
        if last_sample.elapsed() > Duration::from_millis(200) {
            peak_mib = peak_mib.max(sim.memory_mib().1);
            last_sample = Instant::now();
        }
        let Ok(Some(message)) = next else {
            assert!(
                publisher.is_finished(),
                "replies stopped for 2 s during the flood"
            );
            break publisher.await.unwrap();
        };
        let i: usize = message.subject.rsplit('.').next().unwrap().parse().unwrap();
        latency.push(sent_at.lock().unwrap()[i].elapsed());
        if !seen.insert(i) {
            duplicates += 1;
        }
        match message
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::SERVICE_ERROR_CODE))
        {
            None => ok += 1,
            Some(code) if code.as_str() == "503" => overloaded += 1,
            Some(_) => other.push(String::from_utf8_lossy(&message.payload).to_string()),
        }
    };
    let offered = sent as f64 / took.as_secs_f64();
    latency.sort();
    let worst = latency.last().copied().unwrap_or_default();
    let p99 = latency
        .get(latency.len() * 99 / 100)
        .copied()
        .unwrap_or_default();
    let (_, peak) = sim.memory_mib();
    peak_mib = peak_mib.max(peak);
    eprintln!(
        "offered {offered:.0}/s to a processor computing {capacity:.0}/s ({:.1}x) for {took:?}: \
         {sent} sent, {ok} ok, {overloaded} overloaded, p99 reply after {p99:?}, worst {worst:?}, peak RSS {peak_mib:.0} MiB",
        offered / capacity
    );
    assert!(
        offered >= 20.0 * capacity,
        "the flood was only {offered:.0}/s"
    );
    assert_eq!(duplicates, 0);
    assert!(
        other.is_empty(),
        "only overload may fail a valid request: {} others, e.g. {:?}",
        other.len(),
        other.first()
    );
    assert_eq!(
        seen.len(),
        sent,
        "every request gets a reply: {} of {sent}",
        seen.len()
    );
    assert!(
        ok as f64 >= 0.5 * capacity * took.as_secs_f64(),
        "the processor kept computing: {ok} ok"
    );
    assert!(overloaded > 0);
    assert!(
        worst < Duration::from_secs(1),
        "a reply came {worst:?} after its request"
    );
    // README "Limits and memory": a sim processor stays under 128 MiB whatever the flood.
    assert!(peak_mib < 128.0, "peak RSS {peak_mib:.0} MiB");
    let metrics = http_get(&http_address(&sim), "/metrics").1;
    assert_eq!(
        metric(&metrics, "bert_dropped_requests_total"),
        0.0,
        "{metrics}"
    );

    // After the flood, a request is answered at normal latency.
    let client = Client::connect(&server.url()).await.unwrap();
    let request = schemas::InferRequest::new(["after the flood"]);
    let started = Instant::now();
    client
        .request(schemas::Task::Embed, &request)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}
