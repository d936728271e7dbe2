//! `echo`: returns every input unchanged, for every task (a pair as `query<TAB>passage`). Measures the middleware alone.

use schemas::{Output, Task};

use std::sync::Arc;

use super::{BatchModel, InputError, ModelInput, Prepare, WordCount};

/// The model that answers each input with its own text.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoModel;

impl BatchModel for EchoModel {
    fn name(&self) -> &str {
        "echo"
    }

    fn supports(&self, _task: Task) -> bool {
        true
    }

    fn preparer(&self) -> Arc<dyn Prepare> {
        Arc::new(WordCount)
    }

    fn run(&mut self, _task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        inputs
            .iter()
            .map(|input| {
                // A pair comes back as `query<TAB>passage`.
                let text = match input.passage {
                    None => input.text.to_string(),
                    Some(passage) => format!("{}\t{passage}", input.text),
                };
                Ok(Output::Text { text })
            })
            .collect()
    }
}
