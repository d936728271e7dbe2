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
