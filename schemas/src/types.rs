//! Request and reply bodies.

use serde::{Deserialize, Serialize};

/// A request to any task endpoint: one or more inputs, computed independently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// The inputs to run; each is one input of a batch, and the reply has one output per
    /// input, in the same order. Texts for every task but `rerank`, whose inputs are
    /// `[query, passage]` pairs.
    pub inputs: Vec<Input>,
    /// Task options; every field is optional.
    #[serde(default, skip_serializing_if = "InferOptions::is_default")]
    pub options: InferOptions,
    /// Time budget in milliseconds, counted from when a processor receives the request (as
    /// the `Request-Timeout-Ms` header; the earlier of the two applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl InferRequest {
    /// A request for these inputs (texts, or pairs for `rerank`) with default options.
    pub fn new<I: Into<Input>>(inputs: impl IntoIterator<Item = I>) -> Self {
        InferRequest {
            inputs: inputs.into_iter().map(Into::into).collect(),
            options: InferOptions::default(),
            timeout_ms: None,
        }
    }
}

/// One input: a text, or for `rerank` a (query, passage) pair, sent as a two-element array
/// `["query", "passage"]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// A text (`embed`, `fill_mask`, `classify`).
    Text(String),
    /// A query and a passage (`rerank`), encoded together as a sentence pair.
    Pair(String, String),
}

impl Input {
    /// The text, or the pair's query.
    pub fn text(&self) -> &str {
        match self {
            Input::Text(text) | Input::Pair(text, _) => text,
        }
    }

    /// The pair's passage, if this is a pair.
    pub fn passage(&self) -> Option<&str> {
        match self {
            Input::Text(_) => None,
            Input::Pair(_, passage) => Some(passage),
        }
    }

    /// Bytes of text the input carries (both parts of a pair).
    pub fn len(&self) -> usize {
        self.text().len() + self.passage().map_or(0, str::len)
    }

    /// Whether the input (or either part of a pair) is empty.
    pub fn is_empty(&self) -> bool {
        self.text().is_empty() || self.passage().is_some_and(str::is_empty)
    }
}

impl PartialEq<&str> for Input {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, Input::Text(text) if text == other)
    }
}

impl From<String> for Input {
    fn from(text: String) -> Self {
        Input::Text(text)
    }
}

impl From<&str> for Input {
    fn from(text: &str) -> Self {
        Input::Text(text.to_string())
    }
}

impl<Q: Into<String>, P: Into<String>> From<(Q, P)> for Input {
    fn from((query, passage): (Q, P)) -> Self {
        Input::Pair(query.into(), passage.into())
    }
}

impl Serialize for Input {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Input::Text(text) => serializer.serialize_str(text),
            Input::Pair(query, passage) => (query, passage).serialize(serializer),
        }
    }
}

// By hand rather than `#[serde(untagged)]`: untagged buffers every value before trying each
// variant, and inputs are on every request's path.
impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Input;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a text, or a [query, passage] pair of texts")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Input, E> {
                Ok(Input::Text(text.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Input, E> {
                Ok(Input::Text(text))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Input, A::Error> {
                use serde::de::Error;
                let pair_error = || A::Error::custom("a pair is two texts: [query, passage]");
                let query: String = seq.next_element()?.ok_or_else(pair_error)?;
                let passage: String = seq.next_element()?.ok_or_else(pair_error)?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(pair_error());
                }
                Ok(Input::Pair(query, passage))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Options that shape a task's output. Unknown options are rejected rather than ignored, so a
/// misspelt option is an error the caller sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferOptions {
    /// `fill_mask`: how many candidate tokens to return per mask (default 5). `classify`:
    /// how many labels to return, most likely first (default: every label).
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
/// is simply `{"embedding": [...]}`, `{"masks": [...], "sequence": "..."}`,
/// `{"score": 0.93, "raw_score": 2.6}`, `{"labels": [...]}` or `{"text": "..."}`.
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
    /// `rerank`: the pair's relevance.
    Score {
        /// `sigmoid(raw_score)`, in (0, 1): higher is more relevant.
        score: f32,
        /// The cross-encoder's logit.
        raw_score: f32,
    },
    /// `classify`: the most likely labels.
    Labels {
        /// The `top_k` most likely labels, most likely first.
        labels: Vec<LabelScore>,
    },
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

/// One label of a `classify` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    /// The label's name (`id2label` of the checkpoint's `config.json`). Shared: a model hands
    /// out one copy of each name.
    pub label: std::sync::Arc<str>,
    /// The label's index in the classifier's output.
    pub id: u32,
    /// Probability: softmax over the labels, or a per-label sigmoid for multi-label models.
    pub score: f32,
}

/// How urgently a request wants its answer (the `Priority` header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Someone waits for the answer: goes ahead of bulk inputs (the default).
    #[default]
    Interactive,
    /// Background work: fills what room interactive inputs leave in each batch, and is
    /// served first once it has waited `batch.bulk_max_wait_ms`.
    Bulk,
}

impl Priority {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Bulk => "bulk",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Ok(Priority::Interactive),
            "bulk" => Ok(Priority::Bulk),
            _ => Err(format!(
                "header Priority must be `interactive` or `bulk`, not {s:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, Encoding};

    #[test]
    fn inputs_are_texts_or_pairs_in_json_and_cbor() {
        let json = r#"{"inputs": ["a", ["q", "p"]]}"#;
        let request: InferRequest = decode(Encoding::Json, json.as_bytes()).unwrap();
        assert_eq!(
            request.inputs,
            vec![Input::from("a"), Input::from(("q", "p"))]
        );
        for encoding in [Encoding::Json, Encoding::Cbor] {
            let bytes = encode(encoding, &request).unwrap();
            let back: InferRequest = decode(encoding, &bytes).unwrap();
            assert_eq!(back, request);
        }
        for bad in [
            r#"{"inputs": [["q"]]}"#,
            r#"{"inputs": [["q", "p", "x"]]}"#,
            r#"{"inputs": [3]}"#,
        ] {
            let error = decode::<InferRequest>(Encoding::Json, bad.as_bytes()).unwrap_err();
            assert!(
                error.to_string().contains("pair") || error.to_string().contains("a text"),
                "{error}"
            );
        }
        assert_eq!(Input::from(("ab", "c")).len(), 3);
        assert!(Input::from(("ab", "")).is_empty());
    }

    #[test]
    fn outputs_are_told_apart_by_their_fields() {
        let outputs = vec![
            Output::Score {
                score: 0.5,
                raw_score: 0.0,
            },
            Output::Labels {
                labels: vec![LabelScore {
                    label: "pos".into(),
                    id: 1,
                    score: 0.9,
                }],
            },
            Output::Text { text: "t".into() },
        ];
        for encoding in [Encoding::Json, Encoding::Cbor] {
            let bytes = encode(encoding, &outputs).unwrap();
            let back: Vec<Output> = decode(encoding, &bytes).unwrap();
            assert_eq!(back, outputs);
        }
        assert_eq!(" Bulk".parse::<Priority>(), Ok(Priority::Bulk));
        assert!("urgent".parse::<Priority>().unwrap_err().contains("urgent"));
    }
}
