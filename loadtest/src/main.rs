//! `loadtest`: for each worker count, a fresh nats-server and that many `processor` processes,
//! load driven through NATS, and the figures that say what it means: the bare model's batched
//! throughput and the raw NATS request/reply ceiling, measured in the same run.
//!
//!   cargo build --release -p processor -p loadtest
//!   target/release/loadtest --workers 1,2,4,8 --model sim --duration 10s --json out.json --plot out.svg
//!   target/release/loadtest --cluster 3 --transport jetstream --replicas 1,3 --workers 2

mod baseline;
mod drive;
mod report;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use producer::{Client, ClientOptions, Transport};
use testkit::{ChildProcess, NatsCluster, NatsServer};

use crate::drive::Load;
use crate::report::{Report, Run};

/// Throughput and latency of the processors by worker count, through a real NATS.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Cli {
    /// Worker (processor process) counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    workers: Vec<usize>,
    /// The model the processors serve.
    #[arg(long, value_enum, default_value_t = ModelArg::Sim)]
    model: ModelArg,
    /// `bert`: the checkpoint directory.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model_path: PathBuf,
    /// `bert`: the processors' `model.device` (`cuda` needs a processor built with
    /// scripts/build-cuda; each worker then uses GPU 0 unless `PROCESSOR_MODEL__DEVICES` says).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `bert`: the processors' `model.dtype` (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// `sim`: fixed cost of a batch, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    sim_batch_ms: f64,
    /// `sim`: cost of each input of a batch, in milliseconds.
    #[arg(long, default_value_t = 0.25)]
    sim_item_ms: f64,
    /// `batch.max_size` of the processors (and the bare model's batch size).
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// How long to measure each worker count.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before measuring (not counted).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Closed loop: requests kept in flight (default 256 unless --rate is given); several,
    /// comma-separated, are measured one after the other on the same processors.
    #[arg(long, conflicts_with = "rate", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Open loop: requests per second, each timed from its scheduled send time.
    #[arg(long, conflicts_with = "overload")]
    rate: Option<f64>,
    /// Overload: open loop at this multiple of the processors' capacity (the bare model's
    /// inputs/s, times the workers for `sim`), every processor setting at its default.
    /// Reports ok / 503 / no-reply counts and the processors' peak RSS.
    #[arg(long, conflicts_with = "concurrency")]
    overload: Option<f64>,
    /// Inputs, one per line (default: built-in sentences of 8 to 128 tokens).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Inputs per request.
    #[arg(long, default_value_t = 1)]
    inputs_per_request: usize,
    /// Use this NATS server (e.g. a cluster) instead of starting one per worker count. Several
    /// URLs, comma-separated, are shared out among the processors.
    #[arg(long, conflicts_with = "cluster")]
    server: Option<String>,
    /// Start a cluster of this many nats-servers (routes and JetStream on loopback) per worker
    /// count instead of one server; processor i is attached to node i mod N (and learns the
    /// others from it), the producer knows every node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    cluster: u16,
    /// How requests travel: core request/reply, or the durable JetStream work queue.
    #[arg(long, value_enum, default_value_t = Transport::Core)]
    transport: Transport,
    /// JetStream: the stream's replicas to measure, comma-separated (`auto` or 1-5); each is
    /// its own stream and its own row, on the same servers.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    replicas: Vec<String>,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of throughput and p99 latency against workers here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The `processor` binary (default: next to this one).
    #[arg(long)]
    processor_bin: Option<PathBuf>,
    /// What sends the requests to the processors (core transport only).
    #[arg(long, value_enum, default_value_t = ClientArg::Producer)]
    client: ClientArg,
    /// Internal: run only the plain echo responder on SUBJECT at URL, as a process of its own
    /// (the "echo process" baseline starts this binary so).
    #[arg(long, hide = true, num_args = 2, value_names = ["URL", "SUBJECT"])]
    echo_responder: Option<Vec<String>>,
}

/// What sends the requests (see [`drive::Sender`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientArg {
    /// The producer library, as a Rust application uses it (its headers, its decoding).
    Producer,
    /// Plain NATS requests encoded once, no headers, success replies not decoded: the same client
    /// as the plain NATS echo baseline, so only the responder differs.
    Raw,
}

/// Which model the processors serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelArg {
    /// Returns the inputs: the middleware alone.
    Echo,
    /// A simulated accelerator that sleeps per batch (each worker its own device).
    Sim,
    /// The BERT checkpoint at --model-path on --device.
    Bert,
}

