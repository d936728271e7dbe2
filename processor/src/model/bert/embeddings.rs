//! BERT input embeddings: word + position + token type, then LayerNorm.

use burn::nn::{Embedding, LayerNorm};
use burn::prelude::*;

use super::config::BertConfig;
use super::weights::Weights;
use super::LoadError;

/// `embeddings.*` of a BERT checkpoint.
pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl BertEmbeddings {
    /// Loads `embeddings.{word,position,token_type}_embeddings` and `embeddings.LayerNorm`.
    pub fn load(weights: &Weights<'_>, config: &BertConfig) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let name = |n: &str| weights.encoder_name(&format!("embeddings.{n}"));
        Ok(BertEmbeddings {
            word: weights.embedding(&name("word_embeddings.weight"), config.vocab_size, h)?,
            position: weights.embedding(
                &name("position_embeddings.weight"),
                config.max_position_embeddings,
                h,
            )?,
            token_type: weights.embedding(
                &name("token_type_embeddings.weight"),
                config.type_vocab_size,
                h,
            )?,
            norm: weights.layer_norm(&name("LayerNorm"), h, config.layer_norm_eps)?,
        })
    }

    /// `[batch, len]` token ids → `[batch, len, hidden]`. Every token has type 0 (single
    /// sentences), and positions count from 0 in every row.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, len] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..len as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([batch, len]);
        let types = Tensor::<2, Int>::zeros([batch, len], &device);
        let x = self.word.forward(ids)
            + self.position.forward(positions)
            + self.token_type.forward(types);
        self.norm.forward(x)
    }
}
