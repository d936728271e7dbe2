//! The scheduler's overhead and the value of length grouping, each against a baseline
//! measured in the same run:
//!
//! - `sim`: the `sim` model (a simulated accelerator) served through a real nats-server.
//!   At saturation, end-to-end inputs/s against the bare model's inputs/s at the same batch
//!   size; at low load (one request at a time), end-to-end median latency against the bare
//!   model's median batch time.
//! - `grouping`: all-MiniLM-L6-v2 on the CPU, the mixed 8-128-token sentences of
//!   `bench/inputs.json` queued at once through the batcher (no NATS): sentences/s and padding
//!   ratio with length grouping on and off.
//!
//! - `transport`: the `echo` model through core NATS and through the JetStream work queue:
//!   median latency one request at a time, and requests/s with 64 in flight.
//! - `cache`: all-MiniLM-L6-v2 on the CPU through the batcher with the output cache, requests
//!   of 8 mixed-length sentences of which 0%, 50% or 90% repeat earlier inputs: inputs/s
//!   against the 0% row of the same run.
//!
//!   cargo bench -p processor --bench scheduler                  # every part
//!   BENCH_PARTS=sim cargo bench -p processor --bench scheduler  # one part

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::batcher::{BatchPolicy, Batcher};
use processor::config::ModelKind;
use processor::model::bert::BertModel;
use processor::model::{BatchModel, SimModel};
use processor::{Config, Processor};
use producer::{Client, ClientOptions, Transport};
use schemas::{InferOptions, InferRequest, Task};

/// The simulated accelerator: a batch of n inputs takes 20 ms + 0.25 ms × n.
const SIM_BATCH_MS: f64 = 20.0;
const SIM_ITEM_MS: f64 = 0.25;
const BATCH_SIZE: usize = 32;
/// Requests kept in flight at saturation: enough to always have the next batch queued.
const SATURATION_CONCURRENCY: usize = 4 * BATCH_SIZE;
const MEASURE: Duration = Duration::from_secs(6);

mod common;

fn wanted(part: &str) -> bool {
    std::env::var("BENCH_PARTS").map_or(true, |parts| parts.split(',').any(|p| p == part))
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if wanted("sim") {
        runtime.block_on(sim_through_nats());
    }
    if wanted("grouping") {
        runtime.block_on(length_grouping());
    }
    if wanted("transport") {
        runtime.block_on(transports());
    }
    if wanted("cache") {
        runtime.block_on(cache_repeats());
    }
}

/// Inputs/s with 0%, 50% and 90% of the inputs repeating earlier ones, through the batcher
/// with the default output cache; every row on the same model and the same queue.
async fn cache_repeats() {
    use processor::cache::OutputCache;
    use std::sync::Arc;

    let model_dir = common::minilm_dir();
    let mixed = common::sentences("mixed8_128");
    const INPUTS: usize = 768;
    const PER_REQUEST: usize = 8;
    println!(
        "all-MiniLM-L6-v2 on the CPU, {INPUTS} mixed 8-128-token sentences per row in requests of \
         {PER_REQUEST}, all queued at once; output cache on (64 MiB)"
    );
    println!("| repeated inputs | inputs/s | cache hit rate | ratio |");
    println!("|---:|---:|---:|---:|");
    let policy = BatchPolicy::new(BATCH_SIZE, 4096);
    let dir = model_dir.clone();
    let (batcher, workers) = Batcher::start(policy, 1, move |_| {
        BertModel::load(&dir, &processor::model::cpu_device()).map_err(anyhow::Error::from)
    })
    .await
    .unwrap();
    let mut baseline = None;
    let mut serial = 0usize;
    for repeated in [0.0, 0.5, 0.9] {
        // A fresh cache per row; its repeats come from a pool of 64 inputs computed first.
        let cache = Arc::new(OutputCache::new(64 << 20, &[Task::Embed]));
        let batcher = batcher.clone().with_cache(Some(cache.clone()));
        let pool: Vec<String> = mixed[..64].iter().map(|t| format!("{t} (pool)")).collect();
        batcher
            .infer(Task::Embed, pool.clone(), InferOptions::default(), None)
            .await
            .unwrap();
        let before = cache.stats();
        let mut rng = fastrand::Rng::with_seed(7);
        let texts: Vec<String> = (0..INPUTS)
            .map(|_| {
                if rng.f64() < repeated {
                    pool[rng.usize(..pool.len())].clone()
                } else {
                    // A new text of the same length class: never seen, so a miss.
                    serial += 1;
                    format!("{} #{serial}", mixed[rng.usize(..mixed.len())])
                }
            })
            .collect();
        let started = Instant::now();
        let requests: Vec<_> = texts
            .chunks(PER_REQUEST)
            .map(|chunk| {
                let batcher = batcher.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    batcher
                        .infer(Task::Embed, chunk, InferOptions::default(), None)
                        .await
                })
            })
            .collect();
        for request in requests {
            request.await.unwrap().unwrap();
        }
        let rate = INPUTS as f64 / started.elapsed().as_secs_f64();
        let after = cache.stats();
        let hits = after.hits - before.hits;
        let looked_up = hits + after.misses - before.misses;
        let base = *baseline.get_or_insert(rate);
        println!(
            "| {:.0}% | {rate:.1} | {:.1}% | {:.2}× |",
            repeated * 100.0,
            100.0 * hits as f64 / looked_up as f64,
            rate / base
        );
    }
    drop(batcher);
    tokio::task::spawn_blocking(move || workers.join())
        .await
        .unwrap();
}

