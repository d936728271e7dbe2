//! BERT input embeddings: word + position + token type, then LayerNorm. RoBERTa-family
//! checkpoints differ only in where positions start (after the padding id).

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
    /// The position id of the first token.
    position_offset: usize,
}

impl BertEmbeddings {
    /// Loads `embeddings.{word,position,token_type}_embeddings` and `embeddings.LayerNorm`.
    pub fn load(
        weights: &Weights<'_>,
        config: &BertConfig,
        position_offset: usize,
    ) -> Result<Self, LoadError> {
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
            position_offset,
        })
    }

    /// `[batch, len]` token ids and token types → `[batch, len, hidden]`. Positions count
    /// from the offset in every row (padding rows get positions too; they are masked).
    pub fn forward(&self, ids: Tensor<2, Int>, types: Tensor<2, Int>) -> Tensor<3> {
        let [batch, len] = ids.dims();
        let device = ids.device();
        let start = self.position_offset as i64;
        let positions = Tensor::<1, Int>::arange(start..start + len as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([batch, len]);
        let x = self.word.forward(ids)
            + self.position.forward(positions)
            + self.token_type.forward(types);
        self.norm.forward(x)
    }
}
