//! What sits on top of the encoder: the masked-LM head, the sequence classifier and
//! sentence pooling.

use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation::gelu;

use super::config::{BertConfig, Pooling};
use super::weights::Weights;
use super::LoadError;

/// `cls.predictions.*`: dense → GELU → LayerNorm → decoder (tied to the word embeddings
/// unless the file has its own) + bias.
pub struct MaskedLmHead {
    transform: Linear,
    norm: LayerNorm,
    /// `[hidden, vocab]`
    decoder: Tensor<2>,
    bias: Tensor<1>,
}

impl MaskedLmHead {
    /// Loads the head if the checkpoint has one (`cls.predictions.transform.dense.weight`).
    pub fn load(weights: &Weights<'_>, config: &BertConfig) -> Result<Option<Self>, LoadError> {
        if !weights.has_exact("cls.predictions.transform.dense.weight") {
            return Ok(None);
        }
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        // Untied checkpoints have their own decoder; tied ones reuse the word embeddings. Either
        // way a contiguous `[hidden, vocab]` copy makes the decoder one plain matmul.
        let decoder_name = if weights.has_exact("cls.predictions.decoder.weight") {
            "cls.predictions.decoder.weight".to_string()
        } else {
            weights.encoder_name("embeddings.word_embeddings.weight")
        };
        let decoder = weights.matrix_transposed(&decoder_name, vocab, h)?;
        let bias_name = if weights.has_exact("cls.predictions.bias") {
            "cls.predictions.bias"
        } else {
            "cls.predictions.decoder.bias"
        };
        Ok(Some(MaskedLmHead {
            transform: weights.linear("cls.predictions.transform.dense", h, h)?,
            norm: weights.layer_norm(
                "cls.predictions.transform.LayerNorm",
                h,
                config.layer_norm_eps,
            )?,
            decoder,
            bias: weights.vector(bias_name, vocab)?,
        }))
    }

    /// `[n, hidden]` states of masked tokens → `[n, vocab]` logits.
    pub fn forward(&self, states: Tensor<2>) -> Tensor<2> {
        let x = self.norm.forward(gelu(self.transform.forward(states)));
        x.matmul(self.decoder.clone()) + self.bias.clone().unsqueeze_dim::<2>(0)
    }
}

/// A sequence-classification head on the first token's state: dense → tanh → out. BERT
/// calls the first layer its pooler (`bert.pooler.dense`, then `classifier`); RoBERTa keeps
/// both in `classifier.dense` and `classifier.out_proj`. Same computation, other names.
pub struct SequenceClassifier {
    dense: Linear,
    out: Linear,
    /// Outputs (labels; 1 for a cross-encoder's relevance logit).
    pub labels: usize,
}

impl SequenceClassifier {
    /// Loads the head if the checkpoint has one (`classifier.weight` or `classifier.out_proj.weight`).
    pub fn load(weights: &Weights<'_>, config: &BertConfig) -> Result<Option<Self>, LoadError> {
        let h = config.hidden_size;
        let (dense, out) = if weights.has_exact("classifier.out_proj.weight") {
            ("classifier.dense".to_string(), "classifier.out_proj")
        } else if weights.has_exact("classifier.weight") {
            (weights.encoder_name("pooler.dense"), "classifier")
        } else {
            return Ok(None);
        };
        let labels = weights.rows(&format!("{out}.weight"))?;
        Ok(Some(SequenceClassifier {
            dense: weights.linear(&dense, h, h)?,
            out: weights.linear(out, h, labels)?,
            labels,
        }))
    }

    /// `[n, hidden]` first-token states → `[n, labels]` logits.
    pub fn forward(&self, first: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.dense.forward(first).tanh())
    }
}

/// `[batch, len, hidden]` states and a `[batch, len]` 0/1 mask → `[batch, hidden]`.
pub fn pool(states: Tensor<3>, mask: Tensor<2>, pooling: Pooling) -> Tensor<2> {
    let [batch, _, hidden] = states.dims();
    match pooling {
        Pooling::Cls => states.narrow(1, 0, 1).reshape([batch, hidden]),
        Pooling::Mean => {
            let counts = mask.clone().sum_dim(1); // [batch, 1]
            let summed = (states * mask.unsqueeze_dim::<3>(2))
                .sum_dim(1)
                .reshape([batch, hidden]);
            summed / counts
        }
    }
}
