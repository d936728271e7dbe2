//! Models the processor can serve, behind one small trait the batcher drives.
//!
//! A model runs on its own OS thread (compute blocks); it sees only batches of texts with their
//! options and returns one result per input. It knows nothing about NATS or encodings.

pub mod bert;
mod echo;
mod sim;

use std::sync::Arc;
use std::time::Duration;

use schemas::{ErrorCode, InferOptions, Output, Task};

pub use echo::EchoModel;
pub use sim::SimModel;

use crate::config::{DeviceKind, ModelConfig, ModelKind};

/// The burn device for a configured device kind and GPU index.
pub fn device(kind: DeviceKind, index: usize) -> anyhow::Result<burn::prelude::Device> {
    match kind {
        DeviceKind::Cpu => Ok(cpu_device()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Ok(burn::prelude::Device::cuda(index)),
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => {
            let _ = index;
            anyhow::bail!("this processor was built without the `cuda` feature")
        }
    }
}

/// The CPU backend: burn's pure-Rust `flex` (see README for the comparison with ndarray).
pub fn cpu_device() -> burn::prelude::Device {
    burn::prelude::Device::flex()
}

/// An input made ready for the model off the model worker (tokenised), so that the batcher
/// knows its length and the worker only computes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Length in tokens, special tokens included: the input costs `tokens` positions of the
    /// batch, and the batch is padded to its longest input.
    pub tokens: usize,
    /// Token ids, for models that take them (empty for `echo` and `sim`).
    pub ids: Vec<u32>,
    /// Byte range of each token in the text (`(0, 0)` for special tokens); empty when the
    /// task does not need it.
    pub offsets: Vec<(usize, usize)>,
}

impl Prepared {
    /// A prepared input that only carries its length (models that take text).
    pub fn length_only(tokens: usize) -> Self {
        Prepared {
            tokens,
            ..Prepared::default()
        }
    }
}

/// Prepares inputs for a model (tokenises, checks options). Shared by the request tasks, so
/// this CPU work runs beside the model workers instead of on them.
pub trait Prepare: Send + Sync + 'static {
    /// Prepares one input for `task`, or says why it cannot be computed.
    fn prepare(
        &self,
        task: Task,
        text: &str,
        options: &InferOptions,
    ) -> Result<Prepared, InputError>;
}

/// Token count of models without a tokenizer: words plus two, as if framed by `[CLS]` and
/// `[SEP]`, so that batching by tokens behaves with them as with BERT.
#[derive(Debug, Clone, Copy, Default)]
pub struct WordCount;

impl Prepare for WordCount {
    fn prepare(
        &self,
        _task: Task,
        text: &str,
        _options: &InferOptions,
    ) -> Result<Prepared, InputError> {
        Ok(Prepared::length_only(text.split_whitespace().count() + 2))
    }
}

/// One input of a batch, borrowed from its request.
#[derive(Debug, Clone, Copy)]
pub struct ModelInput<'a> {
    /// The text to compute.
    pub text: &'a str,
    /// The options of the request the text came from.
    pub options: &'a InferOptions,
    /// The input as [`Prepare::prepare`] made it.
    pub prepared: &'a Prepared,
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

/// A model that computes a whole batch of prepared inputs of one task at once.
pub trait BatchModel: Send + 'static {
    /// Name reported in replies (e.g. `echo`, `all-MiniLM-L6-v2`).
    fn name(&self) -> &str;

    /// Whether the model can serve the task at all; requests for other tasks are refused
    /// before they are queued.
    fn supports(&self, task: Task) -> bool;

    /// The message for requesters of a task the model does not serve.
    fn unsupported_reason(&self, task: Task) -> String {
        format!("model `{}` does not serve task `{task}`", self.name())
    }

    /// The preparer for this model's inputs (its tokenizer), shared with other threads.
    fn preparer(&self) -> Arc<dyn Prepare>;

    /// Computes every input of the batch; returns exactly one result per input, in order.
    /// An error for one input must not affect the others.
    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>>;

    /// Prepares and computes texts in one call, as one batch of the valid ones (for tests,
    /// benchmarks and tools; the service prepares on the request tasks instead).
    fn run_texts(
        &mut self,
        task: Task,
        texts: &[&str],
        options: &InferOptions,
    ) -> Vec<Result<Output, InputError>> {
        let preparer = self.preparer();
        let prepared: Vec<_> = texts
            .iter()
            .map(|text| preparer.prepare(task, text, options))
            .collect();
        let inputs: Vec<ModelInput<'_>> = texts
            .iter()
            .zip(&prepared)
            .filter_map(|(text, prepared)| {
                Some(ModelInput {
                    text,
                    options,
                    prepared: prepared.as_ref().ok()?,
                })
            })
            .collect();
        let mut outputs = self.run(task, &inputs).into_iter();
        prepared
            .into_iter()
            .map(|p| {
                p.and_then(|_| {
                    outputs
                        .next()
                        .expect("the model returns one result per input")
                })
            })
            .collect()
    }
}

impl<M: BatchModel + ?Sized> BatchModel for Box<M> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn supports(&self, task: Task) -> bool {
        (**self).supports(task)
    }
    fn unsupported_reason(&self, task: Task) -> String {
        (**self).unsupported_reason(task)
    }
    fn preparer(&self) -> Arc<dyn Prepare> {
        (**self).preparer()
    }
    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        (**self).run(task, inputs)
    }
}

/// Builds the model the configuration asks for, for worker `index`. Called on the worker
/// thread that will own it, so that device state (a GPU context) is created where it is used.
pub fn load(config: &ModelConfig, index: usize) -> anyhow::Result<Box<dyn BatchModel>> {
    Ok(match config.kind {
        ModelKind::Bert => {
            anyhow::ensure!(
                config.path.is_dir(),
                "model.path {} is not a directory; fetch the default model with scripts/fetch-model",
                config.path.display()
            );
            let device = device(config.device, config.device_index(index))?;
            let model = bert::BertModel::load(&config.path, &device)?;
            tracing::info!(
                model = model.name(),
                device = ?config.device,
                worker = index,
                gpu = config.device_index(index),
                fill_mask = model.has_mlm_head(),
                "loaded BERT checkpoint"
            );
            Box::new(model)
        }
        ModelKind::Echo => Box::new(EchoModel),
        ModelKind::Sim => Box::new(SimModel::new(
            Duration::from_secs_f64(config.batch_ms / 1000.0),
            Duration::from_secs_f64(config.item_ms / 1000.0),
        )),
    })
}
