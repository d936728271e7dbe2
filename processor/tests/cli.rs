//! The `processor` binary: configuration layers and start-up errors.

use std::process::Command;

fn processor() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    // Run in an empty directory so a developer's processor.toml does not leak in.
    command.current_dir(std::env::temp_dir());
    command.env_remove("PROCESSOR_CONFIG");
    // Tests run in parallel: no fixed metrics port.
    command.env("PROCESSOR_HTTP__LISTEN", "127.0.0.1:0");
    command
}

/// Runs `command`, which must succeed, and parses the configuration it printed.
fn printed_config(command: &mut Command) -> toml::Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    toml::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap()
}

#[test]
fn print_config_shows_env_and_flag_overrides() {
    let config = printed_config(
        processor()
            .env("PROCESSOR_MODEL__KIND", "sim")
            .env("PROCESSOR_BATCH__MAX_SIZE", "7")
            .args(["--print-config", "--nats-url", "nats://10.1.2.3:4222"]),
    );
    assert_eq!(config["model"]["kind"].as_str(), Some("sim"));
    assert_eq!(config["batch"]["max_size"].as_integer(), Some(7));
    assert_eq!(config["nats"]["url"].as_str(), Some("nats://10.1.2.3:4222"));
    assert_eq!(config["service"]["subject_prefix"].as_str(), Some("bert"));
}

