//! The output cache: one entry per computed input, keyed by (task, options, input), bounded
//! in bytes. A request whose inputs were all seen before is answered without reaching the
//! model; one that repeats only some of them queues only the others. Entries are per
//! processor, and a processor serves one model, so the model is part of the key implicitly.
//!
//! Outputs are deterministic for a given model, options and input (batch invariance is
//! tested to 1e-5), so a cached output equals a computed one to within that.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use quick_cache::{Equivalent, Weighter};
use schemas::{InferOptions, Input, Output, Task};

/// What an entry costs beyond its texts and output: the key and value headers, the map's
/// slot and the policy's bookkeeping (measured order of magnitude, not exact).
const ENTRY_OVERHEAD: u64 = 160;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    task: Task,
    options: InferOptions,
    input: Input,
}

/// A key borrowed from a request, so a lookup copies no text. Hashes as [`Key`] does (same
/// fields, same order).
#[derive(Hash)]
struct KeyRef<'a> {
    task: Task,
    options: InferOptions,
    input: &'a Input,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.task == key.task && self.options == key.options && *self.input == key.input
    }
}

/// Bytes an entry holds, approximately: its texts, its output's numbers and strings, and a
/// fixed overhead.
#[derive(Debug, Clone, Copy)]
struct Bytes;

impl Weighter<Key, Output> for Bytes {
    fn weight(&self, key: &Key, output: &Output) -> u64 {
        ENTRY_OVERHEAD + key.input.len() as u64 + output_bytes(output)
    }
}

fn output_bytes(output: &Output) -> u64 {
    let bytes = match output {
        Output::Embedding { embedding } => embedding.len() * 4,
        Output::Score { .. } => 8,
        // Label names are shared with the model (`Arc<str>`): only the entries count.
        Output::Labels { labels } => labels.len() * 32,
        Output::FillMask(fill) => {
            fill.sequence.len() + fill.masks.iter().map(|m| m.len() * 32 + 24).sum::<usize>()
        }
        Output::Text { text } => text.len(),
    };
    bytes as u64
}

/// Counters of the cache, for `/metrics` and `$SRV.STATS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Inputs answered from the cache.
    pub hits: u64,
    /// Inputs looked up and not found (they were computed).
    pub misses: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now (as weighed).
    pub bytes: u64,
    /// The most bytes it holds (`cache.max_bytes`).
    pub capacity: u64,
}

/// The processor's output cache (see the module's documentation).
pub struct OutputCache {
    entries: Cache<Key, Output, Bytes>,
    /// The tasks whose outputs are cached (in `Task::ALL` order).
    tasks: [bool; Task::ALL.len()],
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for OutputCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCache")
            .field("stats", &self.stats())
            .finish()
    }
}

impl OutputCache {
    /// A cache of at most `max_bytes` for the outputs of `tasks`.
    pub fn new(max_bytes: u64, tasks: &[Task]) -> Self {
        // quick_cache sizes its tables from an item estimate: a MiniLM embedding entry is
        // about 1.7 KB.
        let estimated_items = (max_bytes / 1700).clamp(16, 1 << 22) as usize;
        OutputCache {
            entries: Cache::with_weighter(estimated_items, max_bytes, Bytes),
            tasks: Task::ALL.map(|task| tasks.contains(&task)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether outputs of `task` are cached.
    pub fn caches(&self, task: Task) -> bool {
        self.tasks[crate::batcher::task_index(task)]
    }

    /// The cached output of `input`, if any (counted as a hit or a miss).
    pub fn get(&self, task: Task, options: &InferOptions, input: &Input) -> Option<Output> {
        let key = KeyRef {
            task,
            options: *options,
            input,
        };
        let found = self.entries.get(&key);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps a computed output (evicting others if the cache is full).
    pub fn insert(&self, task: Task, options: &InferOptions, input: &Input, output: &Output) {
        let key = Key {
            task,
            options: *options,
            input: input.clone(),
        };
        self.entries.insert(key, output.clone());
    }

    /// The counters now.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.len() as u64,
            bytes: self.entries.weight(),
            capacity: self.entries.capacity(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedding(value: f32, dims: usize) -> Output {
        Output::Embedding {
            embedding: vec![value; dims],
        }
    }

    #[test]
    fn hits_misses_and_keys_that_differ_in_task_options_or_text() {
        let cache = OutputCache::new(1 << 20, &[Task::Embed, Task::Rerank]);
        let options = InferOptions::default();
        let text = Input::from("a sentence");
        assert_eq!(cache.get(Task::Embed, &options, &text), None);
        cache.insert(Task::Embed, &options, &text, &embedding(0.5, 4));
        assert_eq!(
            cache.get(Task::Embed, &options, &text),
            Some(embedding(0.5, 4))
        );
        let unnormalised = InferOptions {
            normalize: Some(false),
            ..options
        };
        assert_eq!(cache.get(Task::Embed, &unnormalised, &text), None);
        assert_eq!(
            cache.get(Task::Embed, &options, &Input::from("A sentence")),
            None
        );
        let pair = Input::from(("a sentence", "b"));
        assert_eq!(cache.get(Task::Rerank, &options, &pair), None);
        assert!(cache.caches(Task::Rerank) && !cache.caches(Task::Classify));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 4, 1));
        assert_eq!(stats.bytes, ENTRY_OVERHEAD + 10 + 16);
    }

    #[test]
    fn eviction_keeps_the_bytes_under_the_bound() {
        // Entries of 160 + 4 + 1536 = 1700 bytes in a 64 KiB cache: at most 38 fit.
        let max_bytes = 64 * 1024;
        let cache = OutputCache::new(max_bytes, &[Task::Embed]);
        let options = InferOptions::default();
        for i in 0..1000 {
            let text = Input::from(format!("{i:04}"));
            cache.insert(Task::Embed, &options, &text, &embedding(i as f32, 384));
            assert!(
                cache.stats().bytes <= max_bytes,
                "after {i}: {:?}",
                cache.stats()
            );
        }
        let stats = cache.stats();
        assert!(stats.entries <= max_bytes / 1700, "{stats:?}");
        assert!(stats.entries >= 10, "{stats:?}");
        // Most entries were evicted (which ones is the cache's policy); what is held is right.
        let held = (0..1000)
            .filter_map(|i| {
                let output = cache.get(Task::Embed, &options, &Input::from(format!("{i:04}")))?;
                assert_eq!(output, embedding(i as f32, 384));
                Some(i)
            })
            .count();
        assert_eq!(held as u64, stats.entries);
    }
}
