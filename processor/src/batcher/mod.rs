//! The scheduler: a queue of prepared inputs shared by the requests, the model workers (each
//! on its own OS thread) and a small actor that keeps time. This module knows nothing about
//! NATS.
//!
//! - Requests arrive through [`Batcher::infer`], which prepares (tokenises) every input before
//!   queueing it, on a blocking thread (at most one per core) unless the model's preparing is
//!   trivial, so neither the async runtime nor the workers tokenise. Each input is queued on
//!   its own: a large request is split over batches, and one batch mixes many requests.
//! - A request queues its inputs itself and hands a batch to an idle worker if one waits; a
//!   worker that finishes a batch takes the next one straight from the queue. No thread is
//!   woken in between unless a worker sleeps for lack of work.
//! - Workers pull: an idle worker is handed a batch as soon as its task's queue holds
//!   `min_size` inputs (1 by default: at low load nothing waits), or when the oldest queued
//!   input has waited `max_latency`. While every worker is busy, inputs accumulate, and the
//!   next free worker takes up to `max_size` inputs or `max_tokens` padded tokens.
//! - With length grouping, a batch is the oldest queued input plus the inputs of nearest
//!   length among the `grouping_window` oldest, so batches carry little padding and no input
//!   is passed over for ever (the oldest always goes next).
//! - Inputs whose request's deadline passed are not computed: the request gets `timeout`.
//!   A full queue answers `overloaded` at once, and so does a queue holding more work than
//!   its workers compute in `max_queue_wait` (estimated from recent batches).
//!
//! Modules: `policy` (the settings), `job` (a request in flight), `queue` (the shared queue
//! and its actor),
//! `select` (which inputs make a batch), `worker` (the model threads).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use schemas::{ErrorBody, ErrorCode, InferOptions, Input, Output, Priority, Task};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::cache::OutputCache;
use crate::model::{BatchModel, Prepare, Prepared};
pub use crate::stats::BatcherStats;
pub use policy::BatchPolicy;

pub use job::Done;
use job::{expired_error, input_error, Job};
pub use queue::DispatchHold;
use queue::{Queue, Shared};
pub(crate) use worker::panic_message;
use worker::{load_and_warm_up, work, Loaded};

mod job;
mod policy;
mod queue;
mod select;
#[cfg(test)]
mod tests;
mod worker;

/// Why the scheduler did not compute a request (the transport turns it into an error
/// reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The error kind.
    pub kind: ErrorCode,
    /// What happened, for a person.
    pub message: String,
}

impl Refused {
    /// A refusal of this kind.
    pub fn new(kind: ErrorCode, message: impl Into<String>) -> Self {
        Refused {
            kind,
            message: message.into(),
        }
    }
}

impl From<Refused> for ErrorBody {
    fn from(refused: Refused) -> ErrorBody {
        ErrorBody::new(refused.kind, refused.message)
    }
}

/// Why the queue refuses work (see [`Batcher::refuses_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `queue_capacity` inputs are waiting.
    Full,
    /// The queued work would take longer than the request may wait.
    Backlog,
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
    /// The queue, shared with the workers and the actor.
    queue: Arc<Shared>,
    /// Closes when the last handle is dropped: the actor then finishes the queue and stops.
    _alive: mpsc::Sender<()>,
    stats: Arc<BatcherStats>,
    /// Blocking threads preparing inputs at once, at most (one per core).
    preparing: Arc<Semaphore>,
    /// Model workers started.
    workers: usize,
    model_name: Arc<str>,
    preparer: Arc<dyn Prepare>,
    /// Per task (in `Task::ALL` order): why the model cannot serve it, if it cannot.
    unsupported: Arc<[Option<String>; Task::ALL.len()]>,
    policy: BatchPolicy,
    /// Outputs kept per input, if caching is on.
    cache: Option<Arc<OutputCache>>,
}

