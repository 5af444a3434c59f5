//! The shared bus layer against a real nats-server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::publish::PublishAck;
use pushbus_shared::EventMeta;
use pushbus_shared::bus::{ConsumerSpec, Delivery, HandleError, Handler, Publisher};
use pushbus_shared::names::{self, headers};
use pushbus_shared::proto::GitPushEvent;
use pushbus_shared::testkit::{self, NatsServer};

use crate::fixtures::{pushes_bus, spawn_consumer, stream_messages};
use crate::poll::until;

fn push(project_id: i64, n: u32) -> GitPushEvent {
    GitPushEvent {
        project_id,
        part: n,
        ..Default::default()
    }
}

/// Stores push `n` of `project` on the project's subject, as a fresh event.
async fn publish_push(publisher: &Publisher, project: i64, n: u32) -> PublishAck {
    let subject = names::push_subject(project, "test");
    let meta = EventMeta::fresh("c");
    publisher
        .publish(subject, &push(project, n), &meta)
        .await
        .unwrap()
}

fn spec() -> ConsumerSpec {
    let mut s = ConsumerSpec::new(names::STREAM_PUSHES, "test");
    s.backoff_base = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(50);
    s.max_deliver = 3;
    s.concurrency = 4;
    s
}

/// Records every delivery; fails according to `fail`.
type FailWhen = dyn Fn(&Delivery<GitPushEvent>) -> Option<HandleError> + Send + Sync;

#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Vec<(i64, u32, i64)>>>,
    fail: Arc<FailWhen>,
    in_flight: Arc<Mutex<(usize, usize)>>,
    delay: Duration,
}

