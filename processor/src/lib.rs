//! The processor: NATS service endpoints → batcher → model worker(s) → replies.
//!
//! Transport (`service`) and models (`model`) never import each other; the `batcher` is the
//! only meeting point, and it knows models only through the [`model::BatchModel`] trait.

pub mod bare;
pub mod batcher;
pub mod config;
mod jetstream;
pub mod model;
mod service;
pub mod stats;
pub mod telemetry;

pub use config::Config;
pub use service::{run, Processor, ProcessorHandle};
