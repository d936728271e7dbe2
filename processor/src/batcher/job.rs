//! A request in flight through the scheduler: its prepared inputs, and the results gathered
//! as its inputs' batches finish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::{ErrorCode, InferOptions, Input, Output, Priority, Task};
use tokio::time::Instant;

use super::{Completed, Refused};
use crate::cache::OutputCache;
use crate::model::{InputError, Prepared};

/// The error of a request whose deadline passed before its batch started.
pub(super) fn expired_error(waited: Duration) -> Refused {
    Refused::new(
        ErrorCode::Timeout,
        format!(
            "the request's deadline passed after {:.1} ms in the queue, before its batch started; it was not computed",
            waited.as_secs_f64() * 1000.0
        ),
    )
}

/// An input's error as the request's error, naming the input when there are several.
pub(super) fn input_error(index: usize, inputs: usize, error: InputError) -> Refused {
    let message = if inputs == 1 {
        error.message
    } else {
        format!("input {index}: {}", error.message)
    };
    Refused::new(error.code, message)
}

/// What to do with a request's outcome: called once, on the thread that completes the
/// request (a model worker, the queue's actor, or the submitting one). Dropped without being
/// called (the scheduler stopped with the request still held), it is called with an
/// `internal` error, so that no request goes unanswered.
pub struct Done(Option<Answer>);

/// The callback inside a [`Done`].
type Answer = Box<dyn FnOnce(Result<Completed, Refused>) + Send>;

impl Done {
    /// Calls `answer` with the outcome. It should be quick (it may run on a model worker's
    /// thread): hand the outcome over, do not encode or publish there.
    pub fn new(answer: impl FnOnce(Result<Completed, Refused>) + Send + 'static) -> Self {
        Done(Some(Box::new(answer)))
    }

    /// Answers the request.
    pub fn send(mut self, outcome: Result<Completed, Refused>) {
        if let Some(answer) = self.0.take() {
            answer(outcome);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(answer) = self.0.take() {
            answer(Err(Refused::new(
                ErrorCode::Internal,
                "the batcher has stopped",
            )));
        }
    }
}

/// One request in flight: its prepared inputs and the results gathered so far.
pub(super) struct Job {
    pub(super) task: Task,
    pub(super) inputs: Vec<Input>,
    /// One per input (a default one for inputs answered from the cache).
    pub(super) prepared: Vec<Prepared>,
    /// The inputs to compute, by index: those the cache did not answer.
    pub(super) to_compute: Vec<usize>,
    pub(super) options: InferOptions,
    pub(super) priority: Priority,
    /// Where computed outputs are kept, if the task's outputs are cached.
    pub(super) cache: Option<Arc<OutputCache>>,
    pub(super) arrived: Instant,
    pub(super) deadline: Option<Instant>,
    /// The requester's `Request-Id`, for the logs.
    pub(super) request_id: Option<Arc<str>>,
    pub(super) progress: Mutex<Progress>,
    /// Set once `progress.done` is taken: the queue's sweeps read it for every input they
    /// pass, without taking the lock.
    answered: AtomicBool,
}

pub(super) struct Progress {
    pub(super) results: Vec<Option<Result<Output, InputError>>>,
    pub(super) remaining: usize,
    pub(super) largest_batch: usize,
    /// Taken when the request is answered.
    pub(super) done: Option<Done>,
}

impl Job {
    /// A request of `inputs`, of which those with a `cached` output need no computing
    /// (`cached` is empty when nothing was looked up).
    pub(super) fn new(
        task: Task,
        inputs: Vec<Input>,
        prepared: Vec<Prepared>,
        options: InferOptions,
        deadline: Option<Instant>,
        cached: Vec<Option<Output>>,
        done: Done,
    ) -> Self {
        let n = inputs.len();
        let mut results: Vec<Option<Result<Output, InputError>>> = (0..n).map(|_| None).collect();
        for (result, output) in results.iter_mut().zip(cached) {
            *result = output.map(Ok);
        }
        let to_compute: Vec<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
        let remaining = to_compute.len();
        Job {
            task,
            inputs,
            prepared,
            to_compute,
            options,
            priority: Priority::default(),
            cache: None,
            arrived: Instant::now(),
            deadline,
            request_id: None,
            progress: Mutex::new(Progress {
                remaining,
                results,
                largest_batch: 0,
                done: Some(done),
            }),
            answered: AtomicBool::new(false),
        }
    }

    /// Whether the request has been answered (its remaining inputs need no computing).
    pub(super) fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Takes the answer out of `progress` (if it is still there) and marks the job answered.
    fn take_done(&self, progress: &mut Progress) -> Option<Done> {
        let done = progress.done.take();
        self.answered.store(true, Ordering::Release);
        done
    }

    /// Answers the request now with an error; false if it was already answered.
    pub(super) fn refuse(&self, error: Refused) -> bool {
        let done = self.take_done(&mut self.progress.lock().expect("job lock"));
        match done {
            Some(done) => {
                done.send(Err(error));
                true
            }
            None => false,
        }
    }

    /// Records one input's result; the last one answers the request.
    pub(super) fn complete(
        &self,
        index: usize,
        result: Result<Output, InputError>,
        batch_size: usize,
    ) {
        if let (Some(cache), Ok(output)) = (&self.cache, &result) {
            cache.insert(self.task, &self.options, &self.inputs[index], output);
        }
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
        let Some(done) = self.take_done(&mut progress) else {
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
        done.send(outputs.map(|outputs| Completed {
            outputs,
            batch_size,
        }));
    }
}

/// One queued input.
pub(super) struct Item {
    pub(super) job: Arc<Job>,
    pub(super) index: usize,
    pub(super) tokens: usize,
}

impl Item {
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.job.deadline.is_some_and(|d| d <= now)
    }
}

/// A batch for a worker: inputs of one task, each pointing back to its request.
pub(super) struct Batch {
    pub(super) task: Task,
    pub(super) items: Vec<Item>,
    /// Inputs were already queued when the worker asked for it: the hand-over is part of
    /// what each batch costs while the queue drains (see `BatcherStats::record_pace`).
    pub(super) backlogged: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_done_answers_once_and_one_dropped_unanswered_answers_internal() {
        let (tx, rx) = std::sync::mpsc::channel();
        let answered = tx.clone();
        drop(Done::new(move |outcome| tx.send(outcome).unwrap()));
        let dropped = rx.recv().unwrap().unwrap_err();
        assert_eq!(dropped.kind, ErrorCode::Internal);
        Done::new(move |outcome| answered.send(outcome).unwrap()).send(Ok(Completed {
            outputs: Vec::new(),
            batch_size: 3,
        }));
        assert_eq!(rx.recv().unwrap().unwrap().batch_size, 3);
        // Sent, then dropped: no second answer (every sender is gone now).
        assert!(matches!(
            rx.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        ));
    }
}
