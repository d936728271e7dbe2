//! The queue actor: owns the per-task queues of prepared inputs, refuses what it has no
//! room or time for, and hands batches to idle workers.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use schemas::{ErrorCode, Task};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::job::{expired_error, Batch, Item, Job};
use super::select::{take_grouped, take_in_order};
use super::{task_index, BatchPolicy, BatcherStats};
use crate::model::InputError;

/// How often the whole queue is swept for inputs that need no computing any more (the
/// head is swept before every batch).
const FULL_PURGE_EVERY: Duration = Duration::from_millis(50);

/// The most submitted requests taken from the channel at once.
const SUBMIT_BURST: usize = 256;

/// Marks the actor stopped in the statistics when dropped, also if it panics.
struct Running<'a>(&'a BatcherStats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.queue_alive.store(false, Ordering::Relaxed);
    }
}

/// The actor's state: per-task queues of inputs (oldest first) and the idle workers.
pub(super) struct Queue {
    pub(super) policy: BatchPolicy,
    /// Model workers started (they compute batches side by side).
    pub(super) workers: usize,
    pub(super) waiting: [VecDeque<Item>; Task::ALL.len()],
    pub(super) queued_inputs: usize,
    /// Idle workers, oldest first, each with whether inputs were queued when it asked.
    pub(super) idle: VecDeque<(oneshot::Sender<Batch>, bool)>,
    pub(super) stats: Arc<BatcherStats>,
}

impl Queue {
    pub(super) async fn run(
        mut self,
        mut submit: mpsc::Receiver<Arc<Job>>,
        mut ready: mpsc::Receiver<oneshot::Sender<Batch>>,
    ) {
        let stats = self.stats.clone();
        let _running = Running(&stats);
        let mut accepting = true;
        let mut workers_alive = true;
        let mut purged = Instant::now();
        // Requests are taken in bursts: under load, everything that arrived while the actor
        // was busy goes into the queue before the next batch is formed (batches fill up, and
        // the workers are woken once per batch, not once per request).
        let mut arrivals = Vec::with_capacity(SUBMIT_BURST);
        loop {
            let now = Instant::now();
            if now.duration_since(purged) >= FULL_PURGE_EVERY {
                // The published depth is what transports refuse work on: keep it free of
                // inputs that expired or whose request was answered, deep in the queue too.
                self.purge(now, usize::MAX);
                purged = now;
            }
            self.dispatch(now, !accepting);
            if !workers_alive && self.idle.is_empty() {
                // Every worker is gone: nothing queued can be computed any more.
                self.fail_all("every model worker has stopped");
            }
            self.stats
                .queued
                .store(self.queued_inputs as u64, Ordering::Relaxed);
            if !accepting && self.queued_inputs == 0 {
                break;
            }
            // Only a queue waiting for `min_size` needs a timer, and only if a worker is idle.
            let wake = self.next_latency_close().filter(|_| !self.idle.is_empty());
            tokio::select! {
                received = submit.recv_many(&mut arrivals, SUBMIT_BURST), if accepting => {
                    if received == 0 {
                        accepting = false;
                    }
                    for job in arrivals.drain(..) {
                        self.enqueue(job);
                    }
                }
                worker = ready.recv(), if workers_alive => match worker {
                    Some(worker) => self.idle.push_back((worker, self.queued_inputs > 0)),
                    None => workers_alive = false,
                },
                _ = sleep_until(wake), if wake.is_some() => {}
            }
        }
    }

    fn enqueue(&mut self, job: Arc<Job>) {
        let n = job.inputs.len();
        if self.queued_inputs + n > self.policy.queue_capacity {
            // Requests that expired or failed still hold places: free them before refusing.
            self.purge(Instant::now(), usize::MAX);
        }
        if self.queued_inputs + n > self.policy.queue_capacity {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            job.refuse(self.policy.queue_full(self.queued_inputs));
            return;
        }
        let refused = self.policy.refuse_for_backlog(
            &self.stats,
            self.queued_inputs as u64,
            self.workers,
            job.deadline,
            Instant::now(),
        );
        if let Some(refused) = refused {
            self.stats.rejected_wait.fetch_add(1, Ordering::Relaxed);
            job.refuse(refused);
            return;
        }
        self.queued_inputs += n;
        let queue = &mut self.waiting[task_index(job.task)];
        queue.extend((0..n).map(|index| Item {
            job: job.clone(),
            index,
            tokens: job.prepared[index].tokens,
        }));
    }

