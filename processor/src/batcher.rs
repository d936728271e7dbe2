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
    /// Inputs waiting for a batch right now.
    pub queued: AtomicU64,
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
    /// Per task (in `Task::ALL` order): why the model cannot serve it, if it cannot.
    unsupported: [Option<String>; Task::ALL.len()],
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
                        let info = (
                            model.name().to_string(),
                            Task::ALL
                                .map(|t| (!model.supports(t)).then(|| model.unsupported_reason(t))),
                        );
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
        let (model_name, unsupported) = info.expect("at least one worker");

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
            unsupported,
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
        let (done_tx, done_rx) = oneshot::channel();
        let job = Arc::new(Job::new(task, inputs, options, done_tx));
        let stopped = || ErrorBody::new(ErrorCode::Internal, "the batcher has stopped");
        self.submit.send(job).await.map_err(|_| stopped())?;
        done_rx.await.map_err(|_| stopped())?
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
            self.stats
                .queued
                .store(self.queued_inputs as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    /// Where a gated batch reports its size, and where it waits for a permit.
    type Gate = (std_mpsc::Sender<usize>, Arc<Mutex<std_mpsc::Receiver<()>>>);

    /// Echoes, records each batch's size, fails inputs that say "fail" and panics on "panic".
    struct Recorder {
        sizes: Arc<Mutex<Vec<usize>>>,
        /// When set, each batch reports that it started and waits for one permit.
        gate: Option<Gate>,
    }

    impl BatchModel for Recorder {
        fn name(&self) -> &str {
            "recorder"
        }
        fn supports(&self, task: Task) -> bool {
            task == Task::Embed
        }
        fn run(
            &mut self,
            _task: Task,
            inputs: &[ModelInput<'_>],
        ) -> Vec<Result<Output, InputError>> {
            self.sizes.lock().unwrap().push(inputs.len());
            if let Some((started, permits)) = &self.gate {
                started.send(inputs.len()).unwrap();
                permits.lock().unwrap().recv().unwrap();
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

    fn policy(max_size: usize, max_latency_ms: u64, queue_capacity: usize) -> BatchPolicy {
        BatchPolicy {
            max_size,
            max_latency: Duration::from_millis(max_latency_ms),
            queue_capacity,
        }
    }

    async fn recorder(policy: BatchPolicy) -> (Batcher, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let record = sizes.clone();
        let (batcher, _workers) = Batcher::start(policy, 1, move |_| {
            Ok(Recorder {
                sizes: record.clone(),
                gate: None,
            })
        })
        .await
        .unwrap();
        (batcher, sizes)
    }

    /// A batcher whose batches block until the test releases them.
    struct Gated {
        batcher: Batcher,
        started: std_mpsc::Receiver<usize>,
        permits: std_mpsc::Sender<()>,
    }

    impl Gated {
        async fn start(policy: BatchPolicy, workers: usize) -> Gated {
            let (started_tx, started) = std_mpsc::channel();
            let (permits, permits_rx) = std_mpsc::channel();
            let permits_rx = Arc::new(Mutex::new(permits_rx));
            let (batcher, _workers) = Batcher::start(policy, workers, move |_| {
                Ok(Recorder {
                    sizes: Arc::default(),
                    gate: Some((started_tx.clone(), permits_rx.clone())),
                })
            })
            .await
            .unwrap();
            Gated {
                batcher,
                started,
                permits,
            }
        }

        /// Waits (in real time, off the runtime) until a batch has started; returns its size.
        async fn next_started(&self) -> usize {
            tokio::task::block_in_place(|| {
                self.started
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a batch started")
            })
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

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_as_soon_as_it_reaches_max_size() {
        let (batcher, sizes) = recorder(policy(4, 3_600_000, 100)).await;
        let started = Instant::now();
        let one = |s: &str| batcher.infer(Task::Embed, texts(&[s]), InferOptions::default());
        let (a, b, c, d) = tokio::join!(one("a"), one("b"), one("c"), one("d"));
        for (result, expected) in [(a, "a"), (b, "b"), (c, "c"), (d, "d")] {
            let completed = result.unwrap();
            assert_eq!(text(&completed.outputs[0]), expected);
            assert_eq!(completed.batch_size, 4);
        }
        assert_eq!(*sizes.lock().unwrap(), vec![4]);
        // The latency bound (an hour) never fired: the batch left on size alone.
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_leaves_max_latency_after_its_first_input() {
        let (batcher, sizes) = recorder(policy(100, 50, 1000)).await;
        let started = Instant::now();
        let first = batcher.infer(Task::Embed, texts(&["a"]), InferOptions::default());
        let later = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            batcher
                .infer(Task::Embed, texts(&["b", "c"]), InferOptions::default())
                .await
        };
        let (first, later) = tokio::join!(first, later);
        assert_eq!(first.unwrap().batch_size, 3);
        assert_eq!(later.unwrap().outputs.len(), 2);
        assert_eq!(*sizes.lock().unwrap(), vec![3]);
        // Closed 50 ms after the first input, not after the second one.
        assert_eq!(started.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_input_request_counts_each_input_and_keeps_its_order() {
        let (batcher, sizes) = recorder(policy(4, 10, 1000)).await;
        let inputs: Vec<String> = (0..10).map(|i| format!("in{i}")).collect();
        let small = batcher.infer(Task::Embed, texts(&["x", "y"]), InferOptions::default());
        let big = batcher.infer(Task::Embed, inputs.clone(), InferOptions::default());
        let (small, big) = tokio::join!(small, big);
        let big = big.unwrap();
        let got: Vec<&str> = big.outputs.iter().map(text).collect();
        assert_eq!(got, inputs.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(big.batch_size, 4);
        assert_eq!(small.unwrap().batch_size, 4);
        // 12 inputs in batches of at most 4, the first one shared by both requests.
        assert_eq!(*sizes.lock().unwrap(), vec![4, 4, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn one_failing_input_fails_only_its_own_request() {
        let (batcher, sizes) = recorder(policy(8, 10, 100)).await;
        let run = |items: &'static [&'static str]| {
            batcher.infer(Task::Embed, texts(items), InferOptions::default())
        };
        let (a, b, c) = tokio::join!(run(&["ok1"]), run(&["x", "fail", "y"]), run(&["ok2"]));
        assert_eq!(text(&a.unwrap().outputs[0]), "ok1");
        assert_eq!(text(&c.unwrap().outputs[0]), "ok2");
        let error = b.unwrap_err();
        assert_eq!(error.kind, ErrorCode::ModelFailed);
        assert_eq!(error.code, 500);
        assert!(error.message.starts_with("input 1:"), "{}", error.message);
        assert_eq!(*sizes.lock().unwrap(), vec![5]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_model_fails_its_batch_and_keeps_serving() {
        let (batcher, _) = recorder(policy(1, 1, 100)).await;
        let error = batcher
            .infer(Task::Embed, texts(&["panic"]), InferOptions::default())
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorCode::ModelFailed);
        let after = batcher
            .infer(Task::Embed, texts(&["fine"]), InferOptions::default())
            .await;
        assert_eq!(text(&after.unwrap().outputs[0]), "fine");
    }

    #[tokio::test(start_paused = true)]
    async fn unsupported_tasks_are_refused_before_queueing() {
        let (batcher, sizes) = recorder(policy(4, 1, 100)).await;
        let error = batcher
            .infer(Task::FillMask, texts(&["a"]), InferOptions::default())
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorCode::UnsupportedTask);
        assert!(sizes.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_new_requests_as_overloaded() {
        let gated = Gated::start(policy(2, 0, 4), 1).await;
        let batcher = gated.batcher.clone();
        let spawn = |items: &'static [&'static str]| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                batcher
                    .infer(Task::Embed, texts(items), InferOptions::default())
                    .await
            })
        };
        let first = spawn(&["a", "b"]);
        assert_eq!(gated.next_started().await, 2); // the worker is now busy
        let queued = [spawn(&["c", "d"]), spawn(&["e", "f"])];
        // The queue holds 4 inputs; wait until both requests are in it.
        while gated.batcher.stats().queued.load(Ordering::Relaxed) < 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let refused = gated
            .batcher
            .infer(Task::Embed, texts(&["g"]), InferOptions::default())
            .await
            .unwrap_err();
        assert_eq!(refused.kind, ErrorCode::Overloaded);
        assert_eq!(refused.code, 503);
        assert_eq!(gated.batcher.stats().rejected.load(Ordering::Relaxed), 1);
        for _ in 0..3 {
            gated.permits.send(()).unwrap();
        }
        assert!(first.await.unwrap().is_ok());
        for request in queued {
            assert!(request.await.unwrap().is_ok());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_take_batches_from_one_queue() {
        let gated = Gated::start(policy(1, 0, 100), 2).await;
        let spawn = |item: &'static str| {
            let batcher = gated.batcher.clone();
            tokio::spawn(async move {
                batcher
                    .infer(Task::Embed, texts(&[item]), InferOptions::default())
                    .await
            })
        };
        let (a, b) = (spawn("a"), spawn("b"));
        // Both batches are computing at once, so they went to different workers.
        assert_eq!(gated.next_started().await, 1);
        assert_eq!(gated.next_started().await, 1);
        gated.permits.send(()).unwrap();
        gated.permits.send(()).unwrap();
        assert!(a.await.unwrap().is_ok() && b.await.unwrap().is_ok());
        assert_eq!(gated.batcher.stats().batches.load(Ordering::Relaxed), 2);
    }
}
