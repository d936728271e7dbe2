//! Models the processor can serve, behind one small trait the batcher drives.
//!
//! A model runs on its own OS thread (compute blocks); it sees only batches of texts with their
//! options and returns one result per input. It knows nothing about NATS or encodings.

pub mod bert;
pub mod cuda;
mod echo;
mod sim;

use std::sync::Arc;
use std::time::Duration;

use schemas::{ErrorCode, InferOptions, Input, Output, Task};

pub use echo::EchoModel;
pub use sim::SimModel;

use crate::config::{AttentionImpl, DeviceKind, ModelConfig, ModelKind, Precision};

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

/// The tensor float type of a configured precision.
pub fn float_dtype(precision: Precision) -> burn::tensor::FloatDType {
    match precision {
        Precision::F32 => burn::tensor::FloatDType::F32,
        Precision::F16 => burn::tensor::FloatDType::F16,
        Precision::Bf16 => burn::tensor::FloatDType::BF16,
    }
}

/// How the configured BERT model computes on its device. On CUDA, batches are padded to a
/// multiple of 8 tokens: kernels are compiled and autotuned per shape class, and vector widths
/// follow the length's divisibility, so odd lengths would each bring their own variants after
/// the warm-up (padding is masked, so outputs do not change).
pub fn bert_options(config: &ModelConfig) -> bert::BertOptions {
    bert::BertOptions {
        dtype: float_dtype(config.dtype),
        fused_attention: config.attention() == AttentionImpl::Fused,
        pad_to_multiple: match config.device {
            DeviceKind::Cuda => 8,
            DeviceKind::Cpu => 1,
        },
        // Naming an attention implementation asks for burn's encoder with it.
        cpu_kernels: config.attention == AttentionImpl::Auto,
        cpu_threads: cpu_threads(config),
    }
}

/// Threads of each CPU replica's own pool: with several replicas (`workers_per_device`) on
/// the CPU, each gets an equal share of the cores, so they do not all contend for one pool;
/// a single replica uses the shared pool (every core).
pub fn cpu_threads(config: &ModelConfig) -> usize {
    let replicas = config.replicas_per_device();
    if config.device != DeviceKind::Cpu || replicas <= 1 {
        return 0;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / replicas).max(1)
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
    /// Token type (segment) ids: for a pair, 0 for the query's tokens and 1 for the
    /// passage's; empty means all 0.
    pub type_ids: Vec<u32>,
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

/// Prepares inputs for a model (tokenises, checks options). Shared by the request path, so
/// this CPU work runs beside the model workers instead of on them.
pub trait Prepare: Send + Sync + 'static {
    /// Prepares one input for `task`, or says why it cannot be computed.
    fn prepare(
        &self,
        task: Task,
        input: &Input,
        options: &InferOptions,
    ) -> Result<Prepared, InputError>;

    /// Whether preparing costs so little (no tokenising) that it may run on the async
    /// runtime's threads; otherwise it runs on a blocking thread.
    fn is_cheap(&self) -> bool {
        false
    }

    /// The text that marks a mask in `fill_mask` inputs (one token per occurrence), if any:
    /// requests are checked against `service.max_masks_per_input` on it before preparing.
    fn mask_token(&self) -> Option<Arc<str>> {
        None
    }
}

/// Token count of models without a tokenizer: words plus two, as if framed by `[CLS]` and
/// `[SEP]`, so that batching by tokens behaves with them as with BERT.
#[derive(Debug, Clone, Copy, Default)]
pub struct WordCount;

impl Prepare for WordCount {
    fn prepare(
        &self,
        _task: Task,
        input: &Input,
        _options: &InferOptions,
    ) -> Result<Prepared, InputError> {
        // A pair is framed as `[CLS] query [SEP] passage [SEP]`.
        let tokens = match input.passage() {
            None => count_words(input.text()) + 2,
            Some(passage) => count_words(input.text()) + count_words(passage) + 3,
        };
        Ok(Prepared::length_only(tokens))
    }

    fn is_cheap(&self) -> bool {
        true
    }
}

/// Word starts: a non-blank byte (not an ASCII blank) at the start or after a blank one.
/// This runs on the request path for every input of the models without a tokenizer, so it
/// is written to vectorise: each pair of neighbouring bytes is tested on its own, and the
/// starts of a stretch of 255 pairs are summed in a byte (8× faster than a loop carrying
/// "the byte before was blank" from byte to byte).
fn count_words(text: &str) -> usize {
    let blank = |byte: u8| matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0c);
    let bytes = text.as_bytes();
    let Some(&first) = bytes.first() else {
        return 0;
    };
    let (before, after) = (&bytes[..bytes.len() - 1], &bytes[1..]);
    let starts_after_blank: usize = before
        .chunks(255)
        .zip(after.chunks(255))
        .map(|(before, after)| {
            let starts = before
                .iter()
                .zip(after)
                .fold(0u8, |sum, (&b, &a)| sum + u8::from(blank(b) & !blank(a)));
            usize::from(starts)
        })
        .sum();
    usize::from(!blank(first)) + starts_after_blank
}

