//! The scheduler: an actor that owns the queue of prepared inputs and hands batches to model
//! workers, each on its own OS thread. This module knows nothing about NATS.
//!
//! - Requests arrive through [`Batcher::infer`], which prepares (tokenises) every input on the
//!   caller's task, so workers only compute. Each input is queued on its own: a large request
//!   is split over batches, and one batch mixes many requests.
//! - Workers pull: an idle worker is handed a batch as soon as its task's queue holds
//!   `min_size` inputs (1 by default: at low load nothing waits), or when the oldest queued
//!   input has waited `max_latency`. While every worker is busy, inputs accumulate, and the
//!   next free worker takes up to `max_size` inputs or `max_tokens` padded tokens.
//! - With length grouping, a batch is the oldest queued input plus the inputs of nearest
//!   length among the `grouping_window` oldest, so batches carry little padding and no input
//!   is passed over for ever (the oldest always goes next).
//! - Inputs whose request's deadline passed are not computed: the request gets `timeout`.
//!   A full queue answers `overloaded` at once.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use schemas::{ErrorBody, ErrorCode, InferOptions, Output, Task};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::BatchConfig;
use crate::model::{BatchModel, InputError, ModelInput, Prepare, Prepared, WarmUpPlan};
pub use crate::stats::BatcherStats;

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
    /// Group inputs of similar length into a batch.
    pub length_grouping: bool,
    /// How many of the oldest queued inputs grouping chooses from.
    pub grouping_window: usize,
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
            length_grouping: true,
            grouping_window: (max_size * 8).max(256),
            warm_up_shapes: false,
        }
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
            length_grouping: config.length_grouping,
            grouping_window: config.grouping_window,
            warm_up_shapes: false,
        }
    }
}

/// The outputs of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// One output per input, in input order.
    pub outputs: Vec<Output>,
    /// The largest batch any of the request's inputs was computed in.
    pub batch_size: usize,
}

/// Handle to the batcher; cheap to clone. The actor stops (after computing everything still
/// queued) once every handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    submit: mpsc::Sender<Arc<Job>>,
    stats: Arc<BatcherStats>,
    model_name: Arc<str>,
    preparer: Arc<dyn Prepare>,
    /// Per task (in `Task::ALL` order): why the model cannot serve it, if it cannot.
    unsupported: Arc<[Option<String>; Task::ALL.len()]>,
    policy: BatchPolicy,
}

/// The worker threads; join them after the last [`Batcher`] handle is dropped.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Waits until every worker thread has ended.
    pub fn join(self) {
        for thread in self.threads {
            // A worker that panicked has already answered its requests with errors.
            let _ = thread.join();
        }
    }
}

/// What a worker reports once its model is loaded.
struct Loaded {
    name: String,
    unsupported: [Option<String>; Task::ALL.len()],
    preparer: Arc<dyn Prepare>,
}

impl Batcher {
    /// Starts the queue actor and `workers` model threads; worker `i` builds its own model
    /// with `load(i)` on its own thread (so a GPU context lives where it is used). Returns
    /// once every model is loaded, or the first error. Must be called inside a tokio runtime.
    pub async fn start<M, F>(
        policy: BatchPolicy,
        workers: usize,
        load: F,
    ) -> anyhow::Result<(Batcher, Workers)>
    where
        M: BatchModel,
        F: Fn(usize) -> anyhow::Result<M> + Send + Sync + 'static,
    {
        assert!(workers > 0 && policy.max_size > 0 && policy.min_size > 0);
        let stats = Arc::new(BatcherStats::default());
        let load = Arc::new(load);
        let plan = policy.warm_up_plan();
        let (ready_tx, ready_rx) = mpsc::channel::<oneshot::Sender<Batch>>(workers);
        let mut threads = Vec::with_capacity(workers);
        let mut loaded = Vec::with_capacity(workers);
        for index in 0..workers {
            let (loaded_tx, loaded_rx) = oneshot::channel();
            let load = load.clone();
            let ready_tx = ready_tx.clone();
            let stats = stats.clone();
            let thread = std::thread::Builder::new()
                .name(format!("model-worker-{index}"))
                .spawn(move || match load_and_warm_up(&*load, index, &plan) {
                    Ok(model) => {
                        let info = Loaded {
                            name: model.name().to_string(),
                            unsupported: Task::ALL
                                .map(|t| (!model.supports(t)).then(|| model.unsupported_reason(t))),
                            preparer: model.preparer(),
                        };
                        let _ = loaded_tx.send(Ok(info));
                        work(model, ready_tx, &stats);
                    }
                    Err(err) => {
                        let _ = loaded_tx.send(Err(err));
                    }
                })?;
            threads.push(thread);
            loaded.push(loaded_rx);
        }
        drop(ready_tx);
        let mut info = None;
        for rx in loaded {
            let result = rx
                .await
                .map_err(|_| anyhow::anyhow!("a model worker died while loading its model"))?;
            info = Some(result?);
        }
        let info = info.expect("at least one worker");

        let (submit_tx, submit_rx) = mpsc::channel(1024);
        let queue = Queue {
            policy,
            waiting: Task::ALL.map(|_| VecDeque::new()),
            queued_inputs: 0,
            idle: VecDeque::new(),
            stats: stats.clone(),
        };
        tokio::spawn(queue.run(submit_rx, ready_rx));
        let batcher = Batcher {
            submit: submit_tx,
            stats,
            model_name: info.name.into(),
            preparer: info.preparer,
            unsupported: Arc::new(info.unsupported),
            policy,
        };
        Ok((batcher, Workers { threads }))
    }

