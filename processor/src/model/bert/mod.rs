//! BERT and RoBERTa-family encoders on burn, loaded from a HuggingFace checkpoint directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`), serving `embed`, `fill_mask`
//! (with a masked-LM head), and `rerank` and `classify` (with a sequence-classification
//! head: one output for a cross-encoder's relevance, several for labels).
//!
//! Inputs of a batch are padded to the batch's longest and the padding is masked out of
//! attention and pooling, so an input's output does not depend on its batch-mates.

mod config;
mod cpu;
mod embeddings;
mod encoder;
mod heads;
pub mod simd;
mod tokenize;
mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use schemas::{
    ErrorCode, FillMaskOutput, InferOptions, Input, LabelScore, MaskPrediction, Output, Task,
};

pub use config::{BertConfig, CheckpointConfig, Family, Pooling};
pub use tokenize::{BertTokenizer, Tokens};

use self::cpu::CpuEncoder;
use self::embeddings::BertEmbeddings;
use self::encoder::{BertEncoder, KeyMask};
use self::heads::{MaskedLmHead, SequenceClassifier};
use super::{BatchModel, InputError, ModelInput, Prepare, Prepared, WarmUpPlan};

/// Added to attention scores of padding keys: exp() of it is exactly 0 in f32.
const PADDING_BIAS: f32 = -1e9;
/// `fill_mask` candidates per mask when the request does not say.
pub const DEFAULT_TOP_K: u32 = 5;
/// Mask positions whose vocabulary logits are computed and read back at a time: bounds the
/// MLM head's memory to `rows x vocab x 4` bytes (7.8 MB for BERT's 30,522 tokens) on the
/// device and on the host, however many masks a batch carries.
pub const MASK_ROWS_PER_CHUNK: usize = 64;

/// Why a checkpoint could not be loaded. Every variant names the file (and tensor).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A required file is absent.
    #[error("{0}: file not found")]
    MissingFile(PathBuf),
    /// A file could not be read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A file is there but unusable.
    #[error("{file}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the file.
    #[error("{file}: tensor `{name}` is missing")]
    MissingTensor {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor's full name.
        name: String,
    },
    /// A tensor's shape disagrees with `config.json`.
    #[error("{file}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor's full name.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
}

/// How a checkpoint is computed on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertOptions {
    /// The float type of weights and activations (outputs are returned as f32).
    pub dtype: FloatDType,
    /// burn's fused attention op instead of separate score/softmax/value ops.
    pub fused_attention: bool,
    /// Pad every batch to a multiple of this many tokens (1: to its longest input only).
    pub pad_to_multiple: usize,
    /// On the CPU (flex) in f32: the fused encoder of `cpu.rs` instead of burn's composite
    /// ops (false: the composite path, for comparisons).
    pub cpu_kernels: bool,
    /// On the CPU: threads of this model's own pool for its parallel work (0: the process's
    /// shared pool, one thread per core). Several replicas on one CPU each get a share.
    pub cpu_threads: usize,
}

impl Default for BertOptions {
    fn default() -> Self {
        BertOptions {
            dtype: FloatDType::F32,
            fused_attention: false,
            pad_to_multiple: 1,
            cpu_kernels: true,
            cpu_threads: 0,
        }
    }
}

/// A loaded BERT checkpoint on one device.
pub struct BertModel {
    name: String,
    device: Device,
    options: BertOptions,
    config: CheckpointConfig,
    preparer: Arc<BertPreparer>,
    embeddings: BertEmbeddings,
    encoder: Encoder,
    mlm: Option<MaskedLmHead>,
    classifier: Option<SequenceClassifier>,
    /// The classifier's label names, shared by every output that names them.
    labels: Vec<Arc<str>>,
    /// The model's own thread pool (`cpu_threads`), if it has one.
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// The encoder as it runs on the model's device.
enum Encoder {
    /// burn ops, on any device and float type.
    Composite(BertEncoder),
    /// Fused, unpadded, on the CPU in f32 (see `cpu.rs`).
    Cpu(CpuEncoder),
}

/// The encoder's output for a padded batch.
struct Encoded {
    /// `[batch, len, hidden]`
    states: Tensor<3>,
    /// `[batch, len]`, 1 for real tokens and 0 for padding.
    mask: Tensor<2>,
    len: usize,
}

impl BertModel {
    /// Loads the checkpoint in `dir` onto `device`, in f32 with explicit attention.
    pub fn load(dir: &Path, device: &Device) -> Result<BertModel, LoadError> {
        Self::load_with(dir, device, BertOptions::default())
    }