impl Cli {
    /// The `--server` URL, or a fresh nats-server (its pid recorded in `pids`) and its URL.
    fn nats_server(&self, pids: &mut Vec<u32>) -> (Option<NatsServer>, String) {
        match &self.server {
            Some(url) => (None, url.clone()),
            None => {
                let server = NatsServer::start();
                pids.push(server.pid());
                let url = server.url();
                (Some(server), url)
            }
        }
    }

    /// The NATS servers the processors of one worker count use: `--server`, a fresh
    /// `--cluster`, or one fresh server (with JetStream when the transport needs it).
    fn bus(&self, pids: &mut Vec<u32>) -> Bus {
        let bus = match (&self.server, self.cluster) {
            (Some(urls), _) => Bus::Given(urls.clone()),
            (None, 1) if self.transport == Transport::Core => Bus::Server(NatsServer::start()),
            (None, 1) => Bus::Server(NatsServer::start_jetstream()),
            (None, nodes) => Bus::Cluster(NatsCluster::start(nodes as usize)),
        };
        pids.extend(bus.pids());
        bus
    }

    /// The replica settings to measure: `auto` or numbers with JetStream; none with core.
    fn replica_settings(&self) -> anyhow::Result<Vec<Option<String>>> {
        if self.transport == Transport::Core {
            return Ok(vec![None]);
        }
        self.replicas
            .iter()
            .map(|r| match r.trim() {
                "auto" => Ok(Some("auto".to_string())),
                n => match n.parse::<usize>() {
                    Ok(count) if (1..=5).contains(&count) => Ok(Some(count.to_string())),
                    _ => anyhow::bail!("--replicas: {r:?} is not `auto` or a number from 1 to 5"),
                },
            })
            .collect()
    }
}

/// The NATS servers of one measurement.
enum Bus {
    /// `--server`: the URL(s) of servers this tool did not start, as given.
    Given(String),
    /// A server started for the measurement.
    Server(NatsServer),
    /// A cluster started for the measurement.
    Cluster(NatsCluster),
}

