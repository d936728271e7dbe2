//! Connecting to a nats-server that requires authentication.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{ChildProcess, NatsServer};

fn processor(url: &str, user: &str, password: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_processor"));
    command
        .current_dir(std::env::temp_dir())
        .env_remove("PROCESSOR_CONFIG")
        .env("PROCESSOR_NATS__URL", url)
        .env("PROCESSOR_NATS__USER", user)
        .env("PROCESSOR_NATS__PASSWORD", password)
        .env("PROCESSOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("PROCESSOR_MODEL__KIND", "echo");
    command
}

#[test]
fn good_credentials_serve_and_bad_ones_exit_non_zero_naming_the_cause() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "s3cret"]);

    let serving = ChildProcess::spawn(
        processor(&server.url(), "alice", "s3cret"),
        "processor ready",
        Duration::from_secs(30),
    );
    serving.terminate();

    let mut refused = processor(&server.url(), "alice", "wrong")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = refused.kill();
            panic!("a processor with a wrong password kept running (retrying?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("authorization") || lower.contains("authentication"),
        "the message names the cause: {stderr}"
    );
    assert!(stderr.contains(&server.url()), "and the server: {stderr}");
}

/// Waits for a processor that must fail, and returns its stderr.
fn failure_output(mut command: Command) -> String {
    let output = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "{stderr}");
    stderr
}

#[test]
fn credentials_in_the_url_connect_and_never_appear_in_logs_or_errors() {
    let server = NatsServer::start_with_args(&["--user", "alice", "--pass", "s3cret-PW"]);
    let port = server.port();
    let in_url = |user_info: &str| {
        let mut command = processor(&format!("nats://{user_info}@127.0.0.1:{port}"), "", "");
        command
            .env_remove("PROCESSOR_NATS__USER")
            .env_remove("PROCESSOR_NATS__PASSWORD");
        command
    };
    let serving = ChildProcess::spawn(
        in_url("alice:s3cret-PW"),
        "processor ready",
        Duration::from_secs(30),
    );
    assert!(!serving.log().contains("s3cret-PW"), "{}", serving.log());
    serving.terminate();

    let stderr = failure_output(in_url("alice:wrong-PW"));
    assert!(stderr.to_lowercase().contains("authoriz"), "{stderr}");
    assert!(!stderr.contains("wrong-PW"), "the password leaks: {stderr}");
    assert!(stderr.contains("alice:***@127.0.0.1"), "{stderr}");

    // A token in the URL, as `nats://TOKEN@host`.
    let token_server = NatsServer::start_with_args(&["--auth", "T0KEN-secret"]);
    let mut command = processor(
        &format!("nats://T0KEN-secret@127.0.0.1:{}", token_server.port()),
        "",
        "",
    );
    command
        .env_remove("PROCESSOR_NATS__USER")
        .env_remove("PROCESSOR_NATS__PASSWORD");
    let serving = ChildProcess::spawn(command, "processor ready", Duration::from_secs(30));
    assert!(!serving.log().contains("T0KEN-secret"), "{}", serving.log());
    serving.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_takes_credentials_from_the_url_too() {
    let server = NatsServer::start_with_args(&["--user", "bob", "--pass", "pw-bob"]);
    let _echo = ChildProcess::spawn(
        processor(&server.url(), "bob", "pw-bob"),
        "processor ready",
        Duration::from_secs(30),
    );
    let url = format!("nats://bob:pw-bob@127.0.0.1:{}", server.port());
    let client = producer::Client::connect(&url).await.unwrap();
    let request = schemas::InferRequest::new(["with credentials"]);
    let reply = client.request(schemas::Task::Embed, &request).await;
    assert!(reply.is_ok(), "{reply:?}");
    let wrong = format!("nats://bob:not-pw-bob@127.0.0.1:{}", server.port());
    let error = producer::Client::connect(&wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(!error.contains("not-pw-bob"), "{error}");
}