/// One input of a batch, borrowed from its request.
#[derive(Debug, Clone, Copy)]
pub struct ModelInput<'a> {
    /// The text to compute (a pair's query).
    pub text: &'a str,
    /// A pair's passage (`rerank`).
    pub passage: Option<&'a str>,
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

/// What a model replica computes before it takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUpPlan {
    /// Every batch shape class the scheduler can produce ([`WarmUpPlan::shapes`]), not just
    /// one small batch.
    pub shapes: bool,
    /// The largest batch the scheduler forms (`batch.max_size`).
    pub max_batch: usize,
    /// The most padded tokens in a batch (`batch.max_tokens`).
    pub max_tokens: usize,
}

impl WarmUpPlan {
    /// The `(inputs, length)` batches for a model that takes inputs of up to `longest` tokens:
    /// lengths 8, 16, 24, 32, 48, 64, 96, ... (powers of two and the multiple of 8 halfway
    /// between) and `longest`, each with batch sizes 1, 2, 4, ... and the largest the scheduler
    /// fills at that length (`max_batch`, or fewer where `max_tokens` bounds it); then one
    /// input of every other multiple of 8 up to `longest`. GPU autotuning buckets sizes by
    /// powers of two but keys matmuls on their strides too, and the attention matmuls' strides
    /// follow the (padded) length whatever the batch size.
    pub fn shapes(&self, longest: usize) -> Vec<(usize, usize)> {
        let longest = longest.max(1);
        let mut lengths: Vec<usize> = std::iter::successors(Some(8usize), |l| Some(l * 2))
            .flat_map(|l| [l, l + l / 2])
            .filter(|l| l % 8 == 0)
            .take_while(|&l| l < longest)
            .collect();
        lengths.push(longest);
        let mut shapes = Vec::new();
        for length in lengths {
            // An input longer than max_tokens is still computed, alone.
            let cap = self.max_batch.min(self.max_tokens / length).max(1);
            let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |b| Some(b * 2))
                .take_while(|&b| b < cap)
                .collect();
            sizes.push(cap);
            shapes.extend(sizes.into_iter().map(|size| (size, length)));
        }
        let every_length = (8..=longest).step_by(8);
        let missing: Vec<usize> = every_length
            .filter(|&l| !shapes.iter().any(|&(_, known)| known == l))
            .collect();
        shapes.extend(missing.into_iter().map(|length| (1, length)));
        shapes
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

    /// Computes before the model takes requests, as `plan` says, and returns how many batches
    /// it computed. By default one small batch of the first task the model serves; models
    /// with per-shape first-use costs (GPU kernels) override it to cover `plan.shapes`.
    fn warm_up(&mut self, plan: &WarmUpPlan) -> anyhow::Result<usize> {
        let _ = plan;
        let Some(task) = Task::ALL.into_iter().find(|&task| self.supports(task)) else {
            anyhow::bail!("model `{}` serves no task", self.name());
        };
        let input = match task {
            Task::FillMask => Input::from("warm [MASK] up"),
            Task::Embed | Task::Classify => Input::from("warm up"),
            Task::Rerank => Input::from(("warm", "up")),
        };
        let results = self.run_inputs(task, &[input], &InferOptions::default());
        match results.into_iter().next() {
            Some(Ok(_)) => Ok(1),
            Some(Err(error)) => anyhow::bail!("the warm-up batch failed: {error}"),
            None => anyhow::bail!("the warm-up batch returned no result"),
        }
    }

    /// Prepares and computes texts in one call, as one batch of the valid ones (for tests,
    /// benchmarks and tools; the service prepares on the request path instead).
    fn run_texts(
        &mut self,
        task: Task,
        texts: &[&str],
        options: &InferOptions,
    ) -> Vec<Result<Output, InputError>> {
        let inputs: Vec<Input> = texts.iter().map(|&text| Input::from(text)).collect();
        self.run_inputs(task, &inputs, options)
    }

