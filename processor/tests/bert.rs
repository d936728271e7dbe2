//! The BERT model against reference outputs computed with PyTorch + transformers
//! (fixtures copied from ../shared/goldens; tolerances from its README).

mod common;

use common::*;
use processor::model::bert::BertModel;
use processor::model::{cpu_device, BatchModel};
use schemas::{ErrorCode, InferOptions, Output, Task};

fn load(dir: &std::path::Path) -> BertModel {
    BertModel::load(dir, &cpu_device()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn run(
    model: &mut BertModel,
    task: Task,
    texts: &[&str],
    options: InferOptions,
) -> Vec<Result<Output, processor::model::InputError>> {
    model.run_texts(task, texts, &options)
}

fn embedding(output: &Output) -> &[f32] {
    match output {
        Output::Embedding { embedding } => embedding,
        other => panic!("expected an embedding, got {other:?}"),
    }
}

#[test]
fn minilm_token_ids_equal_the_reference_tokenizer() {
    let model = load(&minilm_dir());
    let golden = golden("minilm_embeddings.json");
    for item in golden["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let expected: Vec<u32> = item["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let tokens = model.tokenizer().encode(text, false).unwrap();
        assert_eq!(tokens.ids, expected, "token ids of {text:?}");
    }
}

#[test]
fn minilm_embeddings_and_hidden_states_match_pytorch() {
    let mut model = load(&minilm_dir());
    let golden = golden("minilm_embeddings.json");
    for item in golden["items"].as_array().unwrap() {
        let text = item["text"].as_str().unwrap();
        let expected = floats(&item["embedding"]);
        let outputs = run(&mut model, Task::Embed, &[text], InferOptions::default());
        let got = embedding(outputs[0].as_ref().unwrap());
        // goldens/README: ≤ 1e-4 per component and cosine ≥ 0.99999 for unit vectors.
        let diff = max_abs_diff(got, &expected);
        assert!(diff <= 1e-4, "{text:?}: embedding differs by {diff}");
        assert!(
            cosine(got, &expected) >= 0.99999,
            "{text:?}: cosine {}",
            cosine(got, &expected)
        );

        let ids = model.tokenizer().encode(text, false).unwrap().ids;
        let states = model.hidden_states(&ids);
        for (row, expected) in item["cls_hidden_first3"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            // goldens/README: raw hidden states (|v| ≤ 6.25) within 2e-4.
            let diff = max_abs_diff(&states[row], &floats(expected));
            assert!(
                diff <= 2e-4,
                "{text:?}: hidden state {row} differs by {diff}"
            );
        }
    }
}

/// Inputs of many lengths (about 4 to 120 tokens) to pad the golden sentences against.
fn fillers(n: usize) -> Vec<String> {
    let words = [
        "stream", "batch", "queue", "token", "model", "reply", "subject", "inbox",
    ];
    (0..n)
        .map(|i| {
            (0..(3 + (i * 37) % 110))
                .map(|j| words[(i + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn an_embedding_does_not_depend_on_its_batch() {
    let mut model = load(&minilm_dir());
    let golden = golden("minilm_embeddings.json");
    let texts: Vec<String> = golden["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["text"].as_str().unwrap().to_string())
        .collect();
    let alone: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            embedding(
                run(
                    &mut model,
                    Task::Embed,
                    &[t.as_str()],
                    InferOptions::default(),
                )[0]
                .as_ref()
                .unwrap(),
            )
            .to_vec()
        })
        .collect();
    // A batch of 64: the goldens interleaved with fillers of other lengths.
    let mut batch: Vec<String> = fillers(64 - texts.len());
    let mut slots = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let slot = (i * 5 + 3) % (batch.len() + 1);
        batch.insert(slot, text.clone());
        slots.iter_mut().for_each(|s: &mut usize| {
            if *s >= slot {
                *s += 1
            }
        });
        slots.push(slot);
    }
    assert_eq!(batch.len(), 64);
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    let outputs = run(&mut model, Task::Embed, &refs, InferOptions::default());
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(batch[*slot], texts[i]);
        let diff = max_abs_diff(embedding(outputs[*slot].as_ref().unwrap()), &alone[i]);
        assert!(
            diff <= 1e-5,
            "{:?}: alone vs in a batch of 64 differs by {diff}",
            texts[i]
        );
    }
}

#[test]
fn tiny_mlm_fill_mask_matches_the_transformers_pipeline() {
    let mut model = load(&tiny_mlm_dir());
    let golden = golden("tiny_mlm_fill_mask.json");
    let items = golden["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    // All items in one batch (they differ in length), as the processor would run them.
    let outputs = run(&mut model, Task::FillMask, &texts, InferOptions::default());
    for (item, output) in items.iter().zip(&outputs) {
        let text = item["text"].as_str().unwrap();
        let Ok(Output::FillMask(fill)) = output else {
            panic!("{text:?}: {output:?}")
        };
        let masks = item["masks"].as_array().unwrap();
        assert_eq!(fill.masks.len(), masks.len(), "{text:?}: number of masks");
        for (got, expected) in fill.masks.iter().zip(masks) {
            let expected = expected["top5"].as_array().unwrap();
            let ids: Vec<u32> = got.iter().map(|p| p.token_id).collect();
            let want: Vec<u32> = expected
                .iter()
                .map(|p| p["token_id"].as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want, "{text:?}: top-5 tokens");
            for (p, e) in got.iter().zip(expected) {
                assert_eq!(&*p.token, e["token_str"].as_str().unwrap());
                // The issue asks 1e-4 (goldens/README measured ≤ 3.7e-5 for fp32 vs fp64).
                let diff = (p.score - e["score"].as_f64().unwrap() as f32).abs();
                assert!(
                    diff <= 1e-4,
                    "{text:?}: score of {} differs by {diff}",
                    p.token
                );
            }
        }
    }
}

#[test]
fn tiny_mlm_logits_match_pytorch_alone_and_in_a_batch() {
    let model = load(&tiny_mlm_dir());
    let golden = golden("tiny_mlm_fill_mask.json");
    let mut checked = 0;
    for item in golden["items"].as_array().unwrap() {
        let Some(expected) = item.get("logits_first_mask") else {
            continue;
        };
        let expected = floats(expected);
        let text = item["text"].as_str().unwrap();
        let ids = model.tokenizer().encode(text, false).unwrap().ids;
        let position = item["masks"][0]["position"].as_u64().unwrap() as usize;
        let alone = model.mask_logits(&[&ids], &[(0, position)]).unwrap();
        let diff = max_abs_diff(&alone[0], &expected);
        assert!(diff <= 1e-4, "{text:?}: logits differ by {diff}");

        let long = model
            .tokenizer()
            .encode(&fillers(30)[29], false)
            .unwrap()
            .ids;
        let batched = model.mask_logits(&[&long, &ids], &[(1, position)]).unwrap();
        let diff = max_abs_diff(&batched[0], &alone[0]);
        assert!(
            diff <= 1e-5,
            "{text:?}: logits alone vs padded differ by {diff}"
        );
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn twinkle_twinkle_little_star() {
    let mut model = load(&tiny_mlm_dir());
    let options = InferOptions {
        top_k: Some(5),
        ..InferOptions::default()
    };
    let texts = [
        "twinkle twinkle [MASK] star, how i wonder what you are.",
        "twinkle twinkle [MASK] star.",
        "the sky is [MASK] and the grass is [MASK].",
    ];
    let outputs = run(&mut model, Task::FillMask, &texts, options);
    let fill = |i: usize| match &outputs[i] {
        Ok(Output::FillMask(fill)) => fill.clone(),
        other => panic!("{other:?}"),
    };
    // The rhyme as the tiny model was trained on it.
    assert_eq!(&*fill(0).masks[0][0].token, "little");
    assert_eq!(
        fill(0).sequence,
        "twinkle twinkle little star, how i wonder what you are."
    );
    // The seed's short form is outside the tiny model's 30 training sentences: the reference
    // (transformers 5.24 fill-mask pipeline, run on this checkpoint on 2026-11-25) answers
    // `,` 0.739, `to` 0.104, `##s` 0.068, `brown` 0.016, `evening` 0.007; so must we.
    let reference = [
        (",", 0.739),
        ("to", 0.104),
        ("##s", 0.068),
        ("brown", 0.016),
        ("evening", 0.007),
    ];
    let short = fill(1);
    for (got, (token, score)) in short.masks[0].iter().zip(reference) {
        assert_eq!(&*got.token, token);
        assert!((got.score - score).abs() < 1e-3, "{token}: {}", got.score);
    }
    let two = fill(2);
    assert_eq!(
        two.sequence,
        format!(
            "the sky is {} and the grass is {}.",
            two.masks[0][0].token, two.masks[1][0].token
        )
    );
}

#[test]
fn bad_inputs_fail_alone_with_a_clear_message() {
    let mut tiny = load(&tiny_mlm_dir());
    let long_text = fillers(30)[29].repeat(3); // far more than the tiny model's 128 positions
    let outputs = run(
        &mut tiny,
        Task::FillMask,
        &["no mask here", &format!("[MASK] {long_text}"), "ok [MASK]"],
        InferOptions::default(),
    );
    let no_mask = outputs[0].as_ref().unwrap_err();
    assert_eq!(no_mask.code, ErrorCode::InvalidInput);
    assert!(no_mask.message.contains("[MASK]"), "{}", no_mask.message);
    let too_long = outputs[1].as_ref().unwrap_err();
    assert!(
        too_long.message.contains("at most 128") && too_long.message.contains("truncate"),
        "{}",
        too_long.message
    );
    assert!(outputs[2].is_ok());

    let truncate = InferOptions {
        truncate: Some(true),
        ..InferOptions::default()
    };
    let outputs = run(
        &mut tiny,
        Task::FillMask,
        &[&format!("[MASK] {long_text}")],
        truncate,
    );
    assert!(outputs[0].is_ok(), "{outputs:?}");

    let zero = InferOptions {
        top_k: Some(0),
        ..InferOptions::default()
    };
    assert_eq!(
        run(&mut tiny, Task::FillMask, &["a [MASK]"], zero)[0]
            .as_ref()
            .unwrap_err()
            .code,
        ErrorCode::InvalidInput
    );

    // MiniLM has no MLM head: the batcher refuses fill_mask before it reaches the model.
    let minilm = load(&minilm_dir());
    assert!(minilm.supports(Task::Embed) && !minilm.supports(Task::FillMask));
    assert!(tiny.supports(Task::FillMask));
}

#[test]
fn unnormalised_embeddings_are_the_raw_mean() {
    let mut model = load(&minilm_dir());
    let raw = InferOptions {
        normalize: Some(false),
        ..InferOptions::default()
    };
    let outputs = run(&mut model, Task::Embed, &["hello world"], raw);
    let unit = run(
        &mut model,
        Task::Embed,
        &["hello world"],
        InferOptions::default(),
    );
    let raw = embedding(outputs[0].as_ref().unwrap());
    let unit = embedding(unit[0].as_ref().unwrap());
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "raw norm {norm}");
    let rescaled: Vec<f32> = raw.iter().map(|v| v / norm).collect();
    assert!(max_abs_diff(&rescaled, unit) <= 1e-6);
}

/// A copy of the tiny checkpoint in a temporary directory, to break on purpose.
fn broken_copy(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("bert-broken-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_mlm_dir().join(file), dir.join(file)).unwrap();
    }
    dir
}

#[test]
fn load_errors_name_the_file_and_tensor() {
    let dir = broken_copy("missing-file");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = BertModel::load(&dir, &cpu_device())
        .err()
        .expect("fails")
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );

    let dir = broken_copy("shape");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65"),
    )
    .unwrap();
    let err = BertModel::load(&dir, &cpu_device())
        .err()
        .expect("fails")
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("bert.encoder.layer.0.intermediate.dense.weight")
            && err.contains("[64, 32]")
            && err.contains("[65, 32]"),
        "{err}"
    );

    let dir = broken_copy("missing-tensor");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "bert.encoder.layer.1.output.dense.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let err = BertModel::load(&dir, &cpu_device())
        .err()
        .expect("fails")
        .to_string();
    assert!(
        err.contains("bert.encoder.layer.1.output.dense.weight") && err.contains("missing"),
        "{err}"
    );
}
