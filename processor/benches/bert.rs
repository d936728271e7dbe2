//! Bare-model throughput (no NATS): sentences/second of the BERT embed path for batch sizes
//! 1, 8, 32 and 64, on 16-token sentences and on mixed 8-128-token ones, read from
//! `bench/inputs.json` so that `bench/pytorch_reference.py` times exactly the same inputs.
//!
//!   cargo bench -p processor --bench bert                      # flex (the default CPU backend)
//!   cargo bench -p processor --bench bert --features ndarray   # also ndarray + OpenBLAS
//!   cargo bench -p processor --bench bert -- --write-inputs    # regenerate bench/inputs.json
//!   BENCH_SETS=mixed8_128 BENCH_BATCHES=32 BENCH_BACKENDS=flex cargo bench ...   # a subset
//!
//! Tokenisation is done before timing (as in the PyTorch script): this measures the model.

use std::time::{Duration, Instant};

use burn::prelude::Device;
use processor::model::bert::{BertModel, BertOptions};

const BATCH_SIZES: [usize; 4] = [1, 8, 32, 64];
/// Each configuration runs at least this long (after one warm-up pass).
const MIN_TIME: Duration = Duration::from_secs(3);

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = common::minilm_dir();
    if args.iter().any(|a| a == "--write-inputs") {
        let model = BertModel::load(&model_dir, &processor::model::cpu_device()).unwrap();
        write_inputs(&model, &common::inputs_file());
        return;
    }
    let sets: Vec<(&str, Vec<String>)> = ["short16", "mixed8_128"]
        .into_iter()
        .map(|key| (key, common::sentences(key)))
        .collect();

    // "flex": the processor's CPU path (the fused encoder of `bert/cpu.rs` on flex tensors);
    // "flex-composite": burn's encoder ops on flex, as before the fused encoder.
    let fused = BertOptions::default();
    let composite = BertOptions {
        cpu_kernels: false,
        ..fused
    };
    #[cfg_attr(not(feature = "ndarray"), allow(unused_mut))]
    let mut backends: Vec<(&str, Device, BertOptions)> = vec![
        ("flex", processor::model::cpu_device(), fused),
        ("flex-composite", processor::model::cpu_device(), composite),
    ];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // burn 0.22 deprecates ndarray in favour of flex; kept to compare
    backends.push(("ndarray+openblas", Device::ndarray(), composite));
    eprintln!(
        "rayon threads: {}, kernels: {}",
        rayon::current_num_threads(),
        processor::model::bert::simd::instruction_set()
    );

    println!("| backend | inputs | batch | sentences/s | ms/batch |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for (backend, device, options) in &backends {
        if !selected("BENCH_BACKENDS", backend) {
            continue;
        }
        let model = BertModel::load_with(&model_dir, device, *options).unwrap();
        // Two single-threaded replicas side by side (`workers_per_device = 2` on the CPU).
        let replicas = (*backend == "flex").then(|| {
            let single = BertOptions {
                cpu_threads: 1,
                ..*options
            };
            [0, 1].map(|_| BertModel::load_with(&model_dir, device, single).unwrap())
        });
        for (name, texts) in &sets {
            let ids: Vec<Vec<u32>> = texts
                .iter()
                .map(|t| model.tokenizer().encode(t, true).unwrap().ids)
                .collect();
            for batch in BATCH_SIZES {
                if !selected("BENCH_SETS", name) || !selected("BENCH_BATCHES", &batch.to_string()) {
                    continue;
                }
                let (rate, per_batch) = measure(&model, &ids, batch);
                println!(
                    "| {backend} | {name} | {batch} | {rate:.1} | {:.2} |",
                    per_batch * 1e3
                );
                if let Some(replicas) = replicas
                    .as_ref()
                    .filter(|_| selected("BENCH_REPLICAS", "2"))
                {
                    let (rate, per_batch) = measure_replicas(replicas, &ids, batch);
                    println!(
                        "| {backend} 2 replicas x 1 thread | {name} | {batch} | {rate:.1} | {:.2} |",
                        per_batch * 1e3
                    );
                }
            }
        }
    }
}

/// Whether a comma-separated filter variable (unset: everything) lists `value`.
fn selected(variable: &str, value: &str) -> bool {
    std::env::var(variable).map_or(true, |list| list.split(',').any(|v| v == value))
}

/// Embeds every input in batches of `batch`, repeatedly for at least MIN_TIME; returns
/// sentences per second and seconds per batch.
fn measure(model: &BertModel, ids: &[Vec<u32>], batch: usize) -> (f64, f64) {
    let run = || {
        for chunk in ids.chunks(batch) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            std::hint::black_box(model.embed(&refs, &vec![true; refs.len()]));
        }
    };
    run(); // warm-up
    let started = Instant::now();
    let mut passes = 0;
    while passes == 0 || started.elapsed() < MIN_TIME {
        run();
        passes += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sentences = (passes * ids.len()) as f64;
    let batches = (passes * ids.len().div_ceil(batch)) as f64;
    (sentences / elapsed, elapsed / batches)
}

/// Sentences per second of several replicas, each on its own thread computing every
/// replica-th batch, and seconds per batch of one replica.
fn measure_replicas(replicas: &[BertModel], ids: &[Vec<u32>], batch: usize) -> (f64, f64) {
    let chunks: Vec<&[Vec<u32>]> = ids.chunks(batch).collect();
    let n = replicas.len();
    let run = |replica: usize| {
        let model = &replicas[replica];
        for chunk in chunks.iter().skip(replica).step_by(n) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            std::hint::black_box(model.embed(&refs, &vec![true; refs.len()]));
        }
    };
    let all = || {
        std::thread::scope(|scope| {
            for replica in 0..n {
                scope.spawn(move || run(replica));
            }
        })
    };
    all(); // warm-up
    let started = Instant::now();
    let mut passes = 0;
    while passes == 0 || started.elapsed() < MIN_TIME {
        all();
        passes += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sentences = (passes * ids.len()) as f64;
    let batches_per_replica = (passes * chunks.len()) as f64 / n as f64;
    (sentences / elapsed, elapsed / batches_per_replica)
}

/// Deterministic inputs: 256 sentences of exactly 16 tokens, and 128 of 8 to 128 tokens.
fn write_inputs(model: &BertModel, path: &std::path::Path) {
    let words: Vec<&str> = "the a of to and in is was for on that with as by at from it his an were are which this be or has had not but first one their its new after who they have her she two been other when there all during into school time may years more most only over city some world would where later up such used many can state about national out known university united then made"
        .split(' ')
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Adds random words while the sentence (with its final period) stays within `tokens`.
    let mut sentence = |tokens: usize| {
        let count = |words: &[&str]| {
            model
                .tokenizer()
                .encode(&format!("{}.", words.join(" ")), true)
                .unwrap()
                .ids
                .len()
        };
        let mut chosen: Vec<&str> = Vec::new();
        while count(&chosen) < tokens {
            chosen.push(words[(next() % words.len() as u64) as usize]);
            if count(&chosen) > tokens {
                chosen.pop();
                break;
            }
        }
        format!("{}.", chosen.join(" "))
    };
    let short: Vec<String> = (0..256).map(|_| sentence(16)).collect();
    let mixed: Vec<String> = (0..128).map(|i| sentence(8 + (i * 89) % 121)).collect();
    let json = serde_json::json!({
        "note": "generated by `cargo bench -p processor --bench bert -- --write-inputs`; token counts include [CLS] and [SEP]",
        "short16": short,
        "mixed8_128": mixed,
    });
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}
