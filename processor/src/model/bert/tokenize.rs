//! Tokenisation with the checkpoint's own `tokenizer.json` (WordPiece for BERT, byte-level
//! BPE for RoBERTa, SentencePiece Unigram for XLM-RoBERTa: the file says which).
//!
//! The file's padding and truncation settings are switched off: sentence-transformers pads
//! per batch and truncates at its own `max_seq_length`, and so do we (see goldens/README).
//! Pairs that are too long are cut longest-first, as transformers' `truncation=True` does.

use std::path::Path;
use std::sync::Arc;

use schemas::ErrorCode;
use tokenizers::utils::truncation::truncate_encodings;
use tokenizers::{Encoding, Tokenizer, TruncationParams, TruncationStrategy};

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
    /// Token ids with `[CLS]` and `[SEP]` (or the family's equivalents).
    pub ids: Vec<u32>,
    /// Token types: 0 for a single text and a pair's query, 1 for a pair's passage.
    pub type_ids: Vec<u32>,
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
        // BERT's special tokens, or RoBERTa's.
        let special = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|name| Some((inner.token_to_id(name)?, name)))
        };
        let (sep_id, _) = special(["[SEP]", "</s>"])
            .ok_or_else(|| invalid("no [SEP] or </s> token in the vocabulary".into()))?;
        let pad_id = special(["[PAD]", "<pad>"]).map_or(0, |(id, _)| id);
        let mask = special(["[MASK]", "<mask>"]);
        let size = inner.get_vocab_size(true) as u32;
        let vocabulary = (0..size)
            .map(|id| Arc::from(inner.id_to_token(id).unwrap_or_else(|| format!("[{id}]"))))
            .collect();
        Ok(BertTokenizer {
            vocabulary,
            pad_id,
            sep_id,
            mask_id: mask.map(|(id, _)| id),
            mask_token: mask.map_or("[MASK]", |(_, name)| name).to_string(),
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
        let type_ids = vec![0; ids.len().min(self.max_tokens)];
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
        Ok(Tokens {
            ids,
            type_ids,
            offsets,
        })
    }

    /// Tokenises a (query, passage) pair as one input: `[CLS] query [SEP] passage [SEP]`
    /// with token types 0 then 1 (RoBERTa: `<s> query </s></s> passage </s>`). Longer than
    /// `max_tokens`: an error, or with `truncate` the longer text is cut token by token until
    /// the pair fits (transformers' `longest_first`). Offsets are not kept.
    pub fn encode_pair(
        &self,
        query: &str,
        passage: &str,
        truncate: bool,
    ) -> Result<Tokens, InputError> {
        let failed = |e| InputError::new(ErrorCode::InvalidInput, format!("cannot tokenise: {e}"));
        let mut encoding = self.inner.encode((query, passage), true).map_err(failed)?;
        if encoding.len() > self.max_tokens && truncate {
            encoding = self
                .cut_pair(query, passage, encoding.len())
                .map_err(failed)?;
        }
        if encoding.len() > self.max_tokens {
            let message = if truncate {
                format!(
                    "the pair cannot be cut to {} tokens (its special tokens alone take more)",
                    self.max_tokens
                )
            } else {
                format!(
                    "the pair has {} tokens; the model takes at most {}; set truncate: true to cut the longer text",
                    encoding.len(),
                    self.max_tokens
                )
            };
            return Err(InputError::new(ErrorCode::InvalidInput, message));
        }
        Ok(Tokens {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
            offsets: Vec::new(),
        })
    }

    /// A pair of `full` tokens cut to `max_tokens` longest-first, as the tokenizer's own
    /// truncation would (with no second, truncating copy of the tokenizer held for it): the
    /// two texts without special tokens are cut to what the special tokens leave, then framed.
    fn cut_pair(&self, query: &str, passage: &str, full: usize) -> tokenizers::Result<Encoding> {
        let query = self.inner.encode(query, false)?;
        let passage = self.inner.encode(passage, false)?;
        let special = full.saturating_sub(query.len() + passage.len());
        let params = TruncationParams {
            max_length: self.max_tokens.saturating_sub(special),
            strategy: TruncationStrategy::LongestFirst,
            ..TruncationParams::default()
        };
        let (query, passage) = truncate_encodings(query, Some(passage), &params)?;
        self.inner.post_process(query, passage, true)
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