    /// When the oldest input of a queue still short of `min_size` has waited `max_latency`.
    fn next_latency_close(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|q| q.front())
            .map(|item| item.job.arrived + self.policy.max_latency)
            .min()
    }

    /// Whether a queue may be handed to an idle worker now.
    fn is_ready(&self, queue: &VecDeque<Item>, now: Instant, flush: bool) -> bool {
        let Some(oldest) = queue.front() else {
            return false;
        };
        if flush || queue.len() >= self.policy.min_size {
            return true;
        }
        if oldest.job.arrived + self.policy.max_latency <= now {
            return true;
        }
        // Short of `min_size`, but a batch is full by tokens already: waiting adds nothing.
        let mut longest = 0;
        for (count, item) in queue.iter().enumerate() {
            longest = longest.max(item.tokens);
            if (count + 1) * longest > self.policy.max_tokens {
                return true;
            }
        }
        false
    }

    /// Drops expired inputs (answering their requests with `timeout`) and inputs of requests
    /// already answered, among the first `depth` of every queue.
    fn purge(&mut self, now: Instant, depth: usize) {
        for queue in &mut self.waiting {
            let depth = depth.min(queue.len());
            let stale = |item: &Item| item.expired(now) || item.job.answered();
            if !queue.iter().take(depth).any(stale) {
                continue;
            }
            let head: Vec<Item> = queue.drain(..depth).collect();
            let mut kept = Vec::with_capacity(head.len());
            for item in head {
                if item.expired(now) {
                    let waited = now.saturating_duration_since(item.job.arrived);
                    if item.job.refuse(expired_error(waited)) {
                        self.stats.expired.fetch_add(1, Ordering::Relaxed);
                    }
                } else if !item.job.answered() {
                    kept.push(item);
                    continue;
                }
                self.queued_inputs -= 1;
            }
            for item in kept.into_iter().rev() {
                queue.push_front(item);
            }
        }
    }

    /// Hands batches to idle workers while some queue is ready, oldest queue first. When
    /// `flush` is set every queued input is ready (shutdown: compute what is left, then stop).
    fn dispatch(&mut self, now: Instant, flush: bool) {
        if self.idle.is_empty() || self.queued_inputs == 0 {
            return;
        }
        self.purge(now, self.policy.grouping_window.max(self.policy.max_size));
        while !self.idle.is_empty() {
            let ready = (0..self.waiting.len())
                .filter(|&i| self.is_ready(&self.waiting[i], now, flush))
                .min_by_key(|&i| self.waiting[i].front().map(|item| item.job.arrived));
            let Some(index) = ready else { return };
            let items = if self.policy.length_grouping {
                take_grouped(&mut self.waiting[index], &self.policy)
            } else {
                take_in_order(&mut self.waiting[index], &self.policy)
            };
            self.queued_inputs -= items.len();
            self.hand_over(
                Batch {
                    task: Task::ALL[index],
                    items,
                    backlogged: false,
                },
                index,
                now,
            );
        }
    }

    /// Gives a batch to the first live idle worker, or puts it back at the head of its queue.
    fn hand_over(&mut self, batch: Batch, queue_index: usize, now: Instant) {
        let size = batch.items.len();
        let tokens = batch.items.iter().map(|item| item.tokens).sum();
        let longest = batch
            .items
            .iter()
            .map(|item| item.tokens)
            .max()
            .unwrap_or(0);
        let waits: Vec<Duration> = batch
            .items
            .iter()
            .map(|item| now.saturating_duration_since(item.job.arrived))
            .collect();
        let mut batch = Some(batch);
        while let Some((worker, backlogged)) = self.idle.pop_front() {
            let mut handed = batch.take().expect("batch");
            handed.backlogged = backlogged;
            match worker.send(handed) {
                Ok(()) => {
                    self.stats.record_batch(size, tokens, longest);
                    for wait in waits {
                        self.stats.queue_wait.observe(wait);
                    }
                    return;
                }
                // That worker died; try the next idle one.
                Err(returned) => batch = Some(returned),
            }
        }
        if let Some(batch) = batch {
            self.queued_inputs += batch.items.len();
            let queue = &mut self.waiting[queue_index];
            for item in batch.items.into_iter().rev() {
                queue.push_front(item);
            }
        }
    }

    fn fail_all(&mut self, reason: &str) {
        for queue in &mut self.waiting {
            for item in queue.drain(..) {
                let error = InputError::new(ErrorCode::Internal, reason);
                item.job.complete(item.index, Err(error), 0);
            }
        }
        self.queued_inputs = 0;
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
