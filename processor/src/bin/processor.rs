//! `processor`: loads the configuration, then serves until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use figment::providers::Serialized;
use processor::config::{Config, LogFormat};

/// Batched BERT inference worker on NATS. Config layers: defaults < processor.toml (or
/// --config) < PROCESSOR_SECTION__KEY environment variables < these flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML); default: ./processor.toml if it exists.
    #[arg(long, env = "PROCESSOR_CONFIG")]
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
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// batch.max_size
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// batch.max_latency_ms
    #[arg(long)]
    max_latency_ms: Option<u64>,
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
        flag!(max_batch_size, "batch.max_size");
        flag!(max_latency_ms, "batch.max_latency_ms");
        Ok(Config::from_figment(&figment)?)
    }
}

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
        .with_writer(std::io::stderr);
    match config.logging.format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    if cli.print_config {
        match toml::to_string_pretty(&config) {
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("processor: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(processor::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
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
