//! What sits on top of the encoder: the masked-LM head and sentence pooling.

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
    pub fn load(
        weights: &Weights<'_>,
        config: &BertConfig,
        word_table: &Tensor<2>,
    ) -> Result<Option<Self>, LoadError> {
        if !weights.has_exact("cls.predictions.transform.dense.weight") {
            return Ok(None);
        }
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let decoder = if weights.has_exact("cls.predictions.decoder.weight") {
            weights.matrix_transposed("cls.predictions.decoder.weight", vocab, h)?
        } else {
            // Tied: a contiguous transposed copy makes the decoder one plain matmul.
            let values = word_table.to_data().try_to_vec::<f32>().expect("f32 table");
            let mut transposed = vec![0f32; values.len()];
            for (v, row) in values.chunks_exact(h).enumerate() {
                for (i, value) in row.iter().enumerate() {
                    transposed[i * vocab + v] = *value;
                }
            }
            Tensor::from_data(
                TensorData::new(transposed, [h, vocab]),
                &word_table.device(),
            )
        };
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
