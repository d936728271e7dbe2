use super::*;
use std::sync::Mutex;

use crate::model::{InputError, ModelInput, WarmUpPlan};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Tokens are characters, so a test says an input's length by its text.
struct CharCount;

impl Prepare for CharCount {
    fn prepare(
        &self,
        _task: Task,
        input: &Input,
        _options: &InferOptions,
    ) -> Result<Prepared, InputError> {
        let text = input.text();
        if text == "unpreparable" {
            return Err(InputError::new(ErrorCode::InvalidInput, "cannot prepare"));
        }
        Ok(Prepared::length_only(text.len()))
    }

    // On the runtime's thread: these tests run on paused time, which a blocking thread
    // would let run ahead.
    fn is_cheap(&self) -> bool {
        true
    }
}

/// Echoes; reports each batch's texts; fails inputs that say "fail", panics on "panic".
/// When gated, every batch waits for one permit from the test before it computes.
struct Recorder {
    batches: UnboundedSender<Vec<String>>,
    permits: Option<Arc<Mutex<UnboundedReceiver<()>>>>,
}

impl BatchModel for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn supports(&self, task: Task) -> bool {
        matches!(task, Task::Embed | Task::Classify)
    }
    fn preparer(&self) -> Arc<dyn Prepare> {
        Arc::new(CharCount)
    }
    fn run(&mut self, _task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        let texts: Vec<String> = inputs.iter().map(|i| i.text.to_string()).collect();
        if texts == ["warm up"] {
            // The batcher's own warm-up batch, before any test request.
            return vec![Ok(Output::Text {
                text: texts[0].clone(),
            })];
        }
        let _ = self.batches.send(texts);
        if let Some(permits) = &self.permits {
            permits.lock().unwrap().blocking_recv().expect("a permit");
        }
        if inputs.iter().any(|i| i.text == "panic") {
            panic!("asked to panic");
        }
        inputs
            .iter()
            .map(|input| match input.text {
                "fail" => Err(InputError::new(
                    ErrorCode::ModelFailed,
                    "cannot compute `fail`",
                )),
                text => Ok(Output::Text {
                    text: text.to_string(),
                }),
            })
            .collect()
    }
}

/// A batcher of [`Recorder`]s and the test's ends of their channels.
struct Harness {
    batcher: Batcher,
    batches: UnboundedReceiver<Vec<String>>,
    permits: UnboundedSender<()>,
}

impl Harness {
    async fn start(policy: BatchPolicy, workers: usize, gated: bool) -> Harness {
        let (batches_tx, batches) = unbounded_channel();
        let (permits, permits_rx) = unbounded_channel();
        let permits_rx = Arc::new(Mutex::new(permits_rx));
        let (batcher, _workers) = Batcher::start(policy, workers, move |_| {
            Ok(Recorder {
                batches: batches_tx.clone(),
                permits: gated.then(|| permits_rx.clone()),
            })
        })
        .await
        .unwrap();
        Harness {
            batcher,
            batches,
            permits,
        }
    }

    /// Sends a request in its own task.
    fn spawn(
        &self,
        items: &[&str],
        deadline: Option<Instant>,
    ) -> tokio::task::JoinHandle<Result<Completed, Refused>> {
        let batcher = self.batcher.clone();
        let inputs = texts(items);
        tokio::spawn(async move {
            batcher
                .infer(Task::Embed, inputs, InferOptions::default(), deadline)
                .await
        })
    }

    /// Sends an `embed` request of the given priority in its own task.
    fn spawn_priority(
        &self,
        items: &[&str],
        priority: Priority,
    ) -> tokio::task::JoinHandle<Result<Completed, Refused>> {
        self.spawn_task(Task::Embed, items, priority)
    }

    /// Sends a request for `task` of the given priority in its own task.
    fn spawn_task(
        &self,
        task: Task,
        items: &[&str],
        priority: Priority,
    ) -> tokio::task::JoinHandle<Result<Completed, Refused>> {
        let batcher = self.batcher.clone();
        let inputs = items.iter().map(|&t| Input::from(t)).collect();
        let meta = RequestMeta {
            priority,
            ..RequestMeta::default()
        };
        tokio::spawn(async move {
            batcher
                .infer_with(task, inputs, InferOptions::default(), meta)
                .await
        })
    }

    async fn infer(&self, items: &[&str]) -> Result<Completed, Refused> {
        self.batcher
            .infer(Task::Embed, texts(items), InferOptions::default(), None)
            .await
    }

    /// The texts of the next batch a worker started.
    async fn next_batch(&mut self) -> Vec<String> {
        self.batches.recv().await.expect("a batch started")
    }

    /// Yields until `n` inputs are queued (the spawned requests have arrived).
    async fn wait_queued(&self, n: u64) {
        while self.batcher.stats().queued.load(Ordering::Relaxed) != n {
            tokio::task::yield_now().await;
        }
    }

    /// Keeps the (gated) worker busy with a batch of its own, so that what is sent next
    /// queues; the request answers once that batch is released.
    async fn occupy_worker(&mut self) -> tokio::task::JoinHandle<Result<Completed, Refused>> {
        let busy = self.spawn(&["x"], None);
        assert_eq!(self.next_batch().await, ["x"]);
        busy
    }

    fn release(&self, batches: usize) {
        for _ in 0..batches {
            self.permits.send(()).unwrap();
        }
    }
}

