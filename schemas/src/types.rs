//! Request and reply bodies.

use serde::{Deserialize, Serialize};

/// A request to any task endpoint: one or more inputs, computed independently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// The texts to run; each is one input of a batch, and the reply has one output per input,
    /// in the same order.
    pub inputs: Vec<String>,
    /// Task options; every field is optional.
    #[serde(default, skip_serializing_if = "InferOptions::is_default")]
    pub options: InferOptions,
    /// Time budget in milliseconds, counted from when a processor receives the request (as
    /// the `Request-Timeout-Ms` header; the earlier of the two applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl InferRequest {
    /// A request for these inputs with default options.
    pub fn new<S: Into<String>>(inputs: impl IntoIterator<Item = S>) -> Self {
        InferRequest {
            inputs: inputs.into_iter().map(Into::into).collect(),
            options: InferOptions::default(),
            timeout_ms: None,
        }
    }
}

/// Options that shape a task's output. Unknown options are rejected rather than ignored, so a
/// misspelt option is an error the caller sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferOptions {
    /// `fill_mask`: how many candidate tokens to return per mask (default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// `embed`: L2-normalise the embedding (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Cut inputs longer than the model accepts instead of rejecting them (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

impl InferOptions {
    fn is_default(&self) -> bool {
        *self == InferOptions::default()
    }
}

/// A successful reply: one output per input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferReply {
    /// Outputs in the order of the request's inputs.
    pub outputs: Vec<Output>,
    /// Name of the model that computed them.
    pub model: String,
    /// Number of inputs in the largest batch that this request's inputs were computed in.
    pub batch_size: u32,
}

/// The output for one input. The variant is recognised by its fields, so in JSON an output
/// is simply `{"embedding": [...]}`, `{"masks": [...], "sequence": "..."}` or `{"text": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Output {
    /// `embed`: the sentence embedding.
    Embedding {
        /// The vector (unit length unless the request set `normalize: false`).
        embedding: Vec<f32>,
    },
    /// `fill_mask`: candidates for each mask.
    FillMask(FillMaskOutput),
    /// `echo` and `sim` models: the input text itself, whatever the task.
    Text {
        /// The echoed input.
        text: String,
    },
}

/// `fill_mask` output for one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FillMaskOutput {
    /// For each `[MASK]` in input order, the best `top_k` candidates, most likely first.
    pub masks: Vec<Vec<MaskPrediction>>,
    /// The input with every mask replaced by its most likely token.
    pub sequence: String,
}

/// One candidate token for a mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskPrediction {
    /// The token as text (WordPiece continuation tokens keep their `##`). Shared: a model
    /// hands out one copy of each vocabulary entry, not one per prediction.
    pub token: std::sync::Arc<str>,
    /// Vocabulary id of the token.
    pub token_id: u32,
    /// Probability (softmax over the whole vocabulary).
    pub score: f32,
}
