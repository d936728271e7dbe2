//! `rerank`, `classify` and the RoBERTa family against PyTorch + transformers, on the small
//! random-weight checkpoints in `fixtures/` (made by `scripts/make-task-fixtures.py`; each
//! has a golden file of the same name). Every check runs on both CPU encoders: the fused one
//! (the default) and burn's composite ops (the path CUDA takes).

mod common;

use std::path::Path;

use common::*;
use processor::model::bert::{BertModel, BertOptions, Family};
use processor::model::{cpu_device, BatchModel, InputError};
use schemas::{ErrorCode, InferOptions, Input, LabelScore, Output, Task};
use serde_json::Value;

const CHECKPOINTS: [&str; 4] = [
    "tiny-bert-rerank",
    "tiny-bert-classify",
    "tiny-roberta-classify",
    "tiny-xlm-roberta-rerank",
];

/// Both CPU encoders: fused (default) and composite.
fn encoders() -> [(&'static str, BertOptions); 2] {
    [
        ("fused", BertOptions::default()),
        (
            "composite",
            BertOptions {
                cpu_kernels: false,
                ..BertOptions::default()
            },
        ),
    ]
}

fn load_with(dir: &Path, options: BertOptions) -> BertModel {
    BertModel::load_with(dir, &cpu_device(), options)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn texts(golden: &Value) -> Vec<&str> {
    golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect()
}

fn pairs(golden: &Value) -> Vec<Input> {
    golden["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Input::from((p["query"].as_str().unwrap(), p["passage"].as_str().unwrap())))
        .collect()
}

fn ok(results: Vec<Result<Output, InputError>>) -> Vec<Output> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn embedding(output: &Output) -> &[f32] {
    match output {
        Output::Embedding { embedding } => embedding,
        other => panic!("expected an embedding, got {other:?}"),
    }
}

fn score(output: &Output) -> (f32, f32) {
    match output {
        Output::Score { score, raw_score } => (*score, *raw_score),
        other => panic!("expected a score, got {other:?}"),
    }
}

fn labels(output: &Output) -> &[LabelScore] {
    match output {
        Output::Labels { labels } => labels,
        other => panic!("expected labels, got {other:?}"),
    }
}

/// Probabilities by label id.
fn by_id(labels: &[LabelScore], count: usize) -> Vec<f32> {
    let mut probs = vec![f32::NAN; count];
    for label in labels {
        probs[label.id as usize] = label.score;
    }
    probs
}

#[test]
fn token_ids_of_texts_and_pairs_equal_the_reference_tokenizers() {
    for name in CHECKPOINTS {
        let model = load_with(&fixtures().join(name), BertOptions::default());
        let golden = golden(&format!("{name}.json"));
        for item in golden["texts"].as_array().unwrap() {
            let text = item["text"].as_str().unwrap();
            let tokens = model.tokenizer().encode(text, false).unwrap();
            assert_eq!(tokens.ids, ids(&item["input_ids"]), "{name}: {text:?}");
        }
        for item in golden["pairs"].as_array().unwrap() {
            let (query, passage) = (
                item["query"].as_str().unwrap(),
                item["passage"].as_str().unwrap(),
            );
            let tokens = model
                .tokenizer()
                .encode_pair(query, passage, false)
                .unwrap();
            assert_eq!(
                tokens.ids,
                ids(&item["input_ids"]),
                "{name}: {query:?} / {passage:?}"
            );
            if model.family() == Family::Bert {
                assert_eq!(
                    tokens.type_ids,
                    ids(&item["token_type_ids"]),
                    "{name}: types"
                );
                assert!(
                    tokens.type_ids.contains(&1),
                    "{name}: the passage has type 1"
                );
            }
        }
    }
}

#[test]
fn embeddings_of_every_family_match_pytorch() {
    let raw = InferOptions {
        normalize: Some(false),
        ..InferOptions::default()
    };
    for name in CHECKPOINTS {
        let golden = golden(&format!("{name}.json"));
        let texts = texts(&golden);
        for (encoder, options) in encoders() {
            let mut model = load_with(&fixtures().join(name), options);
            for (item, text) in golden["texts"].as_array().unwrap().iter().zip(&texts) {
                let outputs = ok(model.run_texts(Task::Embed, &[text], &raw));
                let diff = max_abs_diff(embedding(&outputs[0]), &floats(&item["embedding_mean"]));
                assert!(
                    diff <= 1e-4,
                    "{name} ({encoder}) {text:?}: mean differs by {diff}"
                );
                let ids = model.tokenizer().encode(text, false).unwrap().ids;
                let first = &model.hidden_states(&ids)[0];
                let diff = max_abs_diff(first, &floats(&item["embedding_cls"]));
                assert!(
                    diff <= 1e-4,
                    "{name} ({encoder}) {text:?}: first state differs by {diff}"
                );
            }
            // Batch invariance: all texts in one padded batch, against one at a time.
            let batched = ok(model.run_texts(Task::Embed, &texts, &raw));
            for (text, output) in texts.iter().zip(&batched) {
                let alone = ok(model.run_texts(Task::Embed, &[text], &raw));
                let diff = max_abs_diff(embedding(output), embedding(&alone[0]));
                assert!(
                    diff <= 1e-5,
                    "{name} ({encoder}) {text:?}: batched differs by {diff}"
                );
            }
        }
    }
}

#[test]
fn rerank_scores_match_pytorch_and_do_not_depend_on_the_batch() {
    for name in ["tiny-bert-rerank", "tiny-xlm-roberta-rerank"] {
        let golden = golden(&format!("{name}.json"));
        let pairs = pairs(&golden);
        for (encoder, options) in encoders() {
            let mut model = load_with(&fixtures().join(name), options);
            assert!(model.supports(Task::Rerank) && !model.supports(Task::Classify));
            let batched = ok(model.run_inputs(Task::Rerank, &pairs, &InferOptions::default()));
            let items = golden["pairs"].as_array().unwrap();
            for ((item, pair), output) in items.iter().zip(&pairs).zip(&batched) {
                let alone = ok(model.run_inputs(
                    Task::Rerank,
                    std::slice::from_ref(pair),
                    &InferOptions::default(),
                ));
                let (got_score, got_raw) = score(&alone[0]);
                let expected_raw = item["logits"][0].as_f64().unwrap() as f32;
                let expected_score = item["score"].as_f64().unwrap() as f32;
                assert!(
                    (got_raw - expected_raw).abs() <= 1e-4,
                    "{name} ({encoder}) {pair:?}: logit {got_raw} vs {expected_raw}"
                );
                assert!(
                    (got_score - expected_score).abs() <= 1e-4,
                    "{name} ({encoder}) {pair:?}: score {got_score} vs {expected_score}"
                );
                let (batched_score, batched_raw) = score(output);
                assert!(
                    (batched_raw - got_raw).abs() <= 1e-5,
                    "{name} ({encoder}) {pair:?}: batched logit {batched_raw} vs {got_raw}"
                );
                assert!((batched_score - got_score).abs() <= 1e-5);
            }
        }
    }
}

#[test]
fn classify_probabilities_and_top_labels_match_pytorch() {
    for name in ["tiny-bert-classify", "tiny-roberta-classify"] {
        let golden = golden(&format!("{name}.json"));
        let names: Vec<&str> = golden["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        let texts = texts(&golden);
        for (encoder, options) in encoders() {
            let mut model = load_with(&fixtures().join(name), options);
            assert!(model.supports(Task::Classify) && !model.supports(Task::Rerank));
            let batched = ok(model.run_texts(Task::Classify, &texts, &InferOptions::default()));
            for ((item, text), output) in golden["texts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(&texts)
                .zip(&batched)
            {
                let alone = ok(model.run_texts(Task::Classify, &[text], &InferOptions::default()));
                let got = labels(&alone[0]);
                // Every label by default, most likely first, named from config.json's id2label.
                assert_eq!(got.len(), names.len(), "{name}: {text:?}");
                assert_eq!(
                    &*got[0].label,
                    item["top1"].as_str().unwrap(),
                    "{name} ({encoder}) {text:?}"
                );
                assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
                for label in got {
                    assert_eq!(&*label.label, names[label.id as usize]);
                }
                let probs = by_id(got, names.len());
                let diff = max_abs_diff(&probs, &floats(&item["probs"]));
                assert!(
                    diff <= 1e-4,
                    "{name} ({encoder}) {text:?}: probabilities differ by {diff}"
                );
                let diff = max_abs_diff(&by_id(labels(output), names.len()), &probs);
                assert!(
                    diff <= 1e-5,
                    "{name} ({encoder}) {text:?}: batched differs by {diff}"
                );
            }
            // top_k cuts the list to the most likely labels.
            let top = InferOptions {
                top_k: Some(1),
                ..InferOptions::default()
            };
            let outputs = ok(model.run_texts(Task::Classify, &texts[..1], &top));
            assert_eq!(labels(&outputs[0]).len(), 1);
        }
    }
}

#[test]
fn tasks_a_checkpoint_cannot_serve_are_refused_with_the_reason() {
    let rerank = load_with(&fixtures().join("tiny-bert-rerank"), BertOptions::default());
    assert!(rerank
        .unsupported_reason(Task::Classify)
        .contains("use rerank"));
    let classify = load_with(
        &fixtures().join("tiny-roberta-classify"),
        BertOptions::default(),
    );
    assert!(classify
        .unsupported_reason(Task::Rerank)
        .contains("use classify"));
    assert!(!classify.supports(Task::FillMask));
    assert!(classify
        .unsupported_reason(Task::FillMask)
        .contains("RoBERTa"));
    let mlm = load_with(&tiny_mlm_dir(), BertOptions::default());
    assert!(!mlm.supports(Task::Rerank) && !mlm.supports(Task::Classify));
    assert!(mlm
        .unsupported_reason(Task::Rerank)
        .contains("no sequence-classification head"));
}

#[test]
fn a_pair_too_long_is_refused_or_cut_longest_first() {
    let mut model = load_with(&fixtures().join("tiny-bert-rerank"), BertOptions::default());
    let max = model.tokenizer().max_tokens();
    let passage = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let pair = [Input::from(("a short query", passage.as_str()))];
    let refused = model.run_inputs(Task::Rerank, &pair, &InferOptions::default());
    let error = refused[0].as_ref().unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidInput);
    assert!(
        error.message.contains("set truncate: true"),
        "{}",
        error.message
    );
    let cut = model
        .tokenizer()
        .encode_pair("a short query", &passage, true)
        .unwrap();
    assert_eq!(cut.ids.len(), max);
    // The same ids as the tokenizers library's own longest-first truncation (what
    // transformers' `truncation=True` runs).
    let mut reference =
        tokenizers::Tokenizer::from_file(fixtures().join("tiny-bert-rerank/tokenizer.json"))
            .unwrap();
    reference
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max,
            strategy: tokenizers::TruncationStrategy::LongestFirst,
            ..tokenizers::TruncationParams::default()
        }))
        .unwrap()
        .with_padding(None);
    let expected = reference
        .encode(("a short query", passage.as_str()), true)
        .unwrap();
    assert_eq!(cut.ids, expected.get_ids());
    assert_eq!(cut.type_ids, expected.get_type_ids());
    // The query is kept whole; the passage was cut.
    let query = model
        .tokenizer()
        .encode("a short query", false)
        .unwrap()
        .ids;
    assert_eq!(cut.ids[..query.len()], query[..]);
    let truncate = InferOptions {
        truncate: Some(true),
        ..InferOptions::default()
    };
    let scored = model.run_inputs(Task::Rerank, &pair, &truncate);
    assert!(score(scored[0].as_ref().unwrap()).0.is_finite());
}

#[test]
fn unknown_architectures_are_refused_at_load_with_what_is_supported() {
    let dir = std::env::temp_dir().join(format!("unknown-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_mlm_dir().join(file), dir.join(file)).unwrap();
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_mlm_dir().join("config.json")).unwrap())
            .unwrap();
    for (field, value, expected) in [
        ("model_type", "distilbert", "model_type `distilbert`"),
        (
            "architectures",
            "DebertaV2ForSequenceClassification",
            "architecture `DebertaV2ForSequenceClassification`",
        ),
    ] {
        let mut config = config.clone();
        config[field] = match field {
            "architectures" => serde_json::json!([value]),
            _ => serde_json::json!(value),
        };
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let error = BertModel::load(&dir, &cpu_device())
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("not supported"), "{error}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn roberta_padding_stays_within_the_positions_left_after_the_offset() {
    // Padding to a multiple (as on CUDA) must not run past the position table, which for
    // RoBERTa starts at pad_token_id + 1: 130 rows hold 128 tokens.
    let dir = fixtures().join("tiny-roberta-classify");
    let padded = load_with(
        &dir,
        BertOptions {
            pad_to_multiple: 48,
            ..BertOptions::default()
        },
    );
    assert_eq!(padded.padded_len(100), 128);
    assert_eq!(padded.padded_len(128), 128);
    let mut padded = padded;
    let mut plain = load_with(&dir, BertOptions::default());
    let text = "word ".repeat(50);
    let raw = InferOptions {
        normalize: Some(false),
        ..InferOptions::default()
    };
    let tokens = plain.tokenizer().encode(&text, false).unwrap().ids.len();
    assert!(tokens > 96 && tokens <= 128, "{tokens}");
    let a = ok(padded.run_texts(Task::Embed, &[&text], &raw));
    let b = ok(plain.run_texts(Task::Embed, &[&text], &raw));
    let diff = max_abs_diff(embedding(&a[0]), embedding(&b[0]));
    assert!(diff <= 1e-5, "padded to 128 differs by {diff}");
}

#[test]
fn a_literal_pad_token_in_a_roberta_text_shifts_positions_as_in_pytorch() {
    let golden = golden("tiny-roberta-pad-literal.json");
    let raw = InferOptions {
        normalize: Some(false),
        ..InferOptions::default()
    };
    for (encoder, options) in encoders() {
        let mut model = load_with(&fixtures().join("tiny-roberta-classify"), options);
        for item in golden["items"].as_array().unwrap() {
            let text = item["text"].as_str().unwrap();
            let tokens = model.tokenizer().encode(text, false).unwrap();
            assert_eq!(tokens.ids, ids(&item["input_ids"]), "{text:?}");
            let outputs = ok(model.run_texts(Task::Embed, &[text], &raw));
            let diff = max_abs_diff(embedding(&outputs[0]), &floats(&item["embedding_mean"]));
            assert!(diff <= 1e-4, "{encoder} {text:?}: mean differs by {diff}");
            let batch = [&tokens.ids[..]];
            let logits = model.classify_logits(&batch, &[]).unwrap();
            let diff = max_abs_diff(&logits[0], &floats(&item["logits"]));
            assert!(diff <= 1e-4, "{encoder} {text:?}: logits differ by {diff}");
        }
    }
}

#[test]
fn multi_label_checkpoints_score_each_label_with_a_sigmoid() {
    let dir = std::env::temp_dir().join(format!("multi-label-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = fixtures().join("tiny-bert-classify");
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["problem_type"] = serde_json::json!("multi_label_classification");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut model = load_with(&dir, BertOptions::default());
    let golden = golden("tiny-bert-classify.json");
    for item in golden["texts"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let outputs = ok(model.run_texts(Task::Classify, &[text], &InferOptions::default()));
        let got = labels(&outputs[0]);
        let expected: Vec<f32> = floats(&item["logits"])
            .iter()
            .map(|&l| 1.0 / (1.0 + (-l).exp()))
            .collect();
        let diff = max_abs_diff(&by_id(got, expected.len()), &expected);
        assert!(diff <= 1e-4, "{text:?}: sigmoid scores differ by {diff}");
        assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
        // Independent per label: they need not sum to 1.
        let sum: f32 = got.iter().map(|l| l.score).sum();
        assert!((sum - 1.0).abs() > 1e-3, "{text:?}: {sum}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
