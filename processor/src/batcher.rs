//! The batcher: an actor that owns the queue of waiting inputs and hands batches to model
//! workers, each on its own OS thread.
//!
//! Requests arrive through [`Batcher::infer`]; every input of a request is queued on its own,
//! so a request larger than a batch is split and one batch can mix many requests. A batch of
//! one task closes when it holds `max_size` inputs or `max_latency` after its oldest input
//! arrived, and is given to the next idle worker (workers pull, so a free one takes the work).
//! Each request gets exactly one answer, built from its own inputs' results. This module knows
//! nothing about NATS.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use schemas::{ErrorBody, ErrorCode, InferOptions, Output, Task};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::model::{BatchModel, InputError, ModelInput};

/// When a batch closes and how much may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// A batch closes when it holds this many inputs.
    pub max_size: usize,
    /// ... or this long after its oldest input arrived.
    pub max_latency: Duration,
    /// Most inputs that may wait in the queue; more are refused as `overloaded`.
    pub queue_capacity: usize,
}

/// The outputs of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// One output per input, in input order.
    pub outputs: Vec<Output>,
    /// The largest batch any of the request's inputs was computed in.
    pub batch_size: usize,
}

/// Counters kept by the batcher (read for `$SRV.STATS`).
#[derive(Debug, Default)]
pub struct BatcherStats {
    /// Batches given to the model.
    pub batches: AtomicU64,
    /// Inputs computed, summed over batches.
    pub inputs: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
}

impl BatcherStats {
    /// Mean inputs per batch so far (0 before the first batch).
    pub fn mean_batch_size(&self) -> f64 {
        let batches = self.batches.load(Ordering::Relaxed);
        if batches == 0 {
            return 0.0;
        }
        self.inputs.load(Ordering::Relaxed) as f64 / batches as f64
    }
}

