//! Task names and the subjects they are served on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Subject prefix used when a deployment does not choose its own.
pub const DEFAULT_SUBJECT_PREFIX: &str = "bert";

/// An inference task; each one is served on its own subject `{prefix}.{task}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One vector per input (sentence embedding).
    Embed,
    /// Predictions for every `[MASK]` token of each input.
    FillMask,
    /// A relevance score per (query, passage) pair, from a cross-encoder.
    Rerank,
    /// Labels with probabilities per input, from a sequence-classification head.
    Classify,
}

impl Task {
    /// Every task of the protocol, in a stable order.
    pub const ALL: [Task; 4] = [Task::Embed, Task::FillMask, Task::Rerank, Task::Classify];

    /// The task's name as it appears in subjects and documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::FillMask => "fill_mask",
            Task::Rerank => "rerank",
            Task::Classify => "classify",
        }
    }

    /// Whether the task's inputs are (query, passage) pairs rather than single texts.
    pub fn takes_pairs(self) -> bool {
        self == Task::Rerank
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task name that the protocol does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task `{0}`; known tasks: embed, fill_mask, rerank, classify")]
pub struct UnknownTask(pub String);

impl FromStr for Task {
    type Err = UnknownTask;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `fill-mask` is accepted too because that is how the CLI and HuggingFace spell it.
        match s {
            "embed" => Ok(Task::Embed),
            "fill_mask" | "fill-mask" => Ok(Task::FillMask),
            "rerank" => Ok(Task::Rerank),
            "classify" => Ok(Task::Classify),
            other => Err(UnknownTask(other.to_string())),
        }
    }
}

/// The subject a task is served on: `{prefix}.{task}`.
pub fn subject(prefix: &str, task: Task) -> String {
    format!("{prefix}.{}", task.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_build_subjects() {
        for task in Task::ALL {
            assert_eq!(task.as_str().parse::<Task>().unwrap(), task);
        }
        assert_eq!("fill-mask".parse::<Task>().unwrap(), Task::FillMask);
        assert_eq!(subject("bert", Task::FillMask), "bert.fill_mask");
        assert_eq!(subject("a.b", Task::Embed), "a.b.embed");
        assert_eq!(subject("bert", Task::Rerank), "bert.rerank");
        assert!(Task::Rerank.takes_pairs() && !Task::Classify.takes_pairs());
        let err = "translate".parse::<Task>().unwrap_err();
        assert!(err.to_string().contains("translate"));
    }
}
