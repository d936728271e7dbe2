//! CBOR by default, JSON when the `Content-Type` says so or the payload is a JSON object.
//!
//! A request body is always a map. In CBOR a map starts with a byte in 0xa0..=0xbf, never `{`,
//! so looking at the first non-blank byte tells the two encodings apart without a header.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::media_types;

/// The two wire encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// RFC 8949 CBOR (the default).
    #[default]
    Cbor,
    /// JSON text.
    Json,
}

impl Encoding {
    /// Picks the encoding of a payload from its `Content-Type` header (if any) and its bytes.
    pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Encoding {
        if let Some(content_type) = content_type {
            let content_type = content_type.trim().to_ascii_lowercase();
            if content_type.contains("json") {
                return Encoding::Json;
            }
            if content_type.contains("cbor") {
                return Encoding::Cbor;
            }
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Encoding::Json,
            _ => Encoding::Cbor,
        }
    }

    /// The media type to put in the `Content-Type` header.
    pub fn media_type(self) -> &'static str {
        match self {
            Encoding::Cbor => media_types::CBOR,
            Encoding::Json => media_types::JSON,
        }
    }
}

/// A payload that could not be decoded (or, rarely, a value that could not be encoded).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// CBOR syntax or shape error.
    #[error("invalid CBOR: {0}")]
    Cbor(String),
    /// JSON syntax or shape error.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes a value from a payload in the given encoding.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, payload: &[u8]) -> Result<T, CodecError> {
    match encoding {
        Encoding::Cbor => {
            ciborium::de::from_reader(payload).map_err(|e| CodecError::Cbor(cbor_message(e)))
        }
        Encoding::Json => Ok(serde_json::from_slice(payload)?),
    }
}

/// Encodes a value in the given encoding.
pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Vec<u8>, CodecError> {
    encode_with_capacity(encoding, value, 0)
}

/// [`encode`] into a buffer that starts with `capacity` bytes reserved (for a caller that
/// knows about how large the value is, and drops the buffer soon).
pub fn encode_with_capacity<T: Serialize>(
    encoding: Encoding,
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(capacity);
    match encoding {
        Encoding::Cbor => ciborium::ser::into_writer(value, &mut out)
            .map_err(|e| CodecError::Cbor(e.to_string()))?,
        Encoding::Json => serde_json::to_writer(&mut out, value)?,
    }
    Ok(out)
}