/// What a request says besides its task, inputs and options.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// When computing it stops being useful.
    pub deadline: Option<Instant>,
    /// Interactive inputs go ahead of bulk ones.
    pub priority: Priority,
    /// The requester's `Request-Id`, logged with the batch that computes it.
    pub request_id: Option<Arc<str>>,
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
        let shared = Shared::new(Queue {
            policy,
            workers,
            waiting: Task::ALL.map(|_| queue::Lanes::default()),
            queued_inputs: 0,
            idle: VecDeque::new(),
            stats: stats.clone(),
            accepting: true,
            stopped: false,
            swept: Instant::now(),
            bulk_led_last: false,
            holds: 0,
        });
        let mut threads = Vec::with_capacity(workers);
        let mut loaded = Vec::with_capacity(workers);
        for index in 0..workers {
            let (loaded_tx, loaded_rx) = oneshot::channel();
            let load = load.clone();
            let queue = shared.clone();
            let stats = stats.clone();
            // The worker reads the runtime's clock (it compares its times with the queue's;
            // in tests that clock is paused).
            let runtime = tokio::runtime::Handle::current();
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
                        // Wakes the actor once this thread has ended (dropped after `_alive`).
                        let _ended = worker::Ended(queue.clone());
                        // Counted while this thread serves, however it ends (from before
                        // `start` returns).
                        let _alive = worker::Alive::new(&stats);
                        let _ = loaded_tx.send(Ok(info));
                        let _clock = runtime.enter();
                        work(model, queue, &stats, policy.max_size);
                    }
                    Err(err) => {
                        let _ = loaded_tx.send(Err(err));
                    }
                })?;
            threads.push(thread);
            loaded.push(loaded_rx);
        }
        let mut info = None;
        for rx in loaded {
            let result = rx
                .await
                .map_err(|_| anyhow::anyhow!("a model worker died while loading its model"))
                .and_then(|result| result);
            match result {
                Ok(loaded) => info = Some(loaded),
                Err(err) => {
                    // The workers that did load end (and drop their models).
                    shared.stop();
                    return Err(err);
                }
            }
        }
        let info = info.expect("at least one worker");

        let (alive_tx, alive_rx) = mpsc::channel(1);
        stats.queue_alive.store(true, Ordering::Relaxed);
        let actor = queue::run(shared.clone(), alive_rx);
        match tokio::runtime::Handle::current().runtime_flavor() {
            // The actor keeps time on a thread of its own: under a flood the runtime's threads
            // are busy with thousands of requests (decoding, queueing, replying), and a timer
            // that waits its turn among them fires late.
            tokio::runtime::RuntimeFlavor::MultiThread => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()?;
                std::thread::Builder::new()
                    .name("batch-queue".into())
                    .spawn(move || runtime.block_on(actor))?;
            }
            // A single-threaded runtime (tests on paused time): the actor shares it.
            _ => {
                tokio::spawn(actor);
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let batcher = Batcher {
            queue: shared,
            _alive: alive_tx,
            stats,
            preparing: Arc::new(Semaphore::new(cores)),
            workers,
            model_name: info.name.into(),
            preparer: info.preparer,
            unsupported: Arc::new(info.unsupported),
            policy,
            cache: None,
        };
        Ok((batcher, Workers { threads }))
    }

    /// Prepares a request's inputs, queues them and waits for all of their outputs. Fails for
    /// the whole request if any input fails (the message names the input), if the queue is
    /// full, if `deadline` passes before an input's batch starts, or if the model does not
    /// serve the task.
    pub async fn infer<I: Into<Input>>(
        &self,
        task: Task,
        inputs: Vec<I>,
        options: InferOptions,
        deadline: Option<Instant>,
    ) -> Result<Completed, Refused> {
        let inputs = inputs.into_iter().map(Into::into).collect();
        let meta = RequestMeta {
            deadline,
            ..RequestMeta::default()
        };
        self.infer_with(task, inputs, options, meta).await
    }

    /// [`Batcher::infer`] with everything a request may say besides its inputs (priority,
    /// id). Inputs the output cache holds are answered from it; only the others are
    /// prepared and queued.
    pub async fn infer_with(
        &self,
        task: Task,
        inputs: Vec<Input>,
        options: InferOptions,
        meta: RequestMeta,
    ) -> Result<Completed, Refused> {
        let (done_tx, done_rx) = oneshot::channel();
        self.submit(
            task,
            inputs,
            options,
            meta,
            Done::new(move |outcome| {
                let _ = done_tx.send(outcome);
            }),
        );
        done_rx
            .await
            .unwrap_or_else(|_| Err(Refused::new(ErrorCode::Internal, "the batcher has stopped")))
    }

    /// [`Batcher::infer_with`] without waiting: `done` is called with the outcome, on the
    /// thread that completes the request (see [`Done`]). Nothing here waits: inputs whose
    /// preparing is trivial are prepared and queued at once, the others on a task of their
    /// own (must be called inside a tokio runtime).
    pub fn submit(
        &self,
        task: Task,
        inputs: Vec<Input>,
        options: InferOptions,
        meta: RequestMeta,
        done: Done,
    ) {
        if let Some(reason) = &self.unsupported[task_index(task)] {
            return done.send(Err(Refused::new(
                ErrorCode::UnsupportedTask,
                reason.clone(),
            )));
        }
        if inputs.is_empty() {
            return done.send(Ok(Completed {
                outputs: Vec::new(),
                batch_size: 0,
            }));
        }
        if inputs.len() > self.policy.queue_capacity {
            return done.send(Err(Refused::new(
                ErrorCode::TooLarge,
                format!(
                    "{} inputs do not fit in the queue ({} inputs); split the request",
                    inputs.len(),
                    self.policy.queue_capacity
                ),
            )));
        }
        if meta.deadline.is_some_and(|d| d <= Instant::now()) {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            return done.send(Err(expired_error(Duration::ZERO)));
        }
        let cache = self
            .cache
            .as_ref()
            .filter(|cache| cache.caches(task))
            .cloned();
        let cached: Vec<Option<Output>> = match &cache {
            Some(cache) => inputs
                .iter()
                .map(|input| cache.get(task, &options, input))
                .collect(),
            None => Vec::new(),
        };
        if !cached.is_empty() && cached.iter().all(Option::is_some) {
            return done.send(Ok(Completed {
                outputs: cached.into_iter().flatten().collect(),
                batch_size: 0,
            }));
        }
        if self.preparer.is_cheap() {
            match prepare_all(&*self.preparer, task, &inputs, &options, &cached) {
                Ok(prepared) => {
                    let job =
                        Job::new(task, inputs, prepared, options, meta.deadline, cached, done);
                    self.enqueue(job, meta, cache)
                }
                Err(refused) => done.send(Err(refused)),
            }
            return;
        }
        let batcher = self.clone();
        tokio::spawn(async move {
            match batcher.prepare(task, inputs, options, cached).await {
                Ok((inputs, options, prepared, cached)) => {
                    let job =
                        Job::new(task, inputs, prepared, options, meta.deadline, cached, done);
                    batcher.enqueue(job, meta, cache)
                }
                Err(refused) => done.send(Err(refused)),
            }
        });
    }

    /// Holds back handing queued inputs to idle workers until the guard is dropped: for a
    /// transport about to queue a burst of requests (see [`DispatchHold`]).
    pub fn hold_dispatch(&self) -> DispatchHold {
        self.queue.hold_dispatch()
    }

    /// Queues a prepared request, its outputs to be kept in `cache` if given.
    fn enqueue(&self, mut job: Job, meta: RequestMeta, cache: Option<Arc<OutputCache>>) {
        job.request_id = meta.request_id;
        job.priority = meta.priority;
        job.cache = cache;
        self.queue.submit(Arc::new(job));
    }

    /// Prepares every input that has no `cached` output (failing on the first that cannot
    /// be), on a blocking thread (at most one per core at once).
    #[allow(clippy::type_complexity)]
    async fn prepare(
        &self,
        task: Task,
        inputs: Vec<Input>,
        options: InferOptions,
        cached: Vec<Option<Output>>,
    ) -> Result<(Vec<Input>, InferOptions, Vec<Prepared>, Vec<Option<Output>>), Refused> {
        let _permit = self
            .preparing
            .acquire()
            .await
            .map_err(|_| Refused::new(ErrorCode::Internal, "the preparing pool is closed"))?;
        let preparer = self.preparer.clone();
        let (inputs, options, cached, prepared) = tokio::task::spawn_blocking(move || {
            let prepared = prepare_all(&*preparer, task, &inputs, &options, &cached);
            (inputs, options, cached, prepared)
        })
        .await
        .map_err(|e| Refused::new(ErrorCode::Internal, format!("preparing the inputs: {e}")))?;
        Ok((inputs, options, prepared?, cached))
    }

    /// Answers inputs from `cache` where it holds them, and keeps computed outputs in it
    /// (for the tasks it caches).
    pub fn with_cache(mut self, cache: Option<Arc<OutputCache>>) -> Self {
        if let Some(cache) = &cache {
            let _ = self.stats.cache.set(cache.clone());
        }
        self.cache = cache;
        self
    }

    /// The output cache, if there is one.
    pub fn cache(&self) -> Option<&Arc<OutputCache>> {
        self.cache.as_ref()
    }

    /// Whether the queue would refuse a request with `deadline` now: full, or holding more
    /// work than `max_queue_wait` or the deadline allows (see
    /// [`BatchPolicy::refuse_for_backlog`]). Read from the queue's last published state, so
    /// that a transport can answer `overloaded` before it decodes anything; the queue itself
    /// decides for the requests that get past this.
    pub fn refuses_now(
        &self,
        deadline: Option<Instant>,
        priority: Priority,
    ) -> Option<(Busy, Refused)> {
        let queued = self.stats.queued.load(Ordering::Relaxed);
        let queued_bulk = self.stats.queued_bulk.load(Ordering::Relaxed);
        if let Some(refused) =
            self.policy
                .no_room(priority, 1, queued as usize, queued_bulk as usize)
        {
            return Some((Busy::Full, refused));
        }
        let ahead = self.policy.queued_ahead(priority, queued, queued_bulk);
        self.policy
            .refuse_for_backlog(&self.stats, ahead, self.workers, deadline, Instant::now())
            .map(|refused| (Busy::Backlog, refused))
    }

    /// Why the model does not serve `task`, if it does not.
    pub fn unsupported(&self, task: Task) -> Option<&str> {
        self.unsupported[task_index(task)].as_deref()
    }

    /// The text of the model's mask token, if it serves `fill_mask` with one.
    pub fn mask_token(&self) -> Option<Arc<str>> {
        self.preparer.mask_token()
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

/// Prepares every input that has no `cached` output, failing on the first that cannot be.
fn prepare_all(
    preparer: &dyn Prepare,
    task: Task,
    inputs: &[Input],
    options: &InferOptions,
    cached: &[Option<Output>],
) -> Result<Vec<Prepared>, Refused> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| match cached.get(i) {
            Some(Some(_)) => Ok(Prepared::default()),
            _ => preparer
                .prepare(task, input, options)
                .map_err(|e| input_error(i, inputs.len(), e)),
        })
        .collect()
}

/// A task's position in `Task::ALL` (per-task tables).
pub(crate) fn task_index(task: Task) -> usize {
    Task::ALL
        .iter()
        .position(|t| *t == task)
        .expect("Task::ALL lists every task")
}
