//! BERT on burn, loaded from a HuggingFace checkpoint directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`), serving `embed` and `fill_mask`.
//!
//! Inputs of a batch are padded to the batch's longest and the padding is masked out of
//! attention and pooling, so an input's output does not depend on its batch-mates.

mod config;
mod embeddings;
mod encoder;
mod heads;
mod tokenize;
mod weights;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use schemas::{ErrorCode, FillMaskOutput, MaskPrediction, Output, Task};

pub use config::{BertConfig, CheckpointConfig, Pooling};
pub use tokenize::{BertTokenizer, Tokens};

use self::embeddings::BertEmbeddings;
use self::encoder::BertEncoder;
use self::heads::MaskedLmHead;
use super::{BatchModel, InputError, ModelInput};

/// Added to attention scores of padding keys: exp() of it is exactly 0 in f32.
const PADDING_BIAS: f32 = -1e9;
/// `fill_mask` candidates per mask when the request does not say.
pub const DEFAULT_TOP_K: u32 = 5;

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

/// A loaded BERT checkpoint on one device.
pub struct BertModel {
    name: String,
    device: Device,
    config: CheckpointConfig,
    tokenizer: BertTokenizer,
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    mlm: Option<MaskedLmHead>,
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
    /// Loads the checkpoint in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<BertModel, LoadError> {
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
        let weights = weights::Weights::parse(&file, &bytes, device)?;
        let embeddings = BertEmbeddings::load(&weights, &config.bert)?;
        let encoder = BertEncoder::load(&weights, &config.bert)?;
        let mlm = MaskedLmHead::load(&weights, &config.bert)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "bert".to_string());
        Ok(BertModel {
            name,
            device: device.clone(),
            config,
            tokenizer,
            embeddings,
            encoder,
            mlm,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &BertTokenizer {
        &self.tokenizer
    }

    /// Whether the checkpoint has a masked-LM head.
    pub fn has_mlm_head(&self) -> bool {
        self.mlm.is_some()
    }

    /// Pads the batch, runs embeddings and encoder.
    fn encode(&self, batch: &[&[u32]]) -> Encoded {
        let len = batch.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        let pad = self.tokenizer.pad_id() as i64;
        for row in batch {
            ids.extend(row.iter().map(|&id| id as i64));
            ids.extend(std::iter::repeat_n(pad, len - row.len()));
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, len - row.len()));
        }
        let bias: Vec<f32> = mask
            .iter()
            .map(|&m| if m > 0.0 { 0.0 } else { PADDING_BIAS })
            .collect();
        let shape = [batch.len(), len];
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, shape), &self.device);
        let mask = Tensor::<2>::from_data(TensorData::new(mask, shape), &self.device);
        let bias = Tensor::<2>::from_data(TensorData::new(bias, shape), &self.device).reshape([
            batch.len(),
            1,
            1,
            len,
        ]);
        let states = self.encoder.forward(self.embeddings.forward(ids), bias);
        Encoded { states, mask, len }
    }

    /// Raw last hidden states of one unpadded input, `[len][hidden]` (for tests and tools).
    pub fn hidden_states(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let encoded = self.encode(&[ids]);
        let hidden = self.config.bert.hidden_size;
        let values = encoded
            .states
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 states");
        values.chunks_exact(hidden).map(<[f32]>::to_vec).collect()
    }

    /// Sentence embeddings of tokenised inputs (pooled; L2-normalised where `normalize[i]`).
    pub fn embed(&self, batch: &[&[u32]], normalize: &[bool]) -> Vec<Vec<f32>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let encoded = self.encode(batch);
        let pooled = heads::pool(encoded.states, encoded.mask, self.config.pooling);
        let hidden = self.config.bert.hidden_size;
        let values = pooled
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 embeddings");
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

    /// Vocabulary logits at each `(input, position)` of the batch, in the given order.
    pub fn mask_logits(
        &self,
        batch: &[&[u32]],
        positions: &[(usize, usize)],
    ) -> Option<Vec<Vec<f32>>> {
        let mlm = self.mlm.as_ref()?;
        if positions.is_empty() {
            return Some(Vec::new());
        }
        let encoded = self.encode(batch);
        let hidden = self.config.bert.hidden_size;
        let flat: Vec<i64> = positions
            .iter()
            .map(|&(row, pos)| (row * encoded.len + pos) as i64)
            .collect();
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(flat, [positions.len()]), &self.device);
        let states = encoded
            .states
            .reshape([batch.len() * encoded.len, hidden])
            .select(0, index);
        let logits = mlm
            .forward(states)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 logits");
        Some(
            logits
                .chunks_exact(self.config.bert.vocab_size)
                .map(<[f32]>::to_vec)
                .collect(),
        )
    }

    fn run_embed(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let tokens: Vec<_> = inputs
            .iter()
            .map(|input| {
                self.tokenizer
                    .encode(input.text, input.options.truncate.unwrap_or(false))
            })
            .collect();
        let (batch, normalize): (Vec<&[u32]>, Vec<bool>) = tokens
            .iter()
            .zip(inputs)
            .filter_map(|(t, input)| {
                let t = t.as_ref().ok()?;
                Some((t.ids.as_slice(), input.options.normalize.unwrap_or(true)))
            })
            .unzip();
        let mut embeddings = self.embed(&batch, &normalize).into_iter();
        tokens
            .into_iter()
            .map(|t| {
                t.map(|_| Output::Embedding {
                    embedding: embeddings.next().expect("one embedding per valid input"),
                })
            })
            .collect()
    }

    fn run_fill_mask(&self, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let Some(mask_id) = self.tokenizer.mask_id() else {
            let error = InputError::new(
                ErrorCode::UnsupportedTask,
                "the vocabulary has no [MASK] token",
            );
            return vec![Err(error); inputs.len()];
        };
        let vocab = self.config.bert.vocab_size as u32;
        let prepared: Vec<Result<MaskedInput, InputError>> = inputs
            .iter()
            .map(|input| {
                let top_k = input.options.top_k.unwrap_or(DEFAULT_TOP_K);
                if top_k == 0 || top_k > vocab {
                    return Err(InputError::new(
                        ErrorCode::InvalidInput,
                        format!("top_k must be between 1 and {vocab}, not {top_k}"),
                    ));
                }
                let tokens = self
                    .tokenizer
                    .encode(input.text, input.options.truncate.unwrap_or(false))?;
                let masks: Vec<usize> = (0..tokens.ids.len())
                    .filter(|&i| tokens.ids[i] == mask_id)
                    .collect();
                if masks.is_empty() {
                    return Err(InputError::new(
                        ErrorCode::InvalidInput,
                        format!(
                            "the input has no {} token to fill",
                            self.tokenizer.mask_token()
                        ),
                    ));
                }
                Ok(MaskedInput {
                    tokens,
                    masks,
                    top_k,
                })
            })
            .collect();
        let mut batch = Vec::new();
        let mut positions = Vec::new();
        for item in prepared.iter().flatten() {
            let row = batch.len();
            batch.push(item.tokens.ids.as_slice());
            positions.extend(item.masks.iter().map(|&p| (row, p)));
        }
        let logits = self
            .mask_logits(&batch, &positions)
            .expect("fill_mask only runs on checkpoints with an MLM head");
        let mut logits = logits.into_iter();
        prepared
            .into_iter()
            .zip(inputs)
            .map(|(item, input)| {
                let MaskedInput {
                    tokens,
                    masks,
                    top_k,
                } = item?;
                let predictions: Vec<Vec<MaskPrediction>> = masks
                    .iter()
                    .map(|_| {
                        let row = logits.next().expect("one row per mask");
                        top_k_softmax(&row, top_k as usize)
                            .into_iter()
                            .map(|(id, score)| MaskPrediction {
                                token: self.tokenizer.token(id),
                                token_id: id,
                                score,
                            })
                            .collect()
                    })
                    .collect();
                let sequence = fill_in(input.text, &tokens, &masks, &predictions);
                Ok(Output::FillMask(FillMaskOutput {
                    masks: predictions,
                    sequence,
                }))
            })
            .collect()
    }
}