    /// Prepares a request's inputs, queues them and waits for all of their outputs. Fails for
    /// the whole request if any input fails (the message names the input), if the queue is
    /// full, if `deadline` passes before an input's batch starts, or if the model does not
    /// serve the task.
    pub async fn infer(
        &self,
        task: Task,
        inputs: Vec<String>,
        options: InferOptions,
        deadline: Option<Instant>,
    ) -> Result<Completed, ErrorBody> {
        self.infer_traced(task, inputs, options, deadline, None)
            .await
    }

    /// [`Batcher::infer`] for a request with an id, which the worker logs with its batch.
    pub async fn infer_traced(
        &self,
        task: Task,
        inputs: Vec<String>,
        options: InferOptions,
        deadline: Option<Instant>,
        request_id: Option<Arc<str>>,
    ) -> Result<Completed, ErrorBody> {
        if let Some(reason) = &self.unsupported[task_index(task)] {
            return Err(ErrorBody::new(ErrorCode::UnsupportedTask, reason.clone()));
        }
        if inputs.is_empty() {
            return Ok(Completed {
                outputs: Vec::new(),
                batch_size: 0,
            });
        }
        if inputs.len() > self.policy.queue_capacity {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                format!(
                    "{} inputs do not fit in the queue ({} inputs); split the request",
                    inputs.len(),
                    self.policy.queue_capacity
                ),
            ));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            return Err(expired_error(Duration::ZERO));
        }
        let prepared = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                self.preparer
                    .prepare(task, text, &options)
                    .map_err(|e| input_error(i, inputs.len(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (done_tx, done_rx) = oneshot::channel();
        let mut job = Job::new(task, inputs, prepared, options, deadline, done_tx);
        job.request_id = request_id;
        let job = Arc::new(job);
        let stopped = || ErrorBody::new(ErrorCode::Internal, "the batcher has stopped");
        self.submit.send(job).await.map_err(|_| stopped())?;
        done_rx.await.map_err(|_| stopped())?
    }

    /// Name of the loaded model.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The batcher's statistics.
    pub fn stats(&self) -> &Arc<BatcherStats> {
        &self.stats
    }
}

/// Loads worker `index`'s model and warms it up (see [`BatchModel::warm_up`]) before it takes
/// requests, so first-use costs (allocations, GPU kernel compilation and autotuning) are not
/// paid by a request, and a model that cannot compute fails at start. A panic on the way (a
/// GPU library that fails inside) becomes an error that says what it was.
fn load_and_warm_up<M: BatchModel>(
    load: &(dyn Fn(usize) -> anyhow::Result<M> + Send + Sync),
    index: usize,
    plan: &WarmUpPlan,
) -> anyhow::Result<M> {
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut model = load(index)?;
        let batches = model.warm_up(plan)?;
        Ok::<_, anyhow::Error>((model, batches))
    }));
    let (model, batches) = outcome.unwrap_or_else(|panic| {
        Err(anyhow::anyhow!(
            "model worker {index} panicked while loading its model: {}",
            panic_message(panic.as_ref())
        ))
    })?;
    tracing::info!(
        worker = index,
        batches,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded and warmed up"
    );
    Ok(model)
}

/// The text of a panic payload (`panic!` with a message or a format string).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The error of a request whose deadline passed before its batch started.
fn expired_error(waited: Duration) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Timeout,
        format!(
            "the request's deadline passed after {:.1} ms in the queue, before its batch started; it was not computed",
            waited.as_secs_f64() * 1000.0
        ),
    )
}

/// An input's error as the request's error, naming the input when there are several.
fn input_error(index: usize, inputs: usize, error: InputError) -> ErrorBody {
    let message = if inputs == 1 {
        error.message
    } else {
        format!("input {index}: {}", error.message)
    };
    ErrorBody::new(error.code, message)
}

/// One request in flight: its prepared inputs and the results gathered so far.
struct Job {
    task: Task,
    inputs: Vec<String>,
    prepared: Vec<Prepared>,
    options: InferOptions,
    arrived: Instant,
    deadline: Option<Instant>,
    /// The requester's `Request-Id`, for the logs.
    request_id: Option<Arc<str>>,
    progress: Mutex<Progress>,
}