fn policy(max_size: usize) -> BatchPolicy {
    BatchPolicy {
        length_grouping: false,
        ..BatchPolicy::new(max_size, 1000)
    }
}

/// Asserts that every request succeeded.
async fn assert_all_ok(
    requests: impl IntoIterator<Item = tokio::task::JoinHandle<Result<Completed, Refused>>>,
) {
    for request in requests {
        let result = request.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}

fn texts(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn text(output: &Output) -> &str {
    match output {
        Output::Text { text } => text,
        other => panic!("unexpected output {other:?}"),
    }
}

fn stat(batcher: &Batcher, counter: fn(&BatcherStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    counter(batcher.stats()).load(Ordering::Relaxed)
}

#[tokio::test(start_paused = true)]
async fn an_idle_worker_starts_at_once_with_what_is_queued() {
    let policy = BatchPolicy {
        max_latency: Duration::from_secs(3600),
        ..policy(8)
    };
    let harness = Harness::start(policy, 1, false).await;
    let started = Instant::now();
    let completed = harness.infer(&["a"]).await.unwrap();
    assert_eq!(text(&completed.outputs[0]), "a");
    assert_eq!(completed.batch_size, 1);
    // No timer fired: the batch of one left without waiting for company.
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn under_a_dispatch_hold_a_burst_reaches_the_idle_worker_as_one_batch() {
    let mut harness = Harness::start(policy(8), 1, false).await;
    let hold = harness.batcher.hold_dispatch();
    let requests: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|t| harness.spawn(&[t], None))
        .collect();
    // All three queue, and the idle worker is handed none of them while the hold lives.
    for _ in 0..10_000 {
        if stat(&harness.batcher, |s| &s.queued) == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(stat(&harness.batcher, |s| &s.queued), 3);
    assert!(harness.batches.try_recv().is_err());
    drop(hold);
    assert_eq!(harness.next_batch().await, ["a", "b", "c"]);
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().batch_size, 3);
    }
    // Without a hold, a request reaches the idle worker at once, alone.
    let completed = harness.infer(&["d"]).await.unwrap();
    assert_eq!(completed.batch_size, 1);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_finishes_a_batch_takes_the_next_at_once_even_under_a_hold() {
    let mut harness = Harness::start(policy(8), 1, true).await;
    let busy = harness.occupy_worker().await;
    let hold = harness.batcher.hold_dispatch();
    let queued = harness.spawn(&["q"], None);
    harness.wait_queued(1).await;
    // The hold keeps idle workers from being handed work, not a worker that asks for it.
    harness.release(2);
    assert_eq!(harness.next_batch().await, ["q"]);
    assert_eq!(queued.await.unwrap().unwrap().batch_size, 1);
    assert!(busy.await.unwrap().is_ok());
    drop(hold);
}

#[tokio::test(start_paused = true)]
async fn while_the_worker_is_busy_inputs_accumulate_up_to_max_size() {
    let mut harness = Harness::start(policy(4), 1, true).await;
    let first = harness.spawn(&["a"], None);
    assert_eq!(harness.next_batch().await, ["a"]);
    let rest: Vec<_> = ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k"]
        .into_iter()
        .map(|t| harness.spawn(&[t], None))
        .collect();
    harness.wait_queued(10).await;
    harness.release(4);
    assert_eq!(harness.next_batch().await, ["b", "c", "d", "e"]);
    assert_eq!(harness.next_batch().await, ["f", "g", "h", "i"]);
    assert_eq!(harness.next_batch().await, ["j", "k"]);
    assert_eq!(first.await.unwrap().unwrap().batch_size, 1);
    for request in rest {
        assert!(request.await.unwrap().unwrap().batch_size >= 2);
    }
    assert_eq!(harness.batcher.stats().mean_batch_size(), 11.0 / 4.0);
}

#[tokio::test(start_paused = true)]
async fn a_batch_stops_at_max_tokens_padded_tokens() {
    let policy = BatchPolicy {
        max_tokens: 12,
        ..policy(8)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    let _busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    // Lengths 2, 2, 6, 2, 20: [2, 2] (adding the 6 would pad to 3 × 6 = 18), then
    // [6, 2] (2 × 6 = 12), then the 20 alone: longer than the bound, but still computed.
    let request = harness.spawn(&["bb", "cc", "dddddd", "ee", &"f".repeat(20)], None);
    harness.wait_queued(5).await;
    harness.release(4);
    assert_eq!(harness.next_batch().await, ["bb", "cc"]);
    assert_eq!(harness.next_batch().await, ["dddddd", "ee"]);
    assert_eq!(harness.next_batch().await, ["f".repeat(20)]);
    let completed = request.await.unwrap().unwrap();
    assert_eq!(completed.outputs.len(), 5);
    // Padded positions: 1 + 2×2 + 2×6 + 20 = 37, of which 1 + 4 + 8 + 20 = 33 were tokens.
    assert_eq!(stat(&harness.batcher, |s| &s.padded_tokens), 37);
    assert_eq!(stat(&harness.batcher, |s| &s.tokens), 33);
}

#[tokio::test(start_paused = true)]
async fn min_size_waits_for_company_until_max_latency() {
    let policy = BatchPolicy {
        min_size: 3,
        max_latency: Duration::from_millis(50),
        ..policy(8)
    };
    let mut harness = Harness::start(policy, 1, false).await;
    let started = Instant::now();
    let first = harness.spawn(&["a"], None);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = harness.spawn(&["b"], None);
    assert_eq!(first.await.unwrap().unwrap().batch_size, 2);
    assert_eq!(second.await.unwrap().unwrap().batch_size, 2);
    // Closed by the latency bound, 50 ms after the first input, not after the second.
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    assert_eq!(harness.next_batch().await, ["a", "b"]);

    // Three inputs reach min_size: they start without waiting.
    let started = Instant::now();
    let completed = harness.infer(&["c", "d", "e"]).await.unwrap();
    assert_eq!(completed.batch_size, 3);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn min_size_does_not_wait_when_a_batch_is_full_by_tokens() {
    let policy = BatchPolicy {
        min_size: 4,
        max_tokens: 10,
        max_latency: Duration::from_secs(3600),
        ..policy(8)
    };
    let harness = Harness::start(policy, 1, false).await;
    let started = Instant::now();
    // 6 and 12 tokens cannot share a batch of 10 tokens, and the 12 fills one alone:
    // waiting for more inputs could not make either batch larger.
    let completed = harness.infer(&["aaaaaa", "bbbbbbbbbbbb"]).await.unwrap();
    assert_eq!(completed.batch_size, 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn inputs_whose_deadline_passed_in_the_queue_are_not_computed() {
    let mut harness = Harness::start(policy(8), 1, true).await;
    let busy = harness.spawn(&["busy"], None);
    harness.next_batch().await;
    let doomed = harness.spawn(
        &["late1", "late2"],
        Some(Instant::now() + Duration::from_millis(10)),
    );
    let patient = harness.spawn(&["patient"], Some(Instant::now() + Duration::from_secs(60)));
    harness.wait_queued(3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    harness.release(2);
    // Only the request whose deadline has not passed reaches the model.
    assert_eq!(harness.next_batch().await, ["patient"]);
    let error = doomed.await.unwrap().unwrap_err();
    assert_eq!(error.kind, ErrorCode::Timeout);
    assert_eq!(error.kind.status(), 504);
    assert!(error.message.contains("not computed"), "{}", error.message);
    assert!(patient.await.unwrap().is_ok() && busy.await.unwrap().is_ok());
    assert_eq!(stat(&harness.batcher, |s| &s.expired), 1);
    assert_eq!(stat(&harness.batcher, |s| &s.inputs), 2);

    // A deadline already passed on arrival is refused without queueing.
    let error = harness
        .batcher
        .infer(
            Task::Embed,
            texts(&["x"]),
            InferOptions::default(),
            Some(Instant::now()),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorCode::Timeout);
    assert_eq!(stat(&harness.batcher, |s| &s.expired), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_new_requests_as_overloaded() {
    let policy = BatchPolicy {
        queue_capacity: 4,
        ..policy(2)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    let first = harness.spawn(&["a", "b"], None);
    assert_eq!(harness.next_batch().await.len(), 2); // the worker is now busy
    let queued = [
        harness.spawn(&["c", "d"], None),
        harness.spawn(&["e", "f"], None),
    ];
    harness.wait_queued(4).await;
    let refused = harness.infer(&["g"]).await.unwrap_err();
    assert_eq!(refused.kind, ErrorCode::Overloaded);
    assert_eq!(refused.kind.status(), 503);
    assert_eq!(stat(&harness.batcher, |s| &s.rejected), 1);
    harness.release(3);
    assert!(first.await.unwrap().is_ok());
    for request in queued {
        assert!(request.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn two_workers_take_batches_from_one_queue() {
    let mut harness = Harness::start(policy(1), 2, true).await;
    let slow = harness.spawn(&["slow"], None);
    let fast = harness.spawn(&["fast"], None);
    // Both batches are computing at once, so they went to different workers.
    let mut started = vec![harness.next_batch().await, harness.next_batch().await];
    started.sort();
    assert_eq!(started, [["fast"], ["slow"]]);
    assert_eq!(stat(&harness.batcher, |s| &s.in_flight), 2);
    harness.release(1);
    // One worker is free again; it takes the next batch while the other still computes.
    let one = harness.spawn(&["next"], None);
    assert_eq!(harness.next_batch().await, ["next"]);
    harness.release(2);
    for request in [slow, fast, one] {
        assert!(request.await.unwrap().is_ok());
    }
    assert_eq!(stat(&harness.batcher, |s| &s.batches), 3);
}

#[tokio::test(start_paused = true)]
async fn length_grouping_batches_similar_lengths_and_serves_the_oldest_first() {
    let policy = BatchPolicy {
        length_grouping: true,
        ..policy(3)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    let _busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    let long = "l".repeat(10);
    let items = [long.as_str(), "s1", &long, "s2", &long, "s3", "s4"];
    let request = harness.spawn(&items, None);
    harness.wait_queued(7).await;
    harness.release(4);
    // The oldest input is long, so the long ones go first, then the short ones in order.
    assert_eq!(
        harness.next_batch().await,
        [long.clone(), long.clone(), long.clone()]
    );
    assert_eq!(harness.next_batch().await, ["s1", "s2", "s3"]);
    assert_eq!(harness.next_batch().await, ["s4"]);
    let completed = request.await.unwrap().unwrap();
    let got: Vec<&str> = completed.outputs.iter().map(text).collect();
    assert_eq!(got, items, "outputs keep the request's order");
    // No padding at all after the first batch of one.
    assert_eq!(harness.batcher.stats().padding_ratio(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn length_grouping_never_passes_over_the_oldest_input() {
    let policy = BatchPolicy {
        length_grouping: true,
        ..policy(2)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    let _busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    let long = "l".repeat(30);
    let old = harness.spawn(&[&long], None);
    harness.wait_queued(1).await;
    let shorts = harness.spawn(&["a", "b", "c", "d", "e"], None);
    harness.wait_queued(6).await;
    harness.release(4);
    let first = harness.next_batch().await;
    assert!(
        first.contains(&long),
        "the oldest input goes next: {first:?}"
    );
    assert!(old.await.unwrap().is_ok() && shorts.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_multi_input_request_is_split_over_batches_and_keeps_its_order() {
    let mut harness = Harness::start(policy(4), 1, true).await;
    let _busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    let inputs: Vec<String> = (0..10).map(|i| format!("in{i}")).collect();
    let small = harness.spawn(&["y", "z"], None);
    harness.wait_queued(2).await;
    let big = harness.spawn(&inputs.iter().map(String::as_str).collect::<Vec<_>>(), None);
    harness.wait_queued(12).await;
    harness.release(4);
    let big = big.await.unwrap().unwrap();
    let got: Vec<&str> = big.outputs.iter().map(text).collect();
    assert_eq!(got, inputs.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(big.batch_size, 4);
    assert_eq!(small.await.unwrap().unwrap().batch_size, 4);
    // The first batch is shared by both requests.
    assert_eq!(harness.next_batch().await, ["y", "z", "in0", "in1"]);
}

#[tokio::test(start_paused = true)]
async fn one_failing_input_fails_only_its_own_request() {
    let mut harness = Harness::start(policy(8), 1, true).await;
    let _busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    let a = harness.spawn(&["ok1"], None);
    let b = harness.spawn(&["x", "fail", "y"], None);
    let c = harness.spawn(&["ok2"], None);
    harness.wait_queued(5).await;
    harness.release(2);
    assert_eq!(harness.next_batch().await.len(), 5);
    assert_eq!(text(&a.await.unwrap().unwrap().outputs[0]), "ok1");
    assert_eq!(text(&c.await.unwrap().unwrap().outputs[0]), "ok2");
    let error = b.await.unwrap().unwrap_err();
    assert_eq!(error.kind, ErrorCode::ModelFailed);
    assert_eq!(error.kind.status(), 500);
    assert!(error.message.starts_with("input 1:"), "{}", error.message);
}

#[tokio::test(start_paused = true)]
async fn inputs_that_cannot_be_prepared_fail_before_queueing() {
    let mut harness = Harness::start(policy(8), 1, false).await;
    let error = harness.infer(&["fine", "unpreparable"]).await.unwrap_err();
    assert_eq!(error.kind, ErrorCode::InvalidInput);
    assert_eq!(error.message, "input 1: cannot prepare");
    assert_eq!(stat(&harness.batcher, |s| &s.batches), 0);
    assert!(harness.batches.try_recv().is_err(), "the model saw nothing");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_model_fails_its_batch_and_keeps_serving() {
    let harness = Harness::start(policy(1), 1, false).await;
    let error = harness.infer(&["panic"]).await.unwrap_err();
    assert_eq!(error.kind, ErrorCode::ModelFailed);
    let after = harness.infer(&["fine"]).await;
    assert_eq!(text(&after.unwrap().outputs[0]), "fine");
}

#[tokio::test(start_paused = true)]
async fn unsupported_tasks_are_refused_before_queueing() {
    let harness = Harness::start(policy(4), 1, false).await;
    let error = harness
        .batcher
        .infer(Task::FillMask, texts(&["a"]), InferOptions::default(), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind, ErrorCode::UnsupportedTask);
    assert_eq!(stat(&harness.batcher, |s| &s.batches), 0);
}

#[tokio::test(start_paused = true)]
async fn queue_wait_and_compute_times_are_recorded() {
    let mut harness = Harness::start(policy(4), 1, true).await;
    let busy = harness.spawn(&["x"], None);
    harness.next_batch().await;
    let waiting = harness.spawn(&["y"], None);
    harness.wait_queued(1).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    harness.release(2);
    assert!(busy.await.unwrap().is_ok() && waiting.await.unwrap().is_ok());
    let stats = harness.batcher.stats();
    assert_eq!(stats.queue_wait.count(), 2);
    // One input waited 0 s, the other the 30 ms the worker was held.
    assert!((stats.queue_wait.sum() - 0.030).abs() < 0.001);
    assert_eq!(stats.compute.count(), 2);
}

/// A model that only records the warm-up it was asked for (or fails it, or panics in it).
struct WarmUpProbe {
    plans: UnboundedSender<WarmUpPlan>,
    outcome: &'static str,
}

impl BatchModel for WarmUpProbe {
    fn name(&self) -> &str {
        "probe"
    }
    fn supports(&self, task: Task) -> bool {
        task == Task::Embed
    }
    fn preparer(&self) -> Arc<dyn Prepare> {
        Arc::new(CharCount)
    }
    fn run(&mut self, _: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        inputs
            .iter()
            .map(|i| {
                Ok(Output::Text {
                    text: i.text.into(),
                })
            })
            .collect()
    }
    fn warm_up(&mut self, plan: &WarmUpPlan) -> anyhow::Result<usize> {
        let _ = self.plans.send(*plan);
        match self.outcome {
            "panic" => panic!("cudarc: Unable to dynamically load the \"cuda\" shared library"),
            "fail" => anyhow::bail!("the warm-up batch failed"),
            _ => Ok(3),
        }
    }
}

async fn start_probe(
    policy: BatchPolicy,
    workers: usize,
    outcome: &'static str,
) -> (anyhow::Result<Batcher>, Vec<WarmUpPlan>) {
    let (plans_tx, mut plans_rx) = unbounded_channel();
    let started = Batcher::start(policy, workers, move |_| {
        Ok(WarmUpProbe {
            plans: plans_tx.clone(),
            outcome,
        })
    })
    .await
    .map(|(batcher, _workers)| batcher);
    let mut plans = Vec::new();
    while let Ok(plan) = plans_rx.try_recv() {
        plans.push(plan);
    }
    (started, plans)
}

#[tokio::test]
async fn every_replica_is_warmed_up_with_the_policys_shapes_before_start_returns() {
    let policy = BatchPolicy {
        max_tokens: 4096,
        warm_up_shapes: true,
        ..policy(16)
    };
    let (started, plans) = start_probe(policy, 3, "ok").await;
    let batcher = started.unwrap();
    let expected = WarmUpPlan {
        shapes: true,
        max_batch: 16,
        max_tokens: 4096,
    };
    assert_eq!(plans, vec![expected; 3]);
    assert_eq!(
        text(
            &batcher
                .infer(Task::Embed, texts(&["a"]), InferOptions::default(), None)
                .await
                .unwrap()
                .outputs[0]
        ),
        "a"
    );
}

#[tokio::test]
async fn a_failed_or_panicking_warm_up_fails_the_start_with_its_reason() {
    let (started, _) = start_probe(policy(4), 1, "fail").await;
    let error = format!("{:#}", started.err().expect("start fails"));
    assert!(error.contains("the warm-up batch failed"), "{error}");

    let (started, _) = start_probe(policy(4), 2, "panic").await;
    let error = format!("{:#}", started.err().expect("start fails"));
    assert!(
        error.contains("panicked while loading its model"),
        "{error}"
    );
    assert!(
        error.contains("Unable to dynamically load the \"cuda\" shared library"),
        "{error}"
    );
}

#[tokio::test]
async fn health_flags_follow_the_queue_actor_and_the_workers() {
    let (batches, _) = unbounded_channel();
    let (batcher, workers) = Batcher::start(policy(4), 2, move |_| {
        Ok(Recorder {
            batches: batches.clone(),
            permits: None,
        })
    })
    .await
    .unwrap();
    let stats = batcher.stats().clone();
    assert!(stats.can_compute());
    assert_eq!(stats.workers_alive.load(Ordering::Relaxed), 2);
    // The last handle gone: the actor ends, then the workers.
    drop(batcher);
    tokio::task::spawn_blocking(move || workers.join())
        .await
        .unwrap();
    assert_eq!(stats.workers_alive.load(Ordering::Relaxed), 0);
    assert!(!stats.queue_alive.load(Ordering::Relaxed));
    assert!(!stats.can_compute());
}

// Real time: the pace is measured by the worker thread's clock.
#[tokio::test]
async fn a_queue_holding_more_work_than_max_queue_wait_refuses_as_overloaded() {
    let policy = BatchPolicy {
        max_queue_wait: Duration::from_millis(100),
        ..policy(2)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    // Teach the pace: one batch of 2 inputs held for 40 ms (at least 20 ms per input).
    let first = harness.spawn(&["a", "b"], None);
    assert_eq!(harness.next_batch().await.len(), 2);
    tokio::time::sleep(Duration::from_millis(40)).await;
    harness.release(1);
    assert!(first.await.unwrap().is_ok());
    let pace = harness
        .batcher
        .stats()
        .pace()
        .expect("a pace after one batch");
    assert!(pace >= Duration::from_millis(20), "{pace:?}");

    // The worker is busy; 6 queued inputs are at least 120 ms of work: a seventh is refused.
    let busy = harness.spawn(&["x", "y"], None);
    harness.next_batch().await;
    let queued = harness.spawn(&["c", "d", "e", "f", "g", "h"], None);
    harness.wait_queued(6).await;
    let refused = harness.infer(&["i"]).await.unwrap_err();
    assert_eq!(refused.kind, ErrorCode::Overloaded);
    assert!(
        refused.message.contains("batch.max_queue_wait_ms"),
        "{}",
        refused.message
    );
    assert_eq!(stat(&harness.batcher, |s| &s.rejected_wait), 1);
    harness.release(8);
    assert!(busy.await.unwrap().is_ok() && queued.await.unwrap().is_ok());
}

/// Spawns one request of `items` on `batcher`.
fn spawn_on(
    batcher: &Batcher,
    items: &[&str],
) -> tokio::task::JoinHandle<Result<Completed, Refused>> {
    let batcher = batcher.clone();
    let inputs = texts(items);
    tokio::spawn(async move {
        batcher
            .infer(Task::Embed, inputs, InferOptions::default(), None)
            .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_end_when_the_last_handle_goes_with_abandoned_inputs_queued() {
    let (batches_tx, mut batches) = unbounded_channel();
    let (permits, permits_rx) = unbounded_channel();
    let permits_rx = Arc::new(Mutex::new(permits_rx));
    let (batcher, workers) = Batcher::start(policy(1), 1, move |_| {
        Ok(Recorder {
            batches: batches_tx.clone(),
            permits: Some(permits_rx.clone()),
        })
    })
    .await
    .unwrap();
    let busy = spawn_on(&batcher, &["busy"]);
    assert_eq!(batches.recv().await.unwrap(), ["busy"]);
    // Two more requests queued behind it; then every caller gives up (their tasks, and the
    // batcher handles they hold, are dropped) while the worker is still computing.
    let abandoned = [
        spawn_on(&batcher, &["left1"]),
        spawn_on(&batcher, &["left2"]),
    ];
    while batcher.stats().queued.load(Ordering::Relaxed) != 2 {
        tokio::task::yield_now().await;
    }
    for request in abandoned.iter().chain([&busy]) {
        request.abort();
    }
    drop(batcher);
    // Let the actor see the close while the worker is still busy: the worker then finds the
    // queue finished by itself, with the actor asleep.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        permits.send(()).unwrap();
    }
    // The worker computes what was queued, finds the queue finished, and ends. (Joined on a
    // thread of its own: a worker that never ends must fail the test, not hang it.)
    let (joined_tx, joined) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        workers.join();
        let _ = joined_tx.send(());
    });
    let joined = tokio::task::spawn_blocking(move || joined.recv_timeout(Duration::from_secs(10)));
    assert!(
        joined.await.unwrap().is_ok(),
        "the worker did not end after the last batcher handle was dropped"
    );
}

/// A model that says when it is dropped.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl BatchModel for DropFlag {
    fn name(&self) -> &str {
        "drop-flag"
    }
    fn supports(&self, _: Task) -> bool {
        true
    }
    fn preparer(&self) -> Arc<dyn Prepare> {
        Arc::new(CharCount)
    }
    fn run(&mut self, task: Task, inputs: &[ModelInput<'_>]) -> Vec<Result<Output, InputError>> {
        crate::model::EchoModel.run(task, inputs)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_ends_the_workers_that_did_load() {
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = dropped.clone();
    let started = Batcher::start(policy(4), 2, move |index| match index {
        0 => Ok(DropFlag(flag.clone())),
        _ => {
            // Worker 0 is serving by now.
            std::thread::sleep(Duration::from_millis(100));
            anyhow::bail!("replica {index} could not load")
        }
    })
    .await;
    let error = started.err().expect("the start fails");
    assert!(error.to_string().contains("could not load"), "{error}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dropped.load(Ordering::Relaxed) {
        assert!(
            std::time::Instant::now() < deadline,
            "the loaded replica's model was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn interactive_inputs_go_first_and_bulk_fills_the_rest_of_the_batch() {
    let mut harness = Harness::start(policy(4), 1, true).await;
    let busy = harness.occupy_worker().await;
    // A bulk flood, then one interactive request of the same length, then a longer one.
    let bulk: Vec<_> = (0..10)
        .map(|_| harness.spawn_priority(&["b"], Priority::Bulk))
        .collect();
    harness.wait_queued(10).await;
    let interactive = harness.spawn_priority(&["i"], Priority::Interactive);
    harness.wait_queued(11).await;
    harness.release(1);
    // The interactive input leads; bulk inputs no longer than it fill the batch.
    assert_eq!(harness.next_batch().await, ["i", "b", "b", "b"]);
    let long = harness.spawn_priority(&["long"], Priority::Interactive);
    harness.wait_queued(8).await;
    harness.release(1);
    // A longer interactive input: short bulk inputs ride along (no extra padding).
    assert_eq!(harness.next_batch().await, ["long", "b", "b", "b"]);
    // No interactive input waits: bulk is served.
    harness.release(3);
    assert_eq!(harness.next_batch().await, ["b", "b", "b", "b"]);
    assert!(interactive.await.unwrap().is_ok() && long.await.unwrap().is_ok());
    assert!(busy.await.unwrap().is_ok());
    assert_all_ok(bulk).await;
}

#[tokio::test(start_paused = true)]
async fn bulk_that_waited_bulk_max_wait_goes_ahead_of_interactive() {
    let mut harness = Harness::start(policy(2), 1, true).await;
    let busy = harness.occupy_worker().await;
    let bulk = harness.spawn_priority(&["bulk"], Priority::Bulk);
    harness.wait_queued(1).await;
    tokio::time::advance(harness.batcher.policy.bulk_max_wait).await;
    let interactive: Vec<_> = ["i", "j", "k"]
        .into_iter()
        .map(|t| harness.spawn_priority(&[t], Priority::Interactive))
        .collect();
    harness.wait_queued(4).await;
    harness.release(3);
    // The bulk input has waited its bound: it leads the next batch, and an interactive input
    // (shorter) rides along.
    assert_eq!(harness.next_batch().await, ["bulk", "i"]);
    assert_eq!(harness.next_batch().await, ["j", "k"]);
    assert!(bulk.await.unwrap().is_ok() && busy.await.unwrap().is_ok());
    assert_all_ok(interactive).await;
}

#[tokio::test(start_paused = true)]
async fn once_bulk_waited_its_bound_bulk_and_interactive_take_turns() {
    let mut harness = Harness::start(policy(2), 1, true).await;
    let busy = harness.occupy_worker().await;
    let bulk: Vec<_> = (0..10)
        .map(|_| harness.spawn_priority(&["b"], Priority::Bulk))
        .collect();
    harness.wait_queued(10).await;
    tokio::time::advance(harness.batcher.policy.bulk_max_wait).await;
    let interactive = harness.spawn_priority(&["i"], Priority::Interactive);
    harness.wait_queued(11).await;
    harness.release(7);
    // Every bulk input has waited its bound now, yet the interactive input waits for one
    // bulk batch only: the lanes take turns, they do not drain the bulk backlog first.
    assert_eq!(harness.next_batch().await, ["b", "b"]);
    assert_eq!(harness.next_batch().await, ["i", "b"]);
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.extend(harness.next_batch().await);
    }
    assert_eq!(rest, vec!["b"; 7]);
    assert!(interactive.await.unwrap().is_ok() && busy.await.unwrap().is_ok());
    assert_all_ok(bulk).await;
}

#[tokio::test(start_paused = true)]
async fn aged_bulk_of_one_task_takes_turns_with_interactive_inputs_of_another() {
    let mut harness = Harness::start(policy(2), 1, true).await;
    let busy = harness.occupy_worker().await;
    // A bulk backlog of `classify`, all of it past its bound, and interactive `embed`.
    let bulk: Vec<_> = (0..8)
        .map(|_| harness.spawn_task(Task::Classify, &["b"], Priority::Bulk))
        .collect();
    harness.wait_queued(8).await;
    tokio::time::advance(harness.batcher.policy.bulk_max_wait).await;
    let interactive: Vec<_> = ["i", "j"]
        .into_iter()
        .map(|t| harness.spawn_priority(&[t], Priority::Interactive))
        .collect();
    harness.wait_queued(10).await;
    harness.release(7);
    // The other task's bulk is older, yet the lanes alternate across tasks too.
    assert_eq!(harness.next_batch().await, ["b", "b"]);
    assert_eq!(harness.next_batch().await, ["i", "j"]);
    for _ in 0..3 {
        assert_eq!(harness.next_batch().await, ["b", "b"]);
    }
    assert_all_ok(interactive.into_iter().chain(bulk)).await;
    assert!(busy.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_bulk_request_larger_than_the_bulk_share_enters_a_queue_without_bulk() {
    let policy = BatchPolicy {
        queue_capacity: 8,
        ..policy(8)
    };
    let mut harness = Harness::start(policy, 1, false).await;
    let large = harness
        .spawn_priority(&["a", "b", "c", "d", "e", "f", "g"], Priority::Bulk)
        .await
        .unwrap();
    assert!(large.is_ok(), "{large:?}");
    assert_eq!(harness.next_batch().await.len(), 7);
}

#[tokio::test(start_paused = true)]
async fn bulk_fills_at_most_three_quarters_of_the_queue() {
    let policy = BatchPolicy {
        queue_capacity: 8,
        ..policy(2)
    };
    let mut harness = Harness::start(policy, 1, true).await;
    let busy = harness.occupy_worker().await;
    let bulk: Vec<_> = (0..6)
        .map(|_| harness.spawn_priority(&["b"], Priority::Bulk))
        .collect();
    harness.wait_queued(6).await;
    let refused = harness
        .spawn_priority(&["b"], Priority::Bulk)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.kind, ErrorCode::Overloaded);
    assert!(
        refused.message.contains("share for bulk"),
        "{}",
        refused.message
    );
    let refused_early = harness.batcher.refuses_now(None, Priority::Bulk);
    assert!(matches!(refused_early, Some((Busy::Full, _))));
    assert!(harness
        .batcher
        .refuses_now(None, Priority::Interactive)
        .is_none());
    // Interactive requests still find room, up to the whole capacity.
    let interactive = harness.spawn_priority(&["i", "j"], Priority::Interactive);
    harness.wait_queued(8).await;
    let full = harness.infer(&["k"]).await.unwrap_err();
    assert!(full.message.starts_with("queue full"), "{}", full.message);
    harness.release(8);
    assert!(interactive.await.unwrap().is_ok() && busy.await.unwrap().is_ok());
    assert_all_ok(bulk).await;
}

/// Real time, real threads: a simulated accelerator at 4 ms + 0.25 ms per input, batches of 8.
/// A bulk flood of 4,000 inputs (about 3 s of work) is queued; interactive requests sent one
/// after another meanwhile are answered about as fast as on an idle processor, and the flood
/// keeps draining while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_latency_stays_flat_during_a_bulk_flood_and_bulk_progresses() {
    use crate::model::SimModel;
    let model = SimModel::new(Duration::from_millis(4), Duration::from_micros(250));
    let full_batch = model.batch_time(8);
    let policy = BatchPolicy::new(8, 16384);
    let (batcher, _workers) = Batcher::start(policy, 1, move |_| Ok(model.clone()))
        .await
        .unwrap();
    let send = |priority: Priority, inputs: Vec<Input>| {
        let batcher = batcher.clone();
        let meta = RequestMeta {
            priority,
            ..RequestMeta::default()
        };
        async move {
            batcher
                .infer_with(Task::Embed, inputs, InferOptions::default(), meta)
                .await
        }
    };
    let latencies = |n: usize| async move {
        let mut latencies = Vec::with_capacity(n);
        for i in 0..n {
            let started = Instant::now();
            let input = Input::from(format!("interactive {i}"));
            send(Priority::Interactive, vec![input]).await.unwrap();
            latencies.push(started.elapsed());
        }
        latencies.sort();
        latencies
    };
    let idle = latencies(30).await;

    let bulk_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood: Vec<_> = (0..400)
        .map(|r| {
            let inputs = (0..10)
                .map(|i| Input::from(format!("bulk {r} {i}")))
                .collect();
            let request = send(Priority::Bulk, inputs);
            let bulk_done = bulk_done.clone();
            tokio::spawn(async move {
                let result = request.await;
                bulk_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                result
            })
        })
        .collect();
    while batcher.stats().queued.load(Ordering::Relaxed) < 3000 {
        tokio::task::yield_now().await;
    }
    let before = bulk_done.load(std::sync::atomic::Ordering::Relaxed);
    // Interactive requests one after another for 1.5 s: past batch.bulk_max_wait (1 s), when
    // the oldest bulk inputs have waited their bound and bulk leads every other batch.
    let flood_started = Instant::now();
    let mut flooded = Vec::new();
    while flood_started.elapsed() < policy.bulk_max_wait.mul_f64(1.5) {
        flooded.extend(latencies(10).await);
    }
    flooded.sort();
    let after = bulk_done.load(std::sync::atomic::Ordering::Relaxed);
    let still_queued = batcher.stats().queued.load(Ordering::Relaxed);
    // Admission counts, for an interactive request, only what goes before it: one with a
    // 500 ms deadline is taken and answered; a bulk one behind the flood is refused at once.
    let deadline = Some(Instant::now() + Duration::from_millis(500));
    let interactive = RequestMeta {
        deadline,
        ..RequestMeta::default()
    };
    let input = || vec![Input::from("with a deadline")];
    let opts = InferOptions::default();
    batcher
        .infer_with(Task::Embed, input(), opts, interactive.clone())
        .await
        .expect("an interactive request with a deadline is served during the flood");
    let bulk = RequestMeta {
        priority: Priority::Bulk,
        ..interactive
    };
    let refused = batcher
        .infer_with(Task::Embed, input(), opts, bulk)
        .await
        .unwrap_err();
    assert_eq!(refused.kind, ErrorCode::Overloaded, "{}", refused.message);

    let median = |l: &[Duration]| l[l.len() / 2];
    let backlog = full_batch * (still_queued as u32 / 8);
    eprintln!(
        "interactive latency idle: median {:?} max {:?}; during the flood: median {:?} max {:?}; \
         bulk requests done meanwhile: {}; inputs still queued: {still_queued} (about {backlog:?} of work)",
        median(&idle),
        idle[idle.len() - 1],
        median(&flooded),
        flooded[flooded.len() - 1],
        after - before
    );
    // Flat: an interactive input waits at most for the batch in progress, then rides in the
    // next one; first in line, not behind thousands of bulk inputs.
    assert!(
        median(&flooded) <= median(&idle) + full_batch * 3,
        "median {:?} during the flood vs {:?} idle",
        median(&flooded),
        median(&idle)
    );
    assert!(flooded[flooded.len() - 1] < Duration::from_millis(250));
    assert!(
        backlog > Duration::from_millis(1000),
        "the flood was still queued"
    );
    // Bulk progressed meanwhile (it fills the seven other places of each batch).
    assert!(
        after > before,
        "no bulk request finished during the interactive phase"
    );
    for request in flood {
        assert!(request.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn cached_inputs_are_answered_without_the_model_and_only_misses_are_computed() {
    let mut harness = Harness::start(policy(8), 1, false).await;
    let cache = Arc::new(OutputCache::new(1 << 20, &[Task::Embed]));
    harness.batcher = harness.batcher.clone().with_cache(Some(cache.clone()));
    let first = harness.infer(&["a", "b"]).await.unwrap();
    assert_eq!(harness.next_batch().await, ["a", "b"]);
    // A request that repeats one input: only the other reaches the model.
    let second = harness.infer(&["c", "a"]).await.unwrap();
    assert_eq!(harness.next_batch().await, ["c"]);
    assert_eq!(second.outputs[1], first.outputs[0]);
    assert_eq!(text(&second.outputs[0]), "c");
    // Every input cached: answered at once, no batch (batch_size 0).
    let third = harness.infer(&["b", "c", "a"]).await.unwrap();
    assert_eq!(third.batch_size, 0);
    assert_eq!(
        third.outputs,
        vec![
            first.outputs[1].clone(),
            second.outputs[0].clone(),
            first.outputs[0].clone()
        ]
    );
    assert!(
        harness.batches.try_recv().is_err(),
        "no batch for cached inputs"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (4, 3, 3));
    let json = harness.batcher.stats().to_json();
    assert_eq!(json["cache"]["hits"], 4);
    assert!((json["cache"]["hit_rate"].as_f64().unwrap() - 4.0 / 7.0).abs() < 1e-9);
    // Other tasks are not cached; failed inputs are not kept.
    assert!(harness.infer(&["fail"]).await.is_err());
    assert_eq!(harness.next_batch().await, ["fail"]);
    assert!(harness.infer(&["fail"]).await.is_err());
    assert_eq!(harness.next_batch().await, ["fail"]);
}