    /// Loads the checkpoint in `dir` onto `device`, computed as `options` say.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        options: BertOptions,
    ) -> Result<BertModel, LoadError> {
        let config = CheckpointConfig::read(dir)?;
        let tokenizer = BertTokenizer::load(dir, config.max_tokens)?;
        let file = dir.join("model.safetensors");
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LoadError::MissingFile(file))
            }
            Err(e) => return Err(LoadError::Io(file, e)),
        };
        let weights = weights::Weights::parse(&file, &bytes, device, options.dtype.into())?;
        let embeddings = BertEmbeddings::load(&weights, &config.bert)?;
        let encoder = BertEncoder::load(&weights, &config.bert)?;
        let encoder = if options.cpu_kernels
            && options.dtype == FloatDType::F32
            && *device == super::cpu_device()
        {
            Encoder::Cpu(encoder.into_cpu(&config.bert))
        } else {
            Encoder::Composite(encoder)
        };
        // RoBERTa's masked-LM head (`lm_head.*`) is not implemented: such checkpoints serve
        // embed (and rerank/classify with a classifier), and say so for fill_mask.
        let mlm = match config.family {
            Family::Bert => MaskedLmHead::load(&weights, &config.bert)?,
            Family::Roberta => None,
        };
        let classifier = SequenceClassifier::load(&weights, &config.bert)?;
        let mut labels = config.bert.labels();
        if let Some(classifier) = &classifier {
            if labels.len() != classifier.labels {
                // No (or a mismatched) id2label: name the outputs as transformers does.
                labels = (0..classifier.labels)
                    .map(|i| format!("LABEL_{i}"))
                    .collect();
            }
        }
        let labels = labels.into_iter().map(Arc::from).collect();
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "bert".to_string());
        let pool = match options.cpu_threads {
            0 => None,
            threads => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("bert-cpu-{i}"))
                    .build()
                    .map_err(|e| LoadError::Invalid {
                        file: dir.to_path_buf(),
                        reason: format!("starting {threads} CPU threads: {e}"),
                    })?,
            )),
        };
        let preparer = Arc::new(BertPreparer {
            tokenizer,
            vocab_size: config.bert.vocab_size as u32,
            // RoBERTa-family models have one token type, whatever their tokenizer says.
            pair_types: config.family == Family::Bert && config.bert.type_vocab_size >= 2,
        });
        Ok(BertModel {
            name,
            device: device.clone(),
            options,
            config,
            preparer,
            embeddings,
            encoder,
            mlm,
            classifier,
            labels,
            pool,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &BertTokenizer {
        &self.preparer.tokenizer
    }

    /// Whether the checkpoint has a masked-LM head.
    pub fn has_mlm_head(&self) -> bool {
        self.mlm.is_some()
    }

    /// The classifier's outputs, if the checkpoint has a sequence-classification head.
    pub fn classifier_labels(&self) -> Option<usize> {
        self.classifier.as_ref().map(|c| c.labels)
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.config.family
    }

    /// The length a batch whose longest input has `longest` tokens is padded to: rounded up to
    /// `pad_to_multiple`, within the position table (after the RoBERTa offset).
    pub fn padded_len(&self, longest: usize) -> usize {
        // RoBERTa-family positions start after the padding id: fewer rows are left.
        let positions = self.config.bert.max_position_embeddings
            - self.config.bert.position_offset(self.config.family);
        longest
            .next_multiple_of(self.options.pad_to_multiple.max(1))
            .min(positions)
            .max(longest)
    }

    /// The model's float type as a tensor dtype.
    fn dtype(&self) -> DType {
        self.options.dtype.into()
    }

    /// Pads the batch (to its longest input, rounded up to `pad_to_multiple` within the
    /// position table), runs embeddings and encoder.
    fn encode(&self, batch: &[&[u32]]) -> Encoded {
        self.encode_typed(batch, &[])
    }

    /// [`BertModel::encode`] with token types per input (`types[i]` empty or missing: all 0).
    fn encode_typed(&self, batch: &[&[u32]], types: &[&[u32]]) -> Encoded {
        match &self.pool {
            Some(pool) => pool.install(|| self.encode_here(batch, types)),
            None => self.encode_here(batch, types),
        }
    }

    /// [`BertModel::encode_typed`] on the calling thread's pool.
    fn encode_here(&self, batch: &[&[u32]], types: &[&[u32]]) -> Encoded {
        let longest = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let len = self.padded_len(longest);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut positions = Vec::with_capacity(batch.len() * len);
        let mut type_ids = vec![0i64; batch.len() * len];
        let mut mask = Vec::with_capacity(batch.len() * len);
        let pad = self.preparer.tokenizer.pad_id() as i64;
        for (i, row) in batch.iter().enumerate() {
            if let Some(row_types) = types.get(i).filter(|t| t.len() == row.len()) {
                for (slot, &t) in type_ids[i * len..].iter_mut().zip(row_types.iter()) {
                    *slot = t as i64;
                }
            }
            ids.extend(row.iter().map(|&id| id as i64));
            ids.extend(std::iter::repeat_n(pad, len - row.len()));
            self.position_ids(&ids[ids.len() - len..], &mut positions);
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, len - row.len()));
        }
        let shape = [batch.len(), len];
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, shape), &self.device);
        let type_ids = Tensor::<2, Int>::from_data(TensorData::new(type_ids, shape), &self.device);
        let positions =
            Tensor::<2, Int>::from_data(TensorData::new(positions, shape), &self.device);
        let embedded = self.embeddings.forward(ids, type_ids, positions);
        let states = match &self.encoder {
            Encoder::Composite(encoder) => {
                let key_mask = self.key_mask(&mask, shape, encoder.heads());
                encoder.forward(embedded, &key_mask)
            }
            Encoder::Cpu(encoder) => {
                let lengths: Vec<usize> = batch.iter().map(|ids| ids.len()).collect();
                self.encode_unpadded(encoder, embedded, &lengths)
            }
        };
        // Pooling runs in f32 whatever the model's float type (see `embed`).
        let mask = Tensor::<2>::from_data(TensorData::new(mask, shape), (&self.device, DType::F32));
        Encoded { states, mask, len }
    }

    /// Appends the position ids of one padded row. BERT counts from 0. RoBERTa-family models
    /// count as transformers' `create_position_ids_from_input_ids` does: padding-id tokens
    /// get `pad_token_id` itself, every other token `pad_token_id + ` its rank among the
    /// non-padding tokens (so a literal `<pad>` in a text shifts the positions after it, as
    /// in PyTorch).
    fn position_ids(&self, row: &[i64], positions: &mut Vec<i64>) {
        match self.config.family {
            Family::Bert => positions.extend(0..row.len() as i64),
            Family::Roberta => {
                let pad = self.config.bert.pad_token_id.unwrap_or(1) as i64;
                let mut rank = 0;
                positions.extend(row.iter().map(|&id| {
                    if id == pad {
                        pad
                    } else {
                        rank += 1;
                        pad + rank
                    }
                }));
            }
        }
    }

    /// What keeps the composite encoder's tokens from attending to padding.
    fn key_mask(&self, mask: &[f32], shape: [usize; 2], heads: usize) -> KeyMask {
        let [batch, len] = shape;
        if self.options.fused_attention {
            let padding: Vec<bool> = mask.iter().map(|&m| m == 0.0).collect();
            let padding =
                Tensor::<2, Bool>::from_data(TensorData::new(padding, shape), &self.device);
            KeyMask::Padding(
                padding
                    .reshape([batch, 1, 1, len])
                    .expand([batch, heads, len, len]),
            )
        } else {
            let bias: Vec<f32> = mask
                .iter()
                .map(|&m| if m > 0.0 { 0.0 } else { PADDING_BIAS })
                .collect();
            KeyMask::Bias(
                Tensor::<2>::from_data(TensorData::new(bias, shape), (&self.device, self.dtype()))
                    .reshape([batch, 1, 1, len]),
            )
        }
    }

    /// The fused CPU encoder over the real tokens only: packs them out of the padded
    /// `[batch, len, hidden]` embeddings, encodes, and puts them back (padding rows zero).
    fn encode_unpadded(
        &self,
        encoder: &CpuEncoder,
        embedded: Tensor<3>,
        lengths: &[usize],
    ) -> Tensor<3> {
        let [batch, len, hidden] = embedded.dims();
        // Zero-copy on flex: the buffer the embeddings were computed into.
        let mut padded: Vec<f32> = embedded
            .into_data()
            .try_into_vec()
            .expect("f32 embeddings on the CPU");
        if lengths.iter().all(|&l| l == len) {
            encoder.forward(&mut padded, lengths);
        } else {
            let mut packed = Vec::with_capacity(lengths.iter().sum::<usize>() * hidden);
            for (row, &l) in padded.chunks_exact(len * hidden).zip(lengths) {
                packed.extend_from_slice(&row[..l * hidden]);
            }
            encoder.forward(&mut packed, lengths);
            let mut tokens = packed.chunks_exact(hidden);
            for (row, &l) in padded.chunks_exact_mut(len * hidden).zip(lengths) {
                for (i, token) in row.chunks_exact_mut(hidden).enumerate() {
                    match i < l {
                        true => token.copy_from_slice(tokens.next().expect("packed row")),
                        false => token.fill(0.0),
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(padded, [batch, len, hidden]), &self.device)
    }

    /// Raw last hidden states of one input, `[len][hidden]`, without its padding rows (for
    /// tests and tools).
    pub fn hidden_states(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let encoded = self.encode(&[ids]);
        let hidden = self.config.bert.hidden_size;
        let values = to_f32_vec(encoded.states);
        values
            .chunks_exact(hidden)
            .take(ids.len())
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// Sentence embeddings of tokenised inputs (pooled; L2-normalised where `normalize[i]`).
    pub fn embed(&self, batch: &[&[u32]], normalize: &[bool]) -> Vec<Vec<f32>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let encoded = self.encode(batch);
        // Averaging hundreds of half-precision states loses digits: pool in f32.
        let pooled = heads::pool(to_f32(encoded.states), encoded.mask, self.config.pooling);
        let hidden = self.config.bert.hidden_size;
        let values = to_f32_vec(pooled);
        values
            .chunks_exact(hidden)
            .zip(normalize)
            .map(|(row, &normalize)| {
                let mut row = row.to_vec();
                if normalize {
                    // As torch.nn.functional.normalize: x / max(||x||, 1e-12).
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|v| *v /= norm);
                }
                row
            })
            .collect()
    }

    /// Vocabulary logits at each `(input, position)` of the batch, in the given order (for
    /// tests and tools: this reads the whole `[positions, vocab]` table back).
    pub fn mask_logits(
        &self,
        batch: &[&[u32]],
        positions: &[(usize, usize)],
    ) -> Option<Vec<Vec<f32>>> {
        let vocab = self.config.bert.vocab_size;
        let mut rows = Vec::with_capacity(positions.len());
        self.for_mask_chunks(batch, positions, |logits, _| {
            rows.extend(logits.chunks_exact(vocab).map(<[f32]>::to_vec));
        })?;
        Some(rows)
    }

    /// The `top_k[i]` most likely tokens, with their probabilities, at each
    /// `(input, position)` of the batch, in the given order. Only one chunk of
    /// [`MASK_ROWS_PER_CHUNK`] rows of logits exists at a time, on the device and on the host.
    pub fn mask_top_k(
        &self,
        batch: &[&[u32]],
        positions: &[(usize, usize)],
        top_k: &[usize],
    ) -> Option<Vec<Vec<(u32, f32)>>> {
        assert_eq!(positions.len(), top_k.len(), "one top_k per position");
        let vocab = self.config.bert.vocab_size;
        let mut predictions = Vec::with_capacity(positions.len());
        self.for_mask_chunks(batch, positions, |logits, first| {
            for (row, &k) in logits.chunks_exact(vocab).zip(&top_k[first..]) {
                predictions.push(top_k_softmax(row, k));
            }
        })?;
        Some(predictions)
    }

    /// Encodes the batch once, then computes the MLM head's logits for the positions
    /// [`MASK_ROWS_PER_CHUNK`] at a time and hands each chunk (`[rows, vocab]`, row-major)
    /// with the index of its first position to `each`. `None` without an MLM head.
    fn for_mask_chunks(
        &self,
        batch: &[&[u32]],
        positions: &[(usize, usize)],
        mut each: impl FnMut(&[f32], usize),
    ) -> Option<()> {
        let mlm = self.mlm.as_ref()?;
        if positions.is_empty() {
            return Some(());
        }
        let encoded = self.encode(batch);
        let hidden = self.config.bert.hidden_size;
        let states = encoded.states.reshape([batch.len() * encoded.len, hidden]);
        for (chunk, rows) in positions.chunks(MASK_ROWS_PER_CHUNK).enumerate() {
            let flat: Vec<i64> = rows
                .iter()
                .map(|&(row, pos)| (row * encoded.len + pos) as i64)
                .collect();
            let index =
                Tensor::<1, Int>::from_data(TensorData::new(flat, [rows.len()]), &self.device);
            let logits = to_f32_vec(mlm.forward(states.clone().select(0, index)));
            each(&logits, chunk * MASK_ROWS_PER_CHUNK);
        }
        Some(())
    }

    /// The classifier's logits for each input (`[labels]` per input), from the first
    /// token's final state; `None` without a classifier.
    pub fn classify_logits(&self, batch: &[&[u32]], types: &[&[u32]]) -> Option<Vec<Vec<f32>>> {
        let classifier = self.classifier.as_ref()?;
        if batch.is_empty() {
            return Some(Vec::new());
        }
        let encoded = self.encode_typed(batch, types);
        let hidden = self.config.bert.hidden_size;
        let first = encoded
            .states
            .narrow(1, 0, 1)
            .reshape([batch.len(), hidden]);
        let logits = to_f32_vec(classifier.forward(first));
        Some(
            logits
                .chunks_exact(classifier.labels)
                .map(<[f32]>::to_vec)
                .collect(),
        )
    }

    fn run_rerank(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let batch: Vec<&[u32]> = inputs.iter().map(|i| i.prepared.ids.as_slice()).collect();
        let types: Vec<&[u32]> = inputs
            .iter()
            .map(|i| i.prepared.type_ids.as_slice())
            .collect();
        let logits = self
            .classify_logits(&batch, &types)
            .expect("rerank only runs on checkpoints with a classifier");
        logits
            .into_iter()
            .map(|row| {
                let raw_score = row[0];
                Ok(Output::Score {
                    score: sigmoid(raw_score),
                    raw_score,
                })
            })
            .collect()
    }

    fn run_classify(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let batch: Vec<&[u32]> = inputs.iter().map(|i| i.prepared.ids.as_slice()).collect();
        let logits = self
            .classify_logits(&batch, &[])
            .expect("classify only runs on checkpoints with a classifier");
        let multi_label =
            self.config.bert.problem_type.as_deref() == Some("multi_label_classification");
        inputs
            .iter()
            .zip(logits)
            .map(|(input, row)| {
                let k = input
                    .options
                    .top_k
                    .map_or(row.len(), |k| k as usize)
                    .min(row.len());
                let ranked = if multi_label {
                    let mut ranked: Vec<(u32, f32)> = row
                        .iter()
                        .enumerate()
                        .map(|(id, &l)| (id as u32, sigmoid(l)))
                        .collect();
                    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                    ranked.truncate(k);
                    ranked
                } else {
                    top_k_softmax(&row, k)
                };
                let labels = ranked
                    .into_iter()
                    .map(|(id, score)| LabelScore {
                        label: self.labels[id as usize].clone(),
                        id,
                        score,
                    })
                    .collect();
                Ok(Output::Labels { labels })
            })
            .collect()
    }

    fn run_embed(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let batch: Vec<&[u32]> = inputs.iter().map(|i| i.prepared.ids.as_slice()).collect();
        let normalize: Vec<bool> = inputs
            .iter()
            .map(|i| i.options.normalize.unwrap_or(true))
            .collect();
        self.embed(&batch, &normalize)
            .into_iter()
            .map(|embedding| Ok(Output::Embedding { embedding }))
            .collect()
    }

    fn run_fill_mask(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let tokenizer = &self.preparer.tokenizer;
        let Some(mask_id) = tokenizer.mask_id() else {
            let error = InputError::new(
                ErrorCode::UnsupportedTask,
                "the vocabulary has no [MASK] token",
            );
            return vec![Err(error); inputs.len()];
        };
        let batch: Vec<&[u32]> = inputs.iter().map(|i| i.prepared.ids.as_slice()).collect();
        let masks: Vec<Vec<usize>> = batch
            .iter()
            .map(|ids| (0..ids.len()).filter(|&p| ids[p] == mask_id).collect())
            .collect();
        let positions: Vec<(usize, usize)> = masks
            .iter()
            .enumerate()
            .flat_map(|(row, masks)| masks.iter().map(move |&p| (row, p)))
            .collect();
        let top_k: Vec<usize> = inputs
            .iter()
            .zip(&masks)
            .flat_map(|(input, masks)| {
                let k = input.options.top_k.unwrap_or(DEFAULT_TOP_K) as usize;
                std::iter::repeat_n(k, masks.len())
            })
            .collect();
        let mut ranked = self
            .mask_top_k(&batch, &positions, &top_k)
            .expect("fill_mask only runs on checkpoints with an MLM head")
            .into_iter();
        inputs
            .iter()
            .zip(&masks)
            .map(|(input, masks)| {
                let predictions: Vec<Vec<MaskPrediction>> = masks
                    .iter()
                    .map(|_| {
                        ranked
                            .next()
                            .expect("one prediction list per mask")
                            .into_iter()
                            .map(|(id, score)| MaskPrediction {
                                token: tokenizer.token(id),
                                token_id: id,
                                score,
                            })
                            .collect()
                    })
                    .collect();
                let sequence = fill_in(input.text, &input.prepared.offsets, masks, &predictions);
                Ok(Output::FillMask(FillMaskOutput {
                    masks: predictions,
                    sequence,
                }))
            })
            .collect()
    }
}

/// The tensor in f32 (itself when it already is).
fn to_f32<const D: usize>(tensor: Tensor<D>) -> Tensor<D> {
    match tensor.dtype() {
        DType::F32 => tensor,
        _ => tensor.cast(FloatDType::F32),
    }
}

/// A tensor's values as f32 on the host, whatever float type it was computed in.
fn to_f32_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    to_f32(tensor)
        .into_data()
        .try_to_vec::<f32>()
        .expect("an f32 tensor reads as f32")
}