/// Handle to the batcher; cheap to clone. The actor stops (after computing everything still
/// queued) once every handle is dropped.
#[derive(Clone)]
pub struct Batcher {
    submit: mpsc::Sender<Arc<Job>>,
    stats: Arc<BatcherStats>,
    model_name: Arc<str>,
    supported: Vec<Task>,
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

impl Batcher {
    /// Starts the queue actor and `workers` model threads, each building its own model with
    /// `load` (on its own thread). Returns once every model is loaded, or the first error.
    /// Must be called inside a tokio runtime.
    pub async fn start<M, F>(
        policy: BatchPolicy,
        workers: usize,
        load: F,
    ) -> anyhow::Result<(Batcher, Workers)>
    where
        M: BatchModel,
        F: Fn(usize) -> anyhow::Result<M> + Send + Sync + 'static,
    {
        assert!(workers > 0 && policy.max_size > 0);
        let load = Arc::new(load);
        let (ready_tx, ready_rx) = mpsc::channel::<oneshot::Sender<Batch>>(workers);
        let mut threads = Vec::with_capacity(workers);
        let mut loaded = Vec::with_capacity(workers);
        for index in 0..workers {
            let (loaded_tx, loaded_rx) = oneshot::channel();
            let load = load.clone();
            let ready_tx = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("model-worker-{index}"))
                .spawn(move || match load(index) {
                    Ok(model) => {
                        let info = (model.name().to_string(), Task::ALL.map(|t| model.supports(t)));
                        let _ = loaded_tx.send(Ok(info));
                        work(model, ready_tx);
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
        let (model_name, supports) = info.expect("at least one worker");
        let supported = Task::ALL
            .into_iter()
            .zip(supports)
            .filter_map(|(task, ok)| ok.then_some(task))
            .collect();

        let stats = Arc::new(BatcherStats::default());
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
            model_name: model_name.into(),
            supported,
            policy,
        };
        Ok((batcher, Workers { threads }))
    }

    /// Queues a request's inputs and waits for all of their outputs. Fails for the whole
    /// request if any input fails (the message names the input), if the queue is full, or if
    /// the model does not serve the task.
    pub async fn infer(
        &self,
        task: Task,
        inputs: Vec<String>,
        options: InferOptions,
    ) -> Result<Completed, ErrorBody> {
        if !self.supports(task) {
            return Err(ErrorBody::new(
                ErrorCode::UnsupportedTask,
                format!("model `{}` does not serve task `{task}`", self.model_name),
            ));
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
        let (done_tx, done_rx) = oneshot::channel();
        let job = Arc::new(Job::new(task, inputs, options, done_tx));
        let stopped = || ErrorBody::new(ErrorCode::Internal, "the batcher has stopped");
        self.submit.send(job).await.map_err(|_| stopped())?;
        done_rx.await.map_err(|_| stopped())?
    }

    /// Whether the loaded model serves this task.
    pub fn supports(&self, task: Task) -> bool {
        self.supported.contains(&task)
    }

    /// Name of the loaded model.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The batcher's counters.
    pub fn stats(&self) -> &Arc<BatcherStats> {
        &self.stats
    }
}

/// One request in flight: its inputs and the results gathered so far.
struct Job {
    task: Task,
    inputs: Vec<String>,
    options: InferOptions,
    arrived: Instant,
    progress: Mutex<Progress>,
}

struct Progress {
    results: Vec<Option<Result<Output, InputError>>>,
    remaining: usize,
    largest_batch: usize,
    done: Option<oneshot::Sender<Result<Completed, ErrorBody>>>,
}

impl Job {
    fn new(
        task: Task,
        inputs: Vec<String>,
        options: InferOptions,
        done: oneshot::Sender<Result<Completed, ErrorBody>>,
    ) -> Self {
        let n = inputs.len();
        Job {
            task,
            options,
            arrived: Instant::now(),
            progress: Mutex::new(Progress {
                results: (0..n).map(|_| None).collect(),
                remaining: n,
                largest_batch: 0,
                done: Some(done),
            }),
            inputs,
        }
    }

    /// Answers the request at once (it never reached a batch).
    fn refuse(&self, error: ErrorBody) {
        let done = self.progress.lock().expect("job lock").done.take();
        if let Some(done) = done {
            let _ = done.send(Err(error));
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
        let mut outputs = Vec::with_capacity(results.len());
        for (i, result) in results.into_iter().enumerate() {
            match result.expect("every input has a result") {
                Ok(output) => outputs.push(output),
                Err(err) => {
                    let message = if self.inputs.len() == 1 {
                        err.message
                    } else {
                        format!("input {i}: {}", err.message)
                    };
                    let _ = done.send(Err(ErrorBody::new(err.code, message)));
                    return;
                }
            }
        }
        let _ = done.send(Ok(Completed {
            outputs,
            batch_size,
        }));
    }
}

/// A batch for a worker: inputs of one task, each pointing back to its request.
struct Batch {
    task: Task,
    items: Vec<(Arc<Job>, usize)>,
}

/// The actor's state: per-task FIFO queues of inputs and the idle workers.
struct Queue {
    policy: BatchPolicy,
    waiting: [VecDeque<(Arc<Job>, usize)>; Task::ALL.len()],
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
            if !accepting && self.queued_inputs == 0 {
                break;
            }
            let wake = self.next_close().filter(|_| !self.idle.is_empty());
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
        queue.extend((0..n).map(|i| (job.clone(), i)));
    }

    /// When the oldest open batch closes on latency.
    fn next_close(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|q| q.front())
            .map(|(job, _)| job.arrived + self.policy.max_latency)
            .min()
    }

    /// Gives closed batches to idle workers, oldest first. When `flush` is set every queued
    /// input counts as closed (shutdown: compute what is left, then stop).
    fn dispatch(&mut self, now: Instant, flush: bool) {
        while !self.idle.is_empty() {
            let closed = self
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, q)| {
                    q.front().is_some_and(|(job, _)| {
                        flush
                            || q.len() >= self.policy.max_size
                            || job.arrived + self.policy.max_latency <= now
                    })
                })
                .min_by_key(|(_, q)| q.front().map(|(job, _)| job.arrived))
                .map(|(i, _)| i);
            let Some(index) = closed else { return };
            let queue = &mut self.waiting[index];
            let take = queue.len().min(self.policy.max_size);
            let items: Vec<_> = queue.drain(..take).collect();
            self.queued_inputs -= items.len();
            let batch = Batch {
                task: Task::ALL[index],
                items,
            };
            let size = batch.items.len() as u64;
            let mut batch = Some(batch);
            while let Some(worker) = self.idle.pop_front() {
                match worker.send(batch.take().expect("batch")) {
                    Ok(()) => {
                        self.stats.batches.fetch_add(1, Ordering::Relaxed);
                        self.stats.inputs.fetch_add(size, Ordering::Relaxed);
                        break;
                    }
                    // That worker died; try the next idle one.
                    Err(returned) => batch = Some(returned),
                }
            }
            if let Some(batch) = batch {
                // No live idle worker: put the inputs back at the head of their queue.
                self.queued_inputs += batch.items.len();
                let queue = &mut self.waiting[index];
                for item in batch.items.into_iter().rev() {
                    queue.push_front(item);
                }
            }
        }
    }

    fn fail_all(&mut self, reason: &str) {
        for queue in &mut self.waiting {
            for (job, index) in queue.drain(..) {
                job.complete(index, Err(InputError::new(ErrorCode::Internal, reason)), 0);
            }
        }
        self.queued_inputs = 0;
    }
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
fn work<M: BatchModel>(mut model: M, ready: mpsc::Sender<oneshot::Sender<Batch>>) {
    loop {
        let (batch_tx, batch_rx) = oneshot::channel();
        if ready.blocking_send(batch_tx).is_err() {
            return;
        }
        let Ok(batch) = batch_rx.blocking_recv() else {
            return;
        };
        let size = batch.items.len();
        let inputs: Vec<ModelInput<'_>> = batch
            .items
            .iter()
            .map(|(job, i)| ModelInput {
                text: &job.inputs[*i],
                options: &job.options,
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
        for ((job, index), result) in batch.items.iter().zip(results) {
            job.complete(*index, result, size);
        }
    }
}
