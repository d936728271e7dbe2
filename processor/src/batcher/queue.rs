//! The queue: per-task queues of prepared inputs behind one lock, shared by the requests
//! (which queue their inputs and hand batches to idle workers themselves), the model workers
//! (which take their next batch straight from it when they finish one) and a small actor
//! that keeps time (`max_latency` for `min_size`, sweeps of expired inputs) and sees the
//! batcher stop. Under load a worker goes from batch to batch without waiting for another
//! thread, and a request reaches the queue without waking one: each hand-off between
//! threads costs tens of microseconds, more than a small batch of an echo model.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use schemas::{ErrorCode, Priority, Task};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::job::{expired_error, Batch, Item, Job};
use super::select::{take_grouped, take_in_order};
use super::{task_index, BatchPolicy, BatcherStats};
use crate::model::InputError;

/// How often the whole queue is swept for inputs that need no computing any more (the
/// head is swept before every batch).
const FULL_PURGE_EVERY: Duration = Duration::from_millis(50);

/// Marks the actor stopped in the statistics when dropped, also if it panics.
struct Running<'a>(&'a BatcherStats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.queue_alive.store(false, Ordering::Relaxed);
    }
}

/// The queue and what wakes its actor.
pub(super) struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the actor to look at its timer again (an idle worker and `min_size > 1`).
    wake_actor: Notify,
}

impl Shared {
    pub(super) fn new(queue: Queue) -> Arc<Self> {
        Arc::new(Shared {
            queue: Mutex::new(queue),
            wake_actor: Notify::new(),
        })
    }

    /// The queue, locked (held for microseconds: no I/O, no computing under it).
    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request's inputs (or refuses it) and hands batches to idle workers.
    pub(super) fn submit(&self, job: Arc<Job>) {
        let mut queue = self.lock();
        let now = Instant::now();
        queue.sweep_if_due(now);
        queue.enqueue(job);
        if queue.holds == 0 {
            queue.dispatch(now, false);
        }
        queue.publish();
        // The actor also answers for workers that are all gone (it fails what is queued).
        let wake =
            queue.waits_for_company() || queue.stats.workers_alive.load(Ordering::Relaxed) == 0;
        drop(queue);
        if wake {
            self.wake_actor.notify_one();
        }
    }

    /// Holds back handing batches to idle workers until the returned guard is dropped (see
    /// [`DispatchHold`]).
    pub(super) fn hold_dispatch(self: &Arc<Self>) -> DispatchHold {
        self.lock().holds += 1;
        DispatchHold(self.clone())
    }

    /// Stops the queue now (a start that failed): workers that wait or ask end.
    pub(super) fn stop(&self) {
        let mut queue = self.lock();
        queue.accepting = false;
        queue.stopped = true;
        queue.idle.clear();
    }

    /// Tells the actor that a worker thread ended (if it was the last, queued work fails).
    pub(super) fn worker_ended(&self) {
        self.wake_actor.notify_one();
    }

    /// A worker's next batch: one that is ready now, or the one handed to it once it is
    /// (`Err`, to wait on); `None` when the batcher has stopped and nothing is left.
    pub(super) fn next_batch(&self) -> Option<Result<Batch, oneshot::Receiver<Batch>>> {
        let mut queue = self.lock();
        let now = Instant::now();
        queue.sweep_if_due(now);
        let flush = !queue.accepting;
        if queue.idle.is_empty() {
            if let Some(mut batch) = queue.take_ready(now, flush) {
                // Work was waiting when this worker asked (see `Batch::backlogged`).
                batch.backlogged = true;
                queue.record_handed(&batch, now);
                queue.publish();
                return Some(Ok(batch));
            }
        }
        if queue.stopped {
            return None;
        }
        queue.publish();
        if flush && queue.queued_inputs == 0 {
            // Shutting down and everything is computed: end the queue here (the actor may be
            // asleep) and let the other workers and the actor see it.
            queue.stopped = true;
            queue.idle.clear();
            drop(queue);
            self.wake_actor.notify_one();
            return None;
        }
        let (batch_tx, batch_rx) = oneshot::channel();
        let backlogged = queue.queued_inputs > 0;
        queue.idle.push_back((batch_tx, backlogged));
        let timer = queue.waits_for_company();
        drop(queue);
        if timer {
            self.wake_actor.notify_one();
        }
        Some(Err(batch_rx))
    }
}

