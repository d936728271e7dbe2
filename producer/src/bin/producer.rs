//! `producer`: send texts to the service and print one JSON object per input, in input order:
//! its result, or its error (the exit status is then 1).

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::{stream, StreamExt};
use producer::{Client, ClientOptions, Transport};
use schemas::{InferOptions, InferRequest, Input, Output, Priority, Task};

/// Send inference requests to the processors over NATS.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// NATS server URL(s), comma-separated; the rest of a cluster is learnt from the server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    server: String,
    /// Subject prefix of the service.
    #[arg(long, env = "PRODUCER_PREFIX", default_value = schemas::DEFAULT_SUBJECT_PREFIX)]
    prefix: String,
    /// How long one attempt waits for its reply (e.g. 2s, 500ms).
    #[arg(long, env = "PRODUCER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Retries after the first attempt on no-responders, timeouts and overload.
    #[arg(long, env = "PRODUCER_RETRIES", default_value_t = 3)]
    retries: u32,
    /// Inputs per request; more inputs are split into requests sent concurrently.
    #[arg(long, env = "PRODUCER_CHUNK", default_value_t = 64)]
    chunk: usize,
    /// `core` request/reply, or `jetstream`: through the processors' durable work-queue
    /// stream (their `service.transport` must be `jetstream`).
    #[arg(long, env = "PRODUCER_TRANSPORT", value_enum, default_value_t = Transport::Core)]
    transport: Transport,
    /// Send JSON instead of CBOR.
    #[arg(long)]
    json: bool,
    /// `bulk` lets interactive requests go ahead of these (sent as the `Priority` header).
    #[arg(long, env = "PRODUCER_PRIORITY", default_value = "interactive", value_parser = parse_priority)]
    priority: Priority,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sentence embeddings: prints {"input": ..., "embedding": [...]} per input.
    Embed {
        /// Texts to embed, or `-` to read one per line from stdin.
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Return the raw mean-pooled vector instead of a unit vector.
        #[arg(long)]
        no_normalize: bool,
        /// Cut inputs longer than the model accepts instead of failing.
        #[arg(long)]
        truncate: bool,
    },
    /// Fill each [MASK]: prints {"input": ..., "masks": [[{"token", "score"}...]], "sequence": ...}.
    FillMask {
        /// Texts with [MASK] tokens, or `-` to read one per line from stdin.
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Candidates per mask.
        #[arg(long)]
        top_k: Option<u32>,
        /// Cut inputs longer than the model accepts instead of failing.
        #[arg(long)]
        truncate: bool,
    },
    /// Score passages against a query with a cross-encoder: prints
    /// {"input": [query, passage], "score": ..., "raw_score": ...} per passage.
    Rerank {
        /// The query every passage is scored against.
        #[arg(long)]
        query: String,
        /// Passages, or `-` to read one per line from stdin.
        #[arg(required = true)]
        passages: Vec<String>,
        /// Cut the longer text of a pair that is too long instead of failing.
        #[arg(long)]
        truncate: bool,
    },
    /// Classify texts: prints {"input": ..., "labels": [{"label", "id", "score"}...]}.
    Classify {
        /// Texts to classify, or `-` to read one per line from stdin.
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Labels per input, most likely first (default: every label).
        #[arg(long)]
        top_k: Option<u32>,
        /// Cut inputs longer than the model accepts instead of failing.
        #[arg(long)]
        truncate: bool,
    },
}

fn parse_priority(value: &str) -> Result<Priority, String> {
    value.parse()
}