/// The logistic function, accurate in f64 for large |x|.
fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// Tokenises and checks inputs for a BERT checkpoint, on the request path (blocking threads, beside the model workers).
pub struct BertPreparer {
    tokenizer: BertTokenizer,
    vocab_size: u32,
    /// Whether a pair's passage gets token type 1 (BERT with two token types).
    pair_types: bool,
}

impl Prepare for BertPreparer {
    fn prepare(
        &self,
        task: Task,
        input: &Input,
        options: &InferOptions,
    ) -> Result<Prepared, InputError> {
        let truncate = options.truncate.unwrap_or(false);
        let text = input.text();
        match task {
            Task::Embed | Task::Classify => {
                let Tokens { ids, .. } = self.tokenizer.encode(text, truncate)?;
                Ok(Prepared {
                    tokens: ids.len(),
                    ids,
                    ..Prepared::default()
                })
            }
            Task::Rerank => {
                let Some(passage) = input.passage() else {
                    return Err(InputError::new(
                        ErrorCode::InvalidInput,
                        "rerank takes [query, passage] pairs",
                    ));
                };
                let Tokens { ids, type_ids, .. } =
                    self.tokenizer.encode_pair(text, passage, truncate)?;
                Ok(Prepared {
                    tokens: ids.len(),
                    ids,
                    type_ids: if self.pair_types {
                        type_ids
                    } else {
                        Vec::new()
                    },
                    offsets: Vec::new(),
                })
            }
            Task::FillMask => {
                let top_k = options.top_k.unwrap_or(DEFAULT_TOP_K);
                if top_k == 0 || top_k > self.vocab_size {
                    return Err(InputError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "top_k must be between 1 and {}, not {top_k}",
                            self.vocab_size
                        ),
                    ));
                }
                let Tokens { ids, offsets, .. } = self.tokenizer.encode(text, truncate)?;
                let mask_id = self.tokenizer.mask_id();
                if mask_id.is_none() || !ids.iter().any(|&id| Some(id) == mask_id) {
                    return Err(InputError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "the input has no {} token to fill",
                            self.tokenizer.mask_token()
                        ),
                    ));
                }
                Ok(Prepared {
                    tokens: ids.len(),
                    ids,
                    type_ids: Vec::new(),
                    offsets,
                })
            }
        }
    }

    fn mask_token(&self) -> Option<Arc<str>> {
        self.tokenizer
            .mask_id()
            .map(|_| Arc::from(self.tokenizer.mask_token()))
    }
}

