//! The configured BERT model called directly, without NATS, on its device: `processor bench`
//! (sentences/s by batch size: the bare-model figure the service is compared with) and
//! `processor dump` (token ids, hidden states, embeddings and fill-mask answers as JSON, for
//! comparing a device or a precision with a reference implementation).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::config::{AttentionImpl, DeviceKind, ModelConfig, ModelKind, Precision};
use crate::model::bert::{top_k_softmax, BertModel};
use crate::model::{BatchModel, WarmUpPlan};

/// `processor bench`: sentences/s of the embed path for each input set and batch size.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Input sets: a JSON object of named lists of sentences (as bench/inputs.json), or a text
    /// file with one sentence per line (set `lines`).
    #[arg(long, default_value = "bench/inputs.json")]
    pub inputs: PathBuf,
    /// Which sets of the JSON file to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub sets: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batch_sizes: Vec<usize>,
    /// Each (set, batch size) runs whole passes over its set for at least this long, after
    /// one warm-up pass.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub min_time: Duration,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The input set.
    pub set: String,
    /// Sentences per batch.
    pub batch: usize,
    /// Sentences per second over whole passes.
    pub sentences_per_s: f64,
    /// Mean time per batch, in milliseconds.
    pub ms_per_batch: f64,
    /// Mean length a batch is padded to, in tokens.
    pub mean_padded_len: f64,
}

/// What computed a report's figures: the checkpoint and how it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// The checkpoint's name (its directory).
    pub model: String,
    /// `cpu` or `cuda`.
    pub device: DeviceKind,
    /// `f32`, `f16` or `bf16`.
    pub dtype: Precision,
    /// `fused` or `explicit` (what `auto` stood for).
    pub attention: AttentionImpl,
}

impl Setup {
    fn of(config: &ModelConfig, model: &BertModel) -> Self {
        Setup {
            model: model.name().to_string(),
            device: config.device,
            dtype: config.dtype,
            attention: config.attention(),
        }
    }
}

/// What `processor bench` measured, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The checkpoint and how it ran.
    #[serde(flatten)]
    pub setup: Setup,
    /// Seconds to load the checkpoint (and warm it up as configured).
    pub load_s: f64,
    /// One row per (set, batch size).
    pub rows: Vec<BenchRow>,
}

/// Loads the configured BERT checkpoint on its first device, warmed up as configured.
pub fn load(config: &ModelConfig, max_batch: usize) -> anyhow::Result<BertModel> {
    anyhow::ensure!(
        config.kind == ModelKind::Bert,
        "model.kind is {:?}: bench and dump need a BERT checkpoint",
        config.kind
    );
    let mut model = crate::model::load_bert(config, 0)?;
    let plan = WarmUpPlan {
        shapes: config.warmup() == crate::config::WarmUp::Shapes,
        max_batch,
        max_tokens: usize::MAX,
    };
    model.warm_up(&plan)?;
    Ok(model)
}

