//! Paths and inputs shared by the benchmarks.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The all-MiniLM-L6-v2 checkpoint (`$MINILM_DIR`, else `models/`), which must be there.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "no checkpoint in {}: run scripts/fetch-model first",
        dir.display()
    );
    dir
}

/// `bench/inputs.json`.
pub fn inputs_file() -> PathBuf {
    root().join("bench/inputs.json")
}

/// The sentence set `key` of `bench/inputs.json` (`short16`, `mixed8_128`).
pub fn sentences(key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(inputs_file()).expect("bench/inputs.json");
    let inputs: serde_json::Value = serde_json::from_str(&text).expect("bench/inputs.json is JSON");
    inputs[key]
        .as_array()
        .unwrap_or_else(|| panic!("no `{key}` set in bench/inputs.json"))
        .iter()
        .map(|t| t.as_str().expect("a sentence").to_string())
        .collect()
}