struct Progress {
    results: Vec<Option<Result<Output, InputError>>>,
    remaining: usize,
    largest_batch: usize,
    /// Taken when the request is answered.
    done: Option<oneshot::Sender<Result<Completed, ErrorBody>>>,
}

impl Job {
    fn new(
        task: Task,
        inputs: Vec<String>,
        prepared: Vec<Prepared>,
        options: InferOptions,
        deadline: Option<Instant>,
        done: oneshot::Sender<Result<Completed, ErrorBody>>,
    ) -> Self {
        let n = inputs.len();
        Job {
            task,
            inputs,
            prepared,
            options,
            arrived: Instant::now(),
            deadline,
            request_id: None,
            progress: Mutex::new(Progress {
                results: (0..n).map(|_| None).collect(),
                remaining: n,
                largest_batch: 0,
                done: Some(done),
            }),
        }
    }

    /// Whether the request has been answered (its remaining inputs need no computing).
    fn answered(&self) -> bool {
        self.progress.lock().expect("job lock").done.is_none()
    }

    /// Answers the request now with an error; false if it was already answered.
    fn refuse(&self, error: ErrorBody) -> bool {
        let done = self.progress.lock().expect("job lock").done.take();
        match done {
            Some(done) => {
                let _ = done.send(Err(error));
                true
            }
            None => false,
        }
    }

    /// Records one input's result; the last one answers the request.
    fn complete(&self, index: usize, result: Result<Output, InputError>, batch_size: usize) {
        let mut progress = self.progress.lock().expect("job lock");
        if progress.results[index].is_some() {
            return;
        }
        progress.results[index] = Some(result);
        progress.remaining -= 1;
        progress.largest_batch = progress.largest_batch.max(batch_size);
        if progress.remaining > 0 {
            return;
        }
        let Some(done) = progress.done.take() else {
            return;
        };
        let batch_size = progress.largest_batch;
        let results = std::mem::take(&mut progress.results);
        drop(progress);
        let n = results.len();
        let outputs = results
            .into_iter()
            .enumerate()
            .map(|(i, result)| {
                result
                    .expect("every input has a result")
                    .map_err(|e| input_error(i, n, e))
            })
            .collect::<Result<Vec<_>, _>>();
        let _ = done.send(outputs.map(|outputs| Completed {
            outputs,
            batch_size,
        }));
    }
}

/// One queued input.
struct Item {
    job: Arc<Job>,
    index: usize,
    tokens: usize,
}

impl Item {
    fn expired(&self, now: Instant) -> bool {
        self.job.deadline.is_some_and(|d| d <= now)
    }
}

/// A batch for a worker: inputs of one task, each pointing back to its request.
struct Batch {
    task: Task,
    items: Vec<Item>,
}

/// The actor's state: per-task queues of inputs (oldest first) and the idle workers.
struct Queue {
    policy: BatchPolicy,
    waiting: [VecDeque<Item>; Task::ALL.len()],
    queued_inputs: usize,
    idle: VecDeque<oneshot::Sender<Batch>>,
    stats: Arc<BatcherStats>,
}

