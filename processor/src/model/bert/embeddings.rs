//! BERT input embeddings: word + position + token type, then LayerNorm. RoBERTa-family
//! checkpoints differ only in their position ids (see `BertModel::position_ids`).

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

    /// `[batch, len]` token ids, token types and position ids → `[batch, len, hidden]`.
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        types: Tensor<2, Int>,
        positions: Tensor<2, Int>,
    ) -> Tensor<3> {
        let x = self.word.forward(ids)
            + self.position.forward(positions)
            + self.token_type.forward(types);
        self.norm.forward(x)
    }
}
