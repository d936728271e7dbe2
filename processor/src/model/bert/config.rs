//! The checkpoint's configuration files: `config.json` (sizes) and, for sentence-transformers
//! checkpoints, `sentence_bert_config.json` (max sequence length) and `1_Pooling/config.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::LoadError;

/// The fields of a HuggingFace `BertConfig` (or `RobertaConfig`, `XLMRobertaConfig`) this
/// implementation uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// `bert`, `roberta` or `xlm-roberta` (others are refused at load).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// The class that saved the checkpoint (`BertForSequenceClassification`, ...).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Id of the padding token; RoBERTa-family position ids start after it.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Names of the classifier's outputs, by index (sequence-classification checkpoints).
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
    /// `multi_label_classification` scores each label with a sigmoid instead of a softmax
    /// over the labels.
    #[serde(default)]
    pub problem_type: Option<String>,
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

fn default_model_type() -> String {
    "bert".to_string()
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

/// The model families this implementation computes: they share the encoder and differ in
/// their embeddings and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT: positions from 0, token types (segments) for pairs.
    Bert,
    /// RoBERTa and XLM-RoBERTa: positions start after the padding id, one token type.
    Roberta,
}

impl Family {
    /// The family of a `config.json` `model_type`, if it is one this implementation computes.
    pub fn of(model_type: &str) -> Option<Family> {
        match model_type {
            "bert" => Some(Family::Bert),
            "roberta" | "xlm-roberta" => Some(Family::Roberta),
            _ => None,
        }
    }
}

impl BertConfig {
    /// The first position id: RoBERTa-family models number positions from `pad_token_id + 1`
    /// (the rows below it are never used for real tokens).
    pub fn position_offset(&self, family: Family) -> usize {
        match family {
            Family::Bert => 0,
            Family::Roberta => self.pad_token_id.unwrap_or(1) as usize + 1,
        }
    }

    /// The classifier's label names in output order (`LABEL_i` where `id2label` has none).
    pub fn labels(&self) -> Vec<String> {
        let Some(id2label) = &self.id2label else {
            return Vec::new();
        };
        let count = id2label
            .keys()
            .filter_map(|k| k.parse::<usize>().ok())
            .max()
            .map_or(0, |max| max + 1);
        (0..count)
            .map(|i| {
                id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }
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
    /// The model family (from `model_type`).
    pub family: Family,
    /// Longest input in tokens (special tokens included).
    pub max_tokens: usize,
    /// Sentence-embedding pooling.
    pub pooling: Pooling,
}

/// The classes whose checkpoints this implementation loads (an empty `architectures` list,
/// as some sentence-transformers exports have, is accepted too). Heads that are not used
/// (a pooler, say) are ignored.
const KNOWN_ARCHITECTURES: [&str; 10] = [
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "RobertaModel",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "XLMRobertaModel",
    "XLMRobertaForMaskedLM",
    "XLMRobertaForSequenceClassification",
];

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
        let Some(family) = Family::of(&bert.model_type) else {
            return Err(invalid(format!(
                "model_type `{}` ({}) is not supported; this processor computes bert, roberta and xlm-roberta checkpoints",
                bert.model_type,
                match bert.architectures.as_slice() {
                    [] => "no architectures listed".to_string(),
                    list => list.join(", "),
                }
            )));
        };
        if let Some(unknown) = bert
            .architectures
            .iter()
            .find(|a| !KNOWN_ARCHITECTURES.contains(&a.as_str()))
        {
            return Err(invalid(format!(
                "architecture `{unknown}` is not supported; known: {}",
                KNOWN_ARCHITECTURES.join(", ")
            )));
        }
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
        let offset = bert.position_offset(family);
        if bert.max_position_embeddings <= offset + 2 {
            return Err(invalid(format!(
                "max_position_embeddings {} leaves no positions after the offset {offset}",
                bert.max_position_embeddings
            )));
        }
        let positions = bert.max_position_embeddings - offset;
        let max_tokens = sentence
            .and_then(|s| s.max_seq_length)
            .map_or(positions, |n| n.min(positions));
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
            family,
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