#[test]
fn a_config_file_is_read_and_flags_beat_env() {
    let dir = std::env::temp_dir().join(format!("processor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("custom.toml");
    std::fs::write(
        &file,
        "[service]\nqueue_group = \"from-file\"\n[batch]\nmax_latency_ms = 9\n",
    )
    .unwrap();
    let config = printed_config(
        processor()
            .env("PROCESSOR_BATCH__MAX_LATENCY_MS", "11")
            .args(["--print-config", "--config"])
            .arg(&file)
            .args(["--max-latency-ms", "13"]),
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(config["service"]["queue_group"].as_str(), Some("from-file"));
    assert_eq!(config["batch"]["max_latency_ms"].as_integer(), Some(13));
}

#[test]
fn bad_configuration_stops_the_start_with_a_message() {
    for (key, value, expected) in [
        ("PROCESSOR_MODEL__KIND", "gpt", "gpt"),
        ("PROCESSOR_BATCH__MAX_SIZ", "8", "max_siz"),
        (
            "PROCESSOR_BATCH__QUEUE_CAPACITY",
            "2",
            "batch.queue_capacity",
        ),
    ] {
        let output = processor().env(key, value).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
        assert!(
            stderr.contains("configuration error") && stderr.contains(expected),
            "{stderr}"
        );
    }
}

#[test]
fn a_missing_model_directory_names_the_fetch_command() {
    let output = processor()
        .args(["--model-path", "/nonexistent/minilm"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/minilm") && stderr.contains("scripts/fetch-model"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_nats_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = processor()
        .env("PROCESSOR_MODEL__KIND", "echo")
        .args(["--nats-url", &format!("nats://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("connecting to NATS at nats://127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn model_precision_attention_and_warmup_are_configurable_and_checked() {
    let config = printed_config(processor().env("PROCESSOR_MODEL__DTYPE", "bf16").args([
        "--print-config",
        "--attention",
        "fused",
        "--warmup",
        "shapes",
    ]));
    assert_eq!(config["model"]["dtype"].as_str(), Some("bf16"));
    assert_eq!(config["model"]["attention"].as_str(), Some("fused"));
    assert_eq!(config["model"]["warmup"].as_str(), Some("shapes"));

    let output = processor()
        .args(["--print-config", "--dtype", "f8"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("f8") && stderr.contains("dtype"),
        "{stderr}"
    );
}

/// Runs `processor SUBCOMMAND` on the tiny MLM; returns the JSON it wrote to `--json`.
fn run_tool(args: &[&str], texts: &str) -> serde_json::Value {
    let dir =
        std::env::temp_dir().join(format!("processor-tool-{}-{}", args[0], std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, json) = (dir.join("texts.txt"), dir.join("out.json"));
    std::fs::write(&input, texts).unwrap();
    let flag = if args[0] == "bench" {
        "--inputs"
    } else {
        "--texts"
    };
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-bert-mlm");
    let output = processor()
        .args(args)
        .arg(flag)
        .arg(&input)
        .arg("--json")
        .arg(&json)
        .args(["--model-path", model])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    value
}

#[test]
fn bench_measures_the_model_by_batch_size_and_writes_json() {
    let texts = "the cat sat on the mat.\nhappy birthday to you.\na\nthe quick brown fox jumps over the lazy dog\n";
    let report = run_tool(
        &[
            "bench",
            "--batch-sizes",
            "1,3",
            "--min-time",
            "100ms",
            "--attention",
            "fused",
        ],
        texts,
    );
    assert_eq!(report["model"], "tiny-bert-mlm");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["attention"], "fused");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, batch) in rows.iter().zip([1, 3]) {
        assert_eq!(row["set"], "lines");
        assert_eq!(row["batch"], batch);
        assert!(row["sentences_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ms_per_batch"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Batches of 3 over 4 sentences: [3 padded to the longest, 1 alone].
    assert!(
        rows[1]["mean_padded_len"].as_f64().unwrap() > rows[0]["mean_padded_len"].as_f64().unwrap()
    );
}

#[test]
fn dump_writes_ids_hidden_states_embeddings_and_fill_mask_answers() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny_mlm_fill_mask.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let items: Vec<&serde_json::Value> =
        golden["items"].as_array().unwrap().iter().take(6).collect();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let report = run_tool(&["dump", "--top-k", "3"], &texts.join("\n"));
    let dumped = report["items"].as_array().unwrap();
    assert_eq!(dumped.len(), items.len());
    for (got, want) in dumped.iter().zip(&items) {
        assert_eq!(got["text"], want["text"]);
        assert_eq!(
            got["ids"], want["input_ids"],
            "token ids of {}",
            want["text"]
        );
        let len = want["input_ids"].as_array().unwrap().len();
        let hidden = got["hidden"].as_array().unwrap();
        assert_eq!(hidden.len(), len);
        assert!(hidden.iter().all(|row| row.as_array().unwrap().len() == 32));
        let norm: f64 = got["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap().powi(2))
            .sum();
        assert!((norm - 1.0).abs() < 1e-4, "embedding norm² {norm}");
        let masks = got["masks"].as_array().unwrap();
        let want_masks = want["masks"].as_array().unwrap();
        assert_eq!(masks.len(), want_masks.len());
        for (mask, want) in masks.iter().zip(want_masks) {
            assert_eq!(mask.as_array().unwrap().len(), 3);
            // [token id, probability]; the reference's best token and its probability (1e-4).
            assert_eq!(mask[0][0], want["top5"][0]["token_id"], "{}", got["text"]);
            let diff =
                (mask[0][1].as_f64().unwrap() - want["top5"][0]["score"].as_f64().unwrap()).abs();
            assert!(
                diff <= 1e-4,
                "{}: top probability differs by {diff}",
                got["text"]
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_cuda_build_is_a_configuration_error_naming_the_build() {
    let output = processor()
        .args(["--device", "cuda", "--print-config"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("scripts/build-cuda"), "{stderr}");
}

#[test]
fn print_config_redacts_every_secret() {
    let output = processor()
        .env(
            "PROCESSOR_NATS__URL",
            "nats://carol:url-SECRET@10.0.0.1:4222",
        )
        .args(["--print-config"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!printed.contains("url-SECRET"), "{printed}");
    assert!(
        printed.contains("nats://carol:***@10.0.0.1:4222"),
        "{printed}"
    );

    let config = printed_config(
        processor()
            .env("PROCESSOR_NATS__USER", "dave")
            .env("PROCESSOR_NATS__PASSWORD", "pw-SECRET")
            .args(["--print-config"]),
    );
    assert_eq!(config["nats"]["user"].as_str(), Some("dave"));
    assert_eq!(config["nats"]["password"].as_str(), Some("***"));
    let config = printed_config(
        processor()
            .env("PROCESSOR_NATS__TOKEN", "tok-SECRET")
            .args(["--print-config"]),
    );
    assert_eq!(config["nats"]["token"].as_str(), Some("***"));
}
