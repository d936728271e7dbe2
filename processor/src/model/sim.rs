//! `sim`: a simulated accelerator. A batch of n inputs takes `batch_ms + item_ms * n` of wall
//! time spent asleep (as a GPU-bound worker's CPU thread is), then echoes its inputs. An input
//! containing `[fail]` fails with `model_failed` (fault injection, to exercise error paths).

use std::sync::Arc;
use std::time::Duration;

use schemas::{ErrorCode, Output, Task};

use super::{BatchModel, EchoModel, InputError, ModelInput, Prepare, WordCount};

/// Inputs containing this fail, on purpose.
pub const FAIL_MARKER: &str = "[fail]";

/// Echo with a configurable per-batch and per-input cost.
#[derive(Debug, Clone)]
pub struct SimModel {
    per_batch: Duration,
    per_item: Duration,
}

impl SimModel {
    /// A model whose batch of n inputs takes `per_batch + per_item * n`.
    pub fn new(per_batch: Duration, per_item: Duration) -> Self {
        SimModel {
            per_batch,
            per_item,
        }
    }

    /// The time a batch of `n` inputs takes.
    pub fn batch_time(&self, n: usize) -> Duration {
        self.per_batch + self.per_item * n as u32
    }
}

impl BatchModel for SimModel {
    fn name(&self) -> &str {
        "sim"
    }

    fn supports(&self, _task: Task) -> bool {
        true
    }

    fn preparer(&self) -> Arc<dyn Prepare> {
        Arc::new(WordCount)
    }

    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        std::thread::sleep(self.batch_time(inputs.len()));
        let mut outputs = EchoModel.run(task, inputs);
        for (output, input) in outputs.iter_mut().zip(inputs) {
            if input.text.contains(FAIL_MARKER) {
                *output = Err(InputError::new(
                    ErrorCode::ModelFailed,
                    format!("simulated failure: the input contains {FAIL_MARKER}"),
                ));
            }
        }
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::InferOptions;
    use std::time::Instant;

    #[test]
    fn a_batch_takes_its_simulated_time_and_echoes() {
        let mut model = SimModel::new(Duration::from_millis(20), Duration::from_millis(5));
        let started = Instant::now();
        let outputs = model.run_texts(
            Task::Embed,
            &["a", "b [fail]", "c"],
            &InferOptions::default(),
        );
        assert!(started.elapsed() >= Duration::from_millis(35));
        assert_eq!(outputs[2], Ok(Output::Text { text: "c".into() }));
        assert_eq!(
            outputs[1].as_ref().unwrap_err().code,
            ErrorCode::ModelFailed
        );
    }
}
