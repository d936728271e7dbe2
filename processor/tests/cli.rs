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

#[test]
fn print_config_shows_env_and_flag_overrides() {
    let output = processor()
        .env("PROCESSOR_MODEL__KIND", "sim")
        .env("PROCESSOR_BATCH__MAX_SIZE", "7")
        .args(["--print-config", "--nats-url", "nats://10.1.2.3:4222"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config: toml::Value = toml::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
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
    let output = processor()
        .env("PROCESSOR_BATCH__MAX_LATENCY_MS", "11")
        .args(["--print-config", "--config"])
        .arg(&file)
        .args(["--max-latency-ms", "13"])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config: toml::Value = toml::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
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