/// A task's queued inputs, oldest first, in one lane per priority class.
#[derive(Default)]
pub(super) struct Lanes {
    pub(super) interactive: VecDeque<Item>,
    pub(super) bulk: VecDeque<Item>,
}

impl Lanes {
    fn lane(&mut self, priority: Priority) -> &mut VecDeque<Item> {
        match priority {
            Priority::Interactive => &mut self.interactive,
            Priority::Bulk => &mut self.bulk,
        }
    }

    fn both(&mut self) -> [&mut VecDeque<Item>; 2] {
        [&mut self.interactive, &mut self.bulk]
    }

    fn len(&self) -> usize {
        self.interactive.len() + self.bulk.len()
    }

    /// The lane the task's next batch would start from, with its rank (0 before 1) and the
    /// arrival of the input that leads it: interactive if it holds anything, except that
    /// once the oldest bulk input has waited `bulk_max_wait`, bulk leads whenever it is
    /// `bulk_turn` (the queue's last batch, of any task, was not led by bulk). So bulk is never
    /// starved, and while interactive inputs wait, every other batch at least is theirs.
    fn lead(
        &self,
        now: Instant,
        bulk_max_wait: Duration,
        bulk_turn: bool,
    ) -> Option<(Priority, u8, Instant)> {
        let bulk = self.bulk.front().map(|item| item.job.arrived);
        let interactive = self.interactive.front().map(|item| item.job.arrived);
        let aged = bulk.is_some_and(|bulk| bulk + bulk_max_wait <= now);
        match (interactive, bulk) {
            (Some(_), Some(bulk)) if aged && bulk_turn => Some((Priority::Bulk, 0, bulk)),
            (Some(interactive), _) => Some((Priority::Interactive, 0, interactive)),
            // Bulk alone: before interactive inputs of other tasks only on its turn.
            (None, Some(bulk)) => Some((Priority::Bulk, u8::from(!(aged && bulk_turn)), bulk)),
            (None, None) => None,
        }
    }
}

/// The queue's state: per-task queues of inputs (oldest first) and the idle workers.
pub(super) struct Queue {
    pub(super) policy: BatchPolicy,
    /// Model workers started (they compute batches side by side).
    pub(super) workers: usize,
    pub(super) waiting: [Lanes; Task::ALL.len()],
    pub(super) queued_inputs: usize,
    /// Idle workers, oldest first, each with whether inputs were queued when it asked.
    pub(super) idle: VecDeque<(oneshot::Sender<Batch>, bool)>,
    pub(super) stats: Arc<BatcherStats>,
    /// Requests may still arrive (some `Batcher` handle is alive).
    pub(super) accepting: bool,
    /// Stopped: nothing was queued when the last handle went; workers end.
    pub(super) stopped: bool,
    /// When the whole queue was last swept.
    pub(super) swept: Instant,
    /// The last batch handed out (of any task) started from a bulk lane: the next aged bulk
    /// lane waits for an interactive-led batch first (see `Lanes::lead`).
    pub(super) bulk_led_last: bool,
    /// Live [`DispatchHold`]s: while any is, a request queued does not hand out batches.
    pub(super) holds: usize,
}

/// Queued inputs wait for this guard's end before idle workers are handed them: a
/// transport that has a burst of requests in hand queues them all under one hold, and a
/// sleeping worker is woken once for the burst (and takes it in one batch) instead of once
/// for its first request, then again for the requests that arrived while it woke. Dropping
/// the guard hands out what is ready, whatever other holds are live, so overlapping bursts
/// of several transports' loops delay no batch beyond their own end.
pub struct DispatchHold(Arc<Shared>);

impl Drop for DispatchHold {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.holds -= 1;
        queue.dispatch(Instant::now(), false);
        queue.publish();
    }
}

