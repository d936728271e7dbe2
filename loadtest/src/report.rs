//! The results: a table like the seed's, a JSON file with every figure, and an SVG plot.

use std::time::Duration;

use futures::StreamExt;
use plotters::prelude::*;

use crate::baseline::{Baselines, EchoBaseline};
use crate::drive::{Load, Outcome};
use crate::{Cli, ModelArg};

/// One worker count's figures.
#[derive(Debug, serde::Serialize)]
pub struct Run {
    pub workers: usize,
    /// nats-servers the processors were spread over.
    pub nats_servers: usize,
    /// JetStream: copies of the request stream (`None`: core request/reply).
    pub stream_replicas: Option<usize>,
    /// How requests were sent in this measurement.
    pub load: Load,
    /// Seconds from starting the processors (one after the other) until all were ready:
    /// model load and warm-up.
    pub ready_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    pub inputs_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    /// Of the errors: 503 `overloaded` replies.
    pub overloaded: u64,
    /// Of the errors: requests that got no reply within the producer's timeout.
    pub no_reply: u64,
    /// The largest peak resident memory (VmHWM) among the processors, in MiB.
    pub peak_rss_mib: f64,
    pub error_samples: Vec<String>,
    /// Mean inputs per batch over the measurement, from the processors' `$SRV.STATS`.
    pub mean_batch_size: f64,
    /// inputs/s over the ideal: workers × the bare model for `sim` (each worker is its own
    /// simulated device), the bare model alone for `echo` and `bert` (workers share the CPU).
    pub efficiency: f64,
    /// inputs/s over the bare model's inputs/s.
    pub vs_bare_model: f64,
    /// requests/s over the plain NATS echo at the same concurrency (the largest measured for
    /// open loops).
    pub vs_nats_echo: f64,
    /// requests/s over the client echo at the same concurrency (closed loops; 0 if none).
    pub vs_client_echo: f64,
    /// requests/s over the echo process at the same concurrency (raw client, closed loops;
    /// 0 if none).
    pub vs_process_echo: f64,
}

/// Everything a run of the tool measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub model: ModelArg,
    /// `bert`: the checkpoint, the processors' device and float type.
    pub model_path: String,
    pub device: String,
    pub dtype: String,
    pub load: Load,
    /// What sent the requests (`producer` or `raw`).
    pub client: crate::ClientArg,
    pub inputs_per_request: usize,
    pub duration_s: f64,
    pub max_batch_size: usize,
    pub baselines: Baselines,
    /// `--overload`: the multiple of capacity offered.
    pub overload: Option<f64>,
    pub runs: Vec<Run>,
    /// Every process the tool started (nats-servers, for the baseline and per worker count, and
    /// processors), all stopped at the end.
    pub pids: Vec<u32>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl Run {
    /// The figures of one worker count from its outcome and the batch counters around it.
    pub fn new(
        workers: usize,
        load: Load,
        cli: &Cli,
        outcome: Outcome,
        before: (u64, u64),
        after: (u64, u64),
    ) -> Run {
        let mut latencies = outcome.latencies;
        latencies.sort();
        let quantile = |q: f64| {
            if latencies.is_empty() {
                return 0.0;
            }
            let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
            ms(latencies[index - 1])
        };
        let seconds = outcome.elapsed.as_secs_f64().max(1e-9);
        let requests = latencies.len() as u64;
        let requests_per_s = requests as f64 / seconds;
        let (inputs, batches) = (
            after.0.saturating_sub(before.0),
            after.1.saturating_sub(before.1),
        );
        Run {
            workers,
            nats_servers: 1,
            stream_replicas: None,
            load,
            ready_s: 0.0,
            requests,
            requests_per_s,
            inputs_per_s: requests_per_s * cli.inputs_per_request as f64,
            p50_ms: quantile(0.5),
            p90_ms: quantile(0.9),
            p99_ms: quantile(0.99),
            max_ms: quantile(1.0),
            errors: outcome.errors,
            overloaded: outcome.overloaded,
            no_reply: outcome.no_reply,
            peak_rss_mib: 0.0,
            error_samples: outcome.error_samples,
            mean_batch_size: if batches == 0 {
                0.0
            } else {
                inputs as f64 / batches as f64
            },
            efficiency: 0.0,
            vs_bare_model: 0.0,
            vs_nats_echo: 0.0,
            vs_client_echo: 0.0,
            vs_process_echo: 0.0,
        }
    }
}

