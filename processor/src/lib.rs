//! The processor: NATS intake → one request pipeline → scheduler → model worker(s) → replies.
//!
//! `transport` moves messages (core endpoints or the JetStream consumer), `request` turns a
//! message into work and a result into a reply (pure), `pipeline` is the path both
//! transports share (admission, compute, reply, counting), `batcher` schedules inputs onto
//! model workers, and `model` computes. Transports and models never import each other: the
//! batcher knows models only through the [`model::BatchModel`] trait.

pub mod bare;
pub mod batcher;
pub mod cache;
pub mod config;
mod lifecycle;
pub mod model;
mod pipeline;
mod request;
pub mod stats;
pub mod telemetry;
mod transport;

pub use config::Config;
pub use lifecycle::{run, Processor, ProcessorHandle};