/// The actor: sweeps the queue, hands out batches whose `max_latency` came, and ends the
/// queue once every `Batcher` handle is gone (`closed` never carries anything; it closes
/// then) and everything queued was computed.
pub(super) async fn run(shared: Arc<Shared>, mut closed: mpsc::Receiver<()>) {
    let stats = shared.lock().stats.clone();
    let _running = Running(&stats);
    let mut accepting = true;
    loop {
        let wake = {
            let mut queue = shared.lock();
            let now = Instant::now();
            queue.sweep_if_due(now);
            if queue.stopped {
                break;
            }
            queue.accepting = accepting;
            queue.dispatch(now, !accepting);
            if stats.workers_alive.load(Ordering::Relaxed) == 0 && queue.idle.is_empty() {
                // Every worker is gone: nothing queued can be computed any more.
                queue.fail_all("every model worker has stopped");
            }
            queue.publish();
            if !accepting && queue.queued_inputs == 0 {
                // Idle workers see their channel close; busy ones find `stopped`.
                queue.stopped = true;
                queue.idle.clear();
                break;
            }
            // Only a queue waiting for `min_size` needs a timer, and only if a worker is idle.
            queue
                .next_latency_close()
                .filter(|_| !queue.idle.is_empty())
        };
        tokio::select! {
            message = closed.recv(), if accepting => {
                if message.is_none() {
                    accepting = false;
                }
            }
            _ = shared.wake_actor.notified() => {}
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

impl Queue {
    /// Sweeps the whole queue if it was not swept for `FULL_PURGE_EVERY`: the published depth
    /// is what transports refuse work on, so it is kept free of inputs that expired or whose
    /// request was answered, deep in the queue too.
    fn sweep_if_due(&mut self, now: Instant) {
        if now.duration_since(self.swept) >= FULL_PURGE_EVERY {
            self.purge(now, usize::MAX);
            self.swept = now;
        }
    }

    /// Publishes the depth that transports refuse work on.
    fn publish(&self) {
        self.stats
            .queued
            .store(self.queued_inputs as u64, Ordering::Relaxed);
        self.stats
            .queued_bulk
            .store(self.queued_bulk() as u64, Ordering::Relaxed);
    }

    /// Whether the actor's timer matters now: inputs wait for `min_size` company while a
    /// worker is idle.
    fn waits_for_company(&self) -> bool {
        self.policy.min_size > 1 && !self.idle.is_empty() && self.queued_inputs > 0
    }

    /// Queued `Priority: bulk` inputs.
    fn queued_bulk(&self) -> usize {
        self.waiting.iter().map(|lanes| lanes.bulk.len()).sum()
    }

    fn enqueue(&mut self, job: Arc<Job>) {
        let n = job.to_compute.len();
        let no_room = |queue: &Queue| {
            queue
                .policy
                .no_room(job.priority, n, queue.queued_inputs, queue.queued_bulk())
        };
        if no_room(self).is_some() {
            // Requests that expired or failed still hold places: free them before refusing.
            self.purge(Instant::now(), usize::MAX);
        }
        if let Some(refused) = no_room(self) {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            job.refuse(refused);
            return;
        }
        let queued_bulk = self.queued_bulk() as u64;
        let ahead = self
            .policy
            .queued_ahead(job.priority, self.queued_inputs as u64, queued_bulk);
        let refused = self.policy.refuse_for_backlog(
            &self.stats,
            ahead,
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
        let queue = self.waiting[task_index(job.task)].lane(job.priority);
        queue.extend(job.to_compute.iter().map(|&index| Item {
            job: job.clone(),
            index,
            tokens: job.prepared[index].tokens,
        }));
    }

    /// When the oldest input of a queue still short of `min_size` has waited `max_latency`.
    fn next_latency_close(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .flat_map(|lanes| [lanes.interactive.front(), lanes.bulk.front()])
            .flatten()
            .map(|item| item.job.arrived + self.policy.max_latency)
            .min()
    }

    /// Whether a task's inputs may be handed to an idle worker now.
    fn is_ready(&self, lanes: &Lanes, now: Instant, flush: bool) -> bool {
        let count = lanes.len();
        if count == 0 {
            return false;
        }
        if flush || count >= self.policy.min_size {
            return true;
        }
        let fronts = [lanes.interactive.front(), lanes.bulk.front()];
        if fronts
            .into_iter()
            .flatten()
            .any(|oldest| oldest.job.arrived + self.policy.max_latency <= now)
        {
            return true;
        }
        // Short of `min_size`, but a batch is full by tokens already: waiting adds nothing.
        let mut longest = 0;
        for (count, item) in lanes.interactive.iter().chain(&lanes.bulk).enumerate() {
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
        for queue in self.waiting.iter_mut().flat_map(Lanes::both) {
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
        while !self.idle.is_empty() {
            let Some(batch) = self.take_ready(now, flush) else {
                return;
            };
            self.hand_over(batch, now);
        }
    }

    /// The next batch of the oldest ready queue, taken out of it (expired inputs and those
    /// of answered requests swept from its head first).
    fn take_ready(&mut self, now: Instant, flush: bool) -> Option<Batch> {
        if self.queued_inputs == 0 {
            return None;
        }
        self.purge(now, self.policy.grouping_window.max(self.policy.max_size));
        let bulk_max_wait = self.policy.bulk_max_wait;
        let bulk_turn = !self.bulk_led_last;
        let (index, (lead, _, _)) = (0..self.waiting.len())
            .filter(|&i| self.is_ready(&self.waiting[i], now, flush))
            .filter_map(|i| Some((i, self.waiting[i].lead(now, bulk_max_wait, bulk_turn)?)))
            .min_by_key(|&(_, (_, rank, arrived))| (rank, arrived))?;
        self.bulk_led_last = lead == Priority::Bulk;
        let policy = self.policy;
        let lanes = &mut self.waiting[index];
        let first = lanes.lane(lead);
        let mut items = if policy.length_grouping {
            take_grouped(first, &policy)
        } else {
            take_in_order(first, &policy)
        };
        let other = match lead {
            Priority::Interactive => &mut lanes.bulk,
            Priority::Bulk => &mut lanes.interactive,
        };
        fill(&mut items, other, &policy);
        self.queued_inputs -= items.len();
        Some(Batch {
            task: Task::ALL[index],
            items,
            backlogged: false,
        })
    }

    /// Counts a batch handed to a worker: its shape and how long its inputs waited.
    fn record_handed(&self, batch: &Batch, now: Instant) {
        Handed::of(batch, now).record(&self.stats);
    }

    /// Gives a batch to the first live idle worker, or puts it back at the head of its queue.
    fn hand_over(&mut self, batch: Batch, now: Instant) {
        let summary = Handed::of(&batch, now);
        let mut batch = Some(batch);
        while let Some((worker, backlogged)) = self.idle.pop_front() {
            let mut handed = batch.take().expect("batch");
            handed.backlogged = backlogged;
            match worker.send(handed) {
                Ok(()) => return summary.record(&self.stats),
                // That worker died; try the next idle one.
                Err(returned) => batch = Some(returned),
            }
        }
        if let Some(batch) = batch {
            self.queued_inputs += batch.items.len();
            let lanes = &mut self.waiting[task_index(batch.task)];
            for item in batch.items.into_iter().rev() {
                lanes.lane(item.job.priority).push_front(item);
            }
        }
    }

    fn fail_all(&mut self, reason: &str) {
        for queue in self.waiting.iter_mut().flat_map(Lanes::both) {
            for item in queue.drain(..) {
                let error = InputError::new(ErrorCode::Internal, reason);
                item.job.complete(item.index, Err(error), 0);
            }
        }
        self.queued_inputs = 0;
    }
}

/// Adds inputs of the other lane to a batch while it has room, oldest first, taking only
/// inputs no longer than the batch's longest: they ride along without making the batch
/// slower for the inputs it was formed for. At most `grouping_window` inputs are looked at.
fn fill(batch: &mut Vec<Item>, other: &mut VecDeque<Item>, policy: &BatchPolicy) {
    let longest = batch.iter().map(|item| item.tokens).max().unwrap_or(0);
    let room = policy
        .max_size
        .min(policy.max_tokens / longest.max(1))
        .saturating_sub(batch.len());
    if room == 0 || other.is_empty() {
        return;
    }
    let window = other.len().min(policy.grouping_window.max(room));
    let mut taken = 0;
    let mut kept = Vec::new();
    for item in other.drain(..window) {
        if taken < room && item.tokens <= longest {
            batch.push(item);
            taken += 1;
        } else {
            kept.push(item);
        }
    }
    for item in kept.into_iter().rev() {
        other.push_front(item);
    }
}

/// What the statistics keep of a batch handed over.
struct Handed {
    size: usize,
    tokens: usize,
    longest: usize,
    waits: Vec<Duration>,
}

impl Handed {
    fn of(batch: &Batch, now: Instant) -> Self {
        let tokens = batch.items.iter().map(|item| item.tokens);
        Handed {
            size: batch.items.len(),
            tokens: tokens.clone().sum(),
            longest: tokens.max().unwrap_or(0),
            waits: batch
                .items
                .iter()
                .map(|item| now.saturating_duration_since(item.job.arrived))
                .collect(),
        }
    }

    fn record(self, stats: &BatcherStats) {
        stats.record_batch(self.size, self.tokens, self.longest);
        for wait in self.waits {
            stats.queue_wait.observe(wait);
        }
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