/// The `k` most likely tokens with their probabilities (softmax over the whole row,
/// accumulated in f64), most likely first.
pub fn top_k_softmax(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if k < order.len() {
        order.select_nth_unstable_by(k, by_logit);
        order.truncate(k);
    }
    order.sort_by(by_logit);
    order
        .into_iter()
        .map(|id| {
            (
                id,
                (((logits[id as usize] - max) as f64).exp() / sum) as f32,
            )
        })
        .collect()
}

/// The input text with each mask's span replaced by its best token (`##` pieces joined).
fn fill_in(
    text: &str,
    offsets: &[(usize, usize)],
    masks: &[usize],
    predictions: &[Vec<MaskPrediction>],
) -> String {
    let mut filled = text.to_string();
    // Replace from the end so earlier byte offsets stay valid.
    for (&position, candidates) in masks.iter().zip(predictions).rev() {
        let (start, end) = offsets[position];
        let Some(best) = candidates.first() else {
            continue;
        };
        let (start, replacement) = match best.token.strip_prefix("##") {
            Some(piece) if filled[..start].ends_with(' ') => (start - 1, piece),
            Some(piece) => (start, piece),
            None => (start, &*best.token),
        };
        if end > start && filled.is_char_boundary(start) && filled.is_char_boundary(end) {
            filled.replace_range(start..end, replacement);
        }
    }
    filled
}

