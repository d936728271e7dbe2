//! `processor`: loads the configuration, then serves until SIGINT/SIGTERM; or, with a
//! subcommand, measures (`bench`) or dumps the outputs of (`dump`) the configured model
//! directly, without NATS.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use figment::providers::Serialized;
use processor::config::{Config, LogFormat};

/// Batched BERT inference worker on NATS. Config layers: defaults < processor.toml (or
/// --config) < PROCESSOR_SECTION__KEY environment variables < these flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML); default: ./processor.toml if it exists.
    #[arg(long, env = "PROCESSOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// nats.url
    #[arg(long)]
    nats_url: Option<String>,
    /// service.subject_prefix
    #[arg(long)]
    subject_prefix: Option<String>,
    /// service.queue_group
    #[arg(long)]
    queue_group: Option<String>,
    /// service.transport (core | jetstream)
    #[arg(long)]
    transport: Option<String>,
    /// model.kind (bert | echo | sim)
    #[arg(long)]
    model_kind: Option<String>,
    /// model.path
    #[arg(long, global = true)]
    model_path: Option<PathBuf>,
    /// model.device (cpu | cuda)
    #[arg(long, global = true)]
    device: Option<String>,
    /// model.dtype (f32 | f16 | bf16)
    #[arg(long, global = true)]
    dtype: Option<String>,
    /// model.attention (auto | fused | explicit)
    #[arg(long, global = true)]
    attention: Option<String>,
    /// model.warmup (auto | one | shapes)
    #[arg(long, global = true)]
    warmup: Option<String>,
    /// batch.max_size
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// batch.max_latency_ms
    #[arg(long)]
    max_latency_ms: Option<u64>,
}

/// What to do instead of serving.
#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the configured model directly (no NATS): sentences/s by batch size.
    Bench(processor::bare::BenchArgs),
    /// Write the configured model's outputs for some texts as JSON: token ids, hidden states,
    /// embeddings and fill-mask answers (to compare a device or precision with a reference).
    Dump(processor::bare::DumpArgs),
}

impl Cli {
    fn load_config(&self) -> anyhow::Result<Config> {
        let mut figment = Config::figment(self.config.as_deref())?;
        macro_rules! flag {
            ($field:ident, $key:literal) => {
                if let Some(value) = &self.$field {
                    figment = figment.merge(Serialized::default($key, value));
                }
            };
        }
        flag!(nats_url, "nats.url");
        flag!(subject_prefix, "service.subject_prefix");
        flag!(queue_group, "service.queue_group");
        flag!(transport, "service.transport");
        flag!(model_kind, "model.kind");
        flag!(model_path, "model.path");
        flag!(device, "model.device");
        flag!(dtype, "model.dtype");
        flag!(attention, "model.attention");
        flag!(warmup, "model.warmup");
        flag!(max_batch_size, "batch.max_size");
        flag!(max_latency_ms, "batch.max_latency_ms");
        Ok(Config::from_figment(&figment)?)
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load_config() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("processor: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: piped logs (journald, kubectl logs, tests) stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.logging.format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    if cli.print_config {
        match toml::to_string_pretty(&config.redacted()) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("processor: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    match &cli.command {
        Some(Command::Bench(args)) => return report(processor::bare::bench(&config.model, args)),
        Some(Command::Dump(args)) => return report(processor::bare::dump(&config.model, args)),
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.service.io_threads)
        .thread_name("processor-io")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("processor: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(processor::run(config, shutdown_signal()));
    // The drain already had its grace period: do not wait again for blocking threads still
    // computing (a model worker past the deadline).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("processor: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a subcommand, its error on stderr.
fn report<T>(result: anyhow::Result<T>) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("processor: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("processor: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