/// Echo through each transport: latency one at a time, and throughput with 64 in flight.
async fn transports() {
    let server = testkit::NatsServer::start_jetstream();
    println!("echo model, one processor, same nats-server (JetStream file storage)");
    println!("| transport | median ms, one at a time | p99 ms | requests/s, 64 in flight |");
    println!("|---|---:|---:|---:|");
    for transport in [Transport::Core, Transport::Jetstream] {
        let mut config = Config::default();
        config.http.listen = String::new();
        config.http.listen = String::new();
        config.nats.url = server.url();
        config.model.kind = ModelKind::Echo;
        config.service.transport = match transport {
            Transport::Core => processor::config::Transport::Core,
            Transport::Jetstream => processor::config::Transport::Jetstream,
        };
        let processor = Processor::start(config).await.unwrap().spawn();
        let options = ClientOptions {
            transport,
            timeout: Duration::from_secs(30),
            retries: 0,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(&server.url(), options).await.unwrap();
        let request = InferRequest::new(["a short sentence to echo"]);
        for _ in 0..50 {
            client.request(Task::Embed, &request).await.unwrap();
        }
        let mut latencies = Vec::new();
        for _ in 0..1000 {
            let started = Instant::now();
            client.request(Task::Embed, &request).await.unwrap();
            latencies.push(started.elapsed());
        }
        latencies.sort();
        let p99 = latencies[latencies.len() * 99 / 100];
        let median = median(latencies);

        let completed = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let lanes: Vec<_> = (0..64)
            .map(|_| {
                let (client, request, completed) =
                    (client.clone(), request.clone(), completed.clone());
                tokio::spawn(async move {
                    while started.elapsed() < Duration::from_secs(3) {
                        client.request(Task::Embed, &request).await.unwrap();
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for lane in lanes {
            lane.await.unwrap();
        }
        let rate = completed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        println!(
            "| {transport:?} | {:.3} | {:.3} | {rate:.0} |",
            median.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0
        );
        processor.shutdown().await.unwrap();
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// The bare sim model: inputs/s at `BATCH_SIZE` and the median time of a batch of one.
fn sim_baseline() -> (f64, Duration) {
    let mut model = SimModel::new(
        Duration::from_secs_f64(SIM_BATCH_MS / 1000.0),
        Duration::from_secs_f64(SIM_ITEM_MS / 1000.0),
    );
    let texts: Vec<String> = (0..BATCH_SIZE).map(|i| format!("input {i}")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let options = InferOptions::default();
    let started = Instant::now();
    let mut inputs = 0;
    while started.elapsed() < MEASURE / 2 {
        inputs += model.run_texts(Task::Embed, &texts, &options).len();
    }
    let throughput = inputs as f64 / started.elapsed().as_secs_f64();
    let singles = (0..50)
        .map(|_| {
            let started = Instant::now();
            model.run_texts(Task::Embed, &texts[..1], &options);
            started.elapsed()
        })
        .collect();
    (throughput, median(singles))
}

async fn sim_through_nats() {
    let (model_throughput, model_single) = sim_baseline();

    let server = testkit::NatsServer::start();
    let mut config = Config::default();
    config.http.listen = String::new();
    config.nats.url = server.url();
    config.model.kind = ModelKind::Sim;
    config.model.batch_ms = SIM_BATCH_MS;
    config.model.item_ms = SIM_ITEM_MS;
    config.batch.max_size = BATCH_SIZE;
    let processor = Processor::start(config).await.unwrap().spawn();
    let options = ClientOptions {
        timeout: Duration::from_secs(30),
        retries: 0,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&server.url(), options).await.unwrap();

    // Low load: one request at a time.
    let mut latencies = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        let request = InferRequest::new([format!("one {i}")]);
        let reply = client.request(Task::Embed, &request).await.unwrap();
        assert_eq!(reply.outputs.len(), 1);
        latencies.push(started.elapsed());
    }
    let e2e_single = median(latencies);

    // Saturation: SATURATION_CONCURRENCY requests always in flight, counted over MEASURE
    // after a warm-up second.
    let completed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for lane in 0..SATURATION_CONCURRENCY {
        let client = client.clone();
        let completed = completed.clone();
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let request = InferRequest::new([format!("lane {lane}")]);
            while !stop.load(Ordering::Relaxed) {
                client.request(Task::Embed, &request).await.unwrap();
                completed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = completed.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let inputs = completed.load(Ordering::Relaxed) - before;
    let e2e_throughput = inputs as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    processor.shutdown().await.unwrap();

    let ratio = e2e_throughput / model_throughput;
    let extra = e2e_single.as_secs_f64() * 1000.0 - model_single.as_secs_f64() * 1000.0;
    println!(
        "sim model ({SIM_BATCH_MS} ms + {SIM_ITEM_MS} ms/input), batch.max_size {BATCH_SIZE}, \
         {SATURATION_CONCURRENCY} requests in flight"
    );
    println!("| measure | bare model | through NATS | result | target |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| saturation, inputs/s | {model_throughput:.0} | {e2e_throughput:.0} | {:.1}% | ≥ 95% {} |",
        ratio * 100.0,
        verdict(ratio >= 0.95)
    );
    println!(
        "| one at a time, median ms | {:.2} | {:.2} | +{extra:.2} ms | ≤ +1 ms {} |",
        model_single.as_secs_f64() * 1000.0,
        e2e_single.as_secs_f64() * 1000.0,
        verdict(extra <= 1.0)
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "(met)"
    } else {
        "(NOT met)"
    }
}

async fn length_grouping() {
    let model_dir = common::minilm_dir();
    let mixed = common::sentences("mixed8_128");
    // Three rounds of the 128 sentences, all queued at once as single-input requests.
    let queued: Vec<String> = (0..3).flat_map(|_| mixed.iter().cloned()).collect();

    println!(
        "all-MiniLM-L6-v2 on the CPU, {} mixed 8-128-token sentences queued at once, \
         batch.max_size {BATCH_SIZE}",
        queued.len()
    );
    println!("| length grouping | sentences/s | padding ratio | mean batch | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let mut baseline = None;
    for grouping in [false, true] {
        let policy = BatchPolicy {
            length_grouping: grouping,
            ..BatchPolicy::new(BATCH_SIZE, 4096)
        };
        let dir = model_dir.clone();
        let (batcher, workers) = Batcher::start(policy, 1, move |_| {
            BertModel::load(&dir, &processor::model::cpu_device()).map_err(anyhow::Error::from)
        })
        .await
        .unwrap();
        // Warm up with one batch.
        batcher
            .infer(
                Task::Embed,
                mixed[..8].to_vec(),
                InferOptions::default(),
                None,
            )
            .await
            .unwrap();
        let before = (
            batcher.stats().tokens.load(Ordering::Relaxed),
            batcher.stats().padded_tokens.load(Ordering::Relaxed),
            batcher.stats().batches.load(Ordering::Relaxed),
        );
        let started = Instant::now();
        let requests: Vec<_> = queued
            .iter()
            .map(|text| {
                let batcher = batcher.clone();
                let text = text.clone();
                tokio::spawn(async move {
                    batcher
                        .infer(Task::Embed, vec![text], InferOptions::default(), None)
                        .await
                })
            })
            .collect();
        for request in requests {
            request.await.unwrap().unwrap();
        }
        let rate = queued.len() as f64 / started.elapsed().as_secs_f64();
        let stats = batcher.stats();
        let tokens = stats.tokens.load(Ordering::Relaxed) - before.0;
        let padded = stats.padded_tokens.load(Ordering::Relaxed) - before.1;
        let batches = stats.batches.load(Ordering::Relaxed) - before.2;
        let padding = 1.0 - tokens as f64 / padded as f64;
        let base = *baseline.get_or_insert(rate);
        println!(
            "| {} | {rate:.1} | {:.1}% | {:.1} | {:.2}× |",
            if grouping { "on" } else { "off" },
            padding * 100.0,
            queued.len() as f64 / batches as f64,
            rate / base
        );
        drop(batcher);
        tokio::task::spawn_blocking(move || workers.join())
            .await
            .unwrap();
    }
}