impl BatchModel for BertModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn supports(&self, task: Task) -> bool {
        match task {
            Task::Embed => true,
            Task::FillMask => self.mlm.is_some() && self.preparer.tokenizer.mask_id().is_some(),
            Task::Rerank => self.classifier_labels() == Some(1),
            Task::Classify => self.classifier_labels().is_some_and(|labels| labels >= 2),
        }
    }

    fn unsupported_reason(&self, task: Task) -> String {
        let name = &self.name;
        match (task, self.classifier_labels()) {
            (Task::FillMask, _) if self.config.family == Family::Roberta => format!(
                "checkpoint `{name}` is a RoBERTa-family model; its masked-LM head is not implemented, so it cannot serve fill_mask; \
                 serve a BertForMaskedLM checkpoint on another subject prefix for that"
            ),
            (Task::FillMask, _) => format!(
                "checkpoint `{name}` has no masked-LM head (cls.predictions.*), so it cannot serve fill_mask; \
                 serve a BertForMaskedLM checkpoint on another subject prefix for that"
            ),
            (Task::Rerank, Some(labels)) => format!(
                "checkpoint `{name}` is a classifier with {labels} labels; rerank needs a cross-encoder with one output (num_labels = 1): use classify"
            ),
            (Task::Classify, Some(_)) => format!(
                "checkpoint `{name}` has one output (a cross-encoder); classify needs at least two labels: use rerank"
            ),
            (Task::Rerank | Task::Classify, None) => format!(
                "checkpoint `{name}` has no sequence-classification head (classifier.*), so it cannot serve {task}; \
                 serve a *ForSequenceClassification checkpoint on another subject prefix for that"
            ),
            (Task::Embed, _) => format!("checkpoint `{name}` cannot serve embed"),
        }
    }

    fn preparer(&self) -> Arc<dyn Prepare> {
        self.preparer.clone()
    }

    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        match task {
            Task::Embed => self.run_embed(inputs),
            Task::FillMask => self.run_fill_mask(inputs),
            Task::Rerank => self.run_rerank(inputs),
            Task::Classify => self.run_classify(inputs),
        }
    }

    /// Embeds a batch of every shape in the plan (or one small one), then runs the masked-LM
    /// head on as many masks as a batch can carry, checking that every value is finite (a
    /// half-precision model that overflows fails here, at start, not on a user's request).
    fn warm_up(&mut self, plan: &WarmUpPlan) -> anyhow::Result<usize> {
        // `[CLS] warm up [SEP]`, stretched to any length by repeating its first word.
        let seed = self
            .preparer
            .tokenizer
            .encode("warm up", false)
            .map_err(|e| anyhow::anyhow!("tokenising the warm-up text: {e}"))?
            .ids;
        anyhow::ensure!(seed.len() >= 3, "the warm-up text tokenises to {seed:?}");
        let row = |len: usize| {
            let mut ids = vec![seed[1]; len.max(3)];
            ids[0] = seed[0];
            ids[len.max(3) - 1] = seed[seed.len() - 1];
            ids
        };
        let shapes = if plan.shapes {
            plan.shapes(self.config.max_tokens)
        } else {
            vec![(1, seed.len())]
        };
        let not_finite = |size: usize, len: usize| {
            anyhow::anyhow!(
                "a warm-up batch of {size} x {len} tokens gave values that are not finite in {:?}; \
                 the model overflows in this precision: use model.dtype = \"f32\" or \"bf16\"",
                self.options.dtype
            )
        };
        for &(size, len) in &shapes {
            let ids = row(len);
            let batch = vec![ids.as_slice(); size];
            let embeddings = self.embed(&batch, &vec![true; size]);
            if !embeddings.iter().flatten().all(|v| v.is_finite()) {
                return Err(not_finite(size, len));
            }
        }
        let mut batches = shapes.len();
        if let (Some(_), Some(mask_id)) = (&self.mlm, self.preparer.tokenizer.mask_id()) {
            let len = shapes[0].1;
            let mut ids = row(len);
            ids[1] = mask_id;
            let mut sizes: Vec<usize> = shapes
                .iter()
                .filter(|&&(_, l)| l == len)
                .map(|&(size, _)| size)
                .collect();
            sizes.dedup();
            for size in sizes {
                let batch = vec![ids.as_slice(); size];
                let positions: Vec<(usize, usize)> = (0..size).map(|row| (row, 1)).collect();
                let logits = self.mask_logits(&batch, &positions).unwrap_or_default();
                if !logits.iter().flatten().all(|v| v.is_finite()) {
                    return Err(not_finite(size, len));
                }
                batches += 1;
            }
        }
        Ok(batches)
    }
}
