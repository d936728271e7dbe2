//! The production shape for durable requests: three nats-servers clustered by routes, each
//! with its own JetStream store, the request stream and its consumer replicated on all three
//! (`jetstream.replicas = auto`, the default), two sim processors and a producer, every
//! setting at its default. Under load, a node is SIGKILLed (the one the processors and the
//! producer are attached to; the stream leader's) or all three are restarted one after
//! another: every request is answered, none is lost, the longest time without an answer stays
//! under 12 s (JetStream's election), and at most 1% of the requests need the producer's
//! re-send (their reply was lost with a node), plus those a near-10 s election outlasted at
//! the load's rate. Duplicates (a reply sent twice) are counted,
//! not forbidden. The tests take turns: two clusters at once on a 2-core machine would slow
//! each other's leader elections.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use producer::{ClientOptions, Transport};
use testkit::{ChildProcess, NatsCluster};

mod common;
use common::load::{
    assert_all_ok, cli_through_fault, client, longest_stall, open_loop, open_loop_while, processor,
    wait_for, ReplyCounter,
};

/// One cluster test at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STREAM: &str = "BERT_REQUESTS";
const CONSUMER: &str = "bert-processors";

/// The longest gap without answers allowed: JetStream's leader election (nats-server 2.9:
/// 4-9 s after the leader's last heartbeat, not configurable; 9.8 s the longest seen, with
/// the processors' next pull) and a margin for a slow machine. Above the producer's 10 s
/// timeout, an attempt caught by the whole election is re-sent (counted below).
const STALL_BOUND: Duration = Duration::from_secs(12);

/// One-input requests a second: about a fifth of what the two sim processors can take, so
/// a stall shows as a backlog, not as saturation.
const RATE: u64 = 500;

