//! How batches are formed and how much may wait.

use std::time::Duration;

use schemas::{ErrorCode, Priority};
use tokio::time::Instant;

use super::{BatcherStats, Refused};

use crate::config::BatchConfig;
use crate::model::WarmUpPlan;

/// How batches are formed and how much may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most inputs in a batch.
    pub max_size: usize,
    /// Most padded tokens in a batch (inputs × longest input); a longer input goes alone.
    pub max_tokens: usize,
    /// Inputs an idle worker waits for before starting (up to `max_latency`).
    pub min_size: usize,
    /// Longest a queued input waits for `min_size` to be reached.
    pub max_latency: Duration,
    /// Most inputs that may wait in the queue; more are refused as `overloaded`.
    pub queue_capacity: usize,
    /// A request is refused as `overloaded` when the queued work ahead of it would take the
    /// workers longer than this (estimated from the recent pace; never into an empty queue).
    pub max_queue_wait: Duration,
    /// Group inputs of similar length into a batch.
    pub length_grouping: bool,
    /// How many of the oldest queued inputs grouping chooses from.
    pub grouping_window: usize,
    /// Longest a bulk input waits behind interactive ones: once the oldest bulk input has
    /// waited this long, bulk and interactive lead batches in turn.
    pub bulk_max_wait: Duration,
    /// Warm every replica up on each batch shape class this policy can produce (GPU kernels
    /// are compiled and autotuned per class), not just on one small batch.
    pub warm_up_shapes: bool,
}

impl BatchPolicy {
    /// Size-bounded batches with no token bound, dispatched at once, grouped by length.
    pub fn new(max_size: usize, queue_capacity: usize) -> Self {
        BatchPolicy {
            max_size,
            max_tokens: usize::MAX,
            min_size: 1,
            max_latency: Duration::ZERO,
            queue_capacity,
            max_queue_wait: Duration::MAX,
            length_grouping: true,
            grouping_window: (max_size * 8).max(256),
            bulk_max_wait: Duration::from_millis(crate::config::DEFAULT_BULK_MAX_WAIT_MS),
            warm_up_shapes: false,
        }
    }

    /// The most `Priority: bulk` inputs the queue holds: three quarters of `queue_capacity`,
    /// so that a bulk flood leaves room for interactive requests.
    pub fn bulk_capacity(&self) -> usize {
        (self.queue_capacity / 4 * 3).max(1)
    }

    /// Why a request of `inputs` inputs of `priority` does not fit the queue now, holding
    /// `queued` inputs of which `queued_bulk` are bulk.
    pub(super) fn no_room(
        &self,
        priority: Priority,
        inputs: usize,
        queued: usize,
        queued_bulk: usize,
    ) -> Option<Refused> {
        if queued + inputs > self.queue_capacity {
            return Some(self.queue_full(queued));
        }
        // A bulk request larger than the share still goes into a queue holding no bulk, so
        // that no request within `service.max_inputs` is refused for ever.
        if priority == Priority::Bulk
            && queued_bulk > 0
            && queued_bulk + inputs > self.bulk_capacity()
        {
            return Some(Refused::new(
                ErrorCode::Overloaded,
                format!(
                    "the queue's share for bulk inputs is full ({queued_bulk} of {} waiting; the rest of batch.queue_capacity is kept for interactive requests); retry later or on another processor",
                    self.bulk_capacity()
                ),
            ));
        }
        None
    }

    /// About how many queued inputs are computed before a new input of `priority`: for bulk,
    /// all of them; for interactive, the interactive ones, and about as many bulk ones again
    /// plus a batch (bulk leads at most every other batch while interactive inputs wait; an
    /// estimate, as batches are not always full).
    pub fn queued_ahead(&self, priority: Priority, queued: u64, queued_bulk: u64) -> u64 {
        let interactive = queued.saturating_sub(queued_bulk);
        match priority {
            Priority::Bulk => queued,
            Priority::Interactive => {
                interactive + queued_bulk.min(interactive + self.max_size as u64)
            }
        }
    }

    /// The refusal of a request when `queued` inputs already fill the queue.
    pub(super) fn queue_full(&self, queued: usize) -> Refused {
        Refused::new(
            ErrorCode::Overloaded,
            format!(
                "queue full ({queued} of {} inputs waiting); retry later or on another processor",
                self.queue_capacity
            ),
        )
    }

    /// Whether a request arriving `now` with `deadline` is refused because the work queued
    /// ahead of it (`queued` inputs for `workers`, at the recent pace) would take longer than
    /// `max_queue_wait`, or than what is left of its deadline minus one batch of its own.
    /// Never into an empty queue, nor before the first batch has set the pace: a request
    /// the processor could serve at once is always taken.
    pub fn refuse_for_backlog(
        &self,
        stats: &BatcherStats,
        queued: u64,
        workers: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Option<Refused> {
        // 10% of headroom over the recent pace: an estimate that is short by a little lets a
        // request in that then expires in the queue (a late 504 instead of a prompt 503).
        if deadline.is_some_and(|deadline| deadline <= now) {
            return None; // already late: a `timeout`, not an overload
        }
        let backlog = stats.backlog(queued, workers)?.mul_f64(1.1);
        let own_batch = stats.pace()?.mul_f64(self.max_size as f64);
        let left = deadline.map(|d| d.saturating_duration_since(now).saturating_sub(own_batch));
        let limit = left.map_or(self.max_queue_wait, |left| left.min(self.max_queue_wait));
        (backlog > limit).then(|| {
            let why = if limit < self.max_queue_wait {
                "the request's deadline".to_string()
            } else {
                format!(
                    "batch.max_queue_wait_ms ({})",
                    self.max_queue_wait.as_millis()
                )
            };
            Refused::new(
                ErrorCode::Overloaded,
                format!(
                    "the {queued} inputs queued ahead take about {} ms to compute, past {why}; retry later or on another processor",
                    backlog.as_millis()
                ),
            )
        })
    }

    /// What a replica computes before it takes requests under this policy.
    pub fn warm_up_plan(&self) -> WarmUpPlan {
        WarmUpPlan {
            shapes: self.warm_up_shapes,
            max_batch: self.max_size,
            max_tokens: self.max_tokens,
        }
    }
}

impl From<&BatchConfig> for BatchPolicy {
    fn from(config: &BatchConfig) -> Self {
        BatchPolicy {
            max_size: config.max_size,
            max_tokens: config.max_tokens,
            min_size: config.min_size,
            max_latency: config.max_latency(),
            queue_capacity: config.queue_capacity,
            max_queue_wait: config.max_queue_wait(),
            length_grouping: config.length_grouping,
            grouping_window: config.grouping_window,
            bulk_max_wait: Duration::from_millis(config.bulk_max_wait_ms),
            warm_up_shapes: false,
        }
    }
}