impl Queue {
    async fn run(
        mut self,
        mut submit: mpsc::Receiver<Arc<Job>>,
        mut ready: mpsc::Receiver<oneshot::Sender<Batch>>,
    ) {
        let mut accepting = true;
        let mut workers_alive = true;
        loop {
            self.dispatch(Instant::now(), !accepting);
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
                job = submit.recv(), if accepting => match job {
                    Some(job) => self.enqueue(job),
                    None => accepting = false,
                },
                worker = ready.recv(), if workers_alive => match worker {
                    Some(worker) => self.idle.push_back(worker),
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
            job.refuse(ErrorBody::new(
                ErrorCode::Overloaded,
                format!(
                    "queue full ({} of {} inputs waiting); retry later or on another processor",
                    self.queued_inputs, self.policy.queue_capacity
                ),
            ));
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
        while let Some(worker) = self.idle.pop_front() {
            match worker.send(batch.take().expect("batch")) {
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

/// Oldest first, up to `max_size` inputs and `max_tokens` padded tokens (at least one input).
fn take_in_order(queue: &mut VecDeque<Item>, policy: &BatchPolicy) -> Vec<Item> {
    let mut longest = 0;
    let mut count = 0;
    for item in queue.iter() {
        let longer = longest.max(item.tokens);
        if count > 0 && (count + 1 > policy.max_size || (count + 1) * longer > policy.max_tokens) {
            break;
        }
        longest = longer;
        count += 1;
    }
    queue.drain(..count).collect()
}

/// The oldest input plus the inputs nearest to it in length among the `grouping_window`
/// oldest: of the runs of inputs adjacent in length order that contain the oldest and fit
/// the bounds, the one with the most inputs, then the least padding.
fn take_grouped(queue: &mut VecDeque<Item>, policy: &BatchPolicy) -> Vec<Item> {
    let window = queue.len().min(policy.grouping_window.max(1));
    // Positions in the queue, shortest first; equal lengths stay oldest first.
    let mut order: Vec<usize> = (0..window).collect();
    order.sort_by_key(|&i| queue[i].tokens);
    let tokens = |k: usize| queue[order[k]].tokens;
    let mut prefix = vec![0usize; window + 1];
    for k in 0..window {
        prefix[k + 1] = prefix[k] + tokens(k);
    }
    let oldest = order
        .iter()
        .position(|&i| i == 0)
        .expect("the oldest is in the window");
    let fits = |start: usize, end: usize| {
        end - start <= policy.max_size && (end - start) * tokens(end - 1) <= policy.max_tokens
    };
    // Best run [start, end) so far, as (inputs, padding).
    let mut best = (oldest, oldest + 1);
    let mut best_score = (1, 0);
    for start in oldest.saturating_sub(policy.max_size - 1)..=oldest {
        if !fits(start, oldest + 1) {
            continue;
        }
        let mut end = oldest + 1;
        while end < window && fits(start, end + 1) {
            end += 1;
        }
        let inputs = end - start;
        let padding = inputs * tokens(end - 1) - (prefix[end] - prefix[start]);
        if inputs > best_score.0 || (inputs == best_score.0 && padding < best_score.1) {
            best = (start, end);
            best_score = (inputs, padding);
        }
    }
    let mut chosen = vec![false; window];
    for &position in &order[best.0..best.1] {
        chosen[position] = true;
    }
    let head: Vec<Item> = queue.drain(..window).collect();
    let mut batch = Vec::with_capacity(best.1 - best.0);
    let mut rest = Vec::with_capacity(window - batch.capacity());
    for (item, chosen) in head.into_iter().zip(chosen) {
        if chosen {
            batch.push(item);
        } else {
            rest.push(item);
        }
    }
    for item in rest.into_iter().rev() {
        queue.push_front(item);
    }
    batch
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn task_index(task: Task) -> usize {
    Task::ALL
        .iter()
        .position(|t| *t == task)
        .expect("Task::ALL lists every task")
}

/// A model worker's loop: ask the queue for a batch, compute it, deliver the results.
fn work<M: BatchModel>(
    mut model: M,
    ready: mpsc::Sender<oneshot::Sender<Batch>>,
    stats: &BatcherStats,
) {
    loop {
        let (batch_tx, batch_rx) = oneshot::channel();
        if ready.blocking_send(batch_tx).is_err() {
            return;
        }
        let Ok(batch) = batch_rx.blocking_recv() else {
            return;
        };
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let size = batch.items.len();
        let inputs: Vec<ModelInput<'_>> = batch
            .items
            .iter()
            .map(|item| ModelInput {
                text: &item.job.inputs[item.index],
                options: &item.job.options,
                prepared: &item.job.prepared[item.index],
            })
            .collect();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| model.run(batch.task, &inputs)));
        let results = match outcome {
            Ok(results) if results.len() == size => results,
            Ok(results) => {
                let message = format!(
                    "the model returned {} results for a batch of {size}",
                    results.len()
                );
                vec![Err(InputError::new(ErrorCode::Internal, message)); size]
            }
            Err(_) => {
                let message = "the model panicked while computing this batch";
                vec![Err(InputError::new(ErrorCode::ModelFailed, message)); size]
            }
        };
        drop(inputs);
        let took = started.elapsed();
        stats.compute.observe(took);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let mut request_ids: Vec<&str> = batch
                .items
                .iter()
                .filter_map(|item| item.job.request_id.as_deref())
                .collect();
            request_ids.dedup();
            tracing::debug!(
                task = batch.task.as_str(),
                size,
                compute_ms = took.as_secs_f64() * 1000.0,
                ?request_ids,
                "batch computed"
            );
        }
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        for (item, result) in batch.items.iter().zip(results) {
            item.job.complete(item.index, result, size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

    /// Tokens are characters, so a test says an input's length by its text.
    struct CharCount;

    impl Prepare for CharCount {
        fn prepare(
            &self,
            _task: Task,
            text: &str,
            _options: &InferOptions,
        ) -> Result<Prepared, InputError> {
            if text == "unpreparable" {
                return Err(InputError::new(ErrorCode::InvalidInput, "cannot prepare"));
            }
            Ok(Prepared::length_only(text.len()))
        }
    }

    /// Echoes; reports each batch's texts; fails inputs that say "fail", panics on "panic".
    /// When gated, every batch waits for one permit from the test before it computes.
    struct Recorder {
        batches: UnboundedSender<Vec<String>>,
        permits: Option<Arc<Mutex<UnboundedReceiver<()>>>>,
    }

    impl BatchModel for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn supports(&self, task: Task) -> bool {
            task == Task::Embed
        }
        fn preparer(&self) -> Arc<dyn Prepare> {
            Arc::new(CharCount)
        }
        fn run(
            &mut self,
            _task: Task,
            inputs: &[ModelInput<'_>],
        ) -> Vec<Result<Output, InputError>> {
            let texts: Vec<String> = inputs.iter().map(|i| i.text.to_string()).collect();
            if texts == ["warm up"] {
                // The batcher's own warm-up batch, before any test request.
                return vec![Ok(Output::Text {
                    text: texts[0].clone(),
                })];
            }
            let _ = self.batches.send(texts);
            if let Some(permits) = &self.permits {
                permits.lock().unwrap().blocking_recv().expect("a permit");
            }
            if inputs.iter().any(|i| i.text == "panic") {
                panic!("asked to panic");
            }
            inputs
                .iter()
                .map(|input| match input.text {
                    "fail" => Err(InputError::new(
                        ErrorCode::ModelFailed,
                        "cannot compute `fail`",
                    )),
                    text => Ok(Output::Text {
                        text: text.to_string(),
                    }),
                })
                .collect()
        }
    }

    /// A batcher of [`Recorder`]s and the test's ends of their channels.
    struct Harness {
        batcher: Batcher,
        batches: UnboundedReceiver<Vec<String>>,
        permits: UnboundedSender<()>,
    }

    impl Harness {
        async fn start(policy: BatchPolicy, workers: usize, gated: bool) -> Harness {
            let (batches_tx, batches) = unbounded_channel();
            let (permits, permits_rx) = unbounded_channel();
            let permits_rx = Arc::new(Mutex::new(permits_rx));
            let (batcher, _workers) = Batcher::start(policy, workers, move |_| {
                Ok(Recorder {
                    batches: batches_tx.clone(),
                    permits: gated.then(|| permits_rx.clone()),
                })
            })
            .await
            .unwrap();
            Harness {
                batcher,
                batches,
                permits,
            }
        }

        /// Sends a request in its own task.
        fn spawn(
            &self,
            items: &[&str],
            deadline: Option<Instant>,
        ) -> tokio::task::JoinHandle<Result<Completed, ErrorBody>> {
            let batcher = self.batcher.clone();
            let inputs = texts(items);
            tokio::spawn(async move {
                batcher
                    .infer(Task::Embed, inputs, InferOptions::default(), deadline)
                    .await
            })
        }

        async fn infer(&self, items: &[&str]) -> Result<Completed, ErrorBody> {
            self.batcher
                .infer(Task::Embed, texts(items), InferOptions::default(), None)
                .await
        }

        /// The texts of the next batch a worker started.
        async fn next_batch(&mut self) -> Vec<String> {
            self.batches.recv().await.expect("a batch started")
        }

        /// Yields until `n` inputs are queued (the spawned requests have arrived).
        async fn wait_queued(&self, n: u64) {
            while self.batcher.stats().queued.load(Ordering::Relaxed) != n {
                tokio::task::yield_now().await;
            }
        }

        fn release(&self, batches: usize) {
            for _ in 0..batches {
                self.permits.send(()).unwrap();
            }
        }
    }

    fn policy(max_size: usize) -> BatchPolicy {
        BatchPolicy {
            length_grouping: false,
            ..BatchPolicy::new(max_size, 1000)
        }
    }

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn text(output: &Output) -> &str {
        match output {
            Output::Text { text } => text,
            other => panic!("unexpected output {other:?}"),
        }
    }

    fn stat(batcher: &Batcher, counter: fn(&BatcherStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        counter(batcher.stats()).load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_worker_starts_at_once_with_what_is_queued() {
        let policy = BatchPolicy {
            max_latency: Duration::from_secs(3600),
            ..policy(8)
        };
        let harness = Harness::start(policy, 1, false).await;
        let started = Instant::now();
        let completed = harness.infer(&["a"]).await.unwrap();
        assert_eq!(text(&completed.outputs[0]), "a");
        assert_eq!(completed.batch_size, 1);
        // No timer fired: the batch of one left without waiting for company.
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_worker_is_busy_inputs_accumulate_up_to_max_size() {
        let mut harness = Harness::start(policy(4), 1, true).await;
        let first = harness.spawn(&["a"], None);
        assert_eq!(harness.next_batch().await, ["a"]);
        let rest: Vec<_> = ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
            .into_iter()
            .map(|t| harness.spawn(&[t], None))
            .collect();
        harness.wait_queued(10).await;
        harness.release(4);
        assert_eq!(harness.next_batch().await, ["b", "c", "d", "e"]);
        assert_eq!(harness.next_batch().await, ["f", "g", "h", "i"]);
        assert_eq!(harness.next_batch().await, ["j", "k"]);
        assert_eq!(first.await.unwrap().unwrap().batch_size, 1);
        for request in rest {
            assert!(request.await.unwrap().unwrap().batch_size >= 2);
        }
        assert_eq!(harness.batcher.stats().mean_batch_size(), 11.0 / 4.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_stops_at_max_tokens_padded_tokens() {
        let policy = BatchPolicy {
            max_tokens: 12,
            ..policy(8)
        };
        let mut harness = Harness::start(policy, 1, true).await;
        let _busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        // Lengths 2, 2, 6, 2, 20: [2, 2] (adding the 6 would pad to 3 × 6 = 18), then
        // [6, 2] (2 × 6 = 12), then the 20 alone: longer than the bound, but still computed.
        let request = harness.spawn(&["bb", "cc", "dddddd", "ee", &"f".repeat(20)], None);
        harness.wait_queued(5).await;
        harness.release(4);
        assert_eq!(harness.next_batch().await, ["bb", "cc"]);
        assert_eq!(harness.next_batch().await, ["dddddd", "ee"]);
        assert_eq!(harness.next_batch().await, ["f".repeat(20)]);
        let completed = request.await.unwrap().unwrap();
        assert_eq!(completed.outputs.len(), 5);
        // Padded positions: 1 + 2×2 + 2×6 + 20 = 37, of which 1 + 4 + 8 + 20 = 33 were tokens.
        assert_eq!(stat(&harness.batcher, |s| &s.padded_tokens), 37);
        assert_eq!(stat(&harness.batcher, |s| &s.tokens), 33);
    }

    #[tokio::test(start_paused = true)]
    async fn min_size_waits_for_company_until_max_latency() {
        let policy = BatchPolicy {
            min_size: 3,
            max_latency: Duration::from_millis(50),
            ..policy(8)
        };
        let mut harness = Harness::start(policy, 1, false).await;
        let started = Instant::now();
        let first = harness.spawn(&["a"], None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = harness.spawn(&["b"], None);
        assert_eq!(first.await.unwrap().unwrap().batch_size, 2);
        assert_eq!(second.await.unwrap().unwrap().batch_size, 2);
        // Closed by the latency bound, 50 ms after the first input, not after the second.
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(harness.next_batch().await, ["a", "b"]);

        // Three inputs reach min_size: they start without waiting.
        let started = Instant::now();
        let completed = harness.infer(&["c", "d", "e"]).await.unwrap();
        assert_eq!(completed.batch_size, 3);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn min_size_does_not_wait_when_a_batch_is_full_by_tokens() {
        let policy = BatchPolicy {
            min_size: 4,
            max_tokens: 10,
            max_latency: Duration::from_secs(3600),
            ..policy(8)
        };
        let harness = Harness::start(policy, 1, false).await;
        let started = Instant::now();
        // 6 and 12 tokens cannot share a batch of 10 tokens, and the 12 fills one alone:
        // waiting for more inputs could not make either batch larger.
        let completed = harness.infer(&["aaaaaa", "bbbbbbbbbbbb"]).await.unwrap();
        assert_eq!(completed.batch_size, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_whose_deadline_passed_in_the_queue_are_not_computed() {
        let mut harness = Harness::start(policy(8), 1, true).await;
        let busy = harness.spawn(&["busy"], None);
        harness.next_batch().await;
        let doomed = harness.spawn(
            &["late1", "late2"],
            Some(Instant::now() + Duration::from_millis(10)),
        );
        let patient = harness.spawn(&["patient"], Some(Instant::now() + Duration::from_secs(60)));
        harness.wait_queued(3).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        harness.release(2);
        // Only the request whose deadline has not passed reaches the model.
        assert_eq!(harness.next_batch().await, ["patient"]);
        let error = doomed.await.unwrap().unwrap_err();
        assert_eq!(error.kind, ErrorCode::Timeout);
        assert_eq!(error.code, 504);
        assert!(error.message.contains("not computed"), "{}", error.message);
        assert!(patient.await.unwrap().is_ok() && busy.await.unwrap().is_ok());
        assert_eq!(stat(&harness.batcher, |s| &s.expired), 1);
        assert_eq!(stat(&harness.batcher, |s| &s.inputs), 2);

        // A deadline already passed on arrival is refused without queueing.
        let error = harness
            .batcher
            .infer(
                Task::Embed,
                texts(&["x"]),
                InferOptions::default(),
                Some(Instant::now()),
            )
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorCode::Timeout);
        assert_eq!(stat(&harness.batcher, |s| &s.expired), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_new_requests_as_overloaded() {
        let policy = BatchPolicy {
            queue_capacity: 4,
            ..policy(2)
        };
        let mut harness = Harness::start(policy, 1, true).await;
        let first = harness.spawn(&["a", "b"], None);
        assert_eq!(harness.next_batch().await.len(), 2); // the worker is now busy
        let queued = [
            harness.spawn(&["c", "d"], None),
            harness.spawn(&["e", "f"], None),
        ];
        harness.wait_queued(4).await;
        let refused = harness.infer(&["g"]).await.unwrap_err();
        assert_eq!(refused.kind, ErrorCode::Overloaded);
        assert_eq!(refused.code, 503);
        assert_eq!(stat(&harness.batcher, |s| &s.rejected), 1);
        harness.release(3);
        assert!(first.await.unwrap().is_ok());
        for request in queued {
            assert!(request.await.unwrap().is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_workers_take_batches_from_one_queue() {
        let mut harness = Harness::start(policy(1), 2, true).await;
        let slow = harness.spawn(&["slow"], None);
        let fast = harness.spawn(&["fast"], None);
        // Both batches are computing at once, so they went to different workers.
        let mut started = vec![harness.next_batch().await, harness.next_batch().await];
        started.sort();
        assert_eq!(started, [["fast"], ["slow"]]);
        assert_eq!(stat(&harness.batcher, |s| &s.in_flight), 2);
        harness.release(1);
        // One worker is free again; it takes the next batch while the other still computes.
        let one = harness.spawn(&["next"], None);
        assert_eq!(harness.next_batch().await, ["next"]);
        harness.release(2);
        for request in [slow, fast, one] {
            assert!(request.await.unwrap().is_ok());
        }
        assert_eq!(stat(&harness.batcher, |s| &s.batches), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn length_grouping_batches_similar_lengths_and_serves_the_oldest_first() {
        let policy = BatchPolicy {
            length_grouping: true,
            ..policy(3)
        };
        let mut harness = Harness::start(policy, 1, true).await;
        let _busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        let long = "l".repeat(10);
        let items = [long.as_str(), "s1", &long, "s2", &long, "s3", "s4"];
        let request = harness.spawn(&items, None);
        harness.wait_queued(7).await;
        harness.release(4);
        // The oldest input is long, so the long ones go first, then the short ones in order.
        assert_eq!(
            harness.next_batch().await,
            [long.clone(), long.clone(), long.clone()]
        );
        assert_eq!(harness.next_batch().await, ["s1", "s2", "s3"]);
        assert_eq!(harness.next_batch().await, ["s4"]);
        let completed = request.await.unwrap().unwrap();
        let got: Vec<&str> = completed.outputs.iter().map(text).collect();
        assert_eq!(got, items, "outputs keep the request's order");
        // No padding at all after the first batch of one.
        assert_eq!(harness.batcher.stats().padding_ratio(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn length_grouping_never_passes_over_the_oldest_input() {
        let policy = BatchPolicy {
            length_grouping: true,
            ..policy(2)
        };
        let mut harness = Harness::start(policy, 1, true).await;
        let _busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        let long = "l".repeat(30);
        let old = harness.spawn(&[&long], None);
        harness.wait_queued(1).await;
        let shorts = harness.spawn(&["a", "b", "c", "d", "e"], None);
        harness.wait_queued(6).await;
        harness.release(4);
        let first = harness.next_batch().await;
        assert!(
            first.contains(&long),
            "the oldest input goes next: {first:?}"
        );
        assert!(old.await.unwrap().is_ok() && shorts.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_input_request_is_split_over_batches_and_keeps_its_order() {
        let mut harness = Harness::start(policy(4), 1, true).await;
        let _busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        let inputs: Vec<String> = (0..10).map(|i| format!("in{i}")).collect();
        let small = harness.spawn(&["y", "z"], None);
        harness.wait_queued(2).await;
        let big = harness.spawn(&inputs.iter().map(String::as_str).collect::<Vec<_>>(), None);
        harness.wait_queued(12).await;
        harness.release(4);
        let big = big.await.unwrap().unwrap();
        let got: Vec<&str> = big.outputs.iter().map(text).collect();
        assert_eq!(got, inputs.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(big.batch_size, 4);
        assert_eq!(small.await.unwrap().unwrap().batch_size, 4);
        // The first batch is shared by both requests.
        assert_eq!(harness.next_batch().await, ["y", "z", "in0", "in1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn one_failing_input_fails_only_its_own_request() {
        let mut harness = Harness::start(policy(8), 1, true).await;
        let _busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        let a = harness.spawn(&["ok1"], None);
        let b = harness.spawn(&["x", "fail", "y"], None);
        let c = harness.spawn(&["ok2"], None);
        harness.wait_queued(5).await;
        harness.release(2);
        assert_eq!(harness.next_batch().await.len(), 5);
        assert_eq!(text(&a.await.unwrap().unwrap().outputs[0]), "ok1");
        assert_eq!(text(&c.await.unwrap().unwrap().outputs[0]), "ok2");
        let error = b.await.unwrap().unwrap_err();
        assert_eq!(error.kind, ErrorCode::ModelFailed);
        assert_eq!(error.code, 500);
        assert!(error.message.starts_with("input 1:"), "{}", error.message);
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_that_cannot_be_prepared_fail_before_queueing() {
        let mut harness = Harness::start(policy(8), 1, false).await;
        let error = harness.infer(&["fine", "unpreparable"]).await.unwrap_err();
        assert_eq!(error.kind, ErrorCode::InvalidInput);
        assert_eq!(error.message, "input 1: cannot prepare");
        assert_eq!(stat(&harness.batcher, |s| &s.batches), 0);
        assert!(harness.batches.try_recv().is_err(), "the model saw nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_model_fails_its_batch_and_keeps_serving() {
        let harness = Harness::start(policy(1), 1, false).await;
        let error = harness.infer(&["panic"]).await.unwrap_err();
        assert_eq!(error.kind, ErrorCode::ModelFailed);
        let after = harness.infer(&["fine"]).await;
        assert_eq!(text(&after.unwrap().outputs[0]), "fine");
    }

    #[tokio::test(start_paused = true)]
    async fn unsupported_tasks_are_refused_before_queueing() {
        let harness = Harness::start(policy(4), 1, false).await;
        let error = harness
            .batcher
            .infer(Task::FillMask, texts(&["a"]), InferOptions::default(), None)
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorCode::UnsupportedTask);
        assert_eq!(stat(&harness.batcher, |s| &s.batches), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_and_compute_times_are_recorded() {
        let mut harness = Harness::start(policy(4), 1, true).await;
        let busy = harness.spawn(&["x"], None);
        harness.next_batch().await;
        let waiting = harness.spawn(&["y"], None);
        harness.wait_queued(1).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        harness.release(2);
        assert!(busy.await.unwrap().is_ok() && waiting.await.unwrap().is_ok());
        let stats = harness.batcher.stats();
        assert_eq!(stats.queue_wait.count(), 2);
        // One input waited 0 s, the other the 30 ms the worker was held.
        assert!((stats.queue_wait.sum() - 0.030).abs() < 0.001);
        assert_eq!(stats.compute.count(), 2);
    }

    /// A model that only records the warm-up it was asked for (or fails it, or panics in it).
    struct WarmUpProbe {
        plans: UnboundedSender<WarmUpPlan>,
        outcome: &'static str,
    }

    impl BatchModel for WarmUpProbe {
        fn name(&self) -> &str {
            "probe"
        }
        fn supports(&self, task: Task) -> bool {
            task == Task::Embed
        }
        fn preparer(&self) -> Arc<dyn Prepare> {
            Arc::new(CharCount)
        }
        fn run(&mut self, _: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
            inputs
                .iter()
                .map(|i| {
                    Ok(Output::Text {
                        text: i.text.into(),
                    })
                })
                .collect()
        }
        fn warm_up(&mut self, plan: &WarmUpPlan) -> anyhow::Result<usize> {
            let _ = self.plans.send(*plan);
            match self.outcome {
                "panic" => panic!("cudarc: Unable to dynamically load the \"cuda\" shared library"),
                "fail" => anyhow::bail!("the warm-up batch failed"),
                _ => Ok(3),
            }
        }
    }

    async fn start_probe(
        policy: BatchPolicy,
        workers: usize,
        outcome: &'static str,
    ) -> (anyhow::Result<Batcher>, Vec<WarmUpPlan>) {
        let (plans_tx, mut plans_rx) = unbounded_channel();
        let started = Batcher::start(policy, workers, move |_| {
            Ok(WarmUpProbe {
                plans: plans_tx.clone(),
                outcome,
            })
        })
        .await
        .map(|(batcher, _workers)| batcher);
        let mut plans = Vec::new();
        while let Ok(plan) = plans_rx.try_recv() {
            plans.push(plan);
        }
        (started, plans)
    }

    #[tokio::test]
    async fn every_replica_is_warmed_up_with_the_policys_shapes_before_start_returns() {
        let policy = BatchPolicy {
            max_tokens: 4096,
            warm_up_shapes: true,
            ..policy(16)
        };
        let (started, plans) = start_probe(policy, 3, "ok").await;
        let batcher = started.unwrap();
        let expected = WarmUpPlan {
            shapes: true,
            max_batch: 16,
            max_tokens: 4096,
        };
        assert_eq!(plans, vec![expected; 3]);
        assert_eq!(
            text(
                &batcher
                    .infer(Task::Embed, texts(&["a"]), InferOptions::default(), None)
                    .await
                    .unwrap()
                    .outputs[0]
            ),
            "a"
        );
    }

    #[tokio::test]
    async fn a_failed_or_panicking_warm_up_fails_the_start_with_its_reason() {
        let (started, _) = start_probe(policy(4), 1, "fail").await;
        let error = format!("{:#}", started.err().expect("start fails"));
        assert!(error.contains("the warm-up batch failed"), "{error}");

        let (started, _) = start_probe(policy(4), 2, "panic").await;
        let error = format!("{:#}", started.err().expect("start fails"));
        assert!(
            error.contains("panicked while loading its model"),
            "{error}"
        );
        assert!(
            error.contains("Unable to dynamically load the \"cuda\" shared library"),
            "{error}"
        );
    }
}