impl Command {
    /// The task, its inputs (stdin read where `-` says) and the options.
    fn task_inputs_options(self) -> anyhow::Result<(Task, Vec<Input>, InferOptions)> {
        let texts = |args: Vec<String>| -> anyhow::Result<Vec<Input>> {
            Ok(read_inputs(args)?.into_iter().map(Input::from).collect())
        };
        Ok(match self {
            Command::Rerank {
                query,
                passages,
                truncate,
            } => (
                Task::Rerank,
                read_inputs(passages)?
                    .into_iter()
                    .map(|passage| Input::from((query.clone(), passage)))
                    .collect(),
                InferOptions {
                    truncate: truncate.then_some(true),
                    ..InferOptions::default()
                },
            ),
            Command::Classify {
                inputs,
                top_k,
                truncate,
            } => (
                Task::Classify,
                texts(inputs)?,
                InferOptions {
                    top_k,
                    truncate: truncate.then_some(true),
                    ..InferOptions::default()
                },
            ),
            Command::Embed {
                inputs,
                no_normalize,
                truncate,
            } => (
                Task::Embed,
                texts(inputs)?,
                InferOptions {
                    normalize: no_normalize.then_some(false),
                    truncate: truncate.then_some(true),
                    ..InferOptions::default()
                },
            ),
            Command::FillMask {
                inputs,
                top_k,
                truncate,
            } => (
                Task::FillMask,
                texts(inputs)?,
                InferOptions {
                    top_k,
                    truncate: truncate.then_some(true),
                    ..InferOptions::default()
                },
            ),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("producer: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("producer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = ClientOptions {
        transport: cli.transport,
        prefix: cli.prefix,
        timeout: cli.timeout,
        retries: cli.retries,
        encoding: if cli.json {
            schemas::Encoding::Json
        } else {
            schemas::Encoding::Cbor
        },
        priority: cli.priority,
        ..ClientOptions::default()
    };
    let chunk = cli.chunk.max(1);
    let (task, inputs, request_options) = cli.command.task_inputs_options()?;
    let client = Client::connect_with(&cli.server, options).await?;

    // Requests go out concurrently; `buffered` yields their replies in input order, and each
    // chunk's lines are printed as soon as it and every chunk before it are answered.
    let requests = inputs.chunks(chunk).map(|texts| {
        let client = client.clone();
        let request = InferRequest {
            inputs: texts.to_vec(),
            options: request_options,
            timeout_ms: None,
        };
        async move { (texts, client.request(task, &request).await) }
    });
    let mut replies = stream::iter(requests).buffered(16);
    let mut stdout = std::io::stdout().lock();
    let mut failed = 0;
    while let Some((texts, reply)) = replies.next().await {
        match reply {
            Ok(reply) if reply.outputs.len() == texts.len() => {
                for (input, output) in texts.iter().zip(&reply.outputs) {
                    writeln!(stdout, "{}", line(input, output)?)?;
                }
            }
            Ok(reply) => {
                let error = producer::Error::BadReply(format!(
                    "{} outputs for {} inputs",
                    reply.outputs.len(),
                    texts.len()
                ));
                failed += texts.len();
                for input in texts {
                    writeln!(stdout, "{}", error_line(input, &error))?;
                }
            }
            Err(error) => {
                failed += texts.len();
                for input in texts {
                    writeln!(stdout, "{}", error_line(input, &error))?;
                }
            }
        }
    }
    stdout.flush()?;
    anyhow::ensure!(failed == 0, "{failed} of {} inputs failed", inputs.len());
    Ok(())
}

/// `{"input": ..., "error": {"code": ..., "kind": ..., "message": ...}}`: the service's error
/// body, or code 0 and kind `client` for a failure on this side (no reply, no connection).
fn error_line(input: &Input, error: &producer::Error) -> String {
    let error = match error.service_error() {
        Some(body) => serde_json::json!({
            "code": body.code,
            "kind": body.kind,
            "message": body.message,
        }),
        None => serde_json::json!({
            "code": 0,
            "kind": "client",
            "message": error.to_string(),
        }),
    };
    serde_json::json!({ "input": input, "error": error }).to_string()
}

/// `-` anywhere in the inputs stands for the lines of stdin.
fn read_inputs(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut inputs = Vec::new();
    for arg in args {
        if arg == "-" {
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    inputs.push(line);
                }
            }
        } else {
            inputs.push(arg);
        }
    }
    anyhow::ensure!(!inputs.is_empty(), "no inputs (stdin was empty)");
    Ok(inputs)
}

/// `{"input": ..., <the output's own fields>}` (a pair's input is `[query, passage]`).
fn line(input: &Input, output: &Output) -> anyhow::Result<String> {
    let mut object = serde_json::Map::new();
    object.insert("input".into(), serde_json::to_value(input)?);
    match serde_json::to_value(output)? {
        serde_json::Value::Object(fields) => object.extend(fields),
        other => {
            object.insert("output".into(), other);
        }
    }
    Ok(serde_json::Value::Object(object).to_string())
}
