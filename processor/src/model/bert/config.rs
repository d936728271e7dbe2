//! The checkpoint's configuration files: `config.json` (sizes) and, for sentence-transformers
//! checkpoints, `sentence_bert_config.json` (max sequence length) and `1_Pooling/config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::LoadError;

/// The fields of a HuggingFace `BertConfig` this implementation uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer and the MLM transform.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Positions the model has embeddings for.
    pub max_position_embeddings: usize,
    /// Token type (segment) vocabulary.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "gelu".to_string()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// How a sentence embedding is made from the token states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the real (non-padding) tokens, `[CLS]` and `[SEP]` included.
    Mean,
    /// The `[CLS]` token's state.
    Cls,
}

/// Everything read from the checkpoint's JSON files.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    /// `config.json`.
    pub bert: BertConfig,
    /// Longest input in tokens (special tokens included).
    pub max_tokens: usize,
    /// Sentence-embedding pooling.
    pub pooling: Pooling,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

impl CheckpointConfig {
    /// Reads and checks the configuration files of the checkpoint in `dir`.
    pub fn read(dir: &Path) -> Result<CheckpointConfig, LoadError> {
        let bert: BertConfig = read_json(&dir.join("config.json"))?
            .ok_or_else(|| LoadError::MissingFile(dir.join("config.json")))?;
        let invalid = |reason: String| LoadError::Invalid {
            file: dir.join("config.json"),
            reason,
        };
        if bert.hidden_size == 0 || bert.num_attention_heads == 0 {
            return Err(invalid(
                "hidden_size and num_attention_heads must be positive".into(),
            ));
        }
        if !bert.hidden_size.is_multiple_of(bert.num_attention_heads) {
            return Err(invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                bert.hidden_size, bert.num_attention_heads
            )));
        }
        if bert.hidden_act != "gelu" {
            return Err(invalid(format!(
                "hidden_act `{}` is not supported (only the exact erf `gelu` is)",
                bert.hidden_act
            )));
        }
        let sentence: Option<SentenceBertConfig> =
            read_json(&dir.join("sentence_bert_config.json"))?;
        let max_tokens = sentence
            .and_then(|s| s.max_seq_length)
            .map_or(bert.max_position_embeddings, |n| {
                n.min(bert.max_position_embeddings)
            });
        let pooling_file = dir.join("1_Pooling").join("config.json");
        let pooling = match read_json::<PoolingConfig>(&pooling_file)? {
            None => Pooling::Mean,
            Some(p) if p.pooling_mode_mean_tokens => Pooling::Mean,
            Some(p) if p.pooling_mode_cls_token => Pooling::Cls,
            Some(_) => {
                return Err(LoadError::Invalid {
                    file: pooling_file,
                    reason: "only mean-token or CLS-token pooling is supported".into(),
                })
            }
        };
        Ok(CheckpointConfig {
            bert,
            max_tokens,
            pooling,
        })
    }
}

/// Parses a JSON file; `None` if it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &PathBuf) -> Result<Option<T>, LoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Io(path.clone(), e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Invalid {
            file: path.clone(),
            reason: e.to_string(),
        })
}