    /// [`BatchModel::run_texts`] for inputs of any kind (pairs for `rerank`).
    fn run_inputs(
        &mut self,
        task: Task,
        inputs: &[Input],
        options: &InferOptions,
    ) -> Vec<Result<Output, InputError>> {
        let preparer = self.preparer();
        let prepared: Vec<_> = inputs
            .iter()
            .map(|input| preparer.prepare(task, input, options))
            .collect();
        let batch: Vec<ModelInput<'_>> = inputs
            .iter()
            .zip(&prepared)
            .filter_map(|(input, prepared)| {
                Some(ModelInput {
                    text: input.text(),
                    passage: input.passage(),
                    options,
                    prepared: prepared.as_ref().ok()?,
                })
            })
            .collect();
        let mut outputs = self.run(task, &batch).into_iter();
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
    fn warm_up(&mut self, plan: &WarmUpPlan) -> anyhow::Result<usize> {
        (**self).warm_up(plan)
    }
}

/// Builds the model the configuration asks for, for worker `index`. Called on the worker
/// thread that will own it, so that device state (a GPU context) is created where it is used.
pub fn load(config: &ModelConfig, index: usize) -> anyhow::Result<Box<dyn BatchModel>> {
    Ok(match config.kind {
        ModelKind::Bert => Box::new(load_bert(config, index)?),
        ModelKind::Echo => Box::new(EchoModel),
        ModelKind::Sim => Box::new(SimModel::new(
            Duration::from_secs_f64(config.batch_ms / 1000.0),
            Duration::from_secs_f64(config.item_ms / 1000.0),
        )),
    })
}

/// Loads the configured BERT checkpoint for worker `index`, on its device (after checking, on
/// `cuda`, that the GPU libraries are there).
pub fn load_bert(config: &ModelConfig, index: usize) -> anyhow::Result<bert::BertModel> {
    anyhow::ensure!(
        config.path.is_dir(),
        "model.path {} is not a directory; fetch the default model with scripts/fetch-model",
        config.path.display()
    );
    let gpu = config.device_index(index);
    #[cfg(feature = "cuda")]
    if config.device == DeviceKind::Cuda {
        let found = cuda::check(
            gpu,
            config.dtype,
            config.attention() == AttentionImpl::Fused,
        )?;
        tracing::info!(
            driver = %found.driver.0,
            driver_cuda = %found.driver.1,
            nvrtc = %found.nvrtc.0,
            nvrtc_version = %found.nvrtc.1,
            gpus = found.devices,
            headers = %found.include.display(),
            "CUDA runtime"
        );
    }
    let device = device(config.device, gpu)?;
    let options = bert_options(config);
    let model = bert::BertModel::load_with(&config.path, &device, options)?;
    tracing::info!(
        model = model.name(),
        device = ?config.device,
        worker = index,
        gpu,
        dtype = ?config.dtype,
        fused_attention = options.fused_attention,
        fill_mask = model.has_mlm_head(),
        "loaded BERT checkpoint"
    );
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_count_counts_words_between_any_ascii_blanks_and_frames_them() {
        let count = |input: Input| {
            WordCount
                .prepare(Task::Embed, &input, &InferOptions::default())
                .unwrap()
                .tokens
        };
        for text in [
            "",
            " ",
            "one",
            "  one  two\tthree\nfour\r\n",
            "día ñandú",
            "a b  c   ",
            "ab ".repeat(400).as_str(),
            " x\x0c".repeat(300).as_str(),
        ] {
            let words = text.split_ascii_whitespace().count();
            assert_eq!(count(Input::Text(text.to_string())), words + 2, "{text:?}");
        }
        let pair = Input::Pair("what is it".to_string(), " a cat ".to_string());
        assert_eq!(count(pair), 3 + 2 + 3);
    }

    #[test]
    fn warm_up_shapes_cover_every_class_and_every_padded_length_within_the_bounds() {
        let plan = WarmUpPlan {
            shapes: true,
            max_batch: 32,
            max_tokens: 16384,
        };
        let shapes = plan.shapes(256);
        let grid_lengths = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256];
        for length in grid_lengths {
            for size in [1, 2, 4, 8, 16, 32] {
                assert!(shapes.contains(&(size, length)), "({size}, {length})");
            }
        }
        // Every other multiple of 8 once, alone; nothing else, nothing twice.
        for length in (8..=256).step_by(8) {
            assert!(shapes.contains(&(1, length)), "(1, {length})");
        }
        let extra = (8..=256).step_by(8).count() - grid_lengths.len();
        assert_eq!(shapes.len(), grid_lengths.len() * 6 + extra);

        // max_tokens bounds the batch at long lengths; the bound itself is a shape.
        let plan = WarmUpPlan {
            max_batch: 24,
            max_tokens: 1000,
            ..plan
        };
        let shapes = plan.shapes(200);
        assert!(shapes.iter().all(|&(b, l)| b * l <= 1000));
        assert_eq!(
            shapes.iter().filter(|s| s.1 == 200).collect::<Vec<_>>(),
            [&(1, 200), &(2, 200), &(4, 200), &(5, 200)]
        );
        assert_eq!(
            shapes.iter().filter(|s| s.1 == 8).map(|s| s.0).max(),
            Some(24)
        );
        // An input longer than max_tokens is still computed, alone; tiny models have one length.
        assert!(plan.shapes(5000).contains(&(1, 5000)));
        assert_eq!(
            plan.shapes(3),
            vec![(1, 3), (2, 3), (4, 3), (8, 3), (16, 3), (24, 3)]
        );
    }
}