/// Which node leads the request stream and its consumer (server names `n1`...), once both
/// have 3 copies and a leader (an election may be under way: waited for, up to 20 s).
async fn leaders(url: &str) -> (String, String) {
    let nats = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let started = Instant::now();
    loop {
        let mut stream = jetstream.get_stream(STREAM).await.unwrap();
        let info = stream.info().await.unwrap().clone();
        let mut consumer = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(CONSUMER)
            .await
            .unwrap();
        let consumer_info = consumer.info().await.unwrap().clone();
        // A leader and two current followers.
        let leader = |cluster: Option<&async_nats::jetstream::stream::ClusterInfo>| {
            cluster
                .filter(|c| c.replicas.len() == 2)
                .and_then(|c| c.leader.clone())
        };
        if let (3, Some(stream_leader), Some(consumer_leader)) = (
            info.config.num_replicas,
            leader(info.cluster.as_ref()),
            leader(consumer_info.cluster.as_ref()),
        ) {
            return (stream_leader, consumer_leader);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stream and consumer not at 3 copies with a leader: {info:?}\n{consumer_info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints one fault's figures in the README's terms and checks them: every request
/// answered, no gap without answers beyond [`STALL_BOUND`], and at most 1% of the requests
/// sent twice by the producer (plus those an election near its top outlasted) (their reply was lost with a node, or the
/// election outlasted their attempt).
fn report(
    what: &str,
    outcomes: &[common::load::Outcome],
    client: &producer::Client,
    counter: &ReplyCounter,
    fault: Instant,
    processors: &[&ChildProcess],
) {
    let (median, slowest) = assert_all_ok(what, outcomes);
    let (stall, stall_began) = longest_stall(outcomes);
    let (inboxes, duplicates) = counter.counts();
    let timeout = ClientOptions::default().timeout;
    let resent = client.retries_sent() as usize;
    println!(
        "{what}: {n} of {n} answered, lost 0, {resent} after a re-send, duplicates seen \
         {duplicates} ({inboxes} inboxes seen), median {median:?}, slowest {slowest:?}, \
         longest stall {stall:?} (began {:?} after the fault)",
        stall_began.saturating_duration_since(fault),
        n = outcomes.len(),
    );
    assert!(
        stall < STALL_BOUND,
        "{what}: no answer for {stall:?} (the producer's timeout is {timeout:?}); the \
         processors' last log lines:\n{}",
        log_tails(processors),
    );
    // A lost reply costs a re-send: at most 1%. An election near its 9 s top also outlasts
    // the attempts of the requests sent in the last moment before the fault (they wait the
    // whole election, plus a store retry): allowed on top, at the load's rate.
    let outlasted = (stall + Duration::from_secs(1)).saturating_sub(timeout);
    let allowed = outcomes.len() / 100 + (outlasted.as_secs_f64() * RATE as f64) as usize;
    assert!(
        resent <= allowed,
        "{what}: {resent} of {} requests needed the producer's re-send ({allowed} allowed)",
        outcomes.len()
    );
}

/// The last lines each processor logged, to tell a stall's cause from a failed run.
fn log_tails(processors: &[&ChildProcess]) -> String {
    processors
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let log = p.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            format!("--- processor {i} ---\n{tail}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_the_processors_and_producer_are_attached_to_loses_nothing() {
    let _turn = TURN.lock().await;
    let mut cluster = NatsCluster::start(3);
    // Processors and producer are given node 1 only, and learn the others from the cluster.
    let mut first = processor(&cluster.node(0).url(), "jetstream", &[]);
    let mut second = processor(&cluster.node(0).url(), "jetstream", &[]);
    let (stream_leader, consumer_leader) = leaders(&cluster.node(1).url()).await;
    let counter = ReplyCounter::start(&cluster.node(2).url()).await;
    let client = client(&cluster.node(0).url(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = open_loop(&client, 3000, RATE, answered.clone());
    wait_for(&answered, 1000).await;
    cluster.node_mut(0).stop();
    let fault = Instant::now();
    let outcomes = load.await.unwrap();
    report(
        &format!(
            "SIGKILL of the processors' and producer's node n1 (stream leader \
             {stream_leader}, consumer leader {consumer_leader})"
        ),
        &outcomes,
        &client,
        &counter,
        fault,
        &[&first, &second],
    );
    // The same processes served before and after.
    for processor in [&mut first, &mut second] {
        assert!(processor.is_running(), "{}", processor.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leaders_node_loses_nothing() {
    let _turn = TURN.lock().await;
    let mut cluster = NatsCluster::start(3);
    // The stream is created by the first processor; its leader is then known.
    let probe = processor(&cluster.node(0).url(), "jetstream", &[]);
    let (stream_leader, consumer_leader) = leaders(&cluster.node(0).url()).await;
    let doomed = cluster.index_of(&stream_leader);
    // Processors on one of the other nodes, the producer on the third.
    let others: Vec<usize> = (0..3).filter(|&i| i != doomed).collect();
    drop(probe);
    let first = processor(&cluster.node(others[0]).url(), "jetstream", &[]);
    let second = processor(&cluster.node(others[0]).url(), "jetstream", &[]);
    let counter = ReplyCounter::start(&cluster.node(others[0]).url()).await;
    let client = client(&cluster.node(others[1]).url(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let load = open_loop(&client, 3000, RATE, answered.clone());
    wait_for(&answered, 1000).await;
    cluster.node_mut(doomed).stop();
    let fault = Instant::now();
    let outcomes = load.await.unwrap();
    report(
        &format!(
            "SIGKILL of the stream leader ({stream_leader}; consumer leader {consumer_leader})"
        ),
        &outcomes,
        &client,
        &counter,
        fault,
        &[&first, &second],
    );
    // A new leader took over on a surviving node.
    let (new_leader, _) = leaders(&cluster.node(others[0]).url()).await;
    assert_ne!(new_leader, stream_leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_under_load_loses_nothing() {
    let _turn = TURN.lock().await;
    let cluster = NatsCluster::start(3);
    // Processors and producer are given every node, as a deployment's clients would be.
    let first = processor(&cluster.urls(), "jetstream", &[]);
    let second = processor(&cluster.urls(), "jetstream", &[]);
    leaders(&cluster.node(0).url()).await;
    let counter = ReplyCounter::start(&cluster.urls()).await;
    let client = client(&cluster.urls(), Transport::Jetstream).await;
    let answered = Arc::new(AtomicUsize::new(0));
    // Load until the last node is back, and 5 s more.
    let rolled_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let until = rolled_at.clone();
    let load = open_loop_while(&client, RATE, answered.clone(), move |_| {
        until
            .get()
            .is_none_or(|rolled| rolled.elapsed() < Duration::from_secs(5))
    });
    wait_for(&answered, 500).await;
    // As an operator would: one node at a time (SIGTERM, start), the next once the cluster
    // is healthy again.
    let fault = Instant::now();
    let rolled = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let mut took = Vec::new();
        for i in 0..cluster.len() {
            let began = Instant::now();
            cluster.node_mut(i).restart_gracefully();
            cluster.wait_healthy(Duration::from_secs(60));
            took.push(began.elapsed());
        }
        (cluster, took)
    });
    let (_cluster, took) = rolled.await.unwrap();
    rolled_at.set(Instant::now()).unwrap();
    let outcomes = load.await.unwrap();
    println!("rolling restart: each node back and healthy after {took:?}");
    report(
        "rolling restart of n1, n2, n3",
        &outcomes,
        &client,
        &counter,
        fault,
        &[&first, &second],
    );
}

/// The producer CLI as a user runs it against a cluster: 3,000 lines, processors on node 1,
/// the CLI on node 2, node 1 SIGKILLed 2 s in. Every line is printed with its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_cli_prints_every_line_when_a_node_is_killed() {
    let _turn = TURN.lock().await;
    let mut cluster = NatsCluster::start(3);
    let _processors = [
        processor(&cluster.node(0).url(), "jetstream", &[]),
        processor(&cluster.node(0).url(), "jetstream", &[]),
    ];
    let started = Instant::now();
    cli_through_fault(&cluster.node(1).url(), 3000, || cluster.node_mut(0).stop()).await;
    println!(
        "producer CLI, node 1 SIGKILLed 2 s in: 3000 of 3000 lines in {:?}",
        started.elapsed()
    );
}

/// `replicas = auto` on a cluster that cannot place 3 copies (here: 2 servers) creates the
/// stream with 1 and says so, rather than failing to start or making 2 (which would need
/// both servers for a quorum); the processor serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_replicas_on_a_two_node_cluster_makes_one_copy_and_says_so() {
    let _turn = TURN.lock().await;
    let cluster = NatsCluster::start(2);
    let processor = processor(&cluster.node(0).url(), "jetstream", &[]);
    let nats = async_nats::connect(cluster.node(1).url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream.get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 1);
    assert!(
        processor
            .log_line("cannot place 3 copies of the stream")
            .is_some(),
        "{}",
        processor.log()
    );
    let client = client(&cluster.node(1).url(), Transport::Jetstream).await;
    let reply = client
        .request(
            schemas::Task::Embed,
            &schemas::InferRequest::new(["two nodes"]),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.outputs,
        [schemas::Output::Text {
            text: "two nodes".into()
        }]
    );
}

/// A stream with 1 copy on a 3-node cluster (made by an older version, or while the
/// cluster could not place 3) is raised to 3, the consumer with it, by the next processor
/// that starts with `auto`; `auto` never lowers a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_replicas_raise_a_single_copy_to_three() {
    let _turn = TURN.lock().await;
    let cluster = NatsCluster::start(3);
    let first = processor(
        &cluster.node(0).url(),
        "jetstream",
        &[("PROCESSOR_JETSTREAM__REPLICAS", "1")],
    );
    let nats = async_nats::connect(cluster.node(1).url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let mut stream = jetstream.get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 1);
    let second = processor(&cluster.node(1).url(), "jetstream", &[]);
    assert!(
        second.log_line("replicas 1 -> 3").is_some(),
        "{}",
        second.log()
    );
    // The stream and the consumer settle with a leader and two followers each.
    leaders(&cluster.node(1).url()).await;
    drop(first);
}
