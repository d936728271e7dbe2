//! Models the processor can serve, behind one small trait the batcher drives.
//!
//! A model runs on its own OS thread (compute blocks); it sees only batches of texts with their
//! options and returns one result per input. It knows nothing about NATS or encodings.

mod echo;
mod sim;

use std::time::Duration;

use schemas::{ErrorCode, InferOptions, Output, Task};

pub use echo::EchoModel;
pub use sim::SimModel;

use crate::config::{ModelConfig, ModelKind};

/// One input of a batch, borrowed from its request.
#[derive(Debug, Clone, Copy)]
pub struct ModelInput<'a> {
    /// The text to compute.
    pub text: &'a str,
    /// The options of the request the text came from.
    pub options: &'a InferOptions,
}

/// Why a model could not produce an output for one input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    /// The error kind sent to the requester.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl InputError {
    /// An error of the given kind.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        InputError {
            code,
            message: message.into(),
        }
    }
}

/// A model that computes a whole batch of inputs of one task at once.
pub trait BatchModel: Send + 'static {
    /// Name reported in replies (e.g. `echo`, `all-MiniLM-L6-v2`).
    fn name(&self) -> &str;

    /// Whether the model can serve the task at all; requests for other tasks are refused
    /// before they are queued.
    fn supports(&self, task: Task) -> bool;

    /// Computes every input of the batch; returns exactly one result per input, in order.
    /// An error for one input must not affect the others.
    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>>;
}

impl<M: BatchModel + ?Sized> BatchModel for Box<M> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn supports(&self, task: Task) -> bool {
        (**self).supports(task)
    }
    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        (**self).run(task, inputs)
    }
}

/// Builds the model the configuration asks for. Called on the worker thread that will own it,
/// so that device state (a GPU context) is created where it is used.
pub fn load(config: &ModelConfig) -> anyhow::Result<Box<dyn BatchModel>> {
    Ok(match config.kind {
        ModelKind::Echo => Box::new(EchoModel),
        ModelKind::Sim => Box::new(SimModel::new(
            Duration::from_secs_f64(config.batch_ms / 1000.0),
            Duration::from_secs_f64(config.item_ms / 1000.0),
        )),
    })
}
