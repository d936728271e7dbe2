//! The fused CPU encoder (`cpu_kernels`, the default on the CPU in f32) against burn's
//! composite encoder on the same checkpoint: random batch shapes, including one-token and
//! maximum-length inputs, and batches that mix them (the fused path packs the real tokens and
//! never computes padding, the composite one masks it).

mod common;

use common::*;
use processor::model::bert::{BertModel, BertOptions};
use processor::model::cpu_device;
use proptest::prelude::*;

/// The fused model runs on a pool of 3 threads, whatever the machine has: a batch of at
/// least 3 inputs that cut into groups of equal cost is computed a group per thread
/// (`cpu.rs`, `split`), any other of 16 tokens or more is shared out by token rows.
fn load(dir: &std::path::Path, cpu_kernels: bool) -> BertModel {
    let options = BertOptions {
        cpu_kernels,
        cpu_threads: if cpu_kernels { 3 } else { 0 },
        ..BertOptions::default()
    };
    BertModel::load_with(dir, &cpu_device(), options)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

struct Pair {
    fused: BertModel,
    composite: BertModel,
}

impl Pair {
    fn new(dir: &std::path::Path) -> Self {
        Pair {
            fused: load(dir, true),
            composite: load(dir, false),
        }
    }

    /// Largest difference of unnormalised pooled embeddings over a batch, and of the hidden
    /// states of its first input alone.
    fn difference(&self, batch: &[Vec<u32>]) -> (f32, f32) {
        let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
        let raw = vec![false; refs.len()];
        let (a, b) = (
            self.fused.embed(&refs, &raw),
            self.composite.embed(&refs, &raw),
        );
        assert_eq!(a.len(), b.len());
        let pooled = a
            .iter()
            .zip(&b)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        let (a, b) = (
            self.fused.hidden_states(&batch[0]),
            self.composite.hidden_states(&batch[0]),
        );
        assert_eq!(a.len(), batch[0].len());
        let states = a
            .iter()
            .zip(&b)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0f32, f32::max);
        (pooled, states)
    }
}

/// A batch of `lengths` random token ids below `vocab`.
fn random_batch(rng: &mut fastrand::Rng, lengths: &[usize], vocab: u32) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .map(|&len| (0..len).map(|_| rng.u32(1..vocab)).collect())
        .collect()
}

const TOLERANCE: f32 = 2e-5;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn tiny_bert_fused_matches_composite_on_random_shapes(
        lengths in prop::collection::vec(prop_oneof![Just(1usize), Just(128), 1usize..=128], 1..7),
        seed in any::<u64>(),
    ) {
        use std::sync::OnceLock;
        static PAIR: OnceLock<Pair> = OnceLock::new();
        let pair = PAIR.get_or_init(|| Pair::new(&tiny_mlm_dir()));
        let batch = random_batch(&mut fastrand::Rng::with_seed(seed), &lengths, 30_522);
        let (pooled, states) = pair.difference(&batch);
        prop_assert!(pooled <= TOLERANCE && states <= TOLERANCE,
            "lengths {lengths:?}: pooled differ by {pooled}, hidden states by {states}");
    }
}

#[test]
fn minilm_fused_matches_composite_from_one_token_to_the_longest_input() {
    let pair = Pair::new(&minilm_dir());
    let max = pair.fused.tokenizer().max_tokens();
    let mut rng = fastrand::Rng::with_seed(7);
    for lengths in [
        vec![1],
        vec![max],
        vec![1, max],
        vec![max, 3, 17, 1, 64, 9, 33, 2],
        vec![16; 32],
        (1..=40).map(|i| i * 3).collect(),
    ] {
        let batch = random_batch(&mut rng, &lengths, 30_522);
        let (pooled, states) = pair.difference(&batch);
        assert!(
            pooled <= TOLERANCE && states <= TOLERANCE,
            "lengths {lengths:?}: pooled differ by {pooled}, hidden states by {states}"
        );
    }
}

#[test]
fn one_model_with_its_own_pool_serves_several_threads_at_once() {
    // A model shared by threads (tools, tests): a caller that finds the encoder's buffers in
    // use gets its own instead of waiting (waiting could deadlock inside the model's pool).
    let options = BertOptions {
        cpu_threads: 2,
        ..BertOptions::default()
    };
    let model = std::sync::Arc::new(
        BertModel::load_with(&tiny_mlm_dir(), &cpu_device(), options).expect("tiny model"),
    );
    let batch = random_batch(&mut fastrand::Rng::with_seed(3), &[128, 64, 5, 1], 30_522);
    let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
    let expected = model.embed(&refs, &[false; 4]);
    let (done_tx, done) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (model, batch, done_tx) = (model.clone(), batch.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let refs: Vec<&[u32]> = batch.iter().map(Vec::as_slice).collect();
            for _ in 0..20 {
                let _ = done_tx.send(model.embed(&refs, &[false; 4]));
            }
        });
    }
    for _ in 0..80 {
        let got = done
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every caller is answered (no deadlock)");
        assert_eq!(got, expected);
    }
}
