//! Runs a BERT checkpoint on burn-cuda and on the CPU backend, compares their outputs and
//! times both (a check for GPU machines; needs `--features cuda`).
//!
//!   cargo run --release -p processor --features cuda --example cuda_check -- [CHECKPOINT_DIR]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use processor::model::bert::BertModel;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert-mlm")
        });
    let cpu = BertModel::load(&dir, &processor::model::cpu_device()).expect("loading on the CPU");
    let gpu = BertModel::load(&dir, &burn::prelude::Device::cuda(0)).expect("loading on CUDA 0");
    let texts = [
        "twinkle twinkle little star, how i wonder what you are.",
        "the quick brown fox jumps over the lazy dog",
        "a",
        "NATS spreads the load across GPU nodes, and every request gets exactly one reply.",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| cpu.tokenizer().encode(t, true).expect("tokenises").ids)
        .collect();
    let mut worst = 0f32;
    for ids in &ids {
        let (a, b) = (cpu.hidden_states(ids), gpu.hidden_states(ids));
        for (row_a, row_b) in a.iter().zip(&b) {
            for (x, y) in row_a.iter().zip(row_b) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    let batch: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let normalize = vec![true; batch.len()];
    let (ea, eb) = (cpu.embed(&batch, &normalize), gpu.embed(&batch, &normalize));
    let worst_embedding = ea
        .iter()
        .flatten()
        .zip(eb.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!("checkpoint {}", dir.display());
    println!("max |cuda - cpu|: hidden states {worst:.2e}, embeddings {worst_embedding:.2e}");
    assert!(
        worst < 1e-3 && worst_embedding < 1e-4,
        "CUDA and CPU disagree"
    );

    for batch_size in [1usize, 32, 128] {
        let rows: Vec<&[u32]> = (0..batch_size)
            .map(|i| ids[i % ids.len()].as_slice())
            .collect();
        let normalize = vec![true; batch_size];
        let rate = |model: &BertModel| {
            model.embed(&rows, &normalize); // warm-up (kernel compilation on CUDA)
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(2) {
                n += model.embed(&rows, &normalize).len();
            }
            n as f64 / started.elapsed().as_secs_f64()
        };
        let (c, g) = (rate(&cpu), rate(&gpu));
        println!(
            "batch {batch_size:>3}: cpu {c:>10.1} sentences/s, cuda {g:>10.1} sentences/s ({:.1}x)",
            g / c
        );
    }
}
