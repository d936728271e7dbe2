//! Model workers: each owns one model replica on its own OS thread, asks the queue for a
//! batch, computes it and hands every input its result.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use schemas::{ErrorCode, Task};

use super::queue::Shared;
use super::BatcherStats;
use crate::model::{BatchModel, InputError, ModelInput, Prepare, WarmUpPlan};

/// Counts a worker thread in [`BatcherStats::workers_alive`] until it is dropped, which
/// happens however the thread ends (a panic unwinds through it).
pub(super) struct Alive<'a>(&'a BatcherStats);

impl<'a> Alive<'a> {
    pub(super) fn new(stats: &'a BatcherStats) -> Self {
        stats.workers_alive.fetch_add(1, Ordering::Relaxed);
        Alive(stats)
    }
}

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.workers_alive.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells the queue's actor when dropped that a worker thread ended, however it ended.
pub(super) struct Ended(pub(super) Arc<Shared>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.worker_ended();
    }
}

/// What a worker reports once its model is loaded.
pub(super) struct Loaded {
    pub(super) name: String,
    pub(super) unsupported: [Option<String>; Task::ALL.len()],
    pub(super) preparer: Arc<dyn Prepare>,
}

/// Loads worker `index`'s model and warms it up (see [`BatchModel::warm_up`]) before it takes
/// requests, so first-use costs (allocations, GPU kernel compilation and autotuning) are not
/// paid by a request, and a model that cannot compute fails at start. A panic on the way (a
/// GPU library that fails inside) becomes an error that says what it was.
pub(super) fn load_and_warm_up<M: BatchModel>(
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
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// A model worker's loop: take the next batch from the queue (or wait to be handed one),
/// compute it, deliver the results.
pub(super) fn work<M: BatchModel>(
    mut model: M,
    queue: Arc<Shared>,
    stats: &BatcherStats,
    max_size: usize,
) {
    loop {
        let asked = std::time::Instant::now();
        let batch = match queue.next_batch() {
            None => return,
            Some(Ok(batch)) => batch,
            Some(Err(handed)) => match handed.blocking_recv() {
                Ok(batch) => batch,
                Err(_) => return,
            },
        };
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        // Work was waiting when this worker asked: the hand-over is part of what each batch
        // costs while the queue drains. After a wait for work, only the compute is.
        let handed_over = started - asked;
        let saturated = batch.backlogged;
        let size = batch.items.len();
        let inputs: Vec<ModelInput<'_>> = batch
            .items
            .iter()
            .map(|item| ModelInput {
                text: item.job.inputs[item.index].text(),
                passage: item.job.inputs[item.index].passage(),
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
        let cost = if saturated { took + handed_over } else { took };
        stats.record_pace(cost, size, max_size);
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