/// Runs `processor bench`.
pub fn bench(config: &ModelConfig, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let sets = read_sets(&args.inputs, &args.sets)?;
    let started = Instant::now();
    let max_batch = args.batch_sizes.iter().copied().max().unwrap_or(1);
    let model = load(config, max_batch)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut report = BenchReport {
        setup: Setup::of(config, &model),
        load_s,
        rows: Vec::new(),
    };
    // Named as in the JSON and the configuration.
    let setup = serde_json::to_value(&report.setup)?;
    let name = |key: &str| setup[key].as_str().unwrap_or_default().to_string();
    println!(
        "{} on {} ({}, {} attention), loaded in {load_s:.1} s",
        report.setup.model,
        name("device"),
        name("dtype"),
        name("attention")
    );
    println!("| inputs | batch | sentences/s | ms/batch | mean padded length |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (set, texts) in &sets {
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| model.tokenizer().encode(t, true).map(|t| t.ids))
            .collect::<Result<_, _>>()
            .with_context(|| format!("tokenising set {set}"))?;
        for &batch in &args.batch_sizes {
            anyhow::ensure!(batch > 0, "--batch-sizes must be at least 1");
            let row = measure(&model, set, &ids, batch, args.min_time);
            println!(
                "| {} | {} | {:.1} | {:.2} | {:.1} |",
                row.set, row.batch, row.sentences_per_s, row.ms_per_batch, row.mean_padded_len
            );
            report.rows.push(row);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Whole passes over `ids` in consecutive batches of `batch` (each padded to its longest),
/// after one warm-up pass, until `min_time` has passed.
fn measure(
    model: &BertModel,
    set: &str,
    ids: &[Vec<u32>],
    batch: usize,
    min_time: Duration,
) -> BenchRow {
    let batches: Vec<Vec<&[u32]>> = ids
        .chunks(batch)
        .map(|chunk| chunk.iter().map(Vec::as_slice).collect())
        .collect();
    let normalize = vec![true; batch];
    let pass = || {
        for rows in &batches {
            model.embed(rows, &normalize[..rows.len()]);
        }
    };
    pass();
    let started = Instant::now();
    let mut passes = 0usize;
    while passes == 0 || started.elapsed() < min_time {
        pass();
        passes += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let padded: usize = batches
        .iter()
        .map(|rows| model.padded_len(rows.iter().map(|r| r.len()).max().unwrap_or(0)))
        .sum();
    BenchRow {
        set: set.to_string(),
        batch,
        sentences_per_s: (passes * ids.len()) as f64 / elapsed,
        ms_per_batch: elapsed * 1000.0 / (passes * batches.len()) as f64,
        mean_padded_len: padded as f64 / batches.len() as f64,
    }
}

/// `processor dump`: the model's outputs for some texts.
#[derive(Debug, Clone, clap::Args)]
pub struct DumpArgs {
    /// The texts: a JSON list of strings, or a text file with one per line.
    #[arg(long)]
    pub texts: PathBuf,
    /// Where to write the JSON.
    #[arg(long)]
    pub json: PathBuf,
    /// Candidates per `[MASK]` for texts that have one (checkpoints with a masked-LM head).
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
}

/// One text's outputs.
#[derive(Debug, Clone, Serialize)]
pub struct DumpItem {
    /// The text.
    pub text: String,
    /// Its token ids, `[CLS]` and `[SEP]` included (cut to the model's longest input).
    pub ids: Vec<u32>,
    /// Last hidden states of the text computed alone (no padding), `[len][hidden]`.
    pub hidden: Vec<Vec<f32>>,
    /// The sentence embedding (pooled, L2-normalised), computed in one padded batch with all
    /// the other texts.
    pub embedding: Vec<f32>,
    /// For each `[MASK]`: `[token id, probability]` of the `top_k` best, computed in one padded
    /// batch with the other masked texts.
    pub masks: Vec<Vec<(u32, f32)>>,
}

/// What `processor dump` writes.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    /// The checkpoint and how it ran.
    #[serde(flatten)]
    pub setup: Setup,
    /// One per text, in order.
    pub items: Vec<DumpItem>,
}

/// Runs `processor dump`.
pub fn dump(config: &ModelConfig, args: &DumpArgs) -> anyhow::Result<DumpReport> {
    let texts = read_texts(&args.texts)?;
    anyhow::ensure!(!texts.is_empty(), "{} holds no texts", args.texts.display());
    let model = load(config, texts.len())?;
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenizer().encode(t, true).map(|t| t.ids))
        .collect::<Result<_, _>>()?;
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let embeddings = model.embed(&rows, &vec![true; rows.len()]);
    let mask_id = model.tokenizer().mask_id();
    let positions: Vec<(usize, usize)> = ids
        .iter()
        .enumerate()
        .flat_map(|(row, ids)| {
            ids.iter()
                .enumerate()
                .filter(|&(_, &id)| Some(id) == mask_id)
                .map(move |(pos, _)| (row, pos))
        })
        .collect();
    let mut logits = if model.has_mlm_head() {
        model.mask_logits(&rows, &positions).unwrap_or_default()
    } else {
        Vec::new()
    }
    .into_iter();
    let mut items = Vec::with_capacity(texts.len());
    for (row, (text, embedding)) in texts.iter().zip(embeddings).enumerate() {
        let masks = positions
            .iter()
            .filter(|&&(r, _)| r == row)
            .filter_map(|_| logits.next())
            .map(|row| top_k_softmax(&row, args.top_k))
            .collect();
        items.push(DumpItem {
            text: text.clone(),
            hidden: model.hidden_states(&ids[row]),
            ids: ids[row].clone(),
            embedding,
            masks,
        });
    }
    let report = DumpReport {
        setup: Setup::of(config, &model),
        items,
    };
    std::fs::write(&args.json, serde_json::to_vec(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    Ok(report)
}

/// Named sentence sets: every list of strings in a JSON object (or those named in `only`), or
/// the lines of a text file as the set `lines`.
fn read_sets(path: &Path, only: &[String]) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sets: Vec<(String, Vec<String>)> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(name, value)| {
                let list = value.as_array()?;
                let texts: Option<Vec<String>> = list
                    .iter()
                    .map(|t| t.as_str().map(str::to_string))
                    .collect();
                Some((name, texts?))
            })
            .collect(),
        _ => vec![("lines".to_string(), lines(&text))],
    };
    let sets: Vec<_> = sets
        .into_iter()
        .filter(|(name, texts)| !texts.is_empty() && (only.is_empty() || only.contains(name)))
        .collect();
    anyhow::ensure!(
        !sets.is_empty(),
        "{} has no sentence set{}",
        path.display(),
        if only.is_empty() {
            String::new()
        } else {
            format!(" named {}", only.join(", "))
        }
    );
    Ok(sets)
}

/// A JSON list of strings, or the non-empty lines of a text file.
fn read_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(match serde_json::from_str::<Vec<String>>(&text) {
        Ok(texts) => texts,
        Err(_) => lines(&text),
    })
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}
