//! The scheduler's statistics: lock-free counters and fixed-bucket histograms, read for the
//! NATS micro `$SRV.STATS` data (and by the metrics exporter).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// Upper bounds of the time histogram buckets, in seconds (Prometheus' defaults, extended
/// down to 100 µs because an idle queue hands a batch over in microseconds).
pub const TIME_BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the batch size histogram buckets, in inputs.
pub const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A histogram with fixed buckets (the given bounds plus one for larger values).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations in millionths of the unit (µs for seconds).
    sum_micro: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these bucket upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
        }
    }

    /// Records one duration, in seconds.
    pub fn observe(&self, value: Duration) {
        self.observe_value(value.as_secs_f64());
    }

    /// Records one value.
    pub fn observe_value(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((value * 1e6).round() as u64, Ordering::Relaxed);
    }

    /// The bucket upper bounds (the last bucket, above them all, has none).
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Observations per bucket (not cumulative); the last bucket is everything above the
    /// last bound.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// Sum of all observations.
    pub fn sum(&self) -> f64 {
        self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Upper bound of the bucket holding the `q`-quantile (`None` when empty, infinity when it
    /// falls in the last bucket): an estimate good to one bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }

    /// The histogram as JSON: count, sum, mean, p50/p99 bucket bounds and the buckets.
    pub fn to_json(&self) -> Value {
        let count = self.count();
        let sum = self.sum();
        let bound = |q| {
            self.quantile_bound(q).map(|b| {
                if b.is_finite() {
                    json!(b)
                } else {
                    json!("+Inf")
                }
            })
        };
        json!({
            "count": count,
            "sum": sum,
            "mean": if count == 0 { 0.0 } else { sum / count as f64 },
            "p50_le": bound(0.5),
            "p99_le": bound(0.99),
            "bucket_le": self.bounds,
            "bucket_counts": self.counts(),
        })
    }
}

/// What the scheduler has done so far.
#[derive(Debug)]
pub struct BatcherStats {
    /// Batches given to the model.
    pub batches: AtomicU64,
    /// Inputs computed, summed over batches.
    pub inputs: AtomicU64,
    /// Tokens of the inputs computed (what the requests asked for).
    pub tokens: AtomicU64,
    /// Token positions computed: each batch's inputs × its longest input.
    pub padded_tokens: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests refused because the work queued ahead of them would take longer than
    /// `batch.max_queue_wait_ms`.
    pub rejected_wait: AtomicU64,
    /// Requests answered with `timeout` because their deadline passed before their batch.
    pub expired: AtomicU64,
    /// Inputs waiting for a batch right now.
    pub queued: AtomicU64,
    /// Of those, `Priority: bulk` inputs.
    pub queued_bulk: AtomicU64,
    /// Batches being computed right now.
    pub in_flight: AtomicU64,
    /// How long each input waited in the queue before its batch started, in seconds.
    pub queue_wait: Histogram,
    /// How long each batch took the model, in seconds.
    pub compute: Histogram,
    /// Inputs per batch.
    pub batch_size: Histogram,
    /// Model worker threads running (they end only if they fail outside a batch).
    pub workers_alive: AtomicU64,
    /// The queue actor is running (false once it ended, or if it panicked).
    pub queue_alive: AtomicBool,
    /// Recent compute time per input in large batches, in seconds (an f64's bits; a moving
    /// average), from which the queue estimates how long its backlog takes.
    pub(crate) seconds_per_input: AtomicU64,
    /// The output cache, if the batcher has one (its counters are reported with these).
    pub cache: std::sync::OnceLock<Arc<crate::cache::OutputCache>>,
}

impl Default for BatcherStats {
    fn default() -> Self {
        let counter = || AtomicU64::new(0);
        BatcherStats {
            batches: counter(),
            inputs: counter(),
            tokens: counter(),
            padded_tokens: counter(),
            rejected: counter(),
            rejected_wait: counter(),
            expired: counter(),
            queued: counter(),
            queued_bulk: counter(),
            in_flight: counter(),
            queue_wait: Histogram::new(&TIME_BUCKETS),
            compute: Histogram::new(&TIME_BUCKETS),
            batch_size: Histogram::new(&SIZE_BUCKETS),
            workers_alive: counter(),
            queue_alive: AtomicBool::new(false),
            seconds_per_input: counter(),
            cache: std::sync::OnceLock::new(),
        }
    }
}

impl BatcherStats {
    /// Folds the time of a batch of `inputs` into the per-input moving average, if the
    /// batch is large (at least half of `max_size`): the backlog is drained in full batches,
    /// and a batch of one costs per input up to `max_size` times what a full one does.
    pub(crate) fn record_pace(&self, took: Duration, inputs: usize, max_size: usize) {
        if inputs.max(1) * 2 < max_size {
            return;
        }
        let sample = took.as_secs_f64() / inputs.max(1) as f64;
        let old = f64::from_bits(self.seconds_per_input.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old * 0.8 + sample * 0.2
        };
        self.seconds_per_input
            .store(new.to_bits(), Ordering::Relaxed);
    }

    /// The recent compute time per input in large batches (`None` before the first one: the
    /// queue has never been busy enough to form one, so it refuses nothing for its backlog).
    pub fn pace(&self) -> Option<Duration> {
        let seconds = f64::from_bits(self.seconds_per_input.load(Ordering::Relaxed));
        (seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
    }

    /// How long `workers` take to compute the inputs queued now, at the recent pace; `None`
    /// when nothing is queued or no batch has been computed yet.
    pub fn backlog(&self, queued: u64, workers: usize) -> Option<Duration> {
        if queued == 0 {
            return None;
        }
        let pace = self.pace()?;
        Some(pace.mul_f64(queued as f64 / workers.max(1) as f64))
    }

    /// Whether the scheduler can still compute: its queue actor runs and a worker lives.
    pub fn can_compute(&self) -> bool {
        self.queue_alive.load(Ordering::Relaxed) && self.workers_alive.load(Ordering::Relaxed) > 0
    }

    /// Mean inputs per batch so far (0 before the first batch).
    pub fn mean_batch_size(&self) -> f64 {
        ratio(
            self.inputs.load(Ordering::Relaxed),
            self.batches.load(Ordering::Relaxed),
        )
    }

    /// Share of the computed token positions that were padding (0 before the first batch).
    pub fn padding_ratio(&self) -> f64 {
        let padded = self.padded_tokens.load(Ordering::Relaxed);
        let real = self.tokens.load(Ordering::Relaxed);
        if padded == 0 {
            return 0.0;
        }
        padded.saturating_sub(real) as f64 / padded as f64
    }

    /// Records a batch handed to a worker.
    pub(crate) fn record_batch(&self, inputs: usize, tokens: usize, longest: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(inputs as u64, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.padded_tokens
            .fetch_add((inputs * longest) as u64, Ordering::Relaxed);
        self.batch_size.observe_value(inputs as f64);
    }

    /// Every figure as JSON (the `$SRV.STATS` endpoint data).
    pub fn to_json(&self) -> Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "batches": load(&self.batches),
            "inputs": load(&self.inputs),
            "mean_batch_size": self.mean_batch_size(),
            "tokens": load(&self.tokens),
            "padded_tokens": load(&self.padded_tokens),
            "padding_ratio": self.padding_ratio(),
            "rejected_overloaded": load(&self.rejected),
            "rejected_queue_wait": load(&self.rejected_wait),
            "expired": load(&self.expired),
            "queued_inputs": load(&self.queued),
            "queued_bulk_inputs": load(&self.queued_bulk),
            "in_flight_batches": load(&self.in_flight),
            "queue_wait_seconds": self.queue_wait.to_json(),
            "compute_seconds": self.compute.to_json(),
            "batch_size": self.batch_size.to_json(),
            "cache": self.cache.get().map(|cache| {
                let stats = cache.stats();
                let looked_up = stats.hits + stats.misses;
                json!({
                    "hits": stats.hits,
                    "misses": stats.misses,
                    "hit_rate": if looked_up == 0 { 0.0 } else { stats.hits as f64 / looked_up as f64 },
                    "entries": stats.entries,
                    "bytes": stats.bytes,
                    "capacity_bytes": stats.capacity,
                })
            }),
        })
    }
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_sum_and_quantiles() {
        let histogram = Histogram::new(&TIME_BUCKETS);
        assert_eq!(histogram.quantile_bound(0.5), None);
        for ms in [0.05, 0.8, 0.9, 3.0, 20_000.0] {
            histogram.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let counts = histogram.counts();
        assert_eq!(counts[0], 1); // ≤ 100 µs
        assert_eq!(counts[2], 2); // ≤ 1 ms
        assert_eq!(counts[4], 1); // ≤ 5 ms
        assert_eq!(counts[TIME_BUCKETS.len()], 1); // > 10 s
        assert_eq!(histogram.count(), 5);
        assert!((histogram.sum() - 20.00475).abs() < 1e-5);
        assert_eq!(histogram.quantile_bound(0.5), Some(0.001));
        assert_eq!(histogram.quantile_bound(1.0), Some(f64::INFINITY));
        assert_eq!(histogram.to_json()["p99_le"], "+Inf");
    }

    #[test]
    fn padding_ratio_is_the_padded_share_of_computed_positions() {
        let stats = BatcherStats::default();
        assert_eq!(stats.padding_ratio(), 0.0);
        // Two inputs of 2 and 6 tokens pad to 2 × 6 = 12 positions, 4 of them padding.
        stats.record_batch(2, 8, 6);
        assert!((stats.padding_ratio() - 4.0 / 12.0).abs() < 1e-12);
        assert_eq!(stats.mean_batch_size(), 2.0);
        assert_eq!(stats.to_json()["padded_tokens"], 12);
    }
}