/// A `fill_mask` input ready for the model.
struct MaskedInput {
    tokens: Tokens,
    /// Token positions of the masks.
    masks: Vec<usize>,
    top_k: u32,
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
    tokens: &Tokens,
    masks: &[usize],
    predictions: &[Vec<MaskPrediction>],
) -> String {
    let mut filled = text.to_string();
    // Replace from the end so earlier byte offsets stay valid.
    for (&position, candidates) in masks.iter().zip(predictions).rev() {
        let (start, end) = tokens.offsets[position];
        let Some(best) = candidates.first() else {
            continue;
        };
        let (start, replacement) = match best.token.strip_prefix("##") {
            Some(piece) if filled[..start].ends_with(' ') => (start - 1, piece),
            Some(piece) => (start, piece),
            None => (start, best.token.as_str()),
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
            Task::FillMask => self.mlm.is_some() && self.tokenizer.mask_id().is_some(),
        }
    }

    fn unsupported_reason(&self, task: Task) -> String {
        format!(
            "checkpoint `{}` has no masked-LM head (cls.predictions.*), so it cannot serve {task}; \
             serve a BertForMaskedLM checkpoint on another subject prefix for that",
            self.name
        )
    }

    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        match task {
            Task::Embed => self.run_embed(inputs),
            Task::FillMask => self.run_fill_mask(inputs),
        }
    }
}
