//! Where requests come from: the core transport (a queue subscription per task, shown by
//! `$SRV` discovery as the service's endpoints) or the
//! JetStream transport (a durable work-queue stream). Both hand every message to the same
//! [`crate::pipeline::Pipeline`] and differ only in how messages arrive and are settled.

pub(crate) mod core;
pub(crate) mod discovery;
pub(crate) mod jetstream;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pipeline::Pipeline;

/// The intake a processor was configured with.
pub(crate) enum Intake {
    /// Queue subscriptions, one per task, in the queue group.
    Core(Box<core::Intake>),
    /// The durable pull consumer of the work-queue stream.
    JetStream(Box<jetstream::Intake>),
}

impl Intake {
    /// Takes requests until `stop`, then stops taking them and returns once the messages
    /// already delivered are handed over (the tasks that answer them tracked by `requests`).
    pub(crate) async fn serve(
        self,
        client: async_nats::Client,
        pipeline: Arc<Pipeline>,
        requests: TaskTracker,
        stop: CancellationToken,
    ) {
        match self {
            Intake::Core(intake) => intake.serve(pipeline, requests, stop).await,
            Intake::JetStream(intake) => intake.serve(client, pipeline, requests, stop).await,
        }
    }
}