impl Bus {
    /// Every server's URL, comma-separated (what the producer connects to).
    fn urls(&self) -> String {
        match self {
            Bus::Given(urls) => urls.clone(),
            Bus::Server(server) => server.url(),
            Bus::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The server(s) processor `i` is given: one node of a cluster this tool started (it
    /// learns the others from it), or every server given.
    fn url_for(&self, i: usize) -> String {
        match self {
            Bus::Given(urls) => urls.clone(),
            Bus::Server(server) => server.url(),
            Bus::Cluster(cluster) => cluster.node(i % cluster.len()).url(),
        }
    }

    /// Servers in the bus (for `--server`: the URLs given).
    fn nodes(&self) -> usize {
        match self {
            Bus::Given(urls) => urls.split(',').count(),
            Bus::Server(_) => 1,
            Bus::Cluster(cluster) => cluster.len(),
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Bus::Given(_) => Vec::new(),
            Bus::Server(server) => vec![server.pid()],
            Bus::Cluster(cluster) => (0..cluster.len()).map(|i| cluster.node(i).pid()).collect(),
        }
    }
}

impl Cli {
    /// The loads to measure for `workers` processors: the overload rate, the open-loop rate,
    /// or each closed-loop concurrency.
    fn loads(&self, workers: usize, baselines: &baseline::Baselines) -> Vec<Load> {
        if let Some(factor) = self.overload {
            let devices = if self.model.scales_with_workers() {
                workers
            } else {
                1
            };
            let capacity = baselines.model_inputs_per_s * devices as f64
                / self.inputs_per_request.max(1) as f64;
            return vec![Load::Open {
                rate: (factor * capacity).round().max(1.0),
            }];
        }
        match (self.rate, self.concurrency.as_slice()) {
            (Some(rate), _) => vec![Load::Open { rate }],
            (None, []) => vec![Load::Closed { concurrency: 256 }],
            (None, list) => list
                .iter()
                .map(|&concurrency| Load::Closed { concurrency })
                .collect(),
        }
    }
}

impl ModelArg {
    /// Whether workers add compute (each sim worker is its own device) or share the CPU.
    fn scales_with_workers(self) -> bool {
        self == ModelArg::Sim
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.echo_responder.is_some() {
        // The echo responder process runs on one thread, as a processor does by default.
        runtime.worker_threads(1);
    }
    let runtime = runtime.enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(start(cli)),
        Err(err) => {
            eprintln!("loadtest: starting the async runtime: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start(cli: Cli) -> std::process::ExitCode {
    if let Some([url, subject]) = cli.echo_responder.as_deref() {
        return match baseline::echo_responder(url, subject).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("loadtest echo responder: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    tokio::select! {
        result = run(cli) => match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("loadtest: {err:#}");
                std::process::ExitCode::FAILURE
            }
        },
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run stops every process it started (ChildProcess/NatsServer kill on drop).
            eprintln!("loadtest: interrupted; stopping the processes it started");
            std::process::ExitCode::from(130)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let processor_bin = match &cli.processor_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("processor"),
    };
    anyhow::ensure!(
        processor_bin.is_file(),
        "no processor binary at {} (build it with `cargo build --release -p processor`, or pass --processor-bin)",
        processor_bin.display()
    );
    anyhow::ensure!(
        cli.client == ClientArg::Producer || cli.transport == Transport::Core,
        "--client raw sends core requests; JetStream requests go through the producer library"
    );
    let inputs = drive::inputs(cli.inputs.as_deref())?;

    eprintln!("measuring baselines…");
    let mut pids = Vec::new();
    let baselines = baseline::measure(&cli, &processor_bin, &inputs, &mut pids).await?;
    let first_load = cli.loads(cli.workers.first().copied().unwrap_or(1), &baselines)[0];
    let mut report = Report::new(&cli, first_load, baselines);
    report.pids = pids;
    let replica_settings = cli.replica_settings()?;
    for &workers in &cli.workers {
        let loads = cli.loads(workers, &report.baselines);
        let bus = cli.bus(&mut report.pids);
        for replicas in &replica_settings {
            let setup = Setup {
                workers,
                bus: &bus,
                replicas: replicas.as_deref(),
            };
            let runs = measure_workers(
                &cli,
                &processor_bin,
                &inputs,
                &loads,
                setup,
                &mut report.pids,
            )
            .await?;
            for run in runs {
                report.print_row(&run);
                report.runs.push(run);
            }
        }
    }
    report.finish(&cli)
}

/// What one set of processors runs on.
#[derive(Clone, Copy)]
struct Setup<'a> {
    workers: usize,
    bus: &'a Bus,
    /// JetStream: the stream's `jetstream.replicas` (`auto` or a number).
    replicas: Option<&'a str>,
}

/// One worker count (and replica setting): `workers` processors on `bus`, then for each load
/// a warm-up and a measurement.
async fn measure_workers(
    cli: &Cli,
    processor_bin: &std::path::Path,
    inputs: &[String],
    loads: &[Load],
    setup: Setup<'_>,
    pids: &mut Vec<u32>,
) -> anyhow::Result<Vec<Run>> {
    let Setup { workers, bus, .. } = setup;
    let url = bus.urls();
    // A prefix (and with JetStream a stream) of its own, so that runs do not mix.
    let prefix = format!(
        "loadtest{}w{workers}r{}",
        std::process::id(),
        setup.replicas.unwrap_or("0")
    );
    let mut processors = Vec::with_capacity(workers);
    let starting = std::time::Instant::now();
    for i in 0..workers {
        // A GPU processor compiles and autotunes its kernels before it reports ready.
        let process = ChildProcess::spawn(
            processor_command(cli, processor_bin, &bus.url_for(i), &prefix, setup.replicas),
            "processor ready",
            Duration::from_secs(600),
        );
        pids.push(process.pid());
        processors.push(process);
    }
    let ready_s = starting.elapsed().as_secs_f64();
    let options = ClientOptions {
        prefix: prefix.clone(),
        transport: cli.transport,
        // Overload: the producer's default, so that "no reply" means what a user would see.
        timeout: Duration::from_secs(if cli.overload.is_some() { 10 } else { 30 }),
        retries: 0,
        ..ClientOptions::default()
    };
    let nats = connect(&url).await?;
    let sender = match cli.client {
        ClientArg::Producer => drive::Sender::Producer(
            Client::connect_with(&url, options.clone())
                .await
                .with_context(|| format!("connecting to {}", schemas::redact_server_urls(&url)))?,
        ),
        ClientArg::Raw => drive::Sender::Raw {
            nats: connect(&url).await?,
            subject: schemas::subject(&prefix, schemas::Task::Embed),
            timeout: options.timeout,
        },
    };
    let stream_replicas = match setup.replicas {
        Some(_) => Some(stream_replicas(&nats, &prefix).await?),
        None => None,
    };

    let mut runs = Vec::with_capacity(loads.len());
    for &load in loads {
        drive::drive(
            &sender,
            inputs,
            cli.inputs_per_request,
            load,
            cli.warmup,
            None,
        )
        .await;
        let before = report::batch_counters(&nats, &prefix).await;
        let label = match load {
            Load::Closed { concurrency } => format!("{workers} worker(s), {concurrency} in flight"),
            Load::Open { rate } => format!("{workers} worker(s), {rate}/s"),
        };
        let outcome = drive::drive(
            &sender,
            inputs,
            cli.inputs_per_request,
            load,
            cli.duration,
            Some(&label),
        )
        .await;
        let after = report::batch_counters(&nats, &prefix).await;
        let mut run = Run::new(workers, load, cli, outcome, before, after);
        run.ready_s = ready_s;
        run.nats_servers = bus.nodes();
        run.stream_replicas = stream_replicas;
        run.peak_rss_mib = processors
            .iter()
            .map(|p| p.memory_mib().1)
            .fold(0.0, f64::max);
        runs.push(run);
    }

    for process in &processors {
        process.terminate();
    }
    for mut process in processors {
        tokio::task::spawn_blocking(move || process.wait(Duration::from_secs(60))).await?;
    }
    if setup.replicas.is_some() {
        // The next setting gets a stream of its own; this one's is not needed any more.
        let jetstream = async_nats::jetstream::new(nats);
        let _ = jetstream.delete_stream(stream_name(&prefix)).await;
    }
    Ok(runs)
}

/// A plain NATS connection to one server or several (comma-separated, credentials in the URL
/// allowed).
pub async fn connect(urls: &str) -> anyhow::Result<async_nats::Client> {
    let (options, servers) = producer::nats_options(urls).map_err(|e| anyhow::anyhow!("{e}"))?;
    options
        .connect(servers.as_slice())
        .await
        .with_context(|| format!("connecting to {}", schemas::redact_server_urls(urls)))
}

/// The JetStream stream (and consumer) name of a measurement's processors.
fn stream_name(prefix: &str) -> String {
    prefix.to_uppercase()
}

/// How many copies of its stream the processors made (what `auto` chose).
async fn stream_replicas(nats: &async_nats::Client, prefix: &str) -> anyhow::Result<usize> {
    let jetstream = async_nats::jetstream::new(nats.clone());
    let mut stream = jetstream
        .get_stream(stream_name(prefix))
        .await
        .with_context(|| format!("the stream {}", stream_name(prefix)))?;
    Ok(stream.info().await?.config.num_replicas)
}

fn processor_command(
    cli: &Cli,
    bin: &std::path::Path,
    url: &str,
    prefix: &str,
    replicas: Option<&str>,
) -> Command {
    let kind = match cli.model {
        ModelArg::Echo => "echo",
        ModelArg::Sim => "sim",
        ModelArg::Bert => "bert",
    };
    let mut command = Command::new(bin);
    command
        .env_remove("PROCESSOR_CONFIG")
        .env("RUST_LOG", "warn,processor=info")
        .env("PROCESSOR_NATS__URL", url)
        .env("PROCESSOR_SERVICE__SUBJECT_PREFIX", prefix)
        .env("PROCESSOR_SERVICE__QUEUE_GROUP", prefix)
        .env("PROCESSOR_SERVICE__NAME", prefix)
        .env("PROCESSOR_SERVICE__REPLY_UNKNOWN_TASKS", "false")
        .env("PROCESSOR_HTTP__LISTEN", "")
        .env("PROCESSOR_MODEL__KIND", kind)
        .env("PROCESSOR_MODEL__PATH", &cli.model_path)
        .env("PROCESSOR_MODEL__DEVICE", &cli.device)
        .env("PROCESSOR_MODEL__DTYPE", &cli.dtype)
        .env("PROCESSOR_MODEL__BATCH_MS", cli.sim_batch_ms.to_string())
        .env("PROCESSOR_MODEL__ITEM_MS", cli.sim_item_ms.to_string())
        .env("PROCESSOR_BATCH__MAX_SIZE", cli.max_batch_size.to_string())
        // The inputs repeat (the built-in 128 sentences over and over): with the output cache on,
        // a BERT run would measure cache hits after the first pass, not the model.
        .env("PROCESSOR_CACHE__MAX_BYTES", "0");
    if let Some(replicas) = replicas {
        command
            .env("PROCESSOR_SERVICE__TRANSPORT", "jetstream")
            .env("PROCESSOR_JETSTREAM__STREAM", stream_name(prefix))
            .env("PROCESSOR_JETSTREAM__CONSUMER", stream_name(prefix))
            .env("PROCESSOR_JETSTREAM__REPLICAS", replicas);
    }
    if cli.overload.is_none() {
        // Throughput runs measure the pipeline at saturation, not its shedding.
        command
            .env("PROCESSOR_BATCH__QUEUE_CAPACITY", "65536")
            .env("PROCESSOR_BATCH__MAX_QUEUE_WAIT_MS", "3600000")
            .env("PROCESSOR_SERVICE__MAX_INPUTS", "1024");
    }
    command
}
