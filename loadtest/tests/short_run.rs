//! A short real run: echo model, two worker counts; the JSON has every figure and no process
//! the tool started is left behind.

use std::path::PathBuf;
use std::process::Command;

/// The `processor` binary of this workspace, built if needed (it is another package's binary,
/// so cargo does not hand its path to this test; `cargo test --workspace` has built it).
fn processor_binary() -> PathBuf {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_loadtest")).with_file_name("processor");
    if binary.is_file() {
        return binary;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "processor", "--bin", "processor"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building the processor binary");
    binary
}

fn is_running(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

/// Every process the run reports it started (`pids` in its JSON): `expected` of them, all
/// stopped.
fn assert_all_stopped(report: &serde_json::Value, expected: usize) {
    let pids: Vec<u64> = report["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), expected, "{pids:?}");
    let alive: Vec<u64> = pids.into_iter().filter(|&pid| is_running(pid)).collect();
    assert!(alive.is_empty(), "left running: {alive:?}");
}

/// A fresh directory for one test's outputs (removed by the test at its end).
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs loadtest with `args`, `--json json` and this workspace's processor; it must succeed.
/// Returns what it printed and the JSON it wrote.
fn run_loadtest(args: &[&str], json: &std::path::Path) -> (String, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--json")
        .arg(json)
        .arg("--processor-bin")
        .arg(processor_binary())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (stdout, report)
}

#[test]
fn a_short_echo_run_reports_every_figure_and_stops_its_processes() {
    let dir = scratch_dir("test");
    let (json, plot) = (dir.join("run.json"), dir.join("run.svg"));
    let plot_arg = plot.to_str().unwrap();
    let (stdout, report) = run_loadtest(
        &[
            "--workers",
            "1,2",
            "--model",
            "echo",
            "--duration",
            "2s",
            "--warmup",
            "300ms",
            "--concurrency",
            "16",
            "--inputs-per-request",
            "2",
            "--plot",
            plot_arg,
        ],
        &json,
    );
    assert!(
        stdout.contains("| workers | nats | in flight | requests/s |"),
        "{stdout}"
    );

    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, workers) in runs.iter().zip([1, 2]) {
        assert_eq!(run["workers"], workers);
        for key in [
            "requests_per_s",
            "inputs_per_s",
            "p50_ms",
            "p99_ms",
            "mean_batch_size",
        ] {
            assert!(run[key].as_f64().unwrap() > 0.0, "{key} in {run}");
        }
        assert_eq!(run["errors"], 0, "{run}");
        let (requests, inputs) = (
            run["requests_per_s"].as_f64().unwrap(),
            run["inputs_per_s"].as_f64().unwrap(),
        );
        assert!(
            (inputs - 2.0 * requests).abs() < 1e-6,
            "two inputs per request"
        );
        assert!(run["p99_ms"].as_f64() >= run["p50_ms"].as_f64());
    }
    for key in ["model_inputs_per_s", "nats_echo_requests_per_s"] {
        assert!(report["baselines"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("workers"),
        "an SVG plot"
    );

    // A nats-server for the baseline and one per worker count, plus 1 + 2 processors: gone.
    assert_all_stopped(&report, 1 + 2 + 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_raw_run_also_measures_the_echo_responder_as_a_process_of_its_own() {
    let dir = scratch_dir("raw");
    let json = dir.join("run.json");
    let (stdout, report) = run_loadtest(
        &[
            "--workers",
            "1",
            "--model",
            "echo",
            "--client",
            "raw",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--concurrency",
            "8",
        ],
        &json,
    );
    assert!(
        stdout.contains("responder in a process of its own"),
        "{stdout}"
    );
    let echoes = report["baselines"]["process_echo"].as_array().unwrap();
    assert_eq!(echoes.len(), 1, "{echoes:?}");
    let echo_rate = echoes[0]["requests_per_s"].as_f64().unwrap();
    assert!(echo_rate > 0.0, "{echoes:?}");
    let run = &report["runs"][0];
    let ratio = run["vs_process_echo"].as_f64().unwrap();
    assert!(
        (ratio - run["requests_per_s"].as_f64().unwrap() / echo_rate).abs() < 1e-9,
        "{run}"
    );
    assert_eq!(run["errors"], 0, "{run}");
    // The baseline server, the echo responder, the run's server and its processor: gone.
    assert_all_stopped(&report, 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bert_run_compares_the_service_with_the_bare_model_measured_by_processor_bench() {
    let dir = scratch_dir("bert");
    let json = dir.join("run.json");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../processor/tests/fixtures/tiny-bert-mlm"
    );
    let (_, report) = run_loadtest(
        &[
            "--workers",
            "1",
            "--model",
            "bert",
            "--model-path",
            model,
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--max-batch-size",
            "8",
            "--duration",
            "2s",
            "--warmup",
            "300ms",
            "--concurrency",
            "4,16",
        ],
        &json,
    );
    assert_eq!(report["device"], "cpu");
    assert!(report["model_path"]
        .as_str()
        .unwrap()
        .ends_with("tiny-bert-mlm"));
    let bare = report["baselines"]["model_inputs_per_s"].as_f64().unwrap();
    assert!(bare > 0.0, "the bare model's rate from `processor bench`");
    // Two concurrencies measured on the same processor, each against the same bare model.
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    // The plain NATS echo was measured at each of them, and each run is compared with its own.
    let echoes = report["baselines"]["nats_echo"].as_array().unwrap();
    assert_eq!(echoes.len(), 2, "{echoes:?}");
    for (run, in_flight) in runs.iter().zip([4, 16]) {
        assert_eq!(run["load"]["concurrency"], in_flight, "{run}");
        let echo = echoes
            .iter()
            .find(|echo| echo["concurrency"] == in_flight)
            .unwrap();
        let echo_rate = echo["requests_per_s"].as_f64().unwrap();
        let vs_echo = run["vs_nats_echo"].as_f64().unwrap();
        assert!(echo_rate > 0.0, "{echo}");
        assert!(
            (vs_echo - run["requests_per_s"].as_f64().unwrap() / echo_rate).abs() < 1e-9,
            "{run} against {echo}"
        );
        assert!(run["ready_s"].as_f64().unwrap() > 0.0, "{run}");
        assert_eq!(run["errors"], 0, "{run}");
        let ratio = run["vs_bare_model"].as_f64().unwrap();
        let rate = run["inputs_per_s"].as_f64().unwrap();
        assert!(rate > 0.0 && (ratio - rate / bare).abs() < 1e-6, "{run}");
    }
    // The baseline server, the run's server and one processor: gone.
    assert_all_stopped(&report, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cluster_run_spreads_processors_over_the_nodes_and_measures_each_replica_count() {
    let dir = scratch_dir("cluster");
    let json = dir.join("run.json");
    let (stdout, report) = run_loadtest(
        &[
            "--cluster",
            "3",
            "--transport",
            "jetstream",
            "--replicas",
            "1,auto",
            "--workers",
            "3",
            "--model",
            "echo",
            "--duration",
            "1s",
            "--warmup",
            "300ms",
            "--concurrency",
            "16",
        ],
        &json,
    );
    // One row per replica count, on the same three nodes; `auto` chose 3 on the cluster.
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{stdout}");
    for (run, replicas) in runs.iter().zip([1, 3]) {
        assert_eq!(run["nats_servers"], 3, "{run}");
        assert_eq!(run["stream_replicas"], replicas, "{run}");
        assert_eq!(run["errors"], 0, "{run}");
        assert!(run["requests_per_s"].as_f64().unwrap() > 0.0, "{run}");
        assert!(
            stdout.contains(&format!("| 3 nodes, R{replicas} |")),
            "{stdout}"
        );
    }
    // The baseline's server, three nodes, and the three processors of each row: all gone.
    assert_all_stopped(&report, 1 + 3 + 2 * 3);
    let _ = std::fs::remove_dir_all(&dir);
}
