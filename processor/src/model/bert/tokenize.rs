//! WordPiece tokenisation with the checkpoint's own `tokenizer.json`.
//!
//! The file's padding and truncation settings are switched off: sentence-transformers pads
//! per batch and truncates at its own `max_seq_length`, and so do we (see goldens/README).

use std::path::Path;
use std::sync::Arc;

use schemas::ErrorCode;
use tokenizers::Tokenizer;

use super::LoadError;
use crate::model::InputError;

/// The model's tokenizer plus the special ids the tasks need.
pub struct BertTokenizer {
    inner: Tokenizer,
    /// Longest input in tokens, special tokens included.
    max_tokens: usize,
    pad_id: u32,
    sep_id: u32,
    mask_id: Option<u32>,
    mask_token: String,
    /// The text of every id, shared by all the predictions that name it.
    vocabulary: Vec<Arc<str>>,
}

/// One tokenised input.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    /// Token ids with `[CLS]` and `[SEP]`.
    pub ids: Vec<u32>,
    /// Byte range of each token in the input text (`(0, 0)` for special tokens).
    pub offsets: Vec<(usize, usize)>,
}

impl BertTokenizer {
    /// Loads `tokenizer.json` from the checkpoint directory.
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, LoadError> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(LoadError::MissingFile(file));
        }
        let invalid = |reason: String| LoadError::Invalid {
            file: file.clone(),
            reason,
        };
        let mut inner = Tokenizer::from_file(&file).map_err(|e| invalid(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?
            .with_padding(None);
        let id = |token: &str| inner.token_to_id(token);
        let sep_id =
            id("[SEP]").ok_or_else(|| invalid("no [SEP] token in the vocabulary".into()))?;
        let size = inner.get_vocab_size(true) as u32;
        let vocabulary = (0..size)
            .map(|id| Arc::from(inner.id_to_token(id).unwrap_or_else(|| format!("[{id}]"))))
            .collect();
        Ok(BertTokenizer {
            vocabulary,
            pad_id: id("[PAD]").unwrap_or(0),
            sep_id,
            mask_id: id("[MASK]"),
            mask_token: "[MASK]".to_string(),
            max_tokens,
            inner,
        })
    }

    /// Tokenises one input. Longer than `max_tokens`: an error, or with `truncate` the first
    /// `max_tokens - 1` tokens and `[SEP]`.
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Tokens, InputError> {
        let encoding = self.inner.encode(text, true).map_err(|e| {
            InputError::new(ErrorCode::InvalidInput, format!("cannot tokenise: {e}"))
        })?;
        let mut ids = encoding.get_ids().to_vec();
        let mut offsets = encoding.get_offsets().to_vec();
        if ids.len() > self.max_tokens {
            if !truncate {
                return Err(InputError::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "the input has {} tokens; the model takes at most {}; set truncate: true to cut it",
                        ids.len(),
                        self.max_tokens
                    ),
                ));
            }
            ids.truncate(self.max_tokens - 1);
            ids.push(self.sep_id);
            offsets.truncate(self.max_tokens - 1);
            offsets.push((0, 0));
        }
        Ok(Tokens { ids, offsets })
    }

    /// The most tokens an input may have (`[CLS]` and `[SEP]` included).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The id of `[PAD]`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of `[MASK]`, if the vocabulary has one.
    pub fn mask_id(&self) -> Option<u32> {
        self.mask_id
    }

    /// The mask token's text.
    pub fn mask_token(&self) -> &str {
        &self.mask_token
    }

    /// The text of a token id (shared, not copied).
    pub fn token(&self, id: u32) -> Arc<str> {
        match self.vocabulary.get(id as usize) {
            Some(token) => token.clone(),
            None => Arc::from(format!("[{id}]")),
        }
    }
}
