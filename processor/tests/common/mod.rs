//! Paths and golden files shared by the model tests, and the processor binary as a child
//! process with its health and metrics endpoint.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testkit::ChildProcess;

pub mod load;

use serde_json::Value;

/// `processor/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny masked-LM checkpoint committed as a fixture.
pub fn tiny_mlm_dir() -> PathBuf {
    fixtures().join("tiny-bert-mlm")
}

/// The default model, fetched by `scripts/fetch-model` (not in git: 90 MB).
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "the all-MiniLM-L6-v2 checkpoint is not in {}: run `scripts/fetch-model` (scripts/test does)",
        dir.display()
    );
    dir
}

/// A golden JSON file from `fixtures/` (copied from ../shared/goldens).
pub fn golden(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of numbers as f32s.
pub fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The `processor` binary with every setting at its default but these.
pub fn processor(url: &str, model: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .current_dir(std::env::temp_dir())
        .env_remove("PROCESSOR_CONFIG")
        .env("PROCESSOR_NATS__URL", url)
        .env("PROCESSOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("PROCESSOR_MODEL__KIND", model);
    command
}

pub fn start(command: Command) -> ChildProcess {
    ChildProcess::spawn(command, "processor ready", Duration::from_secs(60))
}

/// The metrics/health address the processor logged.
pub fn http_address(processor: &ChildProcess) -> String {
    let line = processor
        .log_line("http listening")
        .expect("the processor logs its http address");
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("address="))
        .expect("address=HOST:PORT in the log line")
        .to_string()
}

/// `GET path` → (status, body).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// The value of a metric line (`name{labels} value`), or 0 if absent.
pub fn metric(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name_and_labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}