impl Recorder {
    fn new(
        fail: impl Fn(&Delivery<GitPushEvent>) -> Option<HandleError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            seen: Default::default(),
            fail: Arc::new(fail),
            in_flight: Default::default(),
            delay: Duration::ZERO,
        }
    }
    fn seen(&self) -> Vec<(i64, u32, i64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler<GitPushEvent> for Recorder {
    async fn handle(&self, d: Delivery<GitPushEvent>) -> Result<(), HandleError> {
        {
            let mut f = self.in_flight.lock().unwrap();
            f.0 += 1;
            f.1 = f.1.max(f.0);
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay * (d.message.part % 3)).await;
        }
        self.in_flight.lock().unwrap().0 -= 1;
        self.seen
            .lock()
            .unwrap()
            .push((d.message.project_id, d.message.part, d.delivered));
        match (self.fail)(&d) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[tokio::test]
async fn republished_event_id_is_dropped_by_the_stream() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let meta = EventMeta::deterministic("c1", &["same push"]);
    let first = publisher
        .publish(names::push_subject(1, "test"), &push(1, 1), &meta)
        .await
        .unwrap();
    let again = publisher
        .publish(names::push_subject(1, "test"), &push(1, 1), &meta)
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(stream_messages(&js, names::STREAM_PUSHES).await, 1);
}

#[tokio::test]
async fn retryable_error_is_redelivered_then_acked() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let rec = Recorder::new(|d| {
        (d.delivered == 1).then(|| HandleError::Retryable("dependency down".into()))
    });
    let running = spawn_consumer(&js, spec(), rec.clone());
    publish_push(&publisher, 5, 1).await;
    until("second delivery", async || rec.seen().len() == 2).await;
    assert_eq!(rec.seen(), vec![(5, 1, 1), (5, 1, 2)]);
    running.stop().await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream("test", names::STREAM_PUSHES)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    assert_eq!(stream_messages(&js, names::STREAM_DLQ).await, 0);
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_rest_flows() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    // Project 3 always fails (retryable), project 4 fails permanently.
    let rec = Recorder::new(|d| match d.message.project_id {
        3 => Some(HandleError::Retryable("still down".into())),
        4 => Some(HandleError::Permanent("invalid".into())),
        _ => None,
    });
    let running = spawn_consumer(&js, spec(), rec.clone());
    let client = testkit::client(&nats).await;
    // Undecodable bytes on the same subject as good messages.
    js.publish(names::push_subject(1, "test"), "not protobuf \u{ff}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    client.flush().await.unwrap();
    publish_push(&publisher, 1, 1).await;
    publish_push(&publisher, 3, 1).await;
    publish_push(&publisher, 4, 1).await;
    publish_push(&publisher, 1, 2).await;

    until("three dead letters", async || {
        let seen = rec.seen();
        seen.iter().filter(|s| s.0 == 3).count() == 3 && seen.iter().any(|s| s.0 == 1 && s.1 == 2)
    })
    .await;
    until("three messages in the DLQ", async || {
        stream_messages(&js, names::STREAM_DLQ).await == 3
    })
    .await;
    let dlq = js.get_stream(names::STREAM_DLQ).await.unwrap();
    let mut reasons = Vec::new();
    for seq in 1..=3 {
        let m = dlq.get_raw_message(seq).await.unwrap();
        assert_eq!(
            m.headers.get(headers::DLQ_STREAM).unwrap().as_str(),
            names::STREAM_PUSHES
        );
        assert_eq!(
            m.headers.get(headers::DLQ_CONSUMER).unwrap().as_str(),
            "test"
        );
        reasons.push(
            m.headers
                .get(headers::DLQ_REASON)
                .unwrap()
                .as_str()
                .to_owned(),
        );
    }
    reasons.sort();
    assert!(
        reasons[0].starts_with("max_deliveries: still down"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("permanent: invalid"), "{reasons:?}");
    assert!(
        reasons[2].starts_with("undecodable_envelope"),
        "{reasons:?}"
    );
    // Good messages of the poisoned subject were handled, in order.
    let ones: Vec<u32> = rec
        .seen()
        .iter()
        .filter(|s| s.0 == 1)
        .map(|s| s.1)
        .collect();
    assert_eq!(ones, vec![1, 2]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_in_order_different_keys_in_parallel() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let mut rec = Recorder::new(|_| None);
    rec.delay = Duration::from_millis(2);
    let mut s = spec();
    s.concurrency = 8;
    let running = spawn_consumer(&js, s, rec.clone());
    let mut pending = Vec::new();
    for n in 1..=40u32 {
        for project in 1..=8i64 {
            let sent = publisher
                .send(
                    names::push_subject(project, "test"),
                    &push(project, n),
                    &EventMeta::fresh("c"),
                )
                .await
                .unwrap();
            pending.push(sent);
        }
    }
    for p in pending {
        p.wait().await.unwrap();
    }
    until("all 320 handled", async || rec.seen().len() == 320).await;
    let mut per_key: HashMap<i64, Vec<u32>> = HashMap::new();
    for (project, n, _) in rec.seen() {
        per_key.entry(project).or_default().push(n);
    }
    for (project, ns) in per_key {
        assert_eq!(
            ns,
            (1..=40).collect::<Vec<_>>(),
            "project {project} out of order"
        );
    }
    let max_parallel = rec.in_flight.lock().unwrap().1;
    assert!(max_parallel > 1, "keys were never handled in parallel");
    running.stop().await;
}

#[tokio::test]
async fn stored_events_survive_a_killed_and_restarted_server() {
    let mut nats = NatsServer::start();
    let (_, publisher) = pushes_bus(&nats).await;
    let ack = publish_push(&publisher, 9, 1).await;
    nats.kill();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats.port())).is_err(),
        "server still up after kill"
    );
    nats.start_again();
    let js = jetstream::new(testkit::client(&nats).await);
    let stream = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    let stored = stream.get_raw_message(ack.sequence).await.unwrap();
    let env = pushbus_shared::envelope::decode(&stored.payload).unwrap();
    let event: GitPushEvent = pushbus_shared::envelope::open(&env).unwrap();
    assert_eq!(event.project_id, 9);
    assert_eq!(
        stored
            .headers
            .get(headers::CORRELATION_ID)
            .unwrap()
            .as_str(),
        "c"
    );
    nats.restart();
    assert_eq!(
        stream_messages(
            &jetstream::new(testkit::client(&nats).await),
            names::STREAM_PUSHES
        )
        .await,
        1
    );
}