fn cbor_message(error: ciborium::de::Error<std::io::Error>) -> String {
    use ciborium::de::Error;
    match error {
        Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "payload ends before the value does".to_string()
        }
        Error::Io(e) => e.to_string(),
        Error::Syntax(offset) => format!("syntax error at byte {offset}"),
        Error::Semantic(Some(offset), msg) => format!("{msg} (at byte {offset})"),
        Error::Semantic(None, msg) => msg,
        Error::RecursionLimitExceeded => "nesting too deep".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorBody, ErrorCode, InferOptions, InferReply, InferRequest, Output};
    use proptest::prelude::*;

    #[test]
    fn detects_encoding_from_header_then_bytes() {
        assert_eq!(
            Encoding::detect(Some("application/json"), b"\xa1"),
            Encoding::Json
        );
        assert_eq!(
            Encoding::detect(Some("Application/CBOR"), b"{}"),
            Encoding::Cbor
        );
        assert_eq!(
            Encoding::detect(None, b"  \n{\"inputs\":[]}"),
            Encoding::Json
        );
        assert_eq!(Encoding::detect(Some("text/plain"), b"{}"), Encoding::Json);
        assert_eq!(Encoding::detect(None, b"\xa1finputs\x80"), Encoding::Cbor);
        assert_eq!(Encoding::detect(None, b""), Encoding::Cbor);
    }

    #[test]
    fn json_request_with_options_decodes() {
        let request: InferRequest = decode(
            Encoding::Json,
            br#"{"inputs": ["a [MASK]."], "options": {"top_k": 3}}"#,
        )
        .unwrap();
        assert_eq!(request.inputs, vec!["a [MASK]."]);
        assert_eq!(request.options.top_k, Some(3));
        assert_eq!(request.options.normalize, None);
    }

    #[test]
    fn wrong_shapes_are_errors_that_say_why() {
        let err = decode::<InferRequest>(Encoding::Json, br#"{"inputs": 5}"#).unwrap_err();
        assert!(err.to_string().contains("expected a sequence"), "{err}");
        let err = decode::<InferRequest>(Encoding::Json, br#"{"input": ["x"]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `input`"), "{err}");
        let err = decode::<InferRequest>(
            Encoding::Json,
            br#"{"inputs": ["x"], "options": {"topk": 1}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("topk"), "{err}");
        assert!(decode::<InferRequest>(Encoding::Cbor, b"\xff\x00garbage").is_err());
        assert!(decode::<InferRequest>(Encoding::Cbor, b"").is_err());
    }

    #[test]
    fn outputs_are_recognised_by_their_fields() {
        let reply: InferReply = decode(
            Encoding::Json,
            br#"{"outputs": [{"embedding": [0.5, -1]}, {"text": "hi"},
                {"masks": [[{"token": "star", "token_id": 2732, "score": 0.75}]],
                 "sequence": "twinkle star"}], "model": "m", "batch_size": 3}"#,
        )
        .unwrap();
        assert_eq!(
            reply.outputs[0],
            Output::Embedding {
                embedding: vec![0.5, -1.0]
            }
        );
        assert_eq!(reply.outputs[1], Output::Text { text: "hi".into() });
        match &reply.outputs[2] {
            Output::FillMask(fill) => assert_eq!(&*fill.masks[0][0].token, "star"),
            other => panic!("wrong variant {other:?}"),
        }
    }

    #[test]
    fn error_body_carries_its_code() {
        let body = ErrorBody::new(ErrorCode::UnknownTask, "no such task");
        let json = String::from_utf8(encode(Encoding::Json, &body).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"code":404,"kind":"unknown_task","message":"no such task"}"#
        );
    }

    fn arb_output() -> impl Strategy<Value = Output> {
        prop_oneof![
            prop::collection::vec(-1e6f32..1e6, 0..8)
                .prop_map(|embedding| Output::Embedding { embedding }),
            ".{0,20}".prop_map(|text| Output::Text { text }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip_in_both_encodings(
            inputs in prop::collection::vec((".{0,40}", prop::option::of(".{0,20}")), 0..6),
            top_k in prop::option::of(0u32..100),
            normalize in prop::option::of(any::<bool>()),
            timeout_ms in prop::option::of(any::<u64>()),
        ) {
            let request = InferRequest {
                // Texts and pairs, in any mix.
                inputs: inputs
                    .into_iter()
                    .map(|(text, passage)| match passage {
                        None => crate::Input::from(text),
                        Some(passage) => crate::Input::from((text, passage)),
                    })
                    .collect(),
                options: InferOptions { top_k, normalize, truncate: None },
                timeout_ms,
            };
            for encoding in [Encoding::Cbor, Encoding::Json] {
                let bytes = encode(encoding, &request).unwrap();
                prop_assert_eq!(Encoding::detect(None, &bytes), encoding);
                let back: InferRequest = decode(encoding, &bytes).unwrap();
                prop_assert_eq!(&back, &request);
            }
        }

        #[test]
        fn replies_round_trip_in_both_encodings(
            outputs in prop::collection::vec(arb_output(), 0..5),
            batch_size in 1u32..1000,
        ) {
            let reply = InferReply { outputs, model: "echo".into(), batch_size };
            for encoding in [Encoding::Cbor, Encoding::Json] {
                let back: InferReply = decode(encoding, &encode(encoding, &reply).unwrap()).unwrap();
                prop_assert_eq!(&back, &reply);
            }
        }
    }
}