impl Run {
    /// The bus in words: `1 server`, `3 nodes, R3`.
    fn bus(&self) -> String {
        let servers = match self.nats_servers {
            1 => "1 server".to_string(),
            n => format!("{n} nodes"),
        };
        match self.stream_replicas {
            Some(replicas) => format!("{servers}, R{replicas}"),
            None => servers,
        }
    }
}

impl Report {
    /// An empty report; prints the baselines and the table header.
    pub fn new(cli: &Cli, load: Load, baselines: Baselines) -> Report {
        println!(
            "model {:?}, {load:?}, {} input(s) per request, batch.max_size {}, {:?} per worker count, client {:?}",
            cli.model, cli.inputs_per_request, cli.max_batch_size, cli.duration, cli.client
        );
        println!(
            "baselines: bare model {:.1} inputs/s at batch {}; plain NATS echo {:.0} requests/s (p50 {:.3} ms)",
            baselines.model_inputs_per_s,
            baselines.model_batch_size,
            baselines.nats_echo_requests_per_s,
            baselines.nats_echo_p50_ms
        );
        println!();
        for echo in baselines
            .nats_echo
            .iter()
            .filter(|_| baselines.nats_echo.len() > 1)
        {
            println!(
                "plain NATS echo at {} in flight: {:.0} requests/s (p50 {:.3} ms)",
                echo.concurrency, echo.requests_per_s, echo.p50_ms
            );
        }
        for echo in &baselines.process_echo {
            println!(
                "plain NATS echo, responder in a process of its own, at {} in flight: {:.0} requests/s (p50 {:.3} ms)",
                echo.concurrency, echo.requests_per_s, echo.p50_ms
            );
        }
        for echo in &baselines.client_echo {
            println!(
                "client echo (producer library, pre-encoded replies) at {} in flight: {:.0} requests/s (p50 {:.3} ms)",
                echo.concurrency, echo.requests_per_s, echo.p50_ms
            );
        }
        println!("| workers | nats | in flight | requests/s | inputs/s | p50 ms | p90 ms | p99 ms | max ms | mean batch | errors | efficiency | vs NATS echo | vs echo process | vs client echo |");
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        Report {
            model: cli.model,
            model_path: cli.model_path.display().to_string(),
            device: cli.device.clone(),
            dtype: cli.dtype.clone(),
            load,
            client: cli.client,
            inputs_per_request: cli.inputs_per_request,
            duration_s: cli.duration.as_secs_f64(),
            max_batch_size: cli.max_batch_size,
            baselines,
            overload: cli.overload,
            runs: Vec::new(),
            pids: Vec::new(),
        }
    }

    /// Fills in the ratios and prints the run's row.
    pub fn print_row(&self, run: &Run) {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {:.0}% | {:.2}× | {} | {} |",
            run.workers,
            run.bus(),
            match run.load {
                Load::Closed { concurrency } => concurrency.to_string(),
                Load::Open { rate } => format!("{rate}/s"),
            },
            run.requests_per_s,
            run.inputs_per_s,
            run.p50_ms,
            run.p90_ms,
            run.p99_ms,
            run.max_ms,
            // JetStream processors have no service endpoint to report batches through.
            if run.mean_batch_size > 0.0 {
                format!("{:.1}", run.mean_batch_size)
            } else {
                "n/a".to_string()
            },
            run.errors,
            self.efficiency(run) * 100.0,
            self.vs_echo(run),
            ratio_cell(self.vs_process_echo(run)),
            ratio_cell(self.vs_client_echo(run)),
        );
        if let (Some(_), Load::Open { rate }) = (self.overload, run.load) {
            let offered = run.requests + run.errors;
            println!(
                "overload: {offered} requests offered at {rate}/s: {} ok, {} overloaded (503), {} other errors, {} no reply; processors' peak RSS {:.0} MiB",
                run.requests,
                run.overloaded,
                run.errors - run.overloaded - run.no_reply,
                run.no_reply,
                run.peak_rss_mib
            );
        }
    }

    /// requests/s over the plain NATS echo at the same concurrency.
    fn vs_echo(&self, run: &Run) -> f64 {
        let concurrency = match run.load {
            Load::Closed { concurrency } => concurrency,
            Load::Open { .. } => 0,
        };
        run.requests_per_s / self.baselines.echo_at(concurrency).0.max(1e-9)
    }

    /// requests/s over the client echo at the same concurrency (0 when it was not measured
    /// there).
    fn vs_client_echo(&self, run: &Run) -> f64 {
        vs_measured(run, |concurrency| {
            self.baselines.client_echo_at(concurrency)
        })
    }

    /// requests/s over the echo process at the same concurrency (0 when it was not
    /// measured there).
    fn vs_process_echo(&self, run: &Run) -> f64 {
        vs_measured(run, |concurrency| {
            self.baselines.process_echo_at(concurrency)
        })
    }

    fn efficiency(&self, run: &Run) -> f64 {
        let ideal = if self.model.scales_with_workers() {
            self.baselines.model_inputs_per_s * run.workers as f64
        } else {
            self.baselines.model_inputs_per_s
        };
        run.inputs_per_s / ideal.max(1e-9)
    }

    /// Computes the ratios, writes the JSON and the plot.
    pub fn finish(mut self, cli: &Cli) -> anyhow::Result<()> {
        let bare = self.baselines.model_inputs_per_s.max(1e-9);
        for i in 0..self.runs.len() {
            let (efficiency, vs_echo, vs_client_echo, vs_process_echo) = (
                self.efficiency(&self.runs[i]),
                self.vs_echo(&self.runs[i]),
                self.vs_client_echo(&self.runs[i]),
                self.vs_process_echo(&self.runs[i]),
            );
            let run = &mut self.runs[i];
            run.efficiency = efficiency;
            run.vs_bare_model = run.inputs_per_s / bare;
            run.vs_nats_echo = vs_echo;
            run.vs_client_echo = vs_client_echo;
            run.vs_process_echo = vs_process_echo;
        }
        for run in self.runs.iter().filter(|r| r.errors > 0) {
            eprintln!(
                "{} worker(s): {} errors, e.g. {:?}",
                run.workers, run.errors, run.error_samples
            );
        }
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_string_pretty(&self)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        if let Some(path) = &cli.plot {
            self.plot(path)?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }

    /// Throughput (top) and p99 latency (bottom) against workers.
    fn plot(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (800, 700)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(350);
        let max_workers = self.runs.iter().map(|r| r.workers).max().unwrap_or(1) as f64;
        let x_range = 0.0..max_workers + 1.0;
        let series = |f: fn(&Run) -> f64| -> Vec<(f64, f64)> {
            self.runs.iter().map(|r| (r.workers as f64, f(r))).collect()
        };
        let panels = [
            (&top, "throughput", "inputs/s", series(|r| r.inputs_per_s)),
            (&bottom, "p99 latency", "ms", series(|r| r.p99_ms)),
        ];
        for (area, title, unit, points) in panels {
            let top_y = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-9;
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{title} by workers ({:?} model)", self.model),
                    ("sans-serif", 20),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(x_range.clone(), 0.0..top_y)?;
            chart
                .configure_mesh()
                .x_desc("workers")
                .y_desc(unit)
                .draw()?;
            chart.draw_series(LineSeries::new(points.clone(), &BLUE))?;
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
        }
        root.present()?;
        Ok(())
    }
}

/// (inputs, batches) summed over the processors answering `$SRV.STATS.{service}`.
pub async fn batch_counters(nats: &async_nats::Client, service: &str) -> (u64, u64) {
    let inbox = nats.new_inbox();
    let Ok(mut replies) = nats.subscribe(inbox.clone()).await else {
        return (0, 0);
    };
    if nats
        .publish_with_reply(format!("$SRV.STATS.{service}"), inbox, "".into())
        .await
        .is_err()
    {
        return (0, 0);
    }
    let (mut inputs, mut batches) = (0, 0);
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), replies.next()).await
    {
        let Ok(stats) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
            continue;
        };
        let data = &stats["endpoints"][0]["data"];
        inputs += data["inputs"].as_u64().unwrap_or(0);
        batches += data["batches"].as_u64().unwrap_or(0);
    }
    (inputs, batches)
}

/// A run's requests/s over the baseline `at` its closed-loop concurrency (0 when that
/// baseline was not measured there, or the load is open).
fn vs_measured<'a>(run: &Run, at: impl Fn(usize) -> Option<&'a EchoBaseline>) -> f64 {
    let Load::Closed { concurrency } = run.load else {
        return 0.0;
    };
    at(concurrency).map_or(0.0, |echo| {
        run.requests_per_s / echo.requests_per_s.max(1e-9)
    })
}

/// A ratio for the table; "n/a" where the baseline was not measured.
fn ratio_cell(ratio: f64) -> String {
    if ratio == 0.0 {
        "n/a".to_string()
    } else {
        format!("{ratio:.2}×")
    }
}
